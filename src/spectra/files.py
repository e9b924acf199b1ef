"""Files on disk, at the bottom of the house: atomic writes, JSON and safetensors reads that fail with one clear line.

Every reader in spectra turns a broken file (truncated or corrupt safetensors, invalid JSON, a missing file, a
pickle-only checkpoint) into a `FormatError` that names the file and says what is wrong; the CLI prints it as one
line and exits with code 2. Every writer goes through `atomic_dir` / `atomic_file`: a temporary name in the same
folder, renamed into place on success, so an interrupted write never leaves half a file behind.

A spectra model directory holds `model.safetensors`, `spectra.json` (`{"format": "spectra", "kind": ...}`) and,
when the model has one, `tokenizer.json`. This module knows those names; what each kind means lives with its loader
(`spectra.loading`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

META_FILE = "spectra.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.50 saves a tokenizer's chat template
PICKLE_FILES = ("pytorch_model.bin", "model.pt", "model.pth", "pytorch_model.bin.index.json")

# bytes per element of each safetensors dtype
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4,
    "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


class FormatError(ValueError):
    """A file spectra reads is missing, truncated, corrupt or of a kind it does not accept. The message names the file
    and the problem in one line."""


def _temporary(out: Path, make: Any) -> Any:
    """make() (a temporary name beside `out`) after creating out's folder and removing the temporaries a killed
    writer of `out` left there (`_sweep_stale`); an OSError names `out`, not the temporary name the user never gave."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale(out)
        return make()
    except OSError as e:
        raise OSError(f"cannot write {out}: {e.strerror or e}") from None


def temporary_name(out: str | os.PathLike, suffix: str) -> Path:
    """A temporary path beside `out` for a writer that names its own (the GGUF writer opens the file itself), in
    the form `_sweep_stale` removes once its process is gone; out's folder is created first."""
    out = Path(out)
    return _temporary(out, lambda: out.parent / f"{_prefix(out, 'tmp')}{suffix}")


def _prefix(out: Path, kind: str) -> str:
    """The start of a temporary name beside `out`: hidden, the writer's kind ("tmp" or "old"), its machine and its
    process id, so that a later writer on the same machine can tell a dead writer's leftovers from a live one's (on a
    shared file system another machine's process ids mean nothing here: those are left alone)."""
    return f".{out.name}.{kind}-{_host_tag()}{os.getpid()}-"


@functools.cache
def _host_tag() -> str:
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _sweep_stale(out: Path) -> None:
    """Remove `.OUT.tmp-PID-*` / `.OUT.old-PID-*` beside `out` whose process is gone on this machine: what a writer
    killed by SIGKILL (or a power cut) left, a whole model's copy each, which nothing removed before. A live
    process's (another writer of the same name) is left alone."""
    sweep_stale_in(out.parent, re.escape(out.name))


def sweep_stale_in(folder: str | os.PathLike, name: str = ".+") -> None:
    """`_sweep_stale` for every name (a regular expression) in `folder`."""
    pattern = re.compile(rf"\.{name}\.(?:tmp|old)-([0-9a-f]{{8}})(\d+)-")
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for p in entries:
        m = pattern.match(p.name)
        if not m or m.group(1) != _host_tag() or _alive(int(m.group(2))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def discard_dir(path: str | os.PathLike) -> None:
    """Delete the folder `path` so that no kill leaves part of it under its own name: renamed first to a temporary
    name that `sweep_stale_in` removes if this process dies before the deletion ends (a half-deleted checkpoint kept
    its name and broke every later resume)."""
    path = Path(path)
    gone = path.parent / f"{_prefix(path, 'old')}discard"
    try:
        os.rename(path, gone)
    except FileNotFoundError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM): alive
        return True
    return True


WRITTEN_MARKS = (META_FILE, "config.json")
"""Files that mark a folder as a model's (spectra's, a Hugging Face model's)."""
MODEL_SUFFIXES = (".safetensors", ".json", ".jinja", ".pt", ".model")
"""What a model folder holds: weights, configs and tokenizers, a chat template, a trainer state."""
BOTH_FORMATS = ("gptq", "unpacked")  # the two model folders of `spectra quantize --format both`


def _model_folder(path: Path) -> bool:
    """A folder a model writer made: a mark, and nothing but model files (a Hugging Face clone's README.md, .git or
    notes make it someone's folder, which replacing would delete)."""
    entries = list(path.iterdir())
    return any(e.name in WRITTEN_MARKS for e in entries) and all(
        e.is_file() and e.suffix in MODEL_SUFFIXES for e in entries)


def _data_folder(path: Path) -> bool:
    """A folder spectra's data writers made: their manifest.json (the builtin corpus's `works`, the offline
    benchmarks' `tasks`)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and ("works" in manifest or "tasks" in manifest)


def _check_replaceable(out: Path) -> None:
    """A FileExistsError when `out` is a folder whose files replacing it would delete: neither empty, nor a model
    folder (`_model_folder`) or data folder a writer made, nor the `gptq/` + `unpacked/` pair of `quantize --format
    both`. A folder holding other model folders is someone's collection, not a model: it is refused."""
    entries = sorted(out.iterdir())
    if not entries or _model_folder(out) or _data_folder(out) or all(
            e.name in BOTH_FORMATS and e.is_dir() and _model_folder(e) for e in entries):
        return
    names = ", ".join(e.name for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise FileExistsError(f"{out} exists and holds other files ({names}); writing there would delete them: give a new "
                          "or empty directory, or one holding only a model to replace")


@functools.cache
def _umask() -> int:
    """The process's umask, read once (reading it means setting it, which is not safe beside threads that create
    files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_modes(folder: Path) -> None:
    """mkdtemp/mkstemp make a folder 0700 and files 0600; give the written tree the modes the umask gives a plain
    mkdir or open (typically 0755 / 0644), so another user (a server's) can read the model."""
    umask = _umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` in one rename. An existing
    `out_dir` is replaced only when empty or written by a model/data writer (`_check_replaceable`)."""
    out = Path(out_dir)
    check_output_dir(out)
    tmp = _temporary(out, lambda: Path(tempfile.mkdtemp(prefix=_prefix(out, "tmp"), dir=out.parent)))
    old = None
    try:
        yield tmp
        _publish_modes(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(out, "old"), dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        # an interrupt between the two renames: the previous version goes back (it was left in the hidden folder,
        # which the next writer's sweep would then delete: neither version kept)
        if old is not None and (old / "x").exists() and not out.exists():
            with contextlib.suppress(OSError):
                os.rename(old / "x", out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(out_dir: str | os.PathLike) -> None:
    """What `atomic_dir` would refuse, found before the work that fills `out_dir`: a file there, or a folder whose
    other files replacing it would delete."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir():
        _check_replaceable(out)


def refuse_replacing_source(out: str | os.PathLike, source: str | os.PathLike) -> None:
    """A ValueError when writing the folder `out` (which `atomic_dir` replaces whole) would delete the model being
    read from `source`: the same folder, or one that holds it."""
    o, src = Path(out).resolve(), Path(source).resolve()
    if o == src or o in src.parents:
        raise ValueError(f"output {out} {'is' if o == src else 'holds'} the input model {source}: writing it would "
                         "replace the input; choose another output directory")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) while the block runs: processes that build the same
    cached folder take turns. Advisory (fcntl) on POSIX; where fcntl is missing the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent builders of one cache folder are not supported
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside `path` for writing; it is flushed, fsynced and renamed onto `path` on success."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name to write")
    fd, tmp = _temporary(path, lambda: tempfile.mkstemp(prefix=_prefix(path, "tmp"), dir=path.parent))
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 otherwise
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def finite_json(obj: Any) -> Any:
    """`obj` with every non-finite float as None: RFC 8259 JSON has no Infinity or NaN, which `json.dump` writes and
    strict readers (JavaScript's JSON.parse, jq, Go, Rust's serde_json) refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """A file path that `atomic_file` can write, checked before the work that fills it: not a folder, and its folder
    exists and takes a file, or can be created. A ValueError names the path otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name")
    base = path.parent.absolute()
    while not base.exists():  # the writer creates missing folders: the nearest existing one must take them
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"{what} {path}: {base} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".spectra-write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"{what} {path}: {base} is not writable ({e.strerror or e})") from None
    return path


def read_json(path: str | os.PathLike, what: str = "a JSON file") -> Any:
    """Parse a JSON file; a missing or invalid file is a FormatError naming it and `what` it should be."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FormatError(f"{path} is missing (expected {what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} cannot be read as {what}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path} is not valid JSON ({e}); expected {what}") from None


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `spectra.json` of a model directory, checked to be a spectra meta file."""
    meta_path = Path(path) / META_FILE
    meta = read_json(meta_path, "spectra's model metadata")
    if not isinstance(meta, dict) or meta.get("format") != "spectra":
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise FormatError(f"{meta_path} has format={found!r}, expected 'spectra'")
    return meta


def find_tokenizer(path: str | os.PathLike) -> Path | None:
    """The tokenizer.json stored with a model directory, if any."""
    p = Path(path) / TOKENIZER_FILE
    return p if p.exists() else None


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a safetensors file, checked against the file's size: every tensor's byte range must lie inside
    the file and match its dtype and shape. Reads only the header. A FormatError names what is wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise FormatError(f"{path} is truncated or not safetensors: its header claims {n} bytes, the file "
                                  f"has {size}")
            raw = f.read(n)
    except FileNotFoundError:
        raise FormatError(f"{path} is missing") from None
    except IsADirectoryError:
        raise FormatError(f"{path} is a folder; expected a safetensors file") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FormatError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path} is corrupt: its safetensors header is not a JSON object")
    data = size - 8 - n
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = t["data_offsets"]
            nbytes = SAFETENSORS_DTYPE_BYTES[t["dtype"]] * _prod(t["shape"])
            if not (_index(begin) and _index(end) and begin <= end):
                raise ValueError(t["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path} is corrupt: tensor {name!r} has an invalid header entry") from None
        if end - begin != nbytes:
            raise FormatError(f"{path} is corrupt: tensor {name!r} spans {end - begin} bytes, its dtype and shape "
                              f"need {nbytes}")
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):  # safetensors lays tensors end to end from 0, as its reader requires
        if begin != at:
            raise FormatError(f"{path} is corrupt: tensor {name!r} starts at byte {begin} of the data, where the "
                              f"tensors before it end at {at}")
        at = end
    if at > data:  # (end to end, the last tensor's end is where the data ends)
        raise FormatError(f"{path} is truncated: its tensors need {at} bytes of data, the file holds {data}")
    if at < data:  # safetensors refuses a file its tensors do not fully cover
        raise FormatError(f"{path} is corrupt: {data - at} bytes follow its tensors' data")
    return header


def _index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        if not isinstance(d, int) or d < 0:
            raise ValueError(d)
        n *= d
    return n


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, where a failed write (disk full, file too large) is the OSError behind it:
    safetensors raises its own SafetensorError ("I/O error: ... (os error 28)"), which no caller took for one."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        found = re.search(r"os error (\d+)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to `path`, where a failed write is the OSError behind it: torch's zip writer reports one as a
    RuntimeError ("[enforce fail at inline_container.cc:672] . unexpected pos ...")."""
    import torch

    class Writer:  # torch.save writes through it, so the first OSError is kept
        def __init__(self, f) -> None:
            self.f, self.error = f, None

        def write(self, b) -> int:
            try:
                return self.f.write(b)
            except OSError as e:
                self.error = self.error or e
                raise

        def flush(self) -> None:
            self.f.flush()

    with open(path, "wb") as f:
        writer = Writer(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """All tensors of a safetensors file, after `safetensors_header` has checked it is whole."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safetensors_header(path)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path} cannot be read as safetensors: {e}") from None


def refuse_pickle(path: str | os.PathLike) -> None:
    """A directory whose weights exist only as pickles is refused: spectra never unpickles (a pickle can run code)."""
    path = Path(path)
    found = [name for name in PICKLE_FILES if (path / name).exists()]
    if found and not any(path.glob("*.safetensors")):
        raise FormatError(
            f"{path / found[0]} is a pickle checkpoint, which spectra never loads (unpickling can run code); convert "
            "it to safetensors first, e.g. transformers' `AutoModelForCausalLM.from_pretrained(d)."
            "save_pretrained(out, safe_serialization=True)`"
        )
