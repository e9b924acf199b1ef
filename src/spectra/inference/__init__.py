"""Running models: text generation with a KV cache (`generate`) and speed measurement (`bench`).

    from spectra.inference import generate, bench
"""

from spectra._lazy import lazy_package

__all__ = ["bench", "generate"]


_LAZY = {  # imported on first use: `spectra --help` and Ctrl-C at start stay clear of torch's import
    "bench": "spectra.inference.bench",
    "generate": "spectra.inference.generate",
}


lazy_package(__name__)
