"""Build the Cython extensions of fastconv.

Every extension is declared once in EXTENSIONS. The kernels run on a small
thread pool of their own (``fastconv/_ext/fc_pool.c``, POSIX threads), probed
by compiling a tiny program; without threads (or with
``FASTCONV_SERIAL_BUILD=1``) the extensions are built serial and the build
still succeeds. The direct-convolution kernels are compiled once per
instruction set through target pragmas in their own sources and chosen at run
time: nothing is built for the build machine's CPU (no ``-march``).
"""
import glob
import os
import sys
import tempfile
import textwrap

import Cython
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# module name -> sources, relative to the repository root
EXTENSIONS = {
    "fastconv._ext._buildinfo": ["fastconv/_ext/_buildinfo.pyx"],
    "fastconv._ext._im2col": ["fastconv/_ext/_im2col.pyx"],
    "fastconv._ext._conv": ["fastconv/_ext/_conv.pyx"],
    "fastconv._ext._pool": ["fastconv/_ext/_pool.pyx"],
    "fastconv._ext._relu": ["fastconv/_ext/_relu.pyx"],
    "fastconv._ext._parallel": ["fastconv/_ext/_parallel.pyx", "fastconv/_ext/fc_pool.c"],
    "fastconv._ext._direct": ["fastconv/_ext/_direct.pyx", "fastconv/_ext/dconv_dispatch.c",
                              "fastconv/_ext/dconv_avx512.c", "fastconv/_ext/dconv_avx2.c",
                              "fastconv/_ext/dconv_generic.c"],
}

CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "nonecheck": False,
}

THREADS_TEST = textwrap.dedent(
    """
    #include <pthread.h>
    static void *run(void *arg) { return arg; }
    int main(void) {
        pthread_t thread;
        if (pthread_create(&thread, 0, run, 0)) return 1;
        return pthread_join(thread, 0);
    }
    """
)


def thread_flags(compiler):
    """Return (compile_args, link_args) for POSIX threads, or None if they do not build."""
    if os.environ.get("FASTCONV_SERIAL_BUILD", "") not in ("", "0") or sys.platform == "win32":
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "threads_probe.c")
        with open(source, "w") as f:
            f.write(THREADS_TEST)
        try:
            objects = compiler.compile([source], output_dir=tmp, extra_postargs=["-pthread"])
            compiler.link_executable(objects, "threads_probe", output_dir=tmp, extra_postargs=["-pthread"])
        except Exception:  # a failed probe only means "no threads"
            return None
    return ["-pthread"], ["-pthread"]


class BuildExtWithThreads(build_ext):
    def build_extensions(self):
        flags = thread_flags(self.compiler)
        if flags is None:
            print("fastconv: threads not available, building serial extensions")
        self._rebuild_if_mode_changed("serial" if flags is None else "threads")
        for ext in self.extensions:
            if sys.platform != "win32":
                # -ffp-contract=fast: a * b + c in the kernels becomes one fused multiply-add
                ext.extra_compile_args = list(ext.extra_compile_args) + ["-O3", "-ffp-contract=fast"]
            if flags is not None:
                ext.extra_compile_args += flags[0]
                ext.extra_link_args = list(ext.extra_link_args) + flags[1]
                ext.define_macros = list(ext.define_macros) + [("FASTCONV_THREADS", "1")]
        super().build_extensions()

    def _rebuild_if_mode_changed(self, mode):
        # objects left in the build folder by a build of the other mode look up to date: rebuild them all
        stamp = os.path.join(self.build_temp, "fastconv-build-mode")
        if os.path.exists(stamp):
            with open(stamp) as f:
                self.force = self.force or f.read() != mode
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(mode)


def extensions():
    exts = [
        Extension(
            name,
            sources,
            include_dirs=[np.get_include(), "fastconv/_ext"],
            depends=sorted(glob.glob("fastconv/_ext/*.h") + glob.glob("fastconv/_ext/*.pxd")),
            define_macros=[
                ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                ("FASTCONV_CYTHON_VERSION", f'"{Cython.__version__}"'),
            ],
        )
        for name, sources in EXTENSIONS.items()
    ]
    return cythonize(exts, compiler_directives=CYTHON_DIRECTIVES)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtWithThreads})
