"""Unpickling parameter files without running what else a pickle asks for.

A pickle names the functions that rebuild its objects, and ``pickle.load``
calls whichever it names, ``os.system`` included. ``ArrayUnpickler`` looks up
only the few names that NumPy's own pickles of arrays, dtypes and scalars use
(under NumPy 1.x's ``numpy.core`` paths and NumPy 2's ``numpy._core``, without
importing either), and rebuilds only arrays of booleans, integers and floats,
in dicts, lists and tuples of numbers and strings. Any other name stops the
load before anything is called, with ``RefusedPickle`` naming it; so do
arrays of dtype object, whose elements would be unpickled objects of any kind.

Each dtype is checked where it is used, not only where it is made: a pickle
can set a dtype's state (its flags and fields) after making it, so arrays
and scalars are built from a fresh copy of a checked dtype. Arrays are
rebuilt as ``_Array`` (whose ``__setstate__`` checks the state NumPy would
set) and handed out as plain ``ndarray`` views.
"""
import io
import pickle

import numpy as np

__all__ = ["RefusedPickle", "ArrayUnpickler", "load", "loads"]

_REAL_KINDS = "biuf"  # bool, signed and unsigned integers, floating point
_HOW_TO_TRUST = ("a file you made yourself or otherwise trust can be loaded with "
                 "DeepConvNet.load_params(..., trusted=True), which unpickles it with plain pickle.load "
                 "(and so runs whatever the file asks for)")


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for something other than arrays of real numbers and plain containers."""


def _refuse(what, why=""):
    raise RefusedPickle(f"refused to unpickle {what}{why}: only NumPy arrays of booleans, integers or floats, in "
                        f"dicts, lists and tuples of numbers and strings, are read from a pickle; {_HOW_TO_TRUST}")


def _checked_dtype(dtype, called=None):
    """The canonical dtype equal to ``dtype`` (a dtype or a type code) if it holds real numbers, else RefusedPickle.

    ``called`` names the call that asked for it, for the message.
    """
    if isinstance(dtype, bytes):
        dtype = dtype.decode("latin1")
    if not isinstance(dtype, (str, np.dtype)):
        _refuse(called or f"a dtype given as {type(dtype).__name__}")
    dtype = np.dtype(dtype)
    what = f"{called} (dtype {dtype})" if called else f"an array of dtype {dtype}"
    if dtype.hasobject:
        _refuse(what, " holding Python objects, which would be unpickled as objects of any kind")
    if dtype.kind not in _REAL_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        _refuse(what)
    return np.dtype(dtype.str)


class _Marker:
    """Stands for a class that a pickle names but may only pass to a reconstruction function."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name

    def __call__(self, *args, **kwargs):
        _refuse(f"a call of {self.name}")


_NDARRAY = _Marker("numpy.ndarray")  # never the class itself: calling np.ndarray(shape, dtype, buffer) is refused


class _Array(np.ndarray):
    """An array being unpickled: NumPy's ``__setstate__``, with a checked dtype and raw bytes only."""

    __slots__ = ()

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            _refuse("an array state that is not NumPy's")
        *head, dtype, fortran, data = state  # head: (version, shape), or (shape,) in old pickles
        if not isinstance(dtype, np.dtype):
            _refuse(f"an array state holding a {type(dtype).__name__} for its dtype")
        dtype = _checked_dtype(dtype)
        if not isinstance(data, (bytes, bytearray)):
            _refuse(f"an array state holding a {type(data).__name__} for its data")
        super().__setstate__((*head, dtype, fortran, data))


# What NumPy's pickles call, in the order they call it: ``_reconstruct`` makes an empty array, to which the
# pickle then gives its state (``_Array.__setstate__``); protocol 5 uses ``_frombuffer``; scalars ``scalar``.

def _dtype(code, align=False, copy=False):
    """``numpy.dtype(code, False, True)``: a new dtype object, as the pickle is about to set its state."""
    return np.dtype(_checked_dtype(code, f"numpy.dtype({code!r})"), False, True)


def _reconstruct(subtype, shape, dtype):
    if subtype is not _NDARRAY:
        _refuse(f"an array of type {subtype!r}")
    return _Array(shape, _checked_dtype(dtype))


def _frombuffer(buffer, dtype, shape, order):
    if not isinstance(buffer, (bytes, bytearray)):
        _refuse(f"array data of type {type(buffer).__name__}")
    return np.frombuffer(buffer, dtype=_checked_dtype(dtype)).reshape(shape, order=order).view(_Array)


def _scalar(dtype, data):
    dtype = _checked_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        _refuse(f"a NumPy scalar of dtype {dtype} from {type(data).__name__} data")
    return np.frombuffer(data, dtype=dtype)[0]


def _encode(text, encoding):
    """``_codecs.encode`` as protocols 0 to 2 pickle ``bytes``: a str of latin-1 code points."""
    if not isinstance(text, str) or encoding != "latin1":
        _refuse(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _bytes(*args):
    """``bytes()`` as protocols 0 to 2 pickle ``b''``."""
    if args:
        _refuse("builtins.bytes with arguments")
    return b""


_GLOBALS = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
    ("builtins", "bytes"): _bytes,
    ("__builtin__", "bytes"): _bytes,  # protocols 0 to 2 write Python 2's name
}
for _core in ("numpy.core", "numpy._core"):  # NumPy 1.x, NumPy 2
    _GLOBALS[f"{_core}.multiarray", "_reconstruct"] = _reconstruct
    _GLOBALS[f"{_core}.multiarray", "scalar"] = _scalar
    _GLOBALS[f"{_core}.numeric", "_frombuffer"] = _frombuffer
del _core


def _plain(obj, memo):
    """``obj`` with its arrays as plain ndarrays; anything but arrays, scalars and plain containers is refused."""
    if obj is None or type(obj) in (bool, int, float, str, bytes, bytearray):
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, np.ndarray):
        result = obj.view(np.ndarray)
        _checked_dtype(result.dtype)
    elif isinstance(obj, np.generic):
        _checked_dtype(obj.dtype)
        result = obj
    elif isinstance(obj, np.dtype):
        result = _checked_dtype(obj)
    elif type(obj) is list:
        memo[id(obj)] = result = []  # before the items: a list may hold itself
        result.extend(_plain(item, memo) for item in obj)
    elif type(obj) is dict:
        memo[id(obj)] = result = {}
        for key, value in obj.items():
            result[_plain(key, memo)] = _plain(value, memo)
    elif type(obj) in (tuple, set, frozenset):
        result = type(obj)(_plain(item, memo) for item in obj)
    else:
        _refuse(f"an object of type {type(obj).__name__}")
    memo[id(obj)] = result
    return result


class ArrayUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` for parameter files: NumPy arrays of real numbers in plain containers, nothing else.

    ``find_class`` refuses every global but the few that NumPy's pickles of
    arrays use, so nothing a pickle names is looked up, let alone called,
    unless it is one of those. ``load()`` returns plain ``ndarray`` objects.
    """

    def find_class(self, module, name):
        try:
            return _GLOBALS[module, name]
        except KeyError:
            _refuse(f"the global {module}.{name}")

    def load(self):
        return _plain(super().load(), {})


def load(file):
    """Unpickle the binary file object ``file`` with ``ArrayUnpickler``."""
    return ArrayUnpickler(file).load()


def loads(data):
    """Unpickle the bytes ``data`` with ``ArrayUnpickler``."""
    return load(io.BytesIO(data))
