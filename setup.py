"""Build the Cython extensions of fastconv.

Every extension is declared once in EXTENSIONS. The kernels run on a small
thread pool of their own (``fastconv/_ext/fc_pool.c``): POSIX threads, probed
by compiling a tiny program, or Win32 threads on Windows; without threads (or with
``FASTCONV_SERIAL_BUILD=1``) the extensions are built serial and the build
still succeeds. The direct-convolution kernels are compiled once per
instruction set through target pragmas in their own sources and chosen at run
time: nothing is built for the build machine's CPU (no ``-march``).

The extensions are optional. Where they do not build (no C compiler, a
compiler that fails), the install still succeeds without them, so without the
cython backend: the numba and reference backends run. The reason is printed
in one line and written to ``fastconv/_ext/_not_built.json`` inside the
package, where ``fastconv info`` and the cython backend's import error read
it. It is all of the extensions or none: a failed build removes those that
did build. ``FASTCONV_REQUIRE_EXTENSIONS=1`` makes a failed build an error
(CI and the wheel builds set it). ``FASTCONV_NO_DIRECT_KERNELS=1`` compiles
the direct-convolution kernels out (as a compiler other than GCC or Clang
does), leaving the im2col path.
"""
import glob
import json
import os
import re
import sys
import tempfile
import textwrap

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

REQUIRE_VARIABLE = "FASTCONV_REQUIRE_EXTENSIONS"
SERIAL_VARIABLE = "FASTCONV_SERIAL_BUILD"
NO_DIRECT_VARIABLE = "FASTCONV_NO_DIRECT_KERNELS"

# Written inside the package when the extensions are not built, removed when they are.
NOT_BUILT_RECORD = os.path.join("fastconv", "_ext", "_not_built.json")

# What a build without a (working) compiler raises: a compiler that fails or is missing (CCompilerError,
# ExecError, FileNotFoundError), no compiler known for the platform (PlatformError; MSVC missing on
# Windows), and ValueError from the Windows compiler lookup.
BUILD_ERRORS = (CCompilerError, ExecError, PlatformError, ValueError, FileNotFoundError)

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


def flag(variable):
    """Whether environment variable ``variable`` is set to something other than "", "0", "false" or "no"."""
    return os.environ.get(variable, "").strip().lower() not in ("", "0", "false", "no")


def short_reason(message):
    """``message`` in one line, each compiler command line in it cut to its program's name."""
    message = re.sub(r"[Cc]ommand '?\[\s*'([^']*)'[^\]]*\]'?", r"command '\1'", message)
    return " ".join(message.split())


def compiler_name(compiler):
    """The program that compiles C for ``compiler`` (a CCompiler), or its type's name."""
    command = getattr(compiler, "compiler_so", None) or [getattr(compiler, "cc", None) or compiler.compiler_type]
    return command[0] if isinstance(command, (list, tuple)) else command


def check_compiler(compiler):
    """Compile a one-line C file: raises CompileError (or PlatformError) where the C compiler does not work."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "compiler_probe.c")
        with open(source, "w") as f:
            f.write("int fastconv_probe(void) { return 0; }\n")
        compiler.compile([source], output_dir=tmp)


def thread_flags(compiler):
    """Return (compile_args, link_args) for the pool's threads, or None if they do not build: Win32 threads
    on Windows (with any compiler; nothing to add), else POSIX threads."""
    if flag(SERIAL_VARIABLE):
        return None
    if sys.platform == "win32":
        return [], []
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


class ExtensionsNotBuilt(Exception):
    """The compiled extensions could not be built; the message says why."""


class BuildExtWithThreads(build_ext):
    """build_ext that builds the extensions with threads where it can, and all of them or none."""

    def run(self):
        inplace = self.inplace  # setuptools clears it while it builds, and restores it only on success
        try:
            super().run()
        except BUILD_ERRORS + (ExtensionsNotBuilt,) as exc:
            self.inplace = inplace
            reason = str(exc) if isinstance(exc, ExtensionsNotBuilt) else f"{type(exc).__name__}: {exc}"
            reason = short_reason(reason)
            self._remove_extensions()
            if flag(REQUIRE_VARIABLE):
                print(f"fastconv: the compiled extensions did not build and {REQUIRE_VARIABLE} is set: {reason}",
                      file=sys.stderr)
                raise
            self._write_record(reason)
            print(f"fastconv: the compiled (cython) backend was not built: {reason}; install a C compiler and "
                  f"reinstall, or set {REQUIRE_VARIABLE}=1 to make this an error", file=sys.stderr)
        else:
            self._write_record(None)

    def build_extensions(self):
        try:
            check_compiler(self.compiler)
        except BUILD_ERRORS as exc:
            raise ExtensionsNotBuilt(f"the C compiler {compiler_name(self.compiler)!r} does not work "
                                     f"({type(exc).__name__}: {exc})") from exc
        flags = thread_flags(self.compiler)
        if flags is None:
            print("fastconv: threads not available, building serial extensions")
        no_direct = flag(NO_DIRECT_VARIABLE)
        if no_direct:
            print("fastconv: building without the direct-convolution kernels")
        self._rebuild_if_mode_changed(("serial" if flags is None else "threads") + ("-nodirect" if no_direct else ""))
        for ext in self.extensions:
            if self.compiler.compiler_type != "msvc":  # GCC or Clang, on Windows too (MinGW-w64)
                # -ffp-contract=fast: a * b + c in the kernels becomes one fused multiply-add
                ext.extra_compile_args = list(ext.extra_compile_args) + ["-O3", "-ffp-contract=fast"]
            if flags is not None:
                ext.extra_compile_args += flags[0]
                ext.extra_link_args = list(ext.extra_link_args) + flags[1]
                ext.define_macros = list(ext.define_macros) + [("FASTCONV_THREADS", "1")]
            if no_direct:
                ext.define_macros = list(ext.define_macros) + [("FASTCONV_NO_DIRECT_KERNELS", "1")]
        super().build_extensions()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except BUILD_ERRORS as exc:
            raise ExtensionsNotBuilt(f"{ext.name} did not build ({type(exc).__name__}: {exc})") from exc

    def _output_paths(self):
        """Each place the extensions go, as a list of paths: the build folder, and the source tree when in place."""
        inplace = self.inplace
        try:
            places = []
            for self.inplace in ([False, True] if inplace else [False]):
                places.append([self.get_ext_fullpath(ext.name) for ext in self.extensions])
            return places
        finally:
            self.inplace = inplace

    def _remove_extensions(self):
        # all of them or none: an extension left from before the failure would leave the cython backend broken
        for paths in self._output_paths():
            for path in paths:
                if os.path.exists(path):
                    os.remove(path)

    def _write_record(self, reason):
        """Write why the extensions are not built beside them (the package data ``fastconv info`` reads), or
        remove that record when ``reason`` is None."""
        records = [os.path.join(self.build_lib, NOT_BUILT_RECORD)]
        if self.inplace:
            records.append(NOT_BUILT_RECORD)
        for record in records:
            if reason is None:
                if os.path.exists(record):
                    os.remove(record)
            else:
                os.makedirs(os.path.dirname(record), exist_ok=True)
                with open(record, "w") as f:
                    json.dump({"reason": reason, "python": sys.version.split()[0], "platform": sys.platform}, f)
                    f.write("\n")

    def get_outputs(self):
        outputs = super().get_outputs()
        record = os.path.join(self.build_lib, NOT_BUILT_RECORD)
        return outputs + [record] if os.path.exists(record) else outputs

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
    import Cython
    import numpy as np
    from Cython.Build import cythonize

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


if __name__ == "__main__":  # as pip and `python setup.py` run it; the tests import it for BuildExtWithThreads
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtWithThreads})
