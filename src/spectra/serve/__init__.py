"""`spectra serve`: an OpenAI-compatible HTTP server with continuous batching (`serve`, `Engine`, `create_app`).

    from spectra.serve import serve
    serve("path/to/packed-model", port=8000)
"""

from spectra.serve.server import serve

__all__ = ["serve"]
