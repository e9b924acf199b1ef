"""`quantize`: a FloatLM directory (ours or a Hugging Face Llama) -> a QuantLM, as the paper made its QuantLMs.

Defaults follow the paper (§4 of the facts): GPTQ, symmetric, group size 128 at 3 and 4 bits, calibration sequences
of 2048 tokens, embeddings / lm_head / norms left in fp16. The paper does not state the group size at 6 and 8 bits;
we use one group per output row (group_size −1) there, which is what its size accounting implies (Table 4 counts Q8
at 8.0 bits per weight, no group overhead), and at 6/8 bits the rounding error is already small. The paper used
512 calibration sequences; we default to 128 (the GPTQ reference's default) to keep CPU runs practical.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from spectra.ptq.quantizer import MAX_BITS, MIN_BITS

log = logging.getLogger(__name__)
OUTPUT_FORMATS = ("gptq", "unpacked", "both")


def default_group_size(bits: int) -> int:
    """128 at 2-4 bits (the paper's 3/4-bit setting), one group per row from 5 bits up."""
    return 128 if bits <= 4 else -1


def quantize(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    bits: int,
    calib: str | os.PathLike = "builtin",
    n_samples: int = 128,
    seq_len: int = 2048,
    group_size: int | None = None,
    sym: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
    method: str = "gptq",
    format: str = "gptq",
    tokenizer: str | os.PathLike | None = None,
    split: str = "train",
    seed: int = 0,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize the FloatLM at `model_path` and write it to `out_dir`.

    format: "gptq" (packed GPTQ checkpoint, opens with spectra.load and GPTQModel), "unpacked" (fp16 Llama directory
    of the dequantized weights) or "both" (out_dir/gptq and out_dir/unpacked). Calibration: `n_samples` sequences of
    `seq_len` tokens from `calib` (any source `spectra.data.read_documents` reads), sampled with `seed`, processed in
    chunks of `batch_size` sequences (None: about 32k tokens). `device`: where each block is quantized, one block at
    a time ('cuda', 'auto': the GPU if any; None: the CPU, where the model is loaded).
    Returns {"outputs": {format: path}, "stats": ..., "size_bits": ...}.
    """
    from spectra.data.tokenizer import tokenizer_file
    from spectra.files import atomic_dir, check_output_dir, refuse_replacing_source
    from spectra.loading import find_tokenizer, load
    from spectra.ptq.formats import quantlm_size_bits, save_gptq, save_unpacked
    from spectra.ptq.sequential import quantize_model

    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    if format not in OUTPUT_FORMATS:
        raise ValueError(f"format must be one of {OUTPUT_FORMATS}, got {format!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer (None: about 32k tokens a chunk), got {batch_size!r}")
    if method == "rtn" and (act_order or static_groups):
        raise ValueError("act_order and static_groups (--act-order, --static-groups) order GPTQ's updates; method "
                         "'rtn' rounds each weight alone and takes neither")
    if group_size is None:
        group_size = default_group_size(bits)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:  # it failed after the first
        # layer's calibration pass
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    model_path = Path(model_path)
    if not model_path.exists():  # before the tokenizer's error, which would send a mistyped path the wrong way
        from spectra.loading import missing_model

        raise missing_model(model_path)
    refuse_replacing_source(out_dir, model_path)
    check_output_dir(out_dir)  # found now: the writers refused it at the save, after the whole GPTQ run
    # 'builtin', a tokenizer.json or a folder holding one, as generate / eval / serve take
    tok = tokenizer_file(tokenizer) if tokenizer is not None else find_tokenizer(model_path)
    if tok is None and method == "gptq":
        raise FileNotFoundError(f"{model_path} has no tokenizer.json; pass tokenizer= (--tokenizer PATH, a folder "
                                "holding one, or 'builtin') for calibration")

    model = load(model_path, dtype=torch.float32)
    if getattr(model, "config", None) is None or model.config.family != "floatlm":
        raise ValueError(f"{model_path} is not a FloatLM (family={getattr(model.config, 'family', None)!r}); "
                         "GPTQ turns FloatLMs into QuantLMs")
    from spectra.ptq.quantizer import Quantizer
    from spectra.ptq.sequential import block_linears

    if format in ("gptq", "both"):  # packing's rule, checked before the run (it failed at the save, after it)
        for _, name, linear in block_linears(model):
            for what, n in (("in_features", linear.in_features), ("out_features", linear.out_features)):
                if n % 32:
                    raise ValueError(f"{name}: GPTQ packing needs {what} to be a multiple of 32, got {n}; "
                                     "format='unpacked' (--format unpacked) writes this shape")
    grid = Quantizer(bits, group_size=group_size, sym=sym)
    for _, name, linear in block_linears(model):  # before calibration (it failed once the data was tokenized)
        grid.check_columns(linear.in_features, name)
    calib_tokens = None
    if method == "gptq":
        from spectra.data import token_sequences

        if seq_len > model.config.max_seq_len:
            raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
        calib_tokens = token_sequences(calib, tok, n_samples, seq_len, split=split, seed=seed)
        if calib_tokens.shape[0] < n_samples:
            raise ValueError(f"calibration source {calib!r} gave {calib_tokens.shape[0]} sequences, {n_samples} needed")
    stats = quantize_model(model, calib_tokens, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                           static_groups=static_groups, percdamp=percdamp, block_size=block_size, method=method,
                           batch_size=batch_size, device=device, progress=progress)
    meta = {"source_model": str(model_path), "calibration": {"source": str(calib), "split": split,
                                                             "n_samples": n_samples, "seq_len": seq_len, "seed": seed}}
    out = Path(out_dir)
    outputs: dict[str, str] = {}
    if format == "both":
        with atomic_dir(out) as tmp:
            save_gptq(model, tmp / "gptq", tokenizer=tok, meta=meta)
            save_unpacked(model, tmp / "unpacked", tokenizer=tok)
        outputs = {"gptq": str(out / "gptq"), "unpacked": str(out / "unpacked")}
    elif format == "gptq":
        save_gptq(model, out, tokenizer=tok, meta=meta)
        outputs = {"gptq": str(out)}
    else:
        save_unpacked(model, out, tokenizer=tok)
        outputs = {"unpacked": str(out)}
    size = quantlm_size_bits(outputs["gptq"]) if "gptq" in outputs else quantlm_size_bits(model)
    log.info("quantized %d linear layers in %.1f s", stats["n_linear"], stats["seconds"])
    return {"outputs": outputs, "stats": stats, "size_bits": size}
