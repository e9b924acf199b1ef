"""Compiled CPU kernels for training, and the Python that loads and wraps them.

    csrc/train_kernels.c   the extension `spectra.kernels._train`: cross-entropy with its gradient in one call
                           (AVX-512 and portable C), causal attention forward and backward (AVX-512 BF16)
    attention              `causal_attention`, the one attention call of the model: SDPA, or while training on CPU
                           a dense kernel that keeps its probabilities (this C kernel in bf16, batched matmuls else)

The training loss that wraps the cross-entropy kernel is `spectra.train.loss`. The packed inference kernels have
their own room, `spectra.packed.kernels`. The extension is optional: without a C compiler everything here falls back
to torch.
"""

from __future__ import annotations

import functools


@functools.cache
def train_extension():
    """The compiled `spectra.kernels._train` module, or None when the package was installed without it."""
    try:
        from spectra.kernels import _train
    except ImportError:
        return None
    return _train
