"""Build hook for spectra's compiled CPU kernels (src/spectra/packed/ for inference, src/spectra/kernels/ for training's
loss and attention).

Everything else about the package lives in pyproject.toml. The kernels are plain C with no
dependency on torch at build time, so the build never pulls a torch wheel into its isolated
environment. SIMD paths are compiled per function (`__attribute__((target(...)))`) and chosen at
run time from the CPU's features, so one build runs on any x86-64 CPU. The extension is optional:
if no C compiler is available the package still installs and `spectra.packed.kernels` falls back
to its pure-torch reference (slow, but exact).
"""

import sys

from setuptools import Extension, setup

compile_args = ["-O3", "-ffp-contract=off", "-std=c11"]
link_args = []
if sys.platform.startswith("linux"):
    # OpenMP threads over contiguous row ranges. libgomp is shared with torch's (same soname) when torch loads first.
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
if sys.platform == "win32":
    compile_args, link_args = ["/O2", "/fp:precise"], []

setup(
    ext_modules=[
        Extension(
            "spectra.packed._kernels",
            sources=["src/spectra/packed/csrc/ternary_kernels.c"],
            depends=["src/spectra/packed/csrc/tq1_kernels.h", "src/spectra/packed/csrc/lane_kernels.h",
                     "src/spectra/packed/csrc/amx_kernels.h", "src/spectra/packed/csrc/quad_kernels.h",
                     "src/spectra/packed/csrc/quad_pass.h",
                     "src/spectra/packed/csrc/pool.h", "src/spectra/packed/csrc/rowlane_kernels.h",
                     "src/spectra/packed/csrc/defer.h"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        ),
        Extension(
            "spectra.kernels._train",
            sources=["src/spectra/kernels/csrc/train_kernels.c"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        ),
    ]
)
