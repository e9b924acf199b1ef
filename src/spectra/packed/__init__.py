"""Packed TriLM inference: llama.cpp's TQ2_0 / TQ1_0 formats, our CPU kernels, and packed checkpoints.

    formats   pure numpy pack/unpack of TQ2_0 and TQ1_0 blocks and our kernel layout (lossless between all three)
    kernels   the compiled ternary × int8 GEMV/GEMM (AVX-512 VNNI, AVX2, scalar) and their pure-torch reference
    linear    PackedTernaryLinear and convert_to_packed(model, format) -> number of layers swapped
    io        pack_model(model_or_path, out_dir, format=...) and load_packed(path) (what spectra.load calls)
    cli       `spectra pack MODEL OUT [--format tq2|tq1]`

Nothing heavy is imported here; import the submodule you need.
"""
