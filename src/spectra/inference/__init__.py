"""Running models: text generation with a KV cache (`generate`) and speed measurement (`bench`).

    from spectra.inference import generate, bench
"""


__all__ = ["bench", "generate"]


_LAZY = {  # imported on first use: `spectra --help` and Ctrl-C at start stay clear of torch's import
    "bench": "spectra.inference.bench",
    "generate": "spectra.inference.generate",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
