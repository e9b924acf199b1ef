"""Model configuration and the table of named sizes.

The nine paper sizes come from the Spectra paper's Table 3 (= the SpectraSuite README): hidden size, GLU (FFN) size,
heads, layers and the model-parallel degree (MP) the TriLMs were trained with. MP matters for TriLM: each linear layer
carries one absmean scale per model-parallel shard, so `num_scale_shards` defaults to the paper's MP for the TriLM of
that size. The vocabulary is padded to a multiple of 128 x MP (Spectra §3.1): 50304 for MP 1 and 3, 50432 for MP 2.
For the 3.9B (MP 6) we keep 50304: it reproduces the paper's parameter count (3.989B) and Table 4 better than 50688.

The small CPU sizes (`1m`, `3m`, `6m`, `tiny`, `4m`, `5m`, `20m`; the name counts non-embedding parameters) keep
hidden and FFN sizes multiples of 256 so every TriLM can be packed into llama.cpp's 256-weight blocks. `1m`, `3m` and
`6m` have one block and grow only in width: within a few hundred optimizer steps width helps and depth does not
(512-wide FloatLMs at 4e5 tokens reach 5.028 with one block and 5.034 with two).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("floatlm", "trilm")
NORMS = ("rmsnorm", "layernorm")
MLP_ACTS = ("swiglu", "gelu", "relu")
INIT_SCHEMES = ("normal", "scaled")
QUANTIZERS = ("trilm", "bilm", "bitnet158", "twn", "uniform")


def check_seed(seed: int, what: str) -> None:
    """A seed spectra can use everywhere: 0..2^63-1 (a larger one failed "Overflow when unpacking long long" in torch,
    after a training run's data preparation)."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"{what} must be in 0..2^63-1, got {seed}")


def dataclass_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """`cls(**d)` with an error that names every unknown field and lists the accepted ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; accepted: {sorted(known)}")
    return cls(**d)


_KINDS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
          "list[str]": "a list of strings", "dict[str, Any]": "a table (mapping)"}


def check_field_types(obj: Any, prefix: str) -> None:
    """Each field of dataclass `obj` against its annotation (`int`, `float`, `bool`, `str`, `list[str]`,
    `dict[str, Any]`, each optionally `| None`): a ValueError naming `prefix.field`, what it must be and the value
    given. An integral float is taken for an int field (2e9 from a command line); floats must be finite."""
    for f in dataclasses.fields(obj):
        kind = str(f.type).replace(" | None", "")
        if kind not in _KINDS:
            continue
        v = getattr(obj, f.name)
        if v is None and str(f.type).endswith("| None"):
            continue
        ok = False
        if kind == "bool":
            ok = isinstance(v, bool)
        elif kind == "int":
            if isinstance(v, float) and v.is_integer():
                v = int(v)
                setattr(obj, f.name, v)
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif kind == "float":
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        elif kind == "str":
            ok = isinstance(v, str)
        elif kind == "list[str]":
            ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        else:
            ok = isinstance(v, dict)
        if not ok:
            none = " (or null for the default)" if str(f.type).endswith("| None") else ""
            raise ValueError(f"{prefix}.{f.name} must be {_KINDS[kind]}{none}, got {v!r}")


@dataclass(kw_only=True)
class ModelConfig:
    """A Llama-style decoder. FloatLM and TriLM differ only in `family` (which linear layer the blocks use)."""

    dim: int
    n_layers: int
    n_heads: int
    glu_dim: int
    family: str = "floatlm"
    vocab_size: int = 50304
    head_dim: int | None = None  # None: dim // n_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    norm: str = "rmsnorm"
    mlp_act: str = "swiglu"
    init_std: float = 0.02
    # "normal": every matrix ~ N(0, init_std²) (HF Llama). "scaled": the same, except each residual branch's output
    # projection (o_proj, down_proj) ~ N(0, init_std² / (2 · n_layers)), the scaled init of GPT-2, Megatron and
    # GPT-NeoX; the paper does not state its scheme (docs/init-scheme.md measures both).
    init_scheme: str = "normal"
    num_scale_shards: int = 1  # TriLM: one absmean scale per model-parallel shard of each block matrix
    bos_token_id: int = 0
    eos_token_id: int = 0
    # Weight quantizer of the quantized family (spectra.ternary): "trilm" is the paper's absmean ternary.
    quantizer: str = "trilm"
    quantizer_options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, "ModelConfig")
        for f in ("dim", "n_layers", "n_heads", "glu_dim", "vocab_size", "max_seq_len", "num_scale_shards"):
            value = getattr(self, f)  # an int: checked above
            if value <= 0:
                raise ValueError(f"ModelConfig.{f} must be a positive integer, got {value!r}")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ValueError(f"ModelConfig.head_dim must be a positive integer (or null: dim // n_heads), got "
                             f"{self.head_dim!r}")
        for f, low in (("rope_theta", "> 0"), ("norm_eps", ">= 0"), ("init_std", ">= 0")):
            value = getattr(self, f)
            if value < 0 or value == 0 and low == "> 0":
                raise ValueError(f"ModelConfig.{f} must be a finite number {low}, got {value!r}")
        for f in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, f) < self.vocab_size:
                raise ValueError(f"ModelConfig.{f} must be a token id in 0..{self.vocab_size - 1} (vocab_size "
                                 f"{self.vocab_size}), got {getattr(self, f)!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family must be one of {FAMILIES}, got {self.family!r}")
        if self.norm not in NORMS:
            raise ValueError(f"ModelConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"ModelConfig.mlp_act must be one of {MLP_ACTS}, got {self.mlp_act!r}")
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(f"ModelConfig.init_scheme must be one of {INIT_SCHEMES}, got {self.init_scheme!r}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"ModelConfig.quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.family == "floatlm" and (self.quantizer != "trilm" or self.quantizer_options):
            raise ValueError(f"ModelConfig.quantizer and quantizer_options apply to family 'trilm' only (a FloatLM's "
                             f"linears are not quantized), got quantizer={self.quantizer!r}, quantizer_options="
                             f"{self.quantizer_options!r} with family 'floatlm'")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"ModelConfig.dim ({self.dim}) is not divisible by n_heads ({self.n_heads}); "
                    "set head_dim explicitly or choose n_heads dividing dim"
                )
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.family == "trilm":
            # q/k/v/gate/up are split along their output dimension, o/down along their input dimension.
            # (No matrix is split along dim: a 3-way split of a 256-wide model with 3 heads of 64 is valid.)
            for what, size in (("glu_dim", self.glu_dim), ("n_heads*head_dim", self.attn_dim)):
                if size % self.num_scale_shards:
                    raise ValueError(
                        f"ModelConfig.num_scale_shards ({self.num_scale_shards}) must divide {what} ({size})"
                    )

    @property
    def attn_dim(self) -> int:
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return dataclass_from_dict(cls, d)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], where: Any) -> ModelConfig:
        """The `config` field of a model's metadata (`spectra.json` at `where`); a FormatError naming it when the
        field is missing or not a valid config."""
        from spectra.files import FormatError

        try:
            d = dict(meta["config"])
            if d.get("family") == "floatlm":  # written before FloatLMs refused them: they never had an effect
                d.pop("quantizer", None), d.pop("quantizer_options", None)
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: field 'config' is not a valid model config: {e}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes`; becoming a FloatLM drops the quantizer it no longer has, unless `changes` set one."""
        d = self.to_dict()
        if changes.get("family") == "floatlm":
            d.pop("quantizer"), d.pop("quantizer_options")
        d.update(changes)
        return ModelConfig.from_dict(d)


# name: (dim, glu_dim, n_heads, n_layers, paper MP, vocab, head_dim)
SIZES: dict[str, dict[str, Any]] = {
    "1m": dict(dim=256, glu_dim=512, n_heads=4, n_layers=1, mp=1, vocab_size=50304),
    "3m": dict(dim=512, glu_dim=1024, n_heads=8, n_layers=1, mp=1, vocab_size=50304),
    "6m": dict(dim=768, glu_dim=1536, n_heads=12, n_layers=1, mp=1, vocab_size=50304),
    "tiny": dict(dim=256, glu_dim=512, n_heads=4, n_layers=2, mp=1, vocab_size=50304),
    "4m": dict(dim=512, glu_dim=768, n_heads=8, n_layers=2, mp=1, vocab_size=50304),
    "5m": dict(dim=256, glu_dim=768, n_heads=4, n_layers=6, mp=1, vocab_size=50304),
    "20m": dict(dim=512, glu_dim=1280, n_heads=8, n_layers=6, mp=1, vocab_size=50304),
    "99m": dict(dim=512, glu_dim=1280, n_heads=8, n_layers=16, mp=1, vocab_size=50304),
    "190m": dict(dim=768, glu_dim=2048, n_heads=12, n_layers=16, mp=1, vocab_size=50304),
    "390m": dict(dim=1024, glu_dim=2560, n_heads=16, n_layers=24, mp=1, vocab_size=50304),
    "560m": dict(dim=1280, glu_dim=3072, n_heads=20, n_layers=24, mp=1, vocab_size=50304),
    "830m": dict(dim=1536, glu_dim=4096, n_heads=24, n_layers=24, mp=1, vocab_size=50304),
    "1.1b": dict(dim=1792, glu_dim=5120, n_heads=28, n_layers=24, mp=2, vocab_size=50432),
    "1.5b": dict(dim=2048, glu_dim=6144, n_heads=32, n_layers=24, mp=2, vocab_size=50432),
    "2.4b": dict(dim=2304, glu_dim=7680, n_heads=36, n_layers=30, mp=3, vocab_size=50304),
    "3.9b": dict(dim=3072, glu_dim=9216, n_heads=24, n_layers=30, mp=6, vocab_size=50304),
}
PAPER_SIZES = ("99m", "190m", "390m", "560m", "830m", "1.1b", "1.5b", "2.4b", "3.9b")


def size_names() -> list[str]:
    return [f"{family}-{size}" for size in SIZES for family in FAMILIES]


def from_name(name: str, **overrides: Any) -> ModelConfig:
    """`floatlm-99m`, `trilm-3.9b`, `trilm-tiny`, ... -> ModelConfig. Overrides replace any field."""
    key = name.strip().lower()
    family, _, size = key.partition("-")
    if family not in FAMILIES or size not in SIZES:
        raise ValueError(f"unknown model size {name!r}; accepted: {', '.join(size_names())}")
    spec = dict(SIZES[size])
    mp = spec.pop("mp")
    cfg: dict[str, Any] = dict(spec, family=family, name=key)
    cfg["num_scale_shards"] = mp if family == "trilm" else 1
    cfg.update(overrides)
    return dataclass_from_dict(ModelConfig, cfg)


def pad_vocab(n_tokens: int, model_parallel: int = 1) -> int:
    """The paper pads the embedding to a multiple of 128 x MP."""
    multiple = 128 * model_parallel
    return -(-n_tokens // multiple) * multiple
