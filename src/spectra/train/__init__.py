"""Pretraining: `train(model_cfg, train_cfg, out_dir=...)`, its config, schedules, checkpoints and distribution."""

from spectra._lazy import lazy_package

__all__ = ["Schedule", "TrainConfig", "TrainingDiverged", "build_configs", "load_run_file", "make_schedule",
           "resolve", "train"]


_LAZY = {  # imported on first use: `spectra --help` and Ctrl-C at start stay clear of torch's import
    "TrainConfig": "spectra.train.config",
    "build_configs": "spectra.train.config",
    "load_run_file": "spectra.train.config",
    "resolve": "spectra.train.config",
    "Schedule": "spectra.train.schedule",
    "make_schedule": "spectra.train.schedule",
    "TrainingDiverged": "spectra.train.trainer",
    "train": "spectra.train.trainer",
}


lazy_package(__name__)
