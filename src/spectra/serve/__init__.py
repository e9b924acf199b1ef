"""`spectra serve`: an OpenAI-compatible HTTP server with continuous batching (`serve`, `Engine`, `create_app`).

    from spectra.serve import serve
    serve("path/to/packed-model", port=8000)
"""


__all__ = ["serve"]


_LAZY = {  # imported on first use: `spectra --help` and Ctrl-C at start stay clear of torch's import
    "serve": "spectra.serve.server",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
