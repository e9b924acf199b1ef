"""Training dynamics of a run, read from its intermediate checkpoints (Spectra §3.5, App. F).

`collect(run_dir)` returns the series as data; `analyze(run_dir, out_dir)` also writes them as JSON and PNG plots
(`spectra analyze RUN_DIR`).
"""

from spectra._lazy import lazy_package

__all__ = ["analyze", "collect", "list_checkpoints", "read_metrics"]


_LAZY = {  # imported on first use: `spectra --help` and Ctrl-C at start stay clear of torch's import
    "analyze": "spectra.analysis.checkpoints",
    "collect": "spectra.analysis.checkpoints",
    "list_checkpoints": "spectra.analysis.checkpoints",
    "read_metrics": "spectra.analysis.checkpoints",
}


lazy_package(__name__)
