"""The suite specification: which models to train, quantize, pack, evaluate and benchmark.

A spec is a TOML file (presets live in `spectra/suite/presets/`):

    [suite]
    name = "tiny"
    sizes = ["tiny", "5m", "20m"]          # named sizes (spectra.config.SIZES)
    families = ["floatlm", "trilm"]        # families, or variants defined below
    quant_bits = [3, 4, 6, 8]              # GPTQ QuantLMs made from every FloatLM
    pack_formats = ["tq2", "tq1"]          # packed copies of every ternary model
    tokens = 2e5                           # training tokens per model: one number, or a table per size
    data = "builtin"                       # any spectra.data source
    tokenizer = "builtin"                  # 'builtin', 'bpe:N', or a tokenizer.json
    tasks = ["ppl", "cloze"]               # spectra eval task names
    seeds = [0]
    bench = true                           # measure decode speed of the largest size of each kind

    [model]      # ModelConfig overrides for every model (e.g. max_seq_len; quantizer fields: every TriLM's)
    [train]      # TrainConfig overrides for every model (e.g. precision = "bf16")
    [quantize]   # spectra.ptq.pipeline.quantize keyword arguments (n_samples, seq_len, group_size, ...)
    [eval]       # spectra.eval.evaluate keyword arguments (limit, batch_size, ppl_max_tokens, ...)
    [bench]      # spectra.inference.bench keyword arguments (prompt_len, gen_len, threads)
    [variants.bilm]                        # an extra "family": a base family plus model/train overrides
    family = "trilm"
    model = { quantizer = "bilm" }
    [variants.converted]                   # a run that starts from another run of the plan (same size and seed):
    family = "trilm"                       # `init` = the family/variant whose final model it starts from (FloatLM ->
    init = "floatlm"                       # TriLM conversion, fine-tuning); `teacher` = the one it distils from;
    teacher = "floatlm"                    # train = { tokens = 2e5 } gives a variant its own budget
    train = { tokens = 2e5, quant_warmup_tokens = 5e4 }
    [sizes.s1]                             # a size of this study's own (ModelConfig fields), beside the named ones
    dim = 128
    n_layers = 2
    n_heads = 2
    glu_dim = 384
    [lr.floatlm]                           # peak learning rate per family (or variant) and size, e.g. from a sweep;
    s1 = 3e-3                              # TriLM: a number (lr2 = LR2_RATIO·lr after the drop) or [lr, lr2]
    [contrasts]                            # a named linear contrast of mean validation losses, per size, with its
    "lr drop x wd removal" = { trilm = 1, trilm_no_drop = -1, trilm_no_wd_removal = -1, trilm_neither = 1 }
                                           # 95 % t-interval over seeds (checks.contrast_rows): weights over
                                           # families or variants, summing to zero

Everything is validated here, before any training starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from spectra.config import FAMILIES, SIZES, ModelConfig, from_name

PRESETS = ("tiny", "small", "medium", "paper", "ablations-tiny", "ablations-small", "micro", "qat-tiny")
PACK_FORMATS = ("tq2", "tq1")
MIN_STEPS = 4  # a budget that gives fewer optimizer steps than this is too small to train
SIZE_KEYS = ("dim", "n_layers", "n_heads", "glu_dim")  # what a [sizes.NAME] table must give
LR2_RATIO = 2 / 3  # TriLM's peak LR after the drop, as a fraction of the first peak (the paper's ~1.5e-3 / 2.4e-3)


@dataclass(kw_only=True)
class Variant:
    name: str
    family: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # a family/variant of the study: start from its final model (same size and seed)
    teacher: str | None = None  # a family/variant of the study: distil from its final model (same size and seed)

    def sources(self) -> list[str]:
        """The families/variants whose trained models this one needs: its init, then its teacher."""
        return list(dict.fromkeys(x for x in (self.init, self.teacher) if x is not None))


@dataclass(kw_only=True)
class SuiteSpec:
    name: str
    sizes: list[str]
    families: list[str] = field(default_factory=lambda: ["floatlm", "trilm"])
    quant_bits: list[int] = field(default_factory=lambda: [3, 4, 6, 8])
    pack_formats: list[str] = field(default_factory=lambda: ["tq2"])
    tokens: float | dict[str, float] = 1e6
    data: str = "builtin"
    tokenizer: str = "builtin"
    tasks: list[str] = field(default_factory=lambda: ["ppl", "cloze"])
    seeds: list[int] = field(default_factory=lambda: [0])
    bench: bool = True
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    quantize: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    bench_options: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, Variant] = field(default_factory=dict)
    size_table: dict[str, dict[str, Any]] = field(default_factory=dict)
    lr: dict[str, dict[str, float | list[float]]] = field(default_factory=dict)
    contrasts: dict[str, dict[str, float]] = field(default_factory=dict)
    preset: str | None = None

    def family_of(self, name: str) -> str:
        return self.variants[name].family if name in self.variants else name

    def tokens_for(self, size: str, family: str | None = None) -> float:
        """The training tokens of one run: the variant's own `train.tokens` if it sets one, else [suite] tokens."""
        if family in self.variants and "tokens" in self.variants[family].train:
            return float(self.variants[family].train["tokens"])
        if isinstance(self.tokens, dict):
            return float(self.tokens[size])
        return float(self.tokens)

    def sources(self, family: str) -> list[str]:
        """The families/variants whose trained models a run of `family` starts from or distils from."""
        return self.variants[family].sources() if family in self.variants else []

    def train_order(self) -> list[str]:
        """`families` with every run's init and teacher before it (a stable topological order)."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(f: str) -> None:
            if f not in seen:
                seen.add(f)
                for dep in self.sources(f):
                    visit(dep)
                order.append(f)

        for f in self.families:
            visit(f)
        return order

    def model_config(self, size: str, family: str) -> ModelConfig:
        base = self.family_of(family)
        overrides = dict(self.model)
        if base == "floatlm":  # a study-wide quantizer is the TriLMs'; a FloatLM variant that sets one is refused
            overrides.pop("quantizer", None), overrides.pop("quantizer_options", None)
        if family in self.variants:
            overrides.update(self.variants[family].model)
        if size in self.size_table:
            return ModelConfig(**{**self.size_table[size], "family": base, **overrides, "name": f"{family}-{size}"})
        cfg = from_name(f"{base}-{size}", **overrides)
        return cfg.replace(name=f"{family}-{size}")

    def train_overrides(self, family: str, size: str | None = None) -> dict[str, Any]:
        out = dict(self.train)
        if family in self.variants:
            out.update(self.variants[family].train)
        lr = self.lr.get(family, {}).get(size) if size is not None else None
        if lr is not None:
            lr, lr2 = (lr[0], lr[1]) if isinstance(lr, list) else (lr, lr * LR2_RATIO)
            out["lr"] = float(lr)
            if self.family_of(family) == "trilm":
                out["lr2"] = float(lr2)
        return out

    def eval_window(self) -> int:
        """The held-out window perplexity is scored in: [eval] ppl_seq_len, else the longest sequence the study's
        models train on (`spectra.train.config.resolve`; the eval step passes its model's own, `SuiteRunner`)."""
        if self.eval.get("ppl_seq_len"):
            return int(self.eval["ppl_seq_len"])
        from spectra.train.config import TrainConfig, resolve

        return max(resolve(self.model_config(s, f), TrainConfig.from_dict(
            {"tokens": 1, **{k: v for k, v in self.train_overrides(f, s).items() if k in ("seq_len", "batch_tokens")}}
        )).seq_len for s in self.sizes for f in self.families)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _err(source: str, what: str) -> ValueError:
    return ValueError(f"{source}: {what}")


_SUITE_TYPES = {  # [suite] key: (check, what it must be)
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "sizes": (lambda v: _list_of(v, str) and v, "a non-empty list of size names, e.g. [\"tiny\"]"),
    "families": (lambda v: _list_of(v, str) and v, "a non-empty list of family or variant names"),
    "quant_bits": (lambda v: _list_of(v, int), "a list of bit widths, e.g. [4]"),
    "pack_formats": (lambda v: _list_of(v, str), "a list of pack formats, e.g. [\"tq2\"]"),
    "tokens": (lambda v: _finite(v) and v > 0 or isinstance(v, dict) and all(_finite(x) and x > 0 for x in v.values()),
               "a positive number of tokens or a table of size = tokens"),
    "data": (lambda v: isinstance(v, str), "a string"),
    "tokenizer": (lambda v: isinstance(v, str), "a string"),
    "tasks": (lambda v: _list_of(v, str), "a list of task names, e.g. [\"ppl\", \"cloze\"]"),
    "seeds": (lambda v: _list_of(v, int) and v, "a non-empty list of integer seeds, e.g. [0, 1]"),
    "bench": (lambda v: isinstance(v, bool), "true or false"),
}


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _list_of(v: Any, kind: type) -> bool:
    return isinstance(v, list) and all(isinstance(x, kind) and not isinstance(x, bool) for x in v)


def _check_suite_types(suite: dict[str, Any], source: str) -> None:
    """[suite]'s keys by type: a ValueError naming the key, what it must be and the value given."""
    if "name" not in suite:
        raise _err(source, "[suite] name is required (the study's name, e.g. name = \"my-study\")")
    for key, (ok, what) in _SUITE_TYPES.items():
        if key in suite and not ok(suite[key]):
            raise _err(source, f"[suite] {key} must be {what}, got {suite[key]!r}")


def parse_spec(doc: dict[str, Any], source: str = "spec") -> SuiteSpec:
    """A validated SuiteSpec from a parsed TOML document. Errors name the table and key."""
    known_tables = {"suite", "model", "train", "quantize", "eval", "bench", "variants", "sizes", "lr", "contrasts"}
    unknown = sorted(set(doc) - known_tables)
    if unknown:
        raise _err(source, f"unknown table(s) {unknown}; accepted: {sorted(known_tables)}")
    suite = dict(doc.get("suite", {}))
    if "sizes" not in suite:
        raise _err(source, "[suite] sizes is required (e.g. sizes = ['tiny', '5m'])")
    fields = {f.name for f in dataclasses.fields(SuiteSpec)} - {"model", "train", "quantize", "eval", "bench_options",
                                                                  "variants", "size_table", "lr", "contrasts",
                                                                  "preset"}
    bad = sorted(set(suite) - fields)
    if bad:
        raise _err(source, f"unknown [suite] key(s) {bad}; accepted: {sorted(fields)}")
    _check_suite_types(suite, source)
    for table in ("model", "train", "quantize", "eval", "bench", "variants", "sizes", "lr", "contrasts"):
        if not isinstance(doc.get(table, {}), dict):
            raise _err(source, f"[{table}] must be a table, got {doc[table]!r}")
    variants = {}
    for name, v in doc.get("variants", {}).items():
        if not isinstance(v, dict):
            raise _err(source, f"[variants.{name}] must be a table (family = ..., model = {{...}}), got {v!r}")
        v = dict(v)
        extra = sorted(set(v) - {"family", "model", "train", "init", "teacher"})
        if extra:
            raise _err(source, f"[variants.{name}]: unknown key(s) {extra}; accepted: family, model, train, init, "
                               "teacher")
        if v.get("family") not in FAMILIES:
            raise _err(source, f"[variants.{name}] family must be one of {FAMILIES}, got {v.get('family')!r}")
        for key in ("init", "teacher"):
            if v.get(key) is not None and not isinstance(v[key], str):
                raise _err(source, f"[variants.{name}] {key} must name a family or variant of the study, "
                                   f"got {v[key]!r}")
        train_over = v.get("train", {})
        for key in ("init", "teacher"):
            if key in train_over:
                raise _err(source, f"[variants.{name}] train.{key}: a suite run starts from (or distils from) "
                                   f"another run of the study; write {key} = \"FAMILY\" in [variants.{name}]")
        variants[name] = Variant(name=name, family=v["family"], model=v.get("model", {}), train=train_over,
                                 init=v.get("init"), teacher=v.get("teacher"))
    size_table = {}
    for name, v in doc.get("sizes", {}).items():
        if name in SIZES:
            raise _err(source, f"[sizes.{name}]: {name!r} is a built-in size; give the study's own size another name")
        if not isinstance(v, dict) or any(k not in v for k in SIZE_KEYS):
            raise _err(source, f"[sizes.{name}] needs {', '.join(SIZE_KEYS)} (and may set other ModelConfig fields)")
        size_table[name] = dict(v)
    lrs = {}
    for fam, table in doc.get("lr", {}).items():
        if not isinstance(table, dict):
            raise _err(source, f"[lr.{fam}] must be a table of size = learning rate")
        for size, value in table.items():
            ok = _finite(value) and value > 0 or (  # not a bool: `true` was a rate of 1.0
                isinstance(value, list) and len(value) == 2 and all(_finite(x) and x > 0 for x in value))
            if not ok:
                raise _err(source, f"[lr.{fam}] {size} = {value!r}: expected a positive number or [lr, lr2]")
        lrs[fam] = dict(table)
    contrasts = {}
    for name, weights in doc.get("contrasts", {}).items():
        ok = isinstance(weights, dict) and len(weights) >= 2 and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w != 0 for w in weights.values())
        if not ok:
            raise _err(source, f"[contrasts] {name!r}: expected a table of at least two family = nonzero weight, e.g. "
                               "{ trilm_layernorm = 1, trilm = -1 }")
        if abs(sum(weights.values())) > 1e-9:
            raise _err(source, f"[contrasts] {name!r}: weights sum to {sum(weights.values()):g}; a contrast's weights "
                               "sum to zero")
        contrasts[name] = {k: float(w) for k, w in weights.items()}
    spec = SuiteSpec(
        **suite,
        model=doc.get("model", {}),
        train=doc.get("train", {}),
        quantize=doc.get("quantize", {}),
        eval=doc.get("eval", {}),
        bench_options=doc.get("bench", {}),
        variants=variants,
        size_table=size_table,
        lr=lrs,
        contrasts=contrasts,
    )
    validate(spec, source)
    return spec


def validate(spec: SuiteSpec, source: str = "spec") -> None:
    """Everything that can be checked before training: sizes, families, bits, formats, budgets, configs."""
    from spectra.train.config import TrainConfig, resolve

    for size in spec.sizes:
        if size not in SIZES and size not in spec.size_table:
            raise _err(source, f"unknown size {size!r} in [suite] sizes; accepted: {', '.join(SIZES)} or a "
                               f"[sizes.NAME] table (defined: {sorted(spec.size_table)})")
    for fam, table in spec.lr.items():
        if fam not in spec.families:
            raise _err(source, f"[lr.{fam}]: {fam!r} is not in [suite] families {spec.families}")
        for size in table:
            if size not in spec.sizes:
                raise _err(source, f"[lr.{fam}] {size}: not in [suite] sizes {spec.sizes}")
    for family in spec.families:
        if family not in FAMILIES and family not in spec.variants:
            raise _err(source, f"unknown family {family!r} in [suite] families; accepted: {list(FAMILIES)} or a "
                               f"[variants.NAME] table (defined: {sorted(spec.variants)})")
    for name, weights in spec.contrasts.items():
        missing = [f for f in weights if f not in spec.families]
        if missing:
            raise _err(source, f"[contrasts] {name!r}: {missing} not in [suite] families {spec.families}")
    _check_sources(spec, source)
    for b in spec.quant_bits:
        if not isinstance(b, int) or not 2 <= b <= 8:
            raise _err(source, f"[suite] quant_bits: {b!r} is not an integer from 2 to 8")
    for fmt in spec.pack_formats:
        if fmt not in PACK_FORMATS:
            raise _err(source, f"[suite] pack_formats: {fmt!r}; accepted: {PACK_FORMATS}")
    if isinstance(spec.tokens, dict):
        missing = [s for s in spec.sizes if s not in spec.tokens]
        if missing:
            raise _err(source, f"[suite] tokens has no budget for size(s) {missing}")
    if not spec.seeds:
        raise _err(source, "[suite] seeds is empty")
    for size in spec.sizes:
        for family in spec.families:
            try:
                cfg = spec.model_config(size, family)
                train = TrainConfig.from_dict({"tokens": spec.tokens_for(size, family),
                                               **spec.train_overrides(family, size)})
                train = resolve(cfg, train)
            except (TypeError, ValueError) as e:
                raise _err(source, f"{family}-{size}: {e}") from e
            _check_shapes(spec, cfg, f"{source}: {family}-{size}")
            steps = int(train.tokens // train.batch_tokens)
            if steps < MIN_STEPS:
                raise _err(source, f"{family}-{size}: a budget of {train.tokens:.3g} tokens is {steps} optimizer "
                                   f"step(s) of {train.batch_tokens} tokens; at least {MIN_STEPS} are needed to train "
                                   f"(raise [suite] tokens or lower [train] batch_tokens)")


def _check_sources(spec: SuiteSpec, source: str) -> None:
    """Every variant's init and teacher is a family of the study, no run depends on itself, and a run started from
    another keeps that run's shapes."""
    from spectra.train.init import SHAPE_FIELDS

    for name, v in spec.variants.items():
        for key, dep in (("init", v.init), ("teacher", v.teacher)):
            if dep is not None and dep not in spec.families:
                raise _err(source, f"[variants.{name}] {key} = {dep!r} is not in [suite] families {spec.families}")
    for name in spec.families:  # a cycle: following init/teacher links from `name` comes back to it
        stack, seen = list(spec.sources(name)), set()
        while stack:
            dep = stack.pop()
            if dep == name:
                raise _err(source, f"[variants.{name}]: its init/teacher chain leads back to {name!r}")
            if dep not in seen:
                seen.add(dep)
                stack.extend(spec.sources(dep))
    for name in spec.families:
        init = spec.variants[name].init if name in spec.variants else None
        if init is None:
            continue
        for size in spec.sizes:
            mine, theirs = spec.model_config(size, name).to_dict(), spec.model_config(size, init).to_dict()
            bad = [f for f in SHAPE_FIELDS if f != "vocab_size" and mine[f] != theirs[f]]
            if bad:
                raise _err(source, f"[variants.{name}] starts from {init!r}, whose {bad[0]} is {theirs[bad[0]]!r}; "
                                   f"a run started from another keeps its shapes (got {mine[bad[0]]!r})")


def _check_shapes(spec: SuiteSpec, cfg: ModelConfig, where: str) -> None:
    """The model's matrices fit the steps the spec asks of it: GPTQ groups divide every input width, and packed
    formats' 256-weight blocks divide every ternary row."""
    from spectra.packed.formats import QK
    from spectra.ptq.pipeline import default_group_size

    widths = {"dim": cfg.dim, "glu_dim": cfg.glu_dim, "n_heads*head_dim": cfg.attn_dim}
    if cfg.family == "floatlm":
        for b in spec.quant_bits:
            g = spec.quantize.get("group_size") or default_group_size(b)
            bad = [f"{k} = {v}" for k, v in widths.items() if g > 0 and v % g]
            if bad:
                raise ValueError(f"{where}: GPTQ at {b} bits uses groups of {g} input features, which do not divide "
                                 f"{', '.join(bad)}; choose widths that are multiples of {g} or set [quantize] "
                                 "group_size")
    elif spec.pack_formats and cfg.quantizer in ("trilm", "twn"):
        bad = [f"{k} = {v}" for k, v in widths.items() if v % QK]
        if bad:
            raise ValueError(f"{where}: packing to {'/'.join(spec.pack_formats)} needs rows in blocks of {QK} "
                             f"weights, and {', '.join(bad)} is not a multiple of {QK}; choose wider matrices or "
                             "set [suite] pack_formats = []")


def load_spec(preset: str | None = None, path: str | os.PathLike | None = None,
              overrides: dict[str, Any] | None = None) -> SuiteSpec:
    """A preset by name or a TOML file, with optional `[suite]` overrides (e.g. {"sizes": ["tiny"]})."""
    if (preset is None) == (path is None):
        raise ValueError("give exactly one of a preset name or a spec file")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; accepted: {', '.join(PRESETS)}")
        text = resources.files("spectra.suite").joinpath("presets", f"{preset}.toml").read_text()
        source = f"preset {preset}"
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"suite spec {p} does not exist")
        text, source = p.read_text(), str(p)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{source} is not valid TOML: {e}") from e
    if overrides:
        doc.setdefault("suite", {}).update(overrides)
        _narrow(doc, overrides, source)
    spec = parse_spec(doc, source)
    spec.preset = preset
    return spec


def _narrow(doc: dict[str, Any], overrides: dict[str, Any], source: str) -> None:
    """With sizes or families narrowed by an override (`--set sizes=...`), the spec's [lr] rates and [contrasts] for
    the sizes and families left out are dropped, with a note: they were refused as naming sizes or families not in the
    study, so a preset could not be run on part of its ladder (a review, 2026-12-07)."""
    import logging

    suite = doc.get("suite", {})
    sizes, families = suite.get("sizes"), suite.get("families")
    dropped = []
    if ("sizes" in overrides or "families" in overrides) and isinstance(doc.get("lr"), dict):
        for fam in list(doc["lr"]):
            table = doc["lr"][fam]
            if isinstance(families, list) and fam not in families:
                dropped.append(f"[lr.{fam}]")
                del doc["lr"][fam]
            elif isinstance(sizes, list) and isinstance(table, dict):
                for size in [x for x in table if x not in sizes]:
                    dropped.append(f"[lr.{fam}] {size}")
                    del table[size]
    if "families" in overrides and isinstance(families, list) and isinstance(doc.get("contrasts"), dict):
        for name in [n for n, w in doc["contrasts"].items() if isinstance(w, dict) and set(w) - set(families)]:
            dropped.append(f"[contrasts] {name!r}")
            del doc["contrasts"][name]
    if dropped:
        logging.getLogger(__name__).info("%s: left out with the narrowed sizes/families: %s", source,
                                         ", ".join(dropped))


def check_writable(out_dir: str | os.PathLike) -> Path:
    """Create `out_dir` if needed and prove a file can be written there, before any work starts."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OSError(f"output folder {out} is not writable: {e.strerror or e}") from e
    return out
