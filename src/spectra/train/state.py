"""Run directories and resumable checkpoints.

    RUN_DIR/run.json                    {"model": ModelConfig, "train": TrainConfig (resolved), "tokenizer_sha256"}
    RUN_DIR/metrics.jsonl               one JSON object per logged step, plus {"split": "val", ...} lines
    RUN_DIR/checkpoints/step_%08d/      spectra.json ("step", "tokens", "data_position", "milestone", "train"),
                                        tokenizer.json, trainer_state.pt (loss scaler, RNG states, counters) and
        dcp/                            model and optimizer state, torch.distributed.checkpoint (sharded)
        model.safetensors               the model too, where one rank holds it whole (one process, DDP): such a
                                        checkpoint is also a spectra model dir
    RUN_DIR/final/                      the final model dir (single file, every parallelism)

Distributed checkpoints: every rank writes its own shards of the model and optimizer (FSDP: its DTensor shards; DDP:
replicated tensors are written once) with `torch.distributed.checkpoint`, so no rank gathers the whole model or
optimizer. DCP stores each tensor's global shape, so a checkpoint loads into any world size and parallelism (2 FSDP
ranks -> 1 process, 1 -> 2): each rank reads the parts of the files its shards cover. Older checkpoints (the
optimizer inside trainer_state.pt, no dcp/) still load.

Each checkpoint is written to a temporary folder and renamed into place, so a crash or a full disk leaves the previous
checkpoints as they were. Retention keeps the newest `ckpt_keep` checkpoints plus every milestone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spectra.checkpoint import save_model
from spectra.config import ModelConfig
from spectra.files import (
    META_FILE,
    FormatError,
    atomic_dir,
    discard_dir,
    load_safetensors,
    read_meta,
    sweep_stale_in,
    torch_save,
)
from spectra.model import empty_model

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CKPT_DIR = "checkpoints"
DCP_DIR = "dcp"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CKPT_DIR / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary folders of interrupted writes are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).exists()
            and (p / META_FILE).exists()]  # (a checkpoint is renamed into place whole: both, or not one)
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    *,
    tokenizer: Path | None,
) -> Path:
    """Write checkpoint `step_<meta.step>` atomically. A failed write (e.g. ENOSPC) raises OSError naming the
    checkpoint and the previous one, which is left intact."""
    out = step_dir(run_dir, meta["step"])
    previous = list_checkpoints(run_dir)
    try:
        with atomic_dir(out) as tmp:
            save_model(model, tmp, tokenizer=tokenizer, meta=meta)
            torch_save(trainer_state, tmp / STATE_FILE)
    except OSError as e:
        keep = previous[-1].name if previous else "none"
        raise OSError(e.errno, f"writing checkpoint {out} failed: {e.strerror or e}; "
                               f"the previous checkpoint ({keep}) is intact") from e
    return out


def save_distributed_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    *,
    tokenizer: Path | None,
    is_main: bool,
    barrier,
    whole_model: nn.Module | None = None,
) -> Path:
    """Collective: every rank calls it. Writes checkpoint `step_<meta.step>` with the model and optimizer state in
    `dcp/` (each rank its own shards), and on rank 0 the meta, trainer state, tokenizer and, given `whole_model` (a
    rank that holds the model whole), model.safetensors. Atomic: written to a temporary folder, renamed at the end;
    a failed write raises OSError naming the checkpoint and the previous one, which is left intact."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = step_dir(run_dir, meta["step"])
    tmp = out.parent / f".{out.name}.tmp-dcp"
    side = out.parent / f".{out.name}.tmp-model"  # rank 0's whole model, saved beside tmp and moved into it
    previous = list_checkpoints(run_dir)
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        msd, osd = get_state_dict(model, optimizer)
        with _single_process_ok():
            dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / DCP_DIR))
        if is_main:
            config = getattr(model, "module", model).config.to_dict()
            if whole_model is not None:
                shutil.rmtree(side, ignore_errors=True)  # a killed write's half-moved files (refused, forever, else)
                save_model(whole_model, side, tokenizer=tokenizer, meta=meta)
                for f in side.iterdir():
                    os.rename(f, tmp / f.name)
                side.rmdir()
            else:
                from spectra.files import write_json

                if tokenizer is not None:
                    shutil.copyfile(tokenizer, tmp / "tokenizer.json")
                write_json(tmp / META_FILE, {"format": "spectra", "kind": "checkpoint", "config": config, **meta})
            torch_save(trainer_state, tmp / STATE_FILE)
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
    except BaseException as e:
        if is_main:  # (an interrupt too: Ctrl-C or SIGTERM mid-write left the temporary folders)
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(side, ignore_errors=True)
        if not isinstance(e, (OSError, CheckpointException)):
            raise
        cause = _os_error(e)
        keep = previous[-1].name if previous else "none"
        raise OSError(cause.errno, f"writing checkpoint {out} failed: {cause.strerror or cause}; "
                                   f"the previous checkpoint ({keep}) is intact") from None
    barrier()
    return out


def _os_error(e: BaseException) -> OSError:
    """The OSError behind a failed write: DCP wraps its writers' failures in a CheckpointException (a
    BaseException) that maps ranks to (exception, traceback); torch's zip writer reports a failed write as a
    RuntimeError, given here as EIO with its text."""
    if isinstance(e, OSError):
        return e
    causes = [exc for exc, _ in getattr(e, "failures", {}).values()]
    found = next((c for c in causes if isinstance(c, OSError)), None)
    if found is not None:
        return found
    return OSError(errno.EIO, f"{os.strerror(errno.EIO)} ({causes[0] if causes else e})".splitlines()[0])


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns when it runs without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def is_distributed_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def load_sharded_model(path: Path, model: nn.Module) -> None:
    """The model state of the distributed checkpoint `path` (`save_distributed_checkpoint`, any world size and
    parallelism) into a plain, whole `model` in this one process; the optimizer state is not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    state = {"model": model.state_dict()}
    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
    except (CheckpointException, OSError, RuntimeError, ValueError) as e:  # CheckpointException: a BaseException
        raise FormatError(f"{Path(path) / DCP_DIR} cannot be read as this model's distributed checkpoint: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    model.load_state_dict(state["model"])


def load_checkpoint_model(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A distributed checkpoint directory (kind "checkpoint": the model's FSDP or tensor-parallel shards in `dcp/`,
    from any world size) as one whole latent model in this process, as `spectra.checkpoint.load_model_dir` opens a
    model directory. `spectra.load` and `train.init` open these through it."""
    path = Path(path)
    model = empty_model(ModelConfig.from_meta(read_meta(path), path / META_FILE), "cpu")
    load_sharded_model(path, model)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def load_distributed_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: load `path/dcp` into the (wrapped) model and optimizer of this run, whatever world size and
    parallelism wrote it; every rank reads only what its shards cover."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optimizer": osd}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def read_checkpoint_state(path: Path, model_cfg: ModelConfig) -> tuple[dict[str, Any], dict]:
    """(trainer state, meta) of a distributed checkpoint, after checking its model config equals `model_cfg`."""
    meta = read_meta(path)
    _check_config(path, meta, model_cfg)
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False), meta


def _check_config(path: Path, meta: dict, model_cfg: ModelConfig) -> None:
    saved = meta.get("config")
    now = model_cfg.to_dict()
    if saved != now:
        saved = saved or {}
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ValueError(f"cannot resume from {path}: its model config differs in {diff} "
                         f"(checkpoint {[saved.get(k) for k in diff]}, now {[now.get(k) for k in diff]})")


def apply_retention(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` non-milestone checkpoints. Returns what was deleted."""
    sweep_stale_in(Path(run_dir) / CKPT_DIR)  # what a killed deletion or write left
    rolling = [p for p in list_checkpoints(run_dir) if not read_meta(p).get("milestone")]
    doomed = rolling[:-keep] if keep > 0 else rolling
    for p in doomed:
        discard_dir(p)
    return doomed


def load_checkpoint(path: Path, model_cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """(model state, trainer state, meta) of a checkpoint; the model config must equal `model_cfg`."""
    meta = read_meta(path)
    _check_config(path, meta, model_cfg)
    weights = load_safetensors(path / "model.safetensors")
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return weights, state, meta


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after `step` (a resumed run logs them again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    from spectra.files import atomic_file

    with atomic_file(path) as f:
        f.write("".join(x + "\n" for x in keep))


__all__ = ["META_FILE", "apply_retention", "is_distributed_checkpoint", "list_checkpoints", "load_checkpoint",
           "load_distributed_checkpoint", "read_checkpoint_state", "rng_state", "save_checkpoint",
           "save_distributed_checkpoint", "set_rng_state", "step_dir", "truncate_metrics"]
