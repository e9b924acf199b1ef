"""Running models: text generation with a KV cache (`generate`) and speed measurement (`bench`).

    from spectra.inference import generate, bench
"""

from spectra._lazy import lazy_getattr

__all__ = ["bench", "generate"]


_LAZY = {  # imported on first use: `spectra --help` and Ctrl-C at start stay clear of torch's import
    "bench": "spectra.inference.bench",
    "generate": "spectra.inference.generate",
}


__getattr__ = lazy_getattr(__name__, _LAZY)
