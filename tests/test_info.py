"""`python -m fastconv info` tells versions, backends, OpenMP and threads."""
import os
import subprocess
import sys

import fastconv
from fastconv import info


def test_info_command_prints_the_facts():
    result = subprocess.run([sys.executable, "-m", "fastconv", "info"], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"fastconv {fastconv.__version__}" in out
    for word in ("numpy", "cython", "numba", "openmp", "threads", "blas", "backends:", "active backend:"):
        assert word in out
    for name in fastconv.known_backends():
        assert name in out


def test_info_reports_unavailable_backends_with_reason():
    facts = info.collect()
    facts["backends"] = dict(facts["backends"], broken="ImportError: no compiler today")
    assert "broken     UNAVAILABLE: ImportError: no compiler today" in info.format_info(facts)


def test_compiled_probe_is_built():
    from fastconv._ext import _buildinfo
    assert isinstance(_buildinfo.openmp_enabled(), bool)
    assert _buildinfo.openmp_max_threads() >= 1
    assert _buildinfo.cython_version()[0].isdigit()
