"""Builds the native CPU library from csrc/ (the rest of the project is configured in pyproject.toml).

The library is a plain shared object with a C ABI, loaded by galore_kernels.native through ctypes: it
needs neither Python's nor torch's headers. A failed build (no C++ compiler, no OpenMP) does not fail
the install; the package then runs the PyTorch reference and warns once, at its first CPU step.
"""

import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = sorted(str(path) for path in Path("csrc").glob("*.cpp"))
# Portable flags: no -march=native in what ships (the wheel may run on another CPU). -ffp-contract=off
# keeps the compiler from fusing what the reference rounds twice (csrc/adam8bit.cpp).
FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]


class OptionalBuildExt(build_ext):
    """build_ext that reports a failed native build in one line and lets the install go on."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # noqa: BLE001 - any failure leaves the reference path
            self._skip(error)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001
            self._skip(error)

    _reported = False

    def _skip(self, error: Exception) -> None:
        if not self._reported:  # a failed compile also fails the copy that follows it: one line for both
            print(
                f"galore_kernels: native CPU library not built ({error}); the PyTorch reference will run",
                file=sys.stderr,
            )
            self._reported = True


setup(
    ext_modules=[
        Extension(
            "galore_kernels._native",
            sources=SOURCES,
            language="c++",
            extra_compile_args=FLAGS,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
