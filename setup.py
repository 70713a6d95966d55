"""Build the Cython extensions of fastconv.

Every extension is declared once in EXTENSIONS. OpenMP is probed by compiling
a tiny program; when the compiler has no OpenMP the extensions are built
serial (prange becomes a plain loop) and the build still succeeds.
"""
import os
import sys
import tempfile
import textwrap

import Cython
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# module name -> source, relative to the repository root
EXTENSIONS = {
    "fastconv._ext._buildinfo": "fastconv/_ext/_buildinfo.pyx",
    "fastconv._ext._im2col": "fastconv/_ext/_im2col.pyx",
    "fastconv._ext._conv": "fastconv/_ext/_conv.pyx",
    "fastconv._ext._pool": "fastconv/_ext/_pool.pyx",
    "fastconv._ext._relu": "fastconv/_ext/_relu.pyx",
    "fastconv._ext._parallel": "fastconv/_ext/_parallel.pyx",
}

CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "nonecheck": False,
}

OPENMP_TEST = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n > 0 ? 0 : 1;
    }
    """
)


def openmp_flags(compiler):
    """Return (compile_args, link_args) enabling OpenMP, or None if it does not build."""
    if os.environ.get("FASTCONV_DISABLE_OPENMP", "") not in ("", "0"):
        return None
    if sys.platform == "win32":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "omp_probe.c")
        with open(source, "w") as f:
            f.write(OPENMP_TEST)
        for cflags, lflags in candidates:
            try:
                objects = compiler.compile([source], output_dir=tmp, extra_postargs=cflags)
                compiler.link_executable(objects, "omp_probe", output_dir=tmp, extra_postargs=lflags)
            except Exception:  # a failed probe only means "no OpenMP"
                continue
            return cflags, lflags
    return None


class BuildExtWithOpenMP(build_ext):
    def build_extensions(self):
        flags = openmp_flags(self.compiler)
        if flags is None:
            print("fastconv: OpenMP not available, building serial extensions")
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args) + ["-O3"] * (sys.platform != "win32")
            if flags is not None:
                ext.extra_compile_args += flags[0]
                ext.extra_link_args = list(ext.extra_link_args) + flags[1]
        super().build_extensions()


def extensions():
    exts = [
        Extension(
            name,
            [source],
            include_dirs=[np.get_include(), "fastconv/_ext"],
            define_macros=[
                ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                ("FASTCONV_CYTHON_VERSION", f'"{Cython.__version__}"'),
            ],
        )
        for name, source in EXTENSIONS.items()
    ]
    return cythonize(exts, compiler_directives=CYTHON_DIRECTIVES)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtWithOpenMP})
