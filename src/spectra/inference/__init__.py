"""Running models: text generation with a KV cache (`generate`) and speed measurement (`bench`).

    from spectra.inference import generate, bench
"""

from spectra.inference.bench import bench
from spectra.inference.generate import generate

__all__ = ["bench", "generate"]
