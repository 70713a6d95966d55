"""The seeded fuzzer (``tests/fuzz_kernels.py``) on each fast backend, in the slow set: thousands of random
valid calls against the reference, misuse that must raise its documented error, and no crash."""
import os
import subprocess
import sys

import pytest

from conftest import FAST_BACKENDS

# numba compiles its kernels for most new geometries (seconds each): far fewer calls there
CALLS = {"cython": 20_000, "numba": 60}


@pytest.mark.slow
@pytest.mark.parametrize("name", FAST_BACKENDS)
def test_random_calls_match_the_reference_and_misuse_raises(name):
    script = os.path.join(os.path.dirname(__file__), "fuzz_kernels.py")
    result = subprocess.run([sys.executable, script, "--backend", name, "--calls", str(CALLS.get(name, 1000)),
                             "--seed", "1", "--quiet"], capture_output=True, text=True, timeout=1800,
                            cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "mismatches=0 wrong errors=0 crashes=0" in result.stdout
