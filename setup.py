"""Build hook for spectra's compiled CPU kernels (see src/spectra/packed/).

Everything else about the package lives in pyproject.toml. The kernels are plain C with no
dependency on torch at build time, so the build never pulls a torch wheel into its isolated
environment.
"""

from setuptools import setup

setup()
