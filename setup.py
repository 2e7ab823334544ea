"""Builds the optional C hot path (csrc/hotpath.c); everything else is in pyproject.toml.

``optional=True``: without a C compiler the package installs anyway and traced calls
take the pure-Python path (spans.make_wrapper), which does the same thing, slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("otel_flashinfer._hotpath", ["csrc/hotpath.c"],
                             extra_compile_args=["-O2"], optional=True)])
