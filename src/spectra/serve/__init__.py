"""`spectra serve`: an OpenAI-compatible HTTP server with continuous batching (`serve`, `Engine`, `create_app`).

    from spectra.serve import serve
    serve("path/to/packed-model", port=8000)
"""

from spectra._lazy import lazy_package

__all__ = ["serve"]


_LAZY = {  # imported on first use: `spectra --help` and Ctrl-C at start stay clear of torch's import
    "serve": "spectra.serve.server",
}


lazy_package(__name__)
