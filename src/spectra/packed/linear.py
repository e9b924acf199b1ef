"""`PackedTernaryLinear`: a TriLM linear layer held as TQ2_0 (2-bit) or TQ1_0 (base-3) code bytes plus per-block fp16
scales.

y = x Wᵀ with W = d·q per 256-weight block, computed by `spectra.packed.kernels` from int8 per-token activations:
one C call per forward, a GEMV for a single token (decoding) and a GEMM that reuses each unpacked block across tokens
(prompts). The output equals the pure-torch reference `kernels.reference_matmul` bit for bit, and is close to the float
`TernaryLinear` output: the only difference is the int8 rounding of the activations (relative error ≈ 1 % of the
output norm for Gaussian inputs, see tests/test_packed_linear.py) and fp16 rounding of γ (≤ 2⁻¹¹ relative).

`convert_to_packed(model, format)` swaps every TernaryLinear of a model for a PackedTernaryLinear and returns how many
it swapped; the layers' code bytes then share one buffer on 2 MiB pages (`code_arena`, as `load_packed` leaves them).
Inference only: the layer has no parameters and no backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from spectra.layers import TernaryLinear
from spectra.packed import formats
from spectra.packed import kernels as K
from spectra.ternary import SHARD_DIM

HUGE_PAGE_MIN_BYTES = 1 << 20  # weight buffers at least this large are moved to 2 MiB pages (`kernels.use_huge_pages`)


def _stream_from_huge_pages(weights: Tensor) -> None:
    """A large CPU weight buffer onto 2 MiB pages: a GEMV streams it once per token, and 4 KiB pages cost TLB misses."""
    if weights.device.type == "cpu" and weights.nbytes >= HUGE_PAGE_MIN_BYTES:
        K.use_huge_pages(weights)


def code_arena(sizes: Sequence[int]) -> list[Tensor]:
    """One uint8 buffer cut into slices of `sizes` bytes (each at a 64-byte boundary), starting on a 2 MiB boundary
    and advised onto 2 MiB pages before any page is touched: the home of a packed model's code bytes, in the order a
    decode step reads them (`move_codes`; `spectra.packed.io.load_packed` fills it). A packed checkpoint's layers are
    otherwise separate allocations of 1-3 MiB, which Linux left on 4 KiB pages when asked to collapse them one by
    one; decoding the TriLM-1.1B from one such buffer was 1.13x faster on 1 thread and 1.12x on 2 than from the
    layers as loaded (the 2-core Intel Xeon, 6 alternating runs each, all faster), and the same buffer on 4 KiB pages
    was not (0.99x / 1.01x): the pages, not the order, make the difference."""
    step = [(n + 63) // 64 * 64 for n in sizes]
    total, H = sum(step), 2 << 20
    raw = torch.empty(total + H, dtype=torch.uint8)
    start = (-raw.data_ptr()) % H
    arena = raw[start : start + total]
    if total:
        K.use_huge_pages(arena)  # MADV_HUGEPAGE first, so the pages are faulted in as 2 MiB pages
    out, off = [], 0
    for n, st in zip(sizes, step):
        out.append(arena[off : off + n])
        off += st
    return out


class PackedTernaryLinear(nn.Module):
    """Ternary weights in our block layout: `qs` uint8, the code bytes of `format`, and `d` fp16 [out, in/256].

    `format` 'tq2_0': `qs` is [out, in/4], the 64 code bytes of each TQ2_0 block (2.0 bits per weight); 'tq1_0': `qs`
    is [out, in/256·52], the 52 base-3 code bytes of each TQ1_0 block (1.625 bits per weight), which the TQ1 kernels
    read directly. The kernels read either as one sequential stream per row range, and both give the same outputs
    bit for bit. `qs` may be passed in either layout (told apart by its width) and is converted to `format`'s. A
    TQ1_0 layer holds its bytes in the kernels' order (`kernels.tq1_to_kernel`: dense rows, re-encoded on CPUs with
    AVX-512 VBMI); its state dict, `to_bytes` and `tq1_code_bytes` give llama.cpp's order.
    `path` selects the kernel (see `spectra.packed.kernels`).
    """

    changes = 0  # class-wide: bumped with every layer's `version`, so a decoder checks one integer before each step

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qs: Tensor | np.ndarray,
        d: Tensor | np.ndarray,
        *,
        format: str = "tq2_0",
        path: str = "auto",
        n_threads: int | None = None,
    ) -> None:
        super().__init__()
        if in_features % formats.QK or not 0 < in_features <= 1 << 22:
            raise ValueError(f"in_features={in_features} must be a multiple of {formats.QK} (TQ block size), <= 2^22")
        self.in_features, self.out_features = in_features, out_features
        self.format = formats.canonical_format(format)
        self.path = K.resolve_path(path)
        self.n_threads = n_threads
        self._path_id = K._PATH_IDS.get(self.path)
        self._fmt_id = K.FORMAT_IDS[self.format]
        self._ext = K.extension()
        self._qs_kernel = False  # whether `qs` holds TQ1_0 bytes in the kernels' order (set by refresh)
        self.register_buffer("qs", torch.as_tensor(np.asarray(qs)))
        self.register_buffer("d", torch.as_tensor(np.asarray(d)))
        self.refresh()

    def _checked(self, qs: Tensor, d: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Validated, canonical code bytes in the layout of self.format (converted if given in the other one), d."""
        N, Kin = self.out_features, self.in_features
        w2, w1 = Kin // 4, Kin // formats.QK * formats.TQ1_CODE_BYTES
        if qs.dtype != torch.uint8 or qs.dim() != 2 or qs.shape[0] != N or qs.shape[1] not in (w1, w2) or not qs.is_cpu:
            raise ValueError(
                f"qs must be uint8 [{N}, {w2}] (TQ2_0 code bytes) or [{N}, {w1}] (TQ1_0 code bytes) on the CPU, got "
                f"{qs.dtype} {tuple(qs.shape)}"
            )
        if d.dtype != torch.float16 or tuple(d.shape) != (N, Kin // formats.QK) or not d.is_cpu:
            raise ValueError(f"d must be float16 [{N}, {Kin // formats.QK}] on the CPU, got {d.dtype} {tuple(d.shape)}")
        d_np = d.contiguous().numpy()
        if not np.all(np.isfinite(d_np)):
            raise ValueError("d has NaN or infinite scales")
        qs_np = qs.contiguous().numpy()
        if qs.shape[1] == w2:
            qs_np = formats.canonicalize(qs_np, d_np)
            formats.check_tq2_codes(qs_np)
            return (formats.tq1_code_bytes(qs_np) if self.format == "tq1_0" else qs_np), d_np
        formats.check_tq1_codes(qs_np)
        qs_np = formats.canonicalize_tq1(qs_np, d_np)
        return (formats.tq2_code_bytes(qs_np) if self.format == "tq2_0" else qs_np), d_np

    def refresh(self) -> None:
        """Validate `qs` and `d` and rebuild what the kernels derive from them (after any change to the buffers)."""
        held = self.qs
        if self._qs_kernel:  # TQ1_0 bytes in the kernels' order: checked in llama.cpp's
            held = torch.from_numpy(K.tq1_from_kernel(held.numpy()))
        qs_np, d_np = self._checked(held, self.d)
        bounds, seg_d = formats.scale_segments(d_np)
        self._qs_kernel = self.format == "tq1_0"
        if self._qs_kernel:
            qs_np = K.tq1_to_kernel(qs_np)
        self.qs = torch.from_numpy(np.ascontiguousarray(qs_np))
        _stream_from_huge_pages(self.qs)
        self.d = torch.from_numpy(np.ascontiguousarray(d_np))
        self.register_buffer("seg_bounds", torch.from_numpy(bounds), persistent=False)
        self.register_buffer("seg_d", torch.from_numpy(seg_d), persistent=False)
        self._ptr_cache: tuple | None = None
        self.version = getattr(self, "version", -1) + 1  # bumped whenever the buffers or the path change
        PackedTernaryLinear.changes += 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + "qs" in state_dict and prefix + "d" in state_dict:  # reject bad data before it is copied in
            qs, _ = self._checked(state_dict[prefix + "qs"], state_dict[prefix + "d"])
            state_dict[prefix + "qs"] = torch.from_numpy(np.ascontiguousarray(qs))  # in this layer's layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "qs" in state_dict:
            self._qs_kernel = False  # llama.cpp's order now: refresh puts TQ1_0 bytes in the kernels' order
        if prefix + "qs" in state_dict or prefix + "d" in state_dict:
            self.refresh()  # load_state_dict writes qs/d in place (or assigns them): the derived segments must follow

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickle (torch.save of a whole model): without the extension module (not picklable) and the
        # cached addresses, and TQ1_0 bytes in llama.cpp's order, which every CPU reads back into its own encoding.
        state = self.__dict__.copy()
        state["_ext"], state["_ptr_cache"] = None, None
        if state.get("_qs_kernel"):
            state["_buffers"] = {**state["_buffers"], "qs": torch.from_numpy(self.tq1_code_bytes())}
            state["_qs_kernel"] = False
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._ext = K.extension()
        if self.format == "tq1_0" and not self._qs_kernel:
            self.refresh()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._qs_kernel:  # saved in llama.cpp's order, whatever the CPU's encoding
            destination[prefix + "qs"] = torch.from_numpy(self.tq1_code_bytes())

    # ---- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_ternary(
        cls, layer: TernaryLinear, *, format: str = "tq2_0", path: str = "auto", lossy: bool = False
    ) -> PackedTernaryLinear:
        """Exact codes and per-shard scales of a TernaryLinear -> blocks (d = γ of the block's shard, in fp16)."""
        codes, scales = layer.codes_and_scales()
        qs, d = formats.blocks_from_ternary(codes.cpu(), scales.cpu(), layer.shard_dim, lossy=lossy)
        return cls(layer.in_features, layer.out_features, qs, d, format=format, path=path)

    @classmethod
    def from_weight(
        cls, weight: Tensor, *, format: str = "tq2_0", path: str = "auto", lossy: bool = False
    ) -> PackedTernaryLinear:
        """A float matrix claimed to be ternary per 256-block ({-d, 0, d}); anything else is a ValueError."""
        qs, d = formats.blocks_from_weight(weight.detach().float().cpu(), lossy=lossy)
        return cls(weight.shape[1], weight.shape[0], qs, d, format=format, path=path)

    @classmethod
    def from_bytes(cls, raw, shape: tuple[int, int], format: str, *, path: str = "auto") -> PackedTernaryLinear:
        """llama.cpp TQ2_0 / TQ1_0 block bytes of an [out, in] matrix (validated) -> layer (TQ1_0 stays base 3)."""
        fmt = formats.canonical_format(format)
        if fmt == "tq1_0":
            qs, d = formats.from_tq1_codes(raw, shape)
        else:
            qs, d = formats.from_tq2(raw, shape)
        return cls(shape[1], shape[0], qs, d, format=fmt, path=path)

    def move_codes(self, dst: Tensor) -> None:
        """Copy the code bytes into `dst` (uint8, qs.numel() bytes, e.g. a `code_arena` slice) and use them from
        there; nothing else changes."""
        if dst.dtype != torch.uint8 or dst.numel() != self.qs.numel() or not dst.is_contiguous():
            raise ValueError(f"move_codes needs {self.qs.numel()} contiguous uint8 bytes, got {dst.dtype} "
                             f"{tuple(dst.shape)}")
        view = dst.view(self.qs.shape)
        view.copy_(self.qs)
        self.qs = view
        self.version += 1
        PackedTernaryLinear.changes += 1

    def tq2_code_bytes(self) -> np.ndarray:
        """The TQ2_0 code bytes uint8 [out, in/4] of the layer's codes (a copy when the layer holds TQ1_0)."""
        q = self.qs.numpy()
        return formats.tq2_code_bytes(K.tq1_from_kernel(q)) if self.format == "tq1_0" else q

    def tq1_code_bytes(self) -> np.ndarray:
        """The TQ1_0 code bytes uint8 [out, in/256·52] of the layer's codes in llama.cpp's order (a copy)."""
        if self.format == "tq1_0":
            return K.tq1_from_kernel(self.qs.numpy())
        return formats.tq1_code_bytes(self.qs.numpy())

    def codes(self) -> np.ndarray:
        """Ternary codes q int8 [out, in]."""
        return formats.unpack_codes(self.tq2_code_bytes())

    def to_bytes(self, format: str | None = None) -> np.ndarray:
        """llama.cpp block bytes uint8 [out, blocks·bytes_per_block] in `format` (default: the layer's)."""
        fmt = formats.canonical_format(format or self.format)
        if fmt == "tq1_0" and self.format == "tq1_0":
            return formats.tq1_blocks(self.tq1_code_bytes(), self.d.numpy())
        return formats.to_format(self.tq2_code_bytes(), self.d.numpy(), fmt)

    def set_format(self, format: str) -> None:
        """Convert the held code bytes to `format` ('tq2' | 'tq1'); the outputs do not change."""
        fmt = formats.canonical_format(format)
        if fmt != self.format:
            self.format = fmt
            self._fmt_id = K.FORMAT_IDS[fmt]
            self.refresh()  # _checked converts the other layout

    def dequantized_weight(self) -> Tensor:
        """W = d·q as float32 [out, in]."""
        return torch.from_numpy(formats.dequantize_blocks(self.tq2_code_bytes(), self.d.numpy()))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
            f"path={self.path}, segments={self.seg_d.shape[1]}"
        )

    def _apply(self, fn, recurse: bool = True):
        # The packed buffers are exact data on the CPU: model.to(torch.bfloat16) must not round the fp16 scales, and
        # model.to_empty() (used when materializing a model built on the meta device) must not wipe them.
        for buf in self._buffers.values():
            if buf is not None and fn(buf).device.type != "cpu":
                raise ValueError("PackedTernaryLinear runs on CPU only; it cannot be moved to another device")
        return self

    # ---- forward --------------------------------------------------------------------------------------------------
    def _pointers(self) -> tuple[int, int, int, int]:
        # Cached (qs, bounds, seg_d) addresses, revalidated by identity so a replaced buffer is never read stale.
        bufs = self._buffers
        cache = self._ptr_cache
        if (
            cache is None
            or cache[0] is not bufs["qs"]
            or cache[1] is not bufs["seg_bounds"]
            or cache[2] is not bufs["seg_d"]
        ):
            qs, bounds, seg_d = bufs["qs"], bufs["seg_bounds"], bufs["seg_d"]
            if not (qs.is_cpu and bounds.is_cpu and seg_d.is_cpu):
                raise ValueError("PackedTernaryLinear runs on CPU only")
            cache = (qs, bounds, seg_d, qs.data_ptr(), bounds.data_ptr(), seg_d.data_ptr(), seg_d.shape[1])
            self._ptr_cache = cache
        return cache[3:]

    def forward(self, x: Tensor) -> Tensor:
        """y = x Wᵀ for x [..., in_features]; one C call (kept lean: decoding makes hundreds per token)."""
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("PackedTernaryLinear is inference-only (no backward); run under torch.no_grad()")
        shape = x.shape
        if shape[-1] != self.in_features:
            raise ValueError(f"input has {shape[-1]} features, layer expects {self.in_features}")
        x32 = x if x.dtype is torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
        if self._path_id is None:  # the pure-torch reference
            qs = torch.from_numpy(self.tq1_code_bytes()) if self.format == "tq1_0" else self.qs
            y = K.ternary_matmul(
                x32.view(-1, self.in_features), qs, self.seg_bounds, self.seg_d, fmt=self.format, path="torch"
            )
            y = y.view(*shape[:-1], self.out_features)
        else:
            if not x32.is_cpu:
                raise ValueError("PackedTernaryLinear runs on CPU only")
            qs_ptr, bounds_ptr, d_ptr, n_seg = self._pointers()
            y = torch.empty(shape[:-1] + (self.out_features,), dtype=torch.float32)
            self._ext.matmul(
                self._path_id,
                x32.data_ptr(),
                x32.numel() // self.in_features,
                self.in_features,
                qs_ptr,
                self.out_features,
                bounds_ptr,
                n_seg,
                d_ptr,
                y.data_ptr(),
                self.n_threads or K.default_threads(),
                self._fmt_id,
            )
        return y if x.dtype is torch.float32 else y.to(x.dtype)

    def set_path(self, path: str) -> None:
        self.path = K.resolve_path(path)
        self._path_id = K._PATH_IDS.get(self.path)
        self.version += 1
        PackedTernaryLinear.changes += 1


class Int8Linear(nn.Module):
    """y = x Wᵀ with W held as int8 per output row (`kernels.quantize_weight_int8`): `qw` uint8 [out, in] (w + 128 in
    the kernels' block order) and `scale` float32 [out]; activations are int8 per token as in PackedTernaryLinear.

    For the output layer (`lm_head`) of a packed TriLM: read once per decoded token, it is larger than all the packed
    block weights together in fp32 (vocab × dim × 4 bytes); int8 is what llama.cpp's Q8_0 output tensor holds. The
    output equals `kernels.reference_int8_matmul` bit for bit. Inference only, CPU only.
    """

    def __init__(self, qw: Tensor, scale: Tensor, *, path: str = "auto", n_threads: int | None = None) -> None:
        super().__init__()
        out_features, in_features = qw.shape
        if qw.dtype != torch.uint8 or in_features % formats.QK or not 0 < in_features <= K.INT8_MAX_K:
            raise ValueError(
                f"qw must be uint8 [out, in] with in a multiple of {formats.QK} up to {K.INT8_MAX_K}, got "
                f"{qw.dtype} {tuple(qw.shape)}"
            )
        if scale.dtype != torch.float32 or tuple(scale.shape) != (out_features,):
            raise ValueError(f"scale must be float32 [{out_features}], got {scale.dtype} {tuple(scale.shape)}")
        self.in_features, self.out_features = in_features, out_features
        self.path = K.resolve_path(path)
        self.n_threads = n_threads
        self.register_buffer("qw", qw.contiguous())
        _stream_from_huge_pages(self.qw)
        self.register_buffer("scale", scale.contiguous())

    @classmethod
    def from_linear(cls, layer: nn.Linear, *, path: str = "auto") -> Int8Linear:
        if getattr(layer, "bias", None) is not None:
            raise ValueError("Int8Linear has no bias; the layer has one")
        qw, scale = K.quantize_weight_int8(layer.weight)
        return cls(qw, scale, path=path)

    @classmethod
    def from_int8(cls, w: Tensor, scale: Tensor, *, path: str = "auto") -> Int8Linear:
        """From int8 weights w [out, in] in natural column order (as packed checkpoints store them) and row scales."""
        if w.dtype != torch.int8 or w.dim() != 2:
            raise ValueError(f"w must be an int8 matrix [out, in], got {w.dtype} {tuple(w.shape)}")
        if w.shape[1] % formats.QK:
            raise ValueError(f"w has {w.shape[1]} columns; Int8Linear needs a multiple of {formats.QK}")
        if int(w.min()) < -127:
            raise ValueError("w holds -128; int8 weights are in [-127, 127]")
        if not bool((torch.isfinite(scale) & (scale.float() >= 0)).all()):  # absmax / 127 per row
            raise ValueError("the row scales must be finite and >= 0")
        u = (w.to(torch.int16) + 128).to(torch.uint8)
        return cls(K.permute_activations(u).contiguous(), scale.float().contiguous(), path=path)

    def int8_weight(self) -> Tensor:
        """w int8 [out, in] in natural column order (W = r·w)."""
        return (K.unpermute_activations(self.qw).to(torch.int16) - 128).to(torch.int8)

    def dequantized_weight(self) -> Tensor:
        """W = r·w as float32 [out, in]."""
        w = K.unpermute_activations(self.qw).float() - 128.0
        return w * self.scale[:, None]

    @property
    def weight(self) -> Tensor:
        """The float32 matrix this layer multiplies by (`dequantized_weight`), for code that reads `.weight`."""
        return self.dequantized_weight()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, path={self.path}"

    def _apply(self, fn, recurse: bool = True):
        for buf in self._buffers.values():  # exact int8 data on the CPU: not cast, not moved
            if buf is not None and fn(buf).device.type != "cpu":
                raise ValueError("Int8Linear runs on CPU only; it cannot be moved to another device")
        return self

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("Int8Linear is inference-only (no backward); run under torch.no_grad()")
        shape = x.shape
        if shape[-1] != self.in_features:
            raise ValueError(f"input has {shape[-1]} features, layer expects {self.in_features}")
        x32 = x.to(torch.float32).contiguous().view(-1, self.in_features)
        y = K.int8_matmul(x32, self.qw, self.scale, path=self.path, n_threads=self.n_threads)
        y = y.view(*shape[:-1], self.out_features)
        return y if x.dtype is torch.float32 else y.to(x.dtype)


class CompactEmbedding(nn.Embedding):
    """An embedding table held in 16 bits (fp16 or bf16) whose lookups come out in float32: a packed checkpoint's
    embedding at half the memory, with the float32 residual stream the packed layers and the decoder expect. The
    output equals an fp32 embedding holding the same (rounded) values exactly."""

    def forward(self, idx: Tensor) -> Tensor:
        return super().forward(idx).float()


def as_packed(
    module: nn.Module, name: str, *, trilm: bool, format: str = "tq2", path: str = "auto", lossy: bool = False
) -> PackedTernaryLinear | None:
    """The packed form of one layer of a model, or None if it is not a ternary layer.

    TernaryLinear: its exact codes and scales. PackedTernaryLinear: itself. In a TriLM (`trilm=True`) a plain nn.Linear
    block layer (q/k/v/o/gate/up/down, e.g. from an unpacked checkpoint holding γ·Ŵ) is claimed ternary and must be
    ternary per 256-block. Errors name the layer.
    """
    leaf = name.rpartition(".")[2]
    try:
        if isinstance(module, PackedTernaryLinear):
            return module
        if isinstance(module, TernaryLinear):
            if module.input_norm is not None or getattr(module.quantizer, "activation_bits", None):
                raise ValueError(f"quantizer {module.quantizer.name!r} normalises and quantizes the layer's input; "
                                 "a packed layer multiplies its input as it comes, so it would be another model")
            return PackedTernaryLinear.from_ternary(module, format=format, path=path, lossy=lossy)
        if trilm and type(module) is nn.Linear and leaf in SHARD_DIM:
            return PackedTernaryLinear.from_weight(module.weight, format=format, path=path, lossy=lossy)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return None


def is_trilm(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "family", None) == "trilm"


def convert_to_packed(model: nn.Module, format: str = "tq2", *, path: str = "auto", lossy: bool = False) -> int:
    """Swap every ternary layer of `model` for a PackedTernaryLinear (in place, see `as_packed`). Returns the count.

    Layers already packed are given the requested format and kernel path but not counted.
    """
    fmt = formats.canonical_format(format)
    trilm = is_trilm(model)
    count = 0
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedTernaryLinear):
                child.set_format(fmt)
                child.set_path(path)
                continue
            new = as_packed(
                child, f"{prefix}.{name}" if prefix else name, trilm=trilm, format=fmt, path=path, lossy=lossy
            )
            if new is not None:
                setattr(parent, name, new)
                count += 1
    if count:
        gather_codes(model)
    return count


def gather_codes(model: nn.Module) -> None:
    """Move the code bytes of every PackedTernaryLinear of `model`, in module order, into one `code_arena` buffer on
    2 MiB pages (what `load_packed` does as it builds the layers); outputs do not change."""
    layers = [m for m in model.modules() if isinstance(m, PackedTernaryLinear)]
    for layer, home in zip(layers, code_arena([m.qs.numel() for m in layers])):
        layer.move_codes(home)
