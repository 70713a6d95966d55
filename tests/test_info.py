"""`python -m fastconv info` tells versions, backends, the kernels' thread pool and SIMD variant, and threads."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fastconv
from fastconv import info


def test_info_command_prints_the_facts():
    result = subprocess.run([sys.executable, "-m", "fastconv", "info"], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"fastconv {fastconv.__version__}" in out
    for word in ("numpy", "cython", "numba", "pool", "simd", "threads", "blas", "backends:", "active backend:"):
        assert word in out
    for name in fastconv.known_backends():
        assert name in out


def test_info_reports_unavailable_backends_with_reason():
    facts = info.collect()
    facts["backends"] = dict(facts["backends"], broken="ImportError: no compiler today")
    assert "broken     UNAVAILABLE: ImportError: no compiler today" in info.format_info(facts)


def test_compiled_probe_is_built():
    from fastconv._ext import _buildinfo
    assert _buildinfo.cython_version()[0].isdigit()


def unbuilt_clone(tmp_path):
    """A copy of the source tree as a fresh clone has it: sources only, no compiled modules."""
    root = Path(fastconv.__file__).resolve().parents[1]
    clone = tmp_path / "clone"
    shutil.copytree(root / "fastconv", clone / "fastconv",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "*.o", "__pycache__"))
    (clone / "tests").mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), clone / "tests" / "conftest.py")
    (clone / "tests" / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    return clone


def run_in(folder, *args):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "FASTCONV_BACKEND")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=folder, env=env)


def test_an_unbuilt_source_tree_that_hides_the_installed_package_says_so_and_what_to_do(tmp_path):
    clone = unbuilt_clone(tmp_path)
    advice = ["compiled extensions are not built", "python setup.py build_ext --inplace", "pip install -e .",
              "run from another folder", "hides the fastconv installed at"]

    info_run = run_in(clone, "-m", "fastconv", "info")
    assert info_run.returncode == 0, info_run.stderr
    assert info_run.stdout.startswith("WARNING: fastconv is imported from " + str(clone / "fastconv"))
    for words in advice:
        assert words in info_run.stdout.replace("\n         ", " ")
    hidden = Path(info_run.stdout.split("hides the fastconv installed at ")[1].split(": Python looks")[0])
    assert (hidden / "__init__.py").is_file() and hidden != clone / "fastconv"

    status = run_in(clone, "-c", "import fastconv; print(fastconv.backend_status()['cython'])")
    assert status.returncode == 0, status.stderr
    for words in advice:
        assert words in status.stdout.replace("\n", " ")

    tests = run_in(clone, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests")
    assert tests.returncode == 4, tests.stdout + tests.stderr  # a usage error, before any test is collected
    assert "fastconv is not built here" in tests.stdout + tests.stderr
    assert "python setup.py build_ext --inplace" in tests.stdout + tests.stderr


def test_a_built_package_has_no_build_problem():
    from fastconv import _build_check

    assert _build_check.missing_extensions() == [] and _build_check.diagnosis() is None
    assert "WARNING" not in info.format_info(info.collect())


def test_info_says_which_backend_is_the_default_and_why():
    code = "import fastconv, fastconv.info; fastconv.info.main(); print(fastconv.get_backend())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(__file__),
                            env={k: v for k, v in os.environ.items() if k != "FASTCONV_BACKEND"})
    assert result.returncode == 0, result.stderr
    *lines, active = result.stdout.splitlines()
    default = next(line for line in lines if line.startswith("default: "))
    assert default.startswith(f"default: {active} (") and default.endswith(")")
    if active == "cython":
        assert "the fastest as built here: direct kernels for" in default
    facts = info.collect()
    assert f"default: {facts['default_backend']} ({facts['default_reason']})" in info.format_info(facts)
