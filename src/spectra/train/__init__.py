"""Pretraining: `train(model_cfg, train_cfg, out_dir=...)`, its config, schedules, checkpoints and distribution."""

from spectra.train.config import TrainConfig, build_configs, load_run_file, resolve
from spectra.train.schedule import Schedule, make_schedule
from spectra.train.trainer import TrainingDiverged, train

__all__ = ["Schedule", "TrainConfig", "TrainingDiverged", "build_configs", "load_run_file", "make_schedule",
           "resolve", "train"]
