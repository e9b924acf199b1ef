"""spectra: FloatLM, TriLM and QuantLM language models from the Spectra suite (arXiv 2407.12327).

The package's names (`spectra.load`, `build_model`, `ModelConfig`, ...) are imported on first use, so importing a
submodule such as `spectra.model` does not import every reader, and the `spectra` command starts without torch
(Ctrl-C in its first seconds was a traceback from inside torch's import; `spectra --help` took 2.7 s).
"""

from spectra._lazy import lazy_package
from spectra._version import __version__

__all__ = ["ModelConfig", "Transformer", "build_model", "from_name", "load", "save_model", "__version__"]

_LAZY = {
    "ModelConfig": "spectra.config",
    "from_name": "spectra.config",
    "Transformer": "spectra.model",
    "build_model": "spectra.model",
    "save_model": "spectra.checkpoint",
    "load": "spectra.loading",
}


lazy_package(__name__)
