"""spectra: FloatLM, TriLM and QuantLM language models from the Spectra suite (arXiv 2407.12327)."""

from spectra.checkpoint import load, save_model
from spectra.config import ModelConfig, from_name
from spectra.model import Transformer, build_model

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "build_model", "from_name", "load", "save_model", "__version__"]
