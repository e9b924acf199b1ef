"""The suite: one command reproduces the Spectra study at any scale (train, quantize, pack, evaluate, fit, report).

    load_spec(preset | path)  spec.py     the TOML spec and its presets (presets/*.toml)
    run_suite(spec, out_dir)  runner.py   resumable steps recorded in results.jsonl
    fit_power_law, pareto_front  scaling.py
    build_report(results)     report.py   Markdown + self-contained HTML + PNG figures
    arms, comparisons         conversion.py  runs started from other runs (qat-tiny): loss, compute, verdicts
"""

from spectra.suite.report import build_report
from spectra.suite.runner import plan, run_suite
from spectra.suite.scaling import fit_power_law, pareto_front
from spectra.suite.spec import PRESETS, SuiteSpec, load_spec

__all__ = ["PRESETS", "SuiteSpec", "build_report", "fit_power_law", "load_spec", "pareto_front", "plan", "run_suite"]
