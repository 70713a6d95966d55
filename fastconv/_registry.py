"""The backend registry: which module implements the kernel interface now.

Backends are imported lazily, the first time one is asked for, so that
``import fastconv`` stays cheap. A backend that fails to import is remembered
with its reason and reported (``available_backends``, ``python -m fastconv
info``); it is never silently replaced by another one when asked for by name.
"""
import contextlib
import importlib
import os
import warnings

from fastconv import _build_check

ENV_VAR = "FASTCONV_BACKEND"

# Fastest first: with no choice made, the first one that imports runs. The cython backend leads only where
# it is built whole for this CPU (``cython_shortfall``); otherwise it goes after numba.
_MODULES = {
    "cython": "fastconv.backends.cython",
    "numba": "fastconv.backends.numba",
    "reference": "fastconv.backends.reference",
}
_PREFERENCE = ["cython", "numba", "reference"]
_PORTABLE_VARIANT = "generic"

_cython_facts = None  # what the cython backend says of its build, once asked

_loaded = {}  # name -> module
_failed = {}  # name -> reason it could not be imported
_current = None  # name of the active backend, None until first needed


def register_backend(name, module_path, preference=None):
    """Make a backend known by the module that implements the kernel interface.

    ``preference`` is its position in the default order (0 = tried first);
    by default it goes just before "reference".
    """
    global _cython_facts
    _MODULES[name] = module_path
    _loaded.pop(name, None)
    _failed.pop(name, None)
    if name == "cython":
        _cython_facts = None  # asked of the new module
    if name in _PREFERENCE:
        _PREFERENCE.remove(name)
    if preference is None:
        preference = _PREFERENCE.index("reference") if "reference" in _PREFERENCE else len(_PREFERENCE)
    _PREFERENCE.insert(preference, name)


def cython_build_facts():
    """What the cython backend was built with, as this CPU runs it: a dict with "imports" (whether the
    backend imports), "not_built" (why setup.py skipped the extensions, or None), "variants" (the
    direct-kernel variants built that this CPU runs, best first) and "threaded" (built with threads).
    Asked of the backend once (``available_variants()``, ``_THREADED``)."""
    global _cython_facts
    if _cython_facts is None:
        module = _load("cython") if "cython" in _MODULES else None
        _cython_facts = {
            "imports": module is not None,
            "not_built": _build_check.skipped_reason() if module is None else None,
            "variants": tuple(module.available_variants()) if module is not None else (),
            "threaded": bool(getattr(module, "_THREADED", False)),
        }
    return _cython_facts


def cython_shortfall(facts):
    """None when the cython backend as built (``facts`` as from ``cython_build_facts``) is the fastest one
    here, else why it is not, as a phrase: it must import, have its direct kernels and its threads, and
    this CPU must run one of its vector variants wider than the portable one."""
    if not facts["imports"]:
        return "the cython backend is not built" if facts["not_built"] else "the cython backend does not import"
    if not facts["variants"]:
        return "the cython backend is built without its direct kernels"
    if not facts["threaded"]:
        return "the cython backend is built without threads"
    if all(v == _PORTABLE_VARIANT for v in facts["variants"]):
        return "this CPU runs only the cython backend's portable kernels"
    return None


def default_order(facts):
    """The registered backends in the order the default tries them, given the cython build's ``facts``:
    ``_PREFERENCE``, with "cython" moved just after "numba" when ``cython_shortfall(facts)``."""
    known = [n for n in _PREFERENCE if n in _MODULES]
    order = known + [n for n in _MODULES if n not in known]
    if cython_shortfall(facts) and "cython" in order and "numba" in order \
            and order.index("cython") < order.index("numba"):
        order.remove("cython")
        order.insert(order.index("numba") + 1, "cython")
    return order


def default_reason(chosen, facts, tried):
    """Why ``chosen`` is the default (a phrase), given the cython build's ``facts`` and the names ``tried``
    before it, which did not import."""
    shortfall = cython_shortfall(facts)
    if tried:
        return f"{', '.join(tried)} did not import"
    if chosen == "cython" and shortfall is None:
        return f"the fastest as built here: direct kernels for {facts['variants'][0]}, with threads"
    if chosen == "numba" and shortfall is not None:
        return shortfall
    return "first in the order of preference"


def _ordered_names():
    return default_order(cython_build_facts())


def _load(name):
    """Import a backend module once; return it, or None and remember why not."""
    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
        _check_interface(module)
    except Exception as exc:  # any import error makes the backend unavailable, with its reason
        _failed[name] = f"{type(exc).__name__}: {exc}"
        problem = _build_check.diagnosis() if isinstance(exc, ImportError) else None
        if problem:
            _failed[name] += f"\n{problem}"
        return None
    _loaded[name] = module
    return module


def _check_interface(module):
    """TypeError unless ``module`` has every function of the kernel interface (``fastconv.kernels.INTERFACE``)."""
    from fastconv.kernels import INTERFACE  # the interface module imports this one

    missing = [f for f in INTERFACE if not callable(getattr(module, f, None))]
    if missing:
        raise TypeError(f"{module.__name__} does not implement the kernel interface: it lacks {', '.join(missing)}")


def _unknown(name):
    return ValueError(
        f"unknown fastconv backend {name!r}; available backends: {', '.join(available_backends())}"
        + "".join(f"; {n!r} is unavailable ({why})" for n, why in backend_status().items() if why != "ok")
    )


def _require(name):
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in _MODULES:
        raise _unknown(name)
    if _load(key) is None:
        raise RuntimeError(f"fastconv backend {key!r} is unavailable: {_failed[key]}")
    return key


def known_backends():
    """Every registered backend name, available or not, fastest first."""
    return _ordered_names()


def available_backends():
    """Names of the backends that import on this machine, fastest first."""
    return [name for name in _ordered_names() if _load(name) is not None]


def backend_status():
    """``{name: "ok" or the reason it is unavailable}`` for every registered backend."""
    return {name: ("ok" if _load(name) is not None else _failed[name]) for name in _ordered_names()}


def default_backend():
    """``(name, why)``: the backend that runs when none is set with ``set_backend``, and why it is that one
    (a phrase). ``FASTCONV_BACKEND`` names it; else the first of ``default_order`` that imports."""
    chosen = os.environ.get(ENV_VAR, "").strip()
    if chosen:
        try:
            return _require(chosen), f"set by {ENV_VAR}"
        except ValueError as exc:
            raise ValueError(f"{ENV_VAR}={chosen!r}: {exc}") from None
    facts = cython_build_facts()
    tried = []
    for name in default_order(facts):
        if _load(name) is not None:
            return name, default_reason(name, facts, tried)
        tried.append(name)
        if name == "cython" and facts["not_built"]:
            continue  # installed without the extensions: no surprise, ``fastconv info`` says why
        warnings.warn(
            f"fastconv backend {name!r} failed to import ({_failed[name]}); "
            "run `python -m fastconv info` for details",
            RuntimeWarning,
            stacklevel=4,
        )
    raise RuntimeError("no fastconv backend could be imported")  # reference is plain NumPy: unreachable


def _default():
    return default_backend()[0]


def get_backend():
    """Name of the backend the kernels run on now."""
    global _current
    if _current is None:
        _current = _default()
    return _current


def set_backend(name):
    """Make ``name`` the backend for every kernel call from now on."""
    global _current
    _current = _require(name)


@contextlib.contextmanager
def use_backend(name):
    """Run a block on backend ``name``, then restore the previous backend."""
    global _current
    previous = get_backend()
    _current = _require(name)
    try:
        yield _loaded[_current]
    finally:
        _current = previous


def backend_module(name=None):
    """The module implementing the kernel interface for ``name`` (default: the current backend)."""
    if name is None:
        return _loaded[_current if _current is not None else get_backend()]
    return _loaded[_require(name)]
