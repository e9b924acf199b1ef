"""The GPTQ driver: quantize a model's decoder blocks one after the other, as IST-DASLab's `llama_sequential`.

1. Catch the inputs of block 0: a `Catcher` stands in for it, records what the model passes it and stops the forward.
2. For every block, in order: the inputs are the outputs of the already-quantized previous block. Inside a block the
   linears are quantized in true-sequential order — the groups of layers that share an input, in the order the
   forward calls them (q/k/v → o → gate/up → down for a Llama block) — so each group sees the outputs of the groups
   already quantized before it.
3. The block's outputs, computed with all of its linears quantized, become the next block's inputs.

Calibration runs in chunks of about `CHUNK_TOKENS` tokens by default (`batch_size=None`; 16 sequences of 2048), so
a block's intermediate activations (attention, the MLP's wide hidden states) stay bounded however many sequences
calibrate. Every group takes one pass over the chunks that accumulates H and stops at the group, and a last pass
computes the outputs. When the whole calibration set fits in one chunk, one forward pass per block does everything:
a forward pre-hook on each linear computes H from the input it is about to receive (once per shared input),
quantizes the linear in place and lets the forward continue, so the rest of the pass already sees quantized weights.

Devices (`device`): the model stays where it is (usually in CPU memory) and each block in turn is moved to `device`
(a GPU), quantized there and moved back, so a GPU needs room for one block, its Hessians and the calibration
activations only. `device="auto"` takes the GPU when there is one and otherwise stays on the model's device.

Only `nn.Linear` modules inside `model.layers` are quantized; embeddings, norms and `lm_head` stay in floating point,
as in the paper's QuantLMs. Each quantized linear keeps Q (the dequantized weight) as its weight, and the integer
codes with their scales and zero-points are kept on `model.ptq` for the checkpoint writers (spectra.ptq.formats).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from spectra.ptq.gptq import GPTQ
from spectra.ptq.quantizer import QuantizedWeight, Quantizer

log = logging.getLogger(__name__)
METHODS = ("gptq", "rtn")
CHUNK_TOKENS = 32768  # calibration tokens per forward chunk by default


def default_chunk(n_sequences: int, seq_len: int) -> int:
    """Sequences per forward chunk when none is given: about CHUNK_TOKENS tokens, at least one sequence."""
    return max(1, min(n_sequences, CHUNK_TOKENS // max(1, seq_len)))


def resolve_device(device: str | torch.device | None, model_device: torch.device) -> torch.device:
    """The device blocks are quantized on: None the model's, 'auto' the GPU if any (else the model's), or as given
    (a clear error for a GPU that is not there)."""
    if device is None:
        return model_device
    if str(device) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else model_device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(device)!r} is not a torch device; accepted: cpu, cuda, cuda:N, auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but no CUDA device is available; use device='cpu' or 'auto'")
    return dev


def _to(value: Any, device: torch.device) -> Any:
    """Tensors inside a block's extra arguments (tuples, lists, dicts) moved to `device`."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _weight_to(qw: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    return replace(qw, codes=qw.codes.to(device), scales=qw.scales.to(device),
                               zeros=qw.zeros.to(device), g_idx=qw.g_idx.to(device))


@dataclass
class PTQState:
    """What `quantize_model` leaves on `model.ptq`: the settings and the codes of every quantized linear."""

    settings: dict[str, Any]
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


class Catcher(nn.Module):
    """Stands in for block 0: records the block's positional and keyword inputs, then stops the model's forward."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.inputs: list[Tensor] = []
        self.extra: tuple[tuple, dict] | None = None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.inputs.append(x)
        self.extra = (args, kwargs)
        raise _Stop


def block_linears(model: nn.Module) -> list[tuple[int, str, nn.Linear]]:
    """(block index, module name, linear) of every quantizable linear. Raises ValueError if there are none."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no decoder blocks (`layers`): nothing to quantize")
    found = []
    for i, block in enumerate(layers):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
                raise ValueError(
                    f"layers.{i}.{name} is a {type(module).__name__}; GPTQ quantizes FloatLMs (plain nn.Linear layers)"
                )
            if isinstance(module, nn.Linear):
                found.append((i, f"layers.{i}.{name}", module))
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers inside its blocks: nothing to quantize (GPTQ "
                         "takes a FloatLM; a QuantLM or packed model is already quantized)")
    return found


def _check_calibration(model: nn.Module, calib_tokens: Tensor, min_tokens: int) -> None:
    if not isinstance(calib_tokens, Tensor) or calib_tokens.ndim != 2 or calib_tokens.dtype != torch.long:
        shape = tuple(calib_tokens.shape) if isinstance(calib_tokens, Tensor) else type(calib_tokens).__name__
        raise ValueError(f"calib_tokens must be a LongTensor of shape (N, T), got {shape}")
    N, T = calib_tokens.shape
    cfg = getattr(model, "config", None)
    if cfg is not None:
        if T > cfg.max_seq_len:
            raise ValueError(f"calibration sequences of {T} tokens exceed the model's max_seq_len={cfg.max_seq_len}")
        if N and (int(calib_tokens.min()) < 0 or int(calib_tokens.max()) >= cfg.vocab_size):
            raise ValueError(f"calibration token ids must lie in [0, {cfg.vocab_size}), the model's vocabulary")
    if N * T < min_tokens:
        raise ValueError(
            f"too little calibration data: {N} x {T} = {N * T} tokens, fewer than the {min_tokens} input features of "
            "the widest layer (its Hessian would be singular); use more or longer calibration sequences"
        )


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calib_tokens: Tensor | None,
    *,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
    method: str = "gptq",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize every linear layer inside `model.layers` in place (weights replaced by the dequantized Q).

    calib_tokens: LongTensor (N, T) of calibration sequences (unused by method="rtn"). batch_size: sequences per
    forward chunk (None: `default_chunk`, about 32k tokens). device: where each block is quantized (module
    docstring; None: the model's device). Returns statistics: settings, per-layer loss
    Σ(w − q)²/(2 Hinv_ii²) (GPTQ) or ‖W − Q‖² (RTN), seconds. The codes stay on `model.ptq` (a `PTQState`).
    """
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    quantizer = Quantizer(bits, group_size=group_size, sym=sym)
    if not 0 <= percdamp < math.inf:  # also refuses NaN
        raise ValueError(f"percdamp (--damp) must be a finite number >= 0, got {percdamp}")
    targets = block_linears(model)
    for _, name, linear in targets:
        quantizer.check_columns(linear.in_features, name)
    settings = dict(method=method, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                    static_groups=static_groups, percdamp=percdamp, block_size=block_size, true_sequential=True)
    state = PTQState(settings=settings)
    stats: dict[str, Any] = dict(settings, layers={})
    t0 = time.perf_counter()

    if method == "rtn":
        for _, name, linear in tqdm(targets, desc="rtn", disable=not progress):
            qw = quantizer.rtn(linear.weight)
            Q = qw.dequantize()
            stats["layers"][name] = {"loss": float(((linear.weight.float() - Q) ** 2).sum())}
            linear.weight.copy_(Q.to(linear.weight.dtype))
            state.weights[name] = qw
    else:
        if calib_tokens is None:
            raise ValueError("method='gptq' needs calibration tokens")
        _check_calibration(model, calib_tokens, max(linear.in_features for _, _, linear in targets))
        N, T = calib_tokens.shape
        stats.update(n_samples=N, seq_len=T)
        chunk = default_chunk(N, T) if batch_size is None else max(1, min(batch_size, N))
        home = next(model.parameters()).device
        work = resolve_device(device, home)
        stats.update(batch_size=chunk, device=str(work))
        chunks = [calib_tokens[i : i + chunk].to(home) for i in range(0, N, chunk)]
        inputs, args, kwargs = _catch_block_inputs(model, chunks)
        if work != home:  # the block inputs live on the work device for the whole run; blocks visit it one by one
            inputs, args, kwargs = _to(inputs, work), _to(args, work), _to(kwargs, work)

        def quantize_layer(name: str, linear: nn.Linear, gptq: GPTQ) -> None:
            try:
                Q, qw, loss = gptq.quantize(quantizer, block_size=block_size, percdamp=percdamp, act_order=act_order,
                                            static_groups=static_groups)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            linear.weight.copy_(Q)
            state.weights[name] = _weight_to(qw, home)
            stats["layers"][name] = {"loss": loss}
            log.debug("%s: loss %.4g", name, loss)

        bar = tqdm(model.layers, desc=f"gptq {bits}-bit", disable=not progress)
        for i, block in enumerate(bar):
            named = [(name, linear) for b, name, linear in targets if b == i]
            block.to(work)
            if not named:
                inputs = [block(x, *args, **kwargs) for x in inputs]
            elif len(inputs) == 1:
                inputs = [_quantize_block_one_pass(block, named, inputs[0], args, kwargs, quantize_layer)]
            else:
                inputs = _quantize_block_chunked(block, named, inputs, args, kwargs, quantize_layer)
            block.to(home)
    model.ptq = state
    stats["n_linear"] = len(state.weights)
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _catch_block_inputs(model: nn.Module, chunks: list[Tensor]) -> tuple[list[Tensor], tuple, dict]:
    first = model.layers[0]
    catcher = Catcher(first)
    model.layers[0] = catcher
    try:
        for idx in chunks:
            try:
                model(idx)
            except _Stop:
                pass
    finally:
        model.layers[0] = first
    if len(catcher.inputs) != len(chunks) or catcher.extra is None:
        raise ValueError(f"{type(model).__name__}.forward did not call layers[0]; cannot capture block inputs")
    args, kwargs = catcher.extra
    return catcher.inputs, args, kwargs


QuantizeFn = Callable[[str, nn.Linear, GPTQ], None]


def _quantize_block_one_pass(block: nn.Module, named: list[tuple[str, nn.Linear]], x: Tensor, args: tuple,
                             kwargs: dict, quantize_layer: QuantizeFn) -> Tensor:
    """One forward: each linear is quantized right before it runs, from the input it receives (H shared by the
    linears that receive the same tensor)."""
    shared: dict[str, Any] = {"input": None, "gptq": None}
    done: set[str] = set()

    def make_hook(name: str):
        def hook(linear: nn.Linear, inp: tuple) -> None:
            X = inp[0]
            if X is not shared["input"]:
                gptq = GPTQ(linear)
                gptq.add_batch(X)
                shared["input"], shared["gptq"] = X, gptq
            quantize_layer(name, linear, GPTQ(linear, shared["gptq"].H, shared["gptq"].n_samples))
            done.add(name)

        return hook

    handles = [linear.register_forward_pre_hook(make_hook(name)) for name, linear in named]
    try:
        out = block(x, *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, _ in named if name not in done]
    if missing:
        raise ValueError(f"the forward pass never called {missing}; cannot quantize them")
    return out


def _sequential_groups(block: nn.Module, named: list[tuple[str, nn.Linear]], x: Tensor, args: tuple,
                       kwargs: dict) -> list[list[tuple[str, nn.Linear]]]:
    """Linears grouped by shared input, in call order, traced on one short sequence."""
    calls: list[tuple[str, nn.Linear, Tensor]] = []
    handles = [linear.register_forward_pre_hook(lambda m, inp, n=name: calls.append((n, m, inp[0])))
               for name, linear in named]
    try:
        block(x[:1], *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = sorted({name for name, _ in named} - {name for name, _, _ in calls})
    if missing:
        raise ValueError(f"the forward pass never called {missing}; cannot quantize them")
    groups: list[list[tuple[str, nn.Linear]]] = []
    last = None
    for name, linear, inp in calls:
        if any(name == n for g in groups for n, _ in g):
            continue
        if inp is last:
            groups[-1].append((name, linear))
        else:
            groups.append([(name, linear)])
        last = inp
    return groups


def _quantize_block_chunked(block: nn.Module, named: list[tuple[str, nn.Linear]], inputs: list[Tensor], args: tuple,
                            kwargs: dict, quantize_layer: QuantizeFn) -> list[Tensor]:
    for group in _sequential_groups(block, named, inputs[0], args, kwargs):
        first = group[0][1]
        gptq = GPTQ(first)

        def hook(linear: nn.Linear, inp: tuple, gptq: GPTQ = gptq) -> None:
            gptq.add_batch(inp[0])
            raise _Stop

        handle = first.register_forward_pre_hook(hook)
        try:
            for x in inputs:
                try:
                    block(x, *args, **kwargs)
                except _Stop:
                    pass
        finally:
            handle.remove()
        for name, linear in group:
            quantize_layer(name, linear, GPTQ(linear, gptq.H, gptq.n_samples))
    return [block(x, *args, **kwargs) for x in inputs]
