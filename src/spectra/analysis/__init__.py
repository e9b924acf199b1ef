"""Training dynamics of a run, read from its intermediate checkpoints (Spectra §3.5, App. F).

`collect(run_dir)` returns the series as data; `analyze(run_dir, out_dir)` also writes them as JSON and PNG plots
(`spectra analyze RUN_DIR`).
"""

from spectra.analysis.checkpoints import analyze, collect, list_checkpoints, read_metrics

__all__ = ["analyze", "collect", "list_checkpoints", "read_metrics"]
