"""Builds the optional C parts and ships the start-up hook; everything else is in
pyproject.toml.

- ``_hotpath`` (csrc/hotpath.c): the caller's side of a traced call.
- ``_otlp`` (csrc/otlp_encoder.c): records straight to OTLP bytes on the worker.
- ``_timed_io`` (csrc/timed_io.c): the blob budget's counter-file I/O, timed without
  the GIL.

``optional=True``: without a C compiler the package installs anyway; traced calls then
take the pure-Python wrapper (spans.make_wrapper) and spans the SDK's exporters
(pipeline.DirectSpans), which do the same thing, slower.

``otel_flashinfer_autostart.pth`` (env-only activation, see otel_flashinfer_autostart.py)
must land in site-packages itself, where Python reads ``.pth`` files; package data
cannot put it there.  ``build_py`` copies it to the root of the build folder, which a
wheel installs into site-packages (``pip install .``); an editable install
(``pip install -e .``, PEP 660) builds its wheel elsewhere, so ``editable_wheel`` adds
it to that wheel's root too.
"""

import os
import shutil

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

PTH = "otel_flashinfer_autostart.pth"
PTH_SOURCE = PTH


class BuildPyWithPth(build_py):
    """build_py, plus the start-up hook at the root of build_lib."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, PTH)
        self.mkpath(self.build_lib)
        self.copy_file(PTH_SOURCE, target, preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


cmdclass = {"build_py": BuildPyWithPth}

try:
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWheelWithPth(editable_wheel):
        """editable_wheel, plus the start-up hook at the root of the editable wheel."""

        def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
            result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
            shutil.copyfile(PTH_SOURCE, os.path.join(unpacked_wheel, PTH))
            return result

    cmdclass["editable_wheel"] = EditableWheelWithPth
except ImportError:  # setuptools < 64: no PEP 660 editable installs
    pass

setup(
    ext_modules=[
        Extension("otel_flashinfer._hotpath", ["csrc/hotpath.c"],
                  depends=["csrc/hotpath_api.h", "csrc/py_defer.h", "csrc/xoshiro.h"],
                  extra_compile_args=["-O2"], optional=True),
        Extension("otel_flashinfer._otlp", ["csrc/otlp_encoder.c"],
                  extra_compile_args=["-O2"], optional=True),
        Extension("otel_flashinfer._timed_io", ["csrc/timed_io.c"],
                  extra_compile_args=["-O2"], optional=True),
    ],
    cmdclass=cmdclass,
)
