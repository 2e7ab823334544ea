"""Builds the optional C parts; everything else is in pyproject.toml.

- ``_hotpath`` (csrc/hotpath.c): the caller's side of a traced call.
- ``_otlp`` (csrc/otlp_encoder.c): records straight to OTLP bytes on the worker.

``optional=True``: without a C compiler the package installs anyway; traced calls then
take the pure-Python wrapper (spans.make_wrapper) and spans the SDK's exporters
(pipeline.DirectSpans), which do the same thing, slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("otel_flashinfer._hotpath", ["csrc/hotpath.c"],
              extra_compile_args=["-O2"], optional=True),
    Extension("otel_flashinfer._otlp", ["csrc/otlp_encoder.c"],
              extra_compile_args=["-O2"], optional=True),
])
