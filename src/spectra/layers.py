"""The model's building blocks below the model: norms, rotary embeddings, the ternary linear layer, and the explicit
inference cache that layers with an expensive weight share.

    RMSNorm / make_norm          x / sqrt(mean(x²) + eps) · w (float32, like HF Llama); LayerNorm for the ablation
    rope_cache / apply_rope      rotary position embeddings, HF's rotate_half convention
    TernaryLinear                nn.Linear whose forward uses the quantized weight (`spectra.quantizers`), STE to W
    set_recompute_weight         ternary layers rebuild W̃ in backward instead of keeping it (training memory)
    make_linear                  the one switch between FloatLM (nn.Linear) and TriLM (TernaryLinear)
    convert_to_ternary           swap a model's block linears for TernaryLinear -> how many were swapped

**Inference caches are explicit.** A TernaryLinear's W̃ = γ·Ŵ (and an opted-in QuantLinear's dequantized weight,
`spectra.ptq.qlinear`) is worth computing once when a model only runs inference. `freeze_for_inference(model)` puts
the model in eval mode and has every such layer compute and keep it. It is dropped, never silently stale, by:
`model.train()`, `load_state_dict`, `set_exact`, any optimizer step that updates the layer's parameters (a global
optimizer hook, installed at the first freeze), and `unfreeze()`. Nothing is keyed on tensor versions or pointers:
an in-place edit of a frozen layer's weight outside those (`p.data.copy_(…)` in eval mode) is not seen until one of
them runs, which is what frozen means. Unfrozen layers in eval mode compute W̃ on every forward.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from spectra.config import ModelConfig
from spectra.quantizers import QUANTIZER_CLASSES, build_quantizer
from spectra.ternary import EPS, SHARD_DIM, dequantize, shard_rows


# ---- norms and rotary ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, computed in float32 like HF Llama."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return norm_of(cfg.norm, dim, cfg.norm_eps)


def norm_of(kind: str, dim: int, eps: float) -> nn.Module:
    """A norm over `dim` features: "layernorm" (no bias) or "rmsnorm" (`ModelConfig.norm`)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=False)
    return RMSNorm(dim, eps=eps)


def make_block_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """A block's pre-norm, or none where every linear layer normalises its own input (BitNet b1.58, `input_norm`):
    BitNet's training notes put a norm before each linear in place of the block's (paper-facts §9); kept, each
    linear's input would be normalised twice in a row."""
    if cfg.family == "trilm" and QUANTIZER_CLASSES[cfg.quantizer].input_norm:
        return nn.Identity()
    return make_norm(cfg, dim)


def rope_cache(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (max_seq_len, head_dim), halves repeated (HF's rotate_half convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D); cos/sin: (T, D) or per row (B, 1, T, D). The result keeps x's dtype (under autocast, bf16 q
    and k with float32 cos/sin would otherwise come out float32, only for attention to cast them back)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# ---- explicit inference caches ------------------------------------------------------------------------------------
_FROZEN: weakref.WeakSet = weakref.WeakSet()  # layers holding an inference cache now
_OPTIMIZER_HOOK = None


def _drop_updated(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Optimizer step post-hook: frozen layers whose parameters the optimizer holds drop their cache."""
    if not _FROZEN:
        return
    updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in list(_FROZEN):
        if any(id(p) in updated for p in layer.parameters()):
            layer.unfreeze()


class InferenceCache:
    """Mixin for a layer that can keep an expensive inference weight while frozen (module docstring). Subclasses
    implement `_build_frozen()` (the state to keep, or None to keep nothing) and read `self._frozen`."""

    _frozen = None

    def freeze(self) -> None:
        """Compute and keep the inference weight (a layer already frozen keeps what it holds)."""
        global _OPTIMIZER_HOOK
        if self._frozen is None:
            self._frozen = self._build_frozen()
        if self._frozen is not None:
            _FROZEN.add(self)
            if _OPTIMIZER_HOOK is None:
                _OPTIMIZER_HOOK = register_optimizer_step_post_hook(_drop_updated)

    def unfreeze(self) -> None:
        self._frozen = None
        _FROZEN.discard(self)

    def _build_frozen(self):
        raise NotImplementedError

    def cache_bytes(self) -> int:
        """Bytes the inference cache holds now."""
        held = self._frozen.values() if isinstance(self._frozen, dict) else (self._frozen or ())
        return sum(t.numel() * t.element_size() for t in held if isinstance(t, Tensor))

    def train(self, mode: bool = True):
        if mode:
            self.unfreeze()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.unfreeze()
        super()._load_from_state_dict(*args, **kwargs)


def freeze_for_inference(model: nn.Module) -> nn.Module:
    """Eval mode, and every `InferenceCache` layer computes and keeps its inference weight. Returns `model`."""
    model.eval()
    for module in model.modules():
        if isinstance(module, InferenceCache):
            module.freeze()
    return model


def inference_cache_bytes(model: nn.Module) -> int:
    """Bytes held by the inference caches of `model`'s layers."""
    return sum(m.cache_bytes() for m in model.modules() if isinstance(m, InferenceCache))


# ---- the ternary linear layer -------------------------------------------------------------------------------------
class TernaryLinear(InferenceCache, nn.Linear):
    """nn.Linear whose forward uses the quantized weight; the latent weight is trained through the STE.

    The quantizer is `config.quantizer` (default "trilm", the paper's), a child module `quantizer`; see
    `spectra.quantizers` for the ablations. Quantizers that ask for it (`bitnet158`) get a norm over the input
    features inside the layer (`norm`, `norm_eps`: the model's, RMSNorm by default), `input_norm` (state-dict key
    `...<proj>.input_norm.weight`), applied before the input is quantized: BitNet's norm before every linear layer,
    which a Llama checkpoint cannot represent.
    While frozen (`freeze_for_inference`), the codes, scales and W̃ are kept: `_frozen = (codes, scales, W̃)`.

    Training memory (`recompute_weight`, set by `set_recompute_weight`): the backward matmul needs W̃ (or its
    autocast copy), which autograd would keep per layer from forward to backward, a full model's worth of memory
    that FSDP cannot free. With `recompute_weight`, the layer's saved-tensor hooks keep a reference to the latent
    weight instead and rebuild W̃ from it when backward unpacks it: the same autograd graph and kernels on the same
    values, so the gradients are bit-identical (deterministic quantizers only; stochastic rounding keeps W̃).
    """

    recompute_weight = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        num_shards: int = 1,
        shard_dim: int = 0,
        quantizer: str = "trilm",
        quantizer_options: dict | None = None,
        norm: str = "rmsnorm",
        norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.num_shards = num_shards
        self.shard_dim = shard_dim
        self.quantizer = build_quantizer(quantizer, num_shards=num_shards, dim=shard_dim, **(quantizer_options or {}))
        self.quantizer.to(device=device, dtype=dtype)
        if self.quantizer.input_norm:  # the model's norm kind and eps (`ModelConfig.norm`, `norm_eps`)
            self.input_norm = norm_of(norm, in_features, norm_eps).to(device=device, dtype=dtype)
        else:
            self.input_norm = None
        # quantization warm-up (spectra.train.warmup): the forward uses W + mix·(W̃ − W); 1 is the TriLM itself
        self.quant_mix = 1.0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_shards={self.num_shards}, shard_dim={self.shard_dim}"

    def _build_frozen(self):
        if not self.quantizer.cacheable:
            return None
        codes, scales = self.quantizer.codes_and_scales(self.weight)
        return codes, scales, self.quantizer.dequantize(codes, scales).to(self.weight.dtype)

    def codes_and_scales(self) -> tuple[Tensor, Tensor]:
        """Integer codes (ternary: int8 in {-1, 0, 1}) and per-shard scales: the frozen ones, else of the current
        weight."""
        if self._frozen is not None:
            return self._frozen[0], self._frozen[1]
        return self.quantizer.codes_and_scales(self.weight)

    def set_exact(self, codes: Tensor, scales: Tensor) -> None:
        """Load exact codes and scales (e.g. recovered from an unpacked checkpoint), and freeze the layer on them.

        The latent weight is set to Ŵ·(γ−ε)/p per shard (p = fraction of nonzero codes), which the absmean formula maps
        back to the same codes and, up to float rounding, the same γ, so training can continue from here. Inference
        uses the exact codes and scales until the layer is unfrozen (`train()`, an optimizer step, ...).
        """
        if codes.shape != self.weight.shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not match weight {tuple(self.weight.shape)}")
        if scales.numel() != self.num_shards:
            raise ValueError(f"{scales.numel()} scales given for a layer with {self.num_shards} shards")
        shard_rows(codes, self.num_shards, self.shard_dim)  # validates the split
        latent = []
        for c, g in zip(codes.float().chunk(self.num_shards, self.shard_dim), scales.float(), strict=True):
            p = c.abs().mean()
            latent.append(c * ((g - EPS).clamp(min=0) / p) if p > 0 else torch.zeros_like(c))
        with torch.no_grad():
            self.weight.copy_(torch.cat(latent, dim=self.shard_dim))
        self.unfreeze()
        W_q = dequantize(codes, scales, self.shard_dim, self.weight.dtype).to(self.weight.device)
        self._frozen = (codes.to(torch.int8), scales.float(), W_q)
        self.freeze()

    def quantized_weight(self) -> Tensor:
        """W̃ in the weight's dtype (no autograd): the frozen one, else computed from the current weight."""
        if self._frozen is not None and self._frozen[2].dtype == self.weight.dtype:
            return self._frozen[2]
        codes, scales = self.quantizer.codes_and_scales(self.weight)
        return self.quantizer.dequantize(codes, scales).to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_norm is not None:
            x = self.input_norm(x)
        mix = self.quant_mix
        if mix == 1.0 and not self.training and not torch.is_grad_enabled() and self.quantizer.cacheable:
            return F.linear(self.quantizer.quantize_input(x), self.quantized_weight())
        if self.recompute_weight and torch.is_grad_enabled() and not self.quantizer.stochastic_rounding:
            return self._forward_recompute(self.quantizer.quantize_input(x))
        return F.linear(self.quantizer.quantize_input(x), self._weight_used())

    def _weight_used(self) -> Tensor:
        W_used = self.quantizer.forward_weight(self.weight)
        if self.quant_mix != 1.0:  # ∂W_used/∂W = (1 − mix)·I + mix·I (straight-through): still the identity
            W_used = self.weight + self.quant_mix * (W_used - self.weight)
        return W_used

    def _forward_recompute(self, x: Tensor) -> Tensor:
        """F.linear(x, W̃) whose saved W̃ is a recipe, not a tensor (class docstring)."""
        W_used = self._weight_used()
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if dtype is not None:  # the cast autocast would make inside F.linear, made here so we know its storage
            W_used = W_used.to(dtype)
        storage = _storage(W_used)
        plain = type(W_used) is Tensor
        layouts = {"w": (W_used.shape, W_used.stride()), "wt": (W_used.t().shape, W_used.t().stride())}

        def pack(t: Tensor):
            if _storage(t) != storage:
                return t
            if plain:  # W̃ or a view of it (matmul saves W̃ᵀ)
                return (t.shape, t.stride(), t.storage_offset())
            # a DTensor (tensor parallelism, `spectra.train.tp`): W̃ or W̃ᵀ, which have no as_strided
            kind = next((k for k, v in layouts.items() if v == (t.shape, t.stride())), None)
            return (kind,) if kind is not None else t

        def unpack(saved):
            if not isinstance(saved, tuple):
                return saved
            with torch.no_grad():
                W = self._weight_used()
                W = W.to(dtype) if dtype is not None else W
            if len(saved) == 1:
                return W if saved[0] == "w" else W.t()
            return W.as_strided(*saved)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return F.linear(x, W_used)

    def _apply(self, fn, recurse=True):
        # .to(dtype / device) moves the weight; the frozen codes and scales follow it and W̃ is rebuilt from them
        out = super()._apply(fn, recurse)
        if self._frozen is not None:
            codes, scales, _ = self._frozen
            codes, scales = codes.to(self.weight.device), scales.to(self.weight.device)
            self._frozen = (codes, scales, self.quantizer.dequantize(codes, scales).to(self.weight.dtype))
        return out


def _storage(t: Tensor) -> int:
    """The address of the storage behind `t`; for a DTensor, behind its local shard."""
    local = getattr(t, "_local_tensor", None)  # DTensor keeps its shard here (to_local() would record a graph op)
    return (local if local is not None else t).untyped_storage().data_ptr()


def set_on_ternary_layers(model: nn.Module, **attributes) -> int:
    """Set the given attributes on every TernaryLinear of `model`; returns how many layers were set."""
    layers = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    for layer in layers:
        for name, value in attributes.items():
            setattr(layer, name, value)
    return len(layers)


def set_recompute_weight(model: nn.Module, on: bool) -> int:
    """Turn `TernaryLinear.recompute_weight` on or off in every ternary layer; returns how many were set."""
    return set_on_ternary_layers(model, recompute_weight=bool(on))


def make_linear(cfg: ModelConfig, name: str, in_features: int, out_features: int) -> nn.Linear:
    if cfg.family == "trilm":  # TriLM: ternary weights x one absmean scale per model-parallel shard
        return TernaryLinear(
            in_features,
            out_features,
            num_shards=cfg.num_scale_shards,
            shard_dim=SHARD_DIM[name],
            quantizer=cfg.quantizer,
            quantizer_options=cfg.quantizer_options,
            norm=cfg.norm,
            norm_eps=cfg.norm_eps,
        )
    return nn.Linear(in_features, out_features, bias=False)


def convert_to_ternary(
    model: nn.Module,
    *,
    num_shards: int = 1,
    quantizer: str = "trilm",
    quantizer_options: dict | None = None,
) -> int:
    """Swap every block linear layer (q/k/v/o/gate/up/down) for a TernaryLinear, keeping the latent weight.

    Embeddings and lm_head are never converted. A spectra Transformer (one with a `ModelConfig` as `config`) becomes
    the TriLM its config then says, checked like any config first: `config.family` "trilm" with the quantizer, its
    options and the shards (so that it saves, packs and loads as what it computes; it stayed a FloatLM, which
    reloaded as a FloatLM on the latent weights), its layers take the config's norm, and a quantizer that normalises
    each linear's input (BitNet b1.58) replaces the blocks' norms as `make_block_norm` does (kept, inputs were
    normalised twice). Returns how many layers were converted.
    """
    cfg = getattr(model, "config", None)
    new_cfg = None
    if isinstance(cfg, ModelConfig) and cfg.family != "trilm":
        new_cfg = cfg.replace(family="trilm", quantizer=quantizer, quantizer_options=dict(quantizer_options or {}),
                              num_scale_shards=num_shards)
    norm = {"norm": new_cfg.norm, "norm_eps": new_cfg.norm_eps} if new_cfg is not None else {}
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name not in SHARD_DIM or type(child) is not nn.Linear:
                continue
            if child.bias is not None:
                raise ValueError(f"{name} has a bias; TriLM linear layers have none")
            new = TernaryLinear(
                child.in_features,
                child.out_features,
                num_shards=num_shards,
                shard_dim=SHARD_DIM[name],
                quantizer=quantizer,
                quantizer_options=quantizer_options,
                device=child.weight.device,
                dtype=child.weight.dtype,
                **norm,
            )
            with torch.no_grad():
                new.weight.copy_(child.weight)
            setattr(parent, name, new)
            count += 1
    if new_cfg is not None:
        if QUANTIZER_CLASSES[quantizer].input_norm:
            for block in getattr(model, "layers", ()):
                for attr in ("input_layernorm", "post_attention_layernorm"):
                    if hasattr(block, attr):
                        setattr(block, attr, nn.Identity())
        model.config = new_cfg
    return count
