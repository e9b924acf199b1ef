"""Post-training quantization: GPTQ (and RTN) of FloatLMs into QuantLMs, their checkpoints and runtime layer.

    Quantizer, QuantizedWeight          quantizer.py   the b-bit grid (bits, group size, symmetry)
    GPTQ                                gptq.py        the algorithm on one layer (W, H, Hinv, Q)
    quantize_model(model, calib, ...)   sequential.py  block by block, true-sequential, in place
    pack_rows / unpack_rows             packing.py     GPTQ int32 packing (continuous and planar)
    QuantLinear                         qlinear.py     runs from qweight / qzeros / scales / g_idx
    save_gptq, save_unpacked, load_quantlm, quantlm_size_bits   formats.py
    quantize(model_path, out_dir, ...)  pipeline.py    load, calibrate, quantize, write

`pipeline` opens models through `spectra.load`, which reads QuantLMs through `formats`: it sits above this package's
other modules and is not imported here (`from spectra.ptq.pipeline import quantize`).
"""

from spectra._lazy import lazy_package

__all__ = [
    "GPTQ",
    "PTQState",
    "QuantLinear",
    "QuantizedWeight",
    "Quantizer",
    "load_quantlm",
    "quantize_model",
    "quantlm_size_bits",
    "save_gptq",
    "save_unpacked",
    "to_quantlm",
]


_LAZY = {  # imported on first use: `spectra --help` and Ctrl-C at start stay clear of torch's import
    "load_quantlm": "spectra.ptq.formats",
    "quantlm_size_bits": "spectra.ptq.formats",
    "save_gptq": "spectra.ptq.formats",
    "save_unpacked": "spectra.ptq.formats",
    "to_quantlm": "spectra.ptq.formats",
    "GPTQ": "spectra.ptq.gptq",
    "QuantLinear": "spectra.ptq.qlinear",
    "QuantizedWeight": "spectra.ptq.quantizer",
    "Quantizer": "spectra.ptq.quantizer",
    "PTQState": "spectra.ptq.sequential",
    "quantize_model": "spectra.ptq.sequential",
}


lazy_package(__name__)
