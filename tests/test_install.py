"""Installing without a C compiler: the extensions are all built or none, a skipped build says why (in
setup.py's build record, ``fastconv info`` and the cython backend's import error), and
FASTCONV_REQUIRE_EXTENSIONS turns it into an error."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import fastconv
from fastconv import _build_check, info

ROOT = Path(__file__).resolve().parents[1]
SETUP_PY = ROOT / "setup.py"

GOOD_MODULE = """
#include <Python.h>
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "%s", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_%s(void) { return PyModule_Create(&module); }
"""


def load_setup_py():
    """setup.py as a module (it calls setup() only when run as a script)."""
    if not SETUP_PY.is_file():
        pytest.skip("setup.py is not here (tests run from an installed package)")
    pytest.importorskip("setuptools")
    spec = importlib.util.spec_from_file_location("fastconv_setup_py", SETUP_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def needs_compiler():
    compiler = sysconfig.get_config_var("CC") or "cc"
    if shutil.which(compiler.split()[0]) is None or not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        pytest.skip("no C compiler (or no Python headers) here")


def build(tmp_path, sources, inplace=False):
    """Run setup.py's build_ext on extensions ``{name: C source}`` of package fastconv._ext in ``tmp_path``;
    return (build_lib, the command)."""
    from setuptools import Distribution, Extension

    setup_py = load_setup_py()
    ext_dir = tmp_path / "fastconv" / "_ext"
    ext_dir.mkdir(parents=True, exist_ok=True)
    extensions = []
    for name, source in sources.items():
        (ext_dir / f"{name}.c").write_text(source % (name, name) if "%s" in source else source)
        extensions.append(Extension(f"fastconv._ext.{name}", [f"fastconv/_ext/{name}.c"]))
    dist = Distribution({"name": "probe", "ext_modules": extensions,
                         "cmdclass": {"build_ext": setup_py.BuildExtWithThreads}})
    command = dist.get_command_obj("build_ext")
    command.build_lib = str(tmp_path / "lib")
    command.build_temp = str(tmp_path / "temp")
    command.inplace = inplace
    command.ensure_finalized()
    command.run()
    return tmp_path / "lib", command


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for variable in ("FASTCONV_REQUIRE_EXTENSIONS", "FASTCONV_SERIAL_BUILD", "FASTCONV_NO_DIRECT_KERNELS"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


def built_modules(folder):
    return sorted(path.name.split(".")[0] for path in (folder / "fastconv" / "_ext").glob("*")
                  if path.suffix in (".so", ".pyd"))


def record_in(folder):
    path = folder / "fastconv" / "_ext" / "_not_built.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_without_a_working_compiler_the_build_succeeds_without_extensions_and_records_why(in_tmp, monkeypatch,
                                                                                         capsys):
    monkeypatch.setenv("CC", "false")
    lib, _ = build(in_tmp, {"_one": GOOD_MODULE})
    assert built_modules(lib) == []
    record = record_in(lib)
    assert "the C compiler 'false' does not work" in record["reason"]
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("fastconv:"))
    assert line.startswith("fastconv: the compiled (cython) backend was not built: the C compiler 'false'")
    assert "install a C compiler and reinstall, or set FASTCONV_REQUIRE_EXTENSIONS=1" in line


def test_required_extensions_make_a_failed_build_an_error(in_tmp, monkeypatch, capsys):
    load_setup_py()
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("FASTCONV_REQUIRE_EXTENSIONS", "1")
    with pytest.raises(Exception, match="the C compiler 'false' does not work"):
        build(in_tmp, {"_one": GOOD_MODULE})
    assert "FASTCONV_REQUIRE_EXTENSIONS is set" in capsys.readouterr().err
    assert record_in(in_tmp / "lib") is None


def test_one_extension_that_fails_leaves_none_built(in_tmp):
    needs_compiler()
    lib, command = build(in_tmp, {"_one": GOOD_MODULE, "_two": "this is not C;\n"})
    assert built_modules(lib) == []  # _one was built, then removed
    assert "fastconv._ext._two did not build (CompileError" in record_in(lib)["reason"]
    assert command.get_outputs()[-1].endswith("_not_built.json")


def test_a_successful_build_clears_the_record_of_a_skipped_one_in_place_too(in_tmp, monkeypatch):
    needs_compiler()
    monkeypatch.setenv("CC", "false")
    build(in_tmp, {"_one": GOOD_MODULE}, inplace=True)
    assert record_in(in_tmp) is not None and record_in(in_tmp / "lib") is not None
    monkeypatch.delenv("CC")
    lib, _ = build(in_tmp, {"_one": GOOD_MODULE}, inplace=True)
    assert built_modules(lib) == ["_one"] and built_modules(in_tmp) == ["_one"]
    assert record_in(lib) is None and record_in(in_tmp) is None


def test_a_failed_build_removes_extensions_left_from_an_earlier_one(in_tmp, monkeypatch):
    needs_compiler()
    lib, _ = build(in_tmp, {"_one": GOOD_MODULE}, inplace=True)
    assert built_modules(lib) == ["_one"] and built_modules(in_tmp) == ["_one"]
    monkeypatch.setenv("CC", "false")
    build(in_tmp, {"_one": GOOD_MODULE}, inplace=True)
    assert built_modules(lib) == [] and built_modules(in_tmp) == []


def test_compiler_command_lines_are_cut_from_the_reason():
    setup_py = load_setup_py()
    message = "CompileError: Command '['gcc', '-O3', '-c', 'x.c', '-o', 'x.o']' returned non-zero exit status 1.\n"
    assert setup_py.short_reason(message) == "CompileError: command 'gcc' returned non-zero exit status 1."


@pytest.mark.parametrize("value, on", [("", False), ("0", False), ("no", False), ("1", True), ("yes", True)])
def test_build_flags(value, on, monkeypatch):
    setup_py = load_setup_py()
    monkeypatch.setenv("FASTCONV_REQUIRE_EXTENSIONS", value)
    assert setup_py.flag("FASTCONV_REQUIRE_EXTENSIONS") is on


@pytest.fixture
def skipped_build(tmp_path, monkeypatch):
    """_build_check as in an install whose build skipped the extensions."""
    record = tmp_path / "_not_built.json"
    record.write_text(json.dumps({"reason": "no compiler today"}))
    monkeypatch.setattr(_build_check, "NOT_BUILT_RECORD", record)
    monkeypatch.setattr(_build_check, "missing_extensions", lambda: ["_conv", "_direct"])
    return record


def test_a_skipped_build_is_told_apart_from_an_unbuilt_source_tree(skipped_build):
    assert _build_check.skipped_reason() == "no compiler today"
    problem = _build_check.diagnosis()
    assert problem.startswith("fastconv was installed without its compiled extensions")
    assert "no compiler today" in problem and "install a C compiler and reinstall" in problem
    assert "build_ext --inplace" not in problem
    skipped_build.unlink()
    assert _build_check.skipped_reason() is None
    assert "build_ext --inplace" in _build_check.diagnosis()


def test_an_unreadable_record_still_says_the_build_was_skipped(skipped_build):
    skipped_build.write_text("{not json")
    assert "is unreadable" in _build_check.skipped_reason()


def test_a_record_beside_built_extensions_is_ignored(skipped_build, monkeypatch):
    monkeypatch.setattr(_build_check, "missing_extensions", lambda: [])
    assert _build_check.skipped_reason() is None and _build_check.diagnosis() is None


def test_info_names_the_cython_backend_not_built_with_its_reason(skipped_build):
    facts = dict(info.collect(), not_built="no compiler today", build_problem=_build_check.diagnosis(),
                 default_backend="numba", default_reason="the cython backend is not built")
    facts["backends"] = dict(facts["backends"], cython="ImportError: cannot import name '_conv'")
    text = info.format_info(facts)
    assert "cython     NOT BUILT: no compiler today (install a C compiler and reinstall fastconv" in text
    assert "default: numba (the cython backend is not built)" in text
    assert "WARNING" not in text


def installed_without_extensions(tmp_path):
    """A copy of the package as `pip install .` leaves it where no C compiler works: no compiled modules,
    and the build record."""
    root = Path(fastconv.__file__).resolve().parent
    copy = tmp_path / "site" / "fastconv"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "*.o", "__pycache__"))
    (copy / "_ext" / "_not_built.json").write_text(json.dumps({"reason": "no compiler today"}))
    return copy.parent


def run_python(folder, code, **env):
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "FASTCONV_BACKEND")}
    environment.update(PYTHONPATH=str(folder), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=folder, env=environment)


def test_an_install_without_extensions_defaults_to_numba_and_says_why(tmp_path):
    site = installed_without_extensions(tmp_path)
    result = run_python(site, "from fastconv import info; info.main()")
    assert result.returncode == 0, result.stderr
    assert "cython     NOT BUILT: no compiler today" in result.stdout
    assert "default: numba (the cython backend is not built)" in result.stdout
    assert "WARNING" not in result.stdout and "RuntimeWarning" not in result.stderr

    forced = run_python(site, "import fastconv; fastconv.get_backend()", FASTCONV_BACKEND="cython")
    assert forced.returncode != 0
    assert "fastconv backend 'cython' is unavailable" in forced.stderr
    assert "installed without its compiled extensions, so without the cython backend: no compiler today" \
        in forced.stderr
