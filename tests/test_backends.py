"""The backend switch: listing, setter, context manager, environment variable, failures reported."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import fastconv
from fastconv import _registry, kernels

from conftest import assert_close_to_reference


def run_python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FASTCONV_")}
    full_env.update(env)
    # run from tests/ so that the installed fastconv is imported, not the source tree
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300,
                          cwd=os.path.dirname(__file__))


def test_reference_is_always_available():
    assert "reference" in fastconv.available_backends()
    assert fastconv.backend_status()["reference"] == "ok"


def test_known_backends_are_listed_fastest_first():
    fastest_first = ["cython", "numba", "reference"]
    if _registry.cython_shortfall(_registry.cython_build_facts()) is not None:  # numba, where cython is not whole
        fastest_first = ["numba", "cython", "reference"]
    assert fastconv.known_backends()[:3] == fastest_first


def test_set_backend_and_get_backend():
    previous = fastconv.get_backend()
    try:
        fastconv.set_backend("reference")
        assert fastconv.get_backend() == "reference"
        assert _registry.backend_module().NAME == "reference"
    finally:
        fastconv.set_backend(previous)


def test_use_backend_restores_the_previous_one_even_on_error():
    previous = fastconv.get_backend()
    with pytest.raises(RuntimeError, match="boom"):
        with fastconv.use_backend("reference"):
            assert fastconv.get_backend() == "reference"
            raise RuntimeError("boom")
    assert fastconv.get_backend() == previous


def test_use_backend_nests():
    names = fastconv.available_backends()
    with fastconv.use_backend(names[-1]):
        with fastconv.use_backend(names[0]):
            assert fastconv.get_backend() == names[0]
        assert fastconv.get_backend() == names[-1]


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown fastconv backend 'fortran'; available backends: .*reference"):
        fastconv.set_backend("fortran")
    with pytest.raises(TypeError):
        fastconv.set_backend(3)


def test_names_are_case_insensitive():
    with fastconv.use_backend(" Reference "):
        assert fastconv.get_backend() == "reference"


@pytest.fixture
def broken_backend(monkeypatch):
    """A registered backend whose module raises on import."""
    module_name = "fastconv_test_broken_backend"
    monkeypatch.setitem(_registry._MODULES, "broken", module_name)
    monkeypatch.setattr(_registry, "_PREFERENCE", ["broken"] + _registry._PREFERENCE)
    monkeypatch.setitem(sys.modules, module_name, None)  # makes `import` raise ImportError
    yield "broken"
    _registry._failed.pop("broken", None)


def test_a_failed_backend_is_reported_with_its_reason(broken_backend):
    assert "broken" not in fastconv.available_backends()
    assert "import of fastconv_test_broken_backend halted" in fastconv.backend_status()["broken"]
    with pytest.raises(RuntimeError, match="backend .broken. is unavailable: ModuleNotFoundError: import of"):
        fastconv.set_backend("broken")


def test_a_failed_backend_is_not_silently_skipped_by_default(broken_backend, monkeypatch):
    monkeypatch.setattr(_registry, "_current", None)
    monkeypatch.delenv("FASTCONV_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="fastconv backend 'broken' failed to import"):
        chosen = fastconv.get_backend()
    assert chosen != "broken"


def test_register_backend_adds_a_backend_without_touching_layers(monkeypatch):
    reference = _registry.backend_module("reference")
    calls = []
    module = types.ModuleType("fastconv_test_counting_backend")
    for name in kernels.INTERFACE:
        def counted(*args, _name=name):
            calls.append(_name)
            return getattr(reference, _name)(*args)
        setattr(module, name, counted)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(_registry, "_MODULES", dict(_registry._MODULES))
    monkeypatch.setattr(_registry, "_PREFERENCE", list(_registry._PREFERENCE))
    fastconv.register_backend("counting", module.__name__)
    from fastconv.layers import Convolution, Pooling, Relu
    with fastconv.use_backend("counting"):
        x = np.ones((1, 1, 4, 4))
        out = Pooling(2, 2).forward(Relu().forward(Convolution(np.ones((1, 1, 3, 3)), np.zeros(1), pad=1).forward(x)))
    assert out.shape == (1, 1, 2, 2)
    assert calls == ["conv_forward", "relu_forward", "maxpool_forward"]
    _registry._loaded.pop("counting", None)


def test_a_module_lacking_an_interface_function_is_not_a_backend(monkeypatch):
    module = types.ModuleType("fastconv_test_incomplete_backend")
    for name in kernels.INTERFACE[1:]:
        setattr(module, name, lambda *args: None)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(_registry, "_MODULES", dict(_registry._MODULES))
    monkeypatch.setattr(_registry, "_PREFERENCE", list(_registry._PREFERENCE))
    fastconv.register_backend("incomplete", module.__name__)
    assert "incomplete" not in fastconv.available_backends()
    assert f"lacks {kernels.INTERFACE[0]}" in fastconv.backend_status()["incomplete"]
    with pytest.raises(RuntimeError, match="does not implement the kernel interface"):
        fastconv.set_backend("incomplete")
    _registry._failed.pop("incomplete", None)


def test_environment_variable_selects_the_backend():
    result = run_python("import fastconv; print(fastconv.get_backend())", FASTCONV_BACKEND="reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"


def test_environment_variable_with_unknown_name_fails_clearly():
    result = run_python("import fastconv; fastconv.get_backend()", FASTCONV_BACKEND="nope")
    assert result.returncode != 0
    assert "FASTCONV_BACKEND='nope'" in result.stderr and "available backends" in result.stderr


def test_default_is_the_fastest_available():
    result = run_python("import fastconv; print(fastconv.get_backend(), fastconv.available_backends()[0])")
    assert result.returncode == 0, result.stderr
    chosen, fastest = result.stdout.split()
    assert chosen == fastest


def test_import_is_lazy():
    """Importing fastconv loads no backend and no numba."""
    result = run_python("import sys, fastconv, fastconv.layers; "
                        "print([m for m in sys.modules if m.startswith(('numba', 'fastconv.backends.'))])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_kernels_dispatch_to_the_active_backend(backend):
    assert _registry.backend_module().NAME == backend
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    assert kernels.im2col(x, 2, 2, 2, 0).shape == (4, 4)


def test_num_threads_from_environment():
    result = run_python("import fastconv; print(fastconv.get_num_threads())", FASTCONV_NUM_THREADS="3")
    assert result.stdout.strip() == "3"
    result = run_python("import fastconv; fastconv.get_num_threads()", FASTCONV_NUM_THREADS="zero")
    assert "FASTCONV_NUM_THREADS must be a positive integer" in result.stderr


@pytest.mark.parametrize("batch, features, outputs", [(100, 50, 10), (100, 1024, 50)])
def test_affine_of_small_and_large_products_matches_reference(batch, features, outputs, fast_backend, dtype, rng,
                                                              monkeypatch):
    """Small products skip the one-thread BLAS limit of the fast backends, large ones hold it."""
    from fastconv.backends import _blas, reference
    entered = []

    class RecordingLimit:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc_info):
            pass
    monkeypatch.setattr(_blas, "single_threaded_blas", RecordingLimit())
    x = rng.standard_normal((batch, features)).astype(dtype)
    W = rng.standard_normal((features, outputs)).astype(dtype)
    b = rng.standard_normal(outputs).astype(dtype)
    dout = rng.standard_normal((batch, outputs)).astype(dtype)
    assert_close_to_reference(kernels.affine_forward(x, W, b), reference.affine_forward(x, W, b))
    for got, expected in zip(kernels.affine_backward(dout, x, W), reference.affine_backward(dout, x, W)):
        assert_close_to_reference(got, expected)
    large = batch * features * outputs >= _blas.ONE_THREAD_PRODUCT
    assert entered == ([True] * 2 if large else [])


REQUIRED_ENV_VAR = "FASTCONV_REQUIRE_BACKENDS"


def unavailable_required_backends():
    """``{name: reason}`` for each backend named in FASTCONV_REQUIRE_BACKENDS that does not work here."""
    required = [name.strip().lower() for name in os.environ.get(REQUIRED_ENV_VAR, "").split(",") if name.strip()]
    status = fastconv.backend_status()
    return {name: status.get(name, "not a registered backend") for name in required if status.get(name) != "ok"}


def test_backends_required_on_this_machine_import():
    """CI names the backends its machine must have (FASTCONV_REQUIRE_BACKENDS=cython,numba); a broken build
    fails here instead of its tests being left out of the backend fixture."""
    assert unavailable_required_backends() == {}


def test_a_required_backend_that_does_not_import_is_reported(broken_backend, monkeypatch):
    monkeypatch.setenv(REQUIRED_ENV_VAR, "reference, Broken,fortran")
    missing = unavailable_required_backends()
    assert sorted(missing) == ["broken", "fortran"]
    assert "import of fastconv_test_broken_backend halted" in missing["broken"]


# The default follows what was built: the facts of ``cython_build_facts`` for each build that leaves the
# cython backend short of its fastest (the build options named), and for the whole build.
WHOLE_CYTHON = {"imports": True, "not_built": None, "variants": ("avx512", "avx2", "generic"), "threaded": True}
SHORT_CYTHON = {
    # FASTCONV_NO_DIRECT_KERNELS=1, or a compiler other than GCC and Clang (MSVC)
    "no-direct": (dict(WHOLE_CYTHON, variants=()), "the cython backend is built without its direct kernels"),
    # FASTCONV_SERIAL_BUILD=1, or no POSIX threads (Windows)
    "serial": (dict(WHOLE_CYTHON, threaded=False), "the cython backend is built without threads"),
    # ARM64 (NEON), or an x86-64 CPU without AVX2
    "portable": (dict(WHOLE_CYTHON, variants=("generic",)), "this CPU runs only the cython backend's portable kernels"),
    # no C compiler at install time (setup.py's build record)
    "not-built": ({"imports": False, "not_built": "no compiler", "variants": (), "threaded": False},
                  "the cython backend is not built"),
    "broken": ({"imports": False, "not_built": None, "variants": (), "threaded": False},
               "the cython backend does not import"),
}


@pytest.fixture
def built_as(monkeypatch):
    """Make the registry see the cython build ``facts`` and choose its default anew; returns the setter."""
    monkeypatch.delenv("FASTCONV_BACKEND", raising=False)
    monkeypatch.setattr(_registry, "_current", None)

    def use(facts):
        monkeypatch.setattr(_registry, "_cython_facts", facts)
        monkeypatch.setattr(_registry, "_current", None)
    return use


@pytest.mark.parametrize("build", SHORT_CYTHON)
def test_the_default_is_numba_where_the_cython_build_is_not_its_fastest(build, built_as):
    if "numba" not in fastconv.available_backends():
        pytest.skip("the numba backend does not import here")
    facts, why = SHORT_CYTHON[build]
    assert _registry.cython_shortfall(facts) == why
    assert _registry.default_order(facts) == ["numba", "cython", "reference"]
    built_as(facts)
    assert _registry.default_backend() == ("numba", why)
    assert fastconv.get_backend() == "numba"
    assert fastconv.known_backends()[:2] == ["numba", "cython"]


def test_the_default_is_cython_where_it_is_built_whole(built_as):
    assert _registry.cython_shortfall(WHOLE_CYTHON) is None
    assert _registry.default_order(WHOLE_CYTHON) == ["cython", "numba", "reference"]
    if "cython" not in fastconv.available_backends():
        pytest.skip("the cython backend does not import here")
    built_as(WHOLE_CYTHON)
    why = "the fastest as built here: direct kernels for avx512, with threads"
    assert _registry.default_backend() == ("cython", why)
    assert fastconv.get_backend() == "cython"


def test_a_short_cython_build_is_still_chosen_when_numba_does_not_import(built_as, monkeypatch):
    if "cython" not in fastconv.available_backends():
        pytest.skip("the cython backend does not import here")
    built_as(SHORT_CYTHON["serial"][0])
    monkeypatch.delitem(_registry._loaded, "numba", raising=False)
    monkeypatch.setitem(_registry._failed, "numba", "ImportError: no numba today")
    with pytest.warns(RuntimeWarning, match="fastconv backend 'numba' failed to import"):
        assert _registry.default_backend() == ("cython", "numba did not import")


def test_an_explicit_choice_wins_over_the_build(built_as, monkeypatch):
    built_as(SHORT_CYTHON["serial"][0])
    monkeypatch.setenv("FASTCONV_BACKEND", "reference")
    assert _registry.default_backend() == ("reference", "set by FASTCONV_BACKEND")
    assert fastconv.get_backend() == "reference"
    monkeypatch.delenv("FASTCONV_BACKEND")
    fastconv.set_backend("reference")
    assert fastconv.get_backend() == "reference"


def test_registered_backends_keep_their_place_in_the_default_order(monkeypatch):
    monkeypatch.setattr(_registry, "_MODULES", dict(_registry._MODULES))
    monkeypatch.setattr(_registry, "_PREFERENCE", list(_registry._PREFERENCE))
    fastconv.register_backend("mine", "fastconv.backends.reference")
    fastconv.register_backend("first", "fastconv.backends.reference", 0)
    serial = SHORT_CYTHON["serial"][0]
    assert _registry.default_order(WHOLE_CYTHON) == ["first", "cython", "numba", "mine", "reference"]
    assert _registry.default_order(serial) == ["first", "numba", "cython", "mine", "reference"]
    assert _registry.default_reason("first", serial, []) == "first in the order of preference"
    for name in ("mine", "first"):
        _registry._loaded.pop(name, None)
