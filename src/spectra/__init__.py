"""spectra: FloatLM, TriLM and QuantLM language models from the Spectra suite (arXiv 2407.12327).

`spectra.load` (`spectra.loading`) opens every model spectra knows. It is imported on first use, so importing a
submodule such as `spectra.model` does not import every reader.
"""

from spectra._version import __version__
from spectra.checkpoint import save_model
from spectra.config import ModelConfig, from_name
from spectra.model import Transformer, build_model

__all__ = ["ModelConfig", "Transformer", "build_model", "from_name", "load", "save_model", "__version__"]


def __getattr__(name: str):
    if name == "load":
        from spectra.loading import load

        return load
    raise AttributeError(f"module 'spectra' has no attribute {name!r}")
