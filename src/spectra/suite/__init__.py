"""The suite: one command reproduces the Spectra study at any scale (train, quantize, pack, evaluate, fit, report).

    load_spec(preset | path)  spec.py     the TOML spec and its presets (presets/*.toml)
    run_suite(spec, out_dir)  runner.py   resumable steps recorded in results.jsonl
    fit_power_law, pareto_front  scaling.py
    build_report(results)     report.py   Markdown + self-contained HTML + PNG figures
    arms, comparisons         conversion.py  runs started from other runs (qat-tiny): loss, compute, verdicts
"""

from spectra._lazy import lazy_package

__all__ = ["PRESETS", "SuiteSpec", "build_report", "fit_power_law", "load_spec", "pareto_front", "plan", "run_suite"]


_LAZY = {  # imported on first use: `spectra --help` and Ctrl-C at start stay clear of torch's import
    "build_report": "spectra.suite.report",
    "plan": "spectra.suite.runner",
    "run_suite": "spectra.suite.runner",
    "fit_power_law": "spectra.suite.scaling",
    "pareto_front": "spectra.suite.scaling",
    "PRESETS": "spectra.suite.spec",
    "SuiteSpec": "spectra.suite.spec",
    "load_spec": "spectra.suite.spec",
}


lazy_package(__name__)
