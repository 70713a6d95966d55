"""Parameter pickles are read without running what else they ask for: fastconv._safe_pickle and load_params."""
import fractions
import os
import pickle
import pickletools
import shlex
import struct
import subprocess
import warnings

import numpy as np
import pytest

from fastconv import _safe_pickle
from fastconv._safe_pickle import RefusedPickle
from fastconv.models import DeepConvNet

RECONSTRUCT = np.zeros(1).__reduce__()[0]  # NumPy's own, under whichever module path this NumPy has


def network(seed, dtype=np.float64):
    np.random.seed(seed)
    return DeepConvNet(dtype=dtype)


def snapshot(net):
    return {key: value.copy() for key, value in net.params.items()}


def assert_unchanged(net, before):
    for key, value in before.items():
        assert np.array_equal(net.params[key], value), key
    for i, index in enumerate(net._PARAM_LAYERS):
        assert net.layers[index].W is net.params[f"W{i + 1}"] and net.layers[index].b is net.params[f"b{i + 1}"]


def write(path, obj, protocol=4):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


class Reduces:
    """Pickles as the call ``function(*args)``, whatever the function (then ``state`` set on its result)."""

    def __init__(self, function, *args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce__(self):
        return (self.function, self.args) if self.state is None else (self.function, self.args, self.state)


class FlaggedDtype:
    """Pickles as numpy.dtype("f8") whose state then says it holds Python objects."""

    def __reduce__(self):
        return np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 63)


class Wrapped:
    """Not an array, but turns into one: what a trusted pickle may hold."""

    def __init__(self, array):
        self.array = array

    def __array__(self, dtype=None, copy=None):
        return self.array


def touch(path):
    return Reduces(os.system, f"touch {shlex.quote(str(path))}")


def test_os_system_is_refused_before_it_runs_and_the_network_is_unchanged(tmp_path):
    params = {key: value + 1.0 for key, value in network(seed=1).params.items()}
    params["W1"] = touch(tmp_path / "pwned")
    path = write(tmp_path / "params.pkl", params)
    target = network(seed=2)
    before = snapshot(target)
    with pytest.raises(RefusedPickle, match=rf"the global {os.system.__module__}\.system: .*trusted=True"):
        target.load_params(path)
    assert not (tmp_path / "pwned").exists()
    assert_unchanged(target, before)
    assert isinstance(RefusedPickle("x"), pickle.UnpicklingError)


def test_the_same_file_does_run_its_command_under_plain_pickle(tmp_path):
    # the file above is a working attack: trusted=True (plain pickle.load) runs it
    path = write(tmp_path / "params.pkl", {"W1": touch(tmp_path / "pwned")})
    target = network(seed=2)
    before = snapshot(target)
    with pytest.raises((KeyError, TypeError, ValueError)):  # os.system's return value is no parameter
        target.load_params(path, trusted=True)
    assert (tmp_path / "pwned").exists()
    assert_unchanged(target, before)


@pytest.mark.parametrize("value, refused", [
    (Reduces(subprocess.Popen, ["true"]), "subprocess.Popen"),
    (Reduces(subprocess.check_call, ["true"]), "subprocess.check_call"),
    (Reduces(eval, "1 + 1"), "builtins.eval"),
    (Reduces(exec, "x = 1"), "builtins.exec"),
    (Reduces(getattr, "text", "upper"), "builtins.getattr"),
    (Reduces(np.load, "params.npz"), "numpy.load"),
    (Reduces(np.frombuffer, b"\0" * 8), "numpy.frombuffer"),
    (Reduces(np.testing.assert_equal, 1, 1), np.testing.assert_equal.__module__ + ".assert_equal"),
    (fractions.Fraction(1, 3), "fractions.Fraction"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_other_globals_are_refused_by_name(tmp_path, value, refused):
    params = dict(network(seed=3).params, W1=value)
    target = network(seed=4)
    before = snapshot(target)
    with pytest.raises(RefusedPickle, match=rf"the global {refused}: .*trusted=True"):
        target.load_params(write(tmp_path / "params.pkl", params))
    assert_unchanged(target, before)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_object_arrays_are_refused(tmp_path, protocol):
    params = dict(network(seed=5).params, W1=np.array([1.0, fractions.Fraction(1, 3)], dtype=object))
    target = network(seed=6)
    before = snapshot(target)
    with pytest.raises(RefusedPickle, match=r"numpy\.dtype\('O8'\) \(dtype object\) holding Python objects"):
        target.load_params(write(tmp_path / "params.pkl", params, protocol))
    assert_unchanged(target, before)


def test_a_float_dtype_whose_state_claims_objects_is_refused():
    # numpy.dtype("f8") is allowed, but the state the pickle sets afterwards makes it an object dtype
    data = pickle.dumps({"W1": Reduces(RECONSTRUCT, np.ndarray, (0,), b"b")}, protocol=2)
    assert _safe_pickle.loads(data)["W1"].shape == (0,)
    sneaky = Reduces(RECONSTRUCT, np.ndarray, (0,), b"b", state=(1, (2,), FlaggedDtype(), False, [1, 2]))
    with pytest.raises(RefusedPickle, match=r"an array of dtype float64 holding Python objects"):
        _safe_pickle.loads(pickle.dumps({"W1": sneaky}, protocol=2))


@pytest.mark.parametrize("value, refused", [
    (Reduces(np.ndarray, (2,), "O"), "a call of numpy.ndarray"),
    (np.zeros(3, dtype=complex), r"numpy\.dtype\('c16'\)"),
    (np.zeros(3, dtype=[("a", "f8")]), r"numpy\.dtype\('V8'\)"),
    (np.array(["text"]), r"numpy\.dtype\('U4'\)"),
])
def test_arrays_of_other_than_real_numbers_are_refused(value, refused):
    with pytest.raises(RefusedPickle, match=refused):
        _safe_pickle.loads(pickle.dumps({"W1": value}))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_parameter_pickles_of_every_protocol_load(tmp_path, protocol):
    source = network(seed=7)
    source.params["b8"] += 0.25
    path = write(tmp_path / "params.pkl", {key: np.asarray(value) for key, value in source.params.items()}, protocol)
    target = network(seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target.load_params(path)
    for key, value in source.params.items():
        assert np.array_equal(target.params[key], value), key


def test_save_params_pickles_load_in_float32(tmp_path):
    source = network(seed=9, dtype=np.float32)
    source.save_params(tmp_path / "params.pkl")
    assert b"numpy._core" in (tmp_path / "params.pkl").read_bytes() or np.__version__.startswith("1.")
    target = network(seed=10, dtype=np.float32)
    target.load_params(tmp_path / "params.pkl")
    for key, value in source.params.items():
        assert target.params[key].dtype == np.float32 and np.array_equal(target.params[key], value), key


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_real_arrays_and_scalars_come_back_equal_and_plain(protocol):
    rng = np.random.default_rng(0)
    value = {
        "f64": rng.standard_normal((3, 4)),
        "f32": rng.standard_normal(5).astype(np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((3, 2))),
        "strided": np.arange(20.0).reshape(4, 5)[::2, ::2],
        "int": np.arange(-3, 3),
        "uint8": np.arange(4, dtype=np.uint8),
        "bool": np.array([True, False]),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "scalars": [np.float64(0.5), np.int32(-2), np.bool_(True)],
        "plain": (1, 2.5, "text", None, [True], {"nested": b"bytes"}),
    }
    loaded = _safe_pickle.loads(pickle.dumps(value, protocol=protocol))
    assert loaded.keys() == value.keys() and loaded["plain"] == value["plain"]
    for key in ("f64", "f32", "fortran", "strided", "int", "uint8", "bool", "empty"):
        assert type(loaded[key]) is np.ndarray, key
        assert loaded[key].dtype == value[key].dtype and np.array_equal(loaded[key], value[key]), key
    for got, expected in zip(loaded["scalars"], value["scalars"]):
        assert type(got) is type(expected) and got == expected


def numpy1_pickle(params):
    """``params`` pickled as NumPy 1.x pickled it (protocol 3), written opcode by opcode: numpy.core names."""
    def text(s):
        data = s.encode()
        return b"X" + struct.pack("<I", len(data)) + data

    def binbytes(data):
        return b"B" + struct.pack("<I", len(data)) + data

    def dtype(d):
        return (b"cnumpy\ndtype\n" + text(d.str[1:]) + b"\x89\x88\x87R"  # numpy.dtype('f8', False, True)
                + b"(K\x03" + text(d.str[0]) + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")  # its state
    out = [b"\x80\x03}"]
    for key, value in params.items():
        value = np.asarray(value)
        out.append(text(key))
        if value.ndim == 0:  # a NumPy scalar: scalar(dtype, its bytes)
            out.append(b"cnumpy.core.multiarray\nscalar\n" + dtype(value.dtype) + binbytes(value.tobytes()) + b"\x86R")
        else:  # _reconstruct(ndarray, (0,), b'b'), then its state (1, shape, dtype, False, data)
            out.append(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
                       + b"(K\x01(" + b"".join(b"J" + struct.pack("<i", n) for n in value.shape) + b"t"
                       + dtype(value.dtype) + b"\x89" + binbytes(value.tobytes()) + b"tb")
        out.append(b"s")
    return b"".join(out) + b"."


def test_numpy1_pickles_naming_numpy_core_load(tmp_path):
    source = network(seed=11)
    params = {key: np.asarray(value) for key, value in source.params.items()}
    data = numpy1_pickle(params)
    globals_named = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert globals_named == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    (tmp_path / "deep_convnet_params.pkl").write_bytes(data)
    target = network(seed=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy.core is not imported: no DeprecationWarning under NumPy 2
        target.load_params(tmp_path / "deep_convnet_params.pkl")
    for key, value in params.items():
        assert np.array_equal(target.params[key], value), key


def test_numpy1_pickles_of_every_real_dtype_and_scalars_load():
    value = {"f64": np.linspace(0, 1, 6).reshape(2, 3), "f32": np.arange(4, dtype=np.float32),
             "i64": np.arange(-2, 2), "i32be": np.arange(3, dtype=">i4"), "bool": np.array([True, False]),
             "lr": np.array(0.01), "step": np.array(7, dtype=np.int64)}
    data = numpy1_pickle(value)
    assert "numpy.core.multiarray scalar" in {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    loaded = _safe_pickle.loads(data)
    for key in ("f64", "f32", "i64", "i32be", "bool"):  # NumPy's own __setstate__ turns >i4 into native int32
        assert type(loaded[key]) is np.ndarray and loaded[key].dtype == value[key].dtype.newbyteorder("="), key
        assert np.array_equal(loaded[key], value[key]), key
    assert type(loaded["lr"]) is np.float64 and loaded["lr"] == 0.01
    assert type(loaded["step"]) is np.int64 and loaded["step"] == 7


def test_numpy1_protocol5_frombuffer_loads():
    # NumPy 1.x's protocol-5 pickle of a contiguous array: numpy.core.numeric._frombuffer(buffer, dtype, shape, order)
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    body = (b"\x8c\x12numpy.core.numeric\x8c\x0b_frombuffer\x93(\x96" + struct.pack("<Q", array.nbytes) + array.tobytes()
            + b"\x8c\x05numpy\x8c\x05dtype\x93\x8c\x02f4\x89\x88\x87R(K\x03\x8c\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            + b"K\x02K\x03\x86\x8c\x01Ct" + b"R.")
    data = b"\x80\x05" + body
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    assert ops[:3] == [("PROTO", 5), ("SHORT_BINUNICODE", "numpy.core.numeric"), ("SHORT_BINUNICODE", "_frombuffer")]
    assert ops[3] == ("STACK_GLOBAL", None)
    loaded = _safe_pickle.loads(data)
    assert type(loaded) is np.ndarray and loaded.dtype == np.float32 and np.array_equal(loaded, array)


def test_trusted_loads_what_the_default_refuses(tmp_path):
    source = network(seed=13)
    path = write(tmp_path / "params.pkl", {key: Wrapped(np.asarray(value)) for key, value in source.params.items()})
    target = network(seed=14)
    before = snapshot(target)
    with pytest.raises(RefusedPickle, match=rf"the global {__name__}\.Wrapped"):
        target.load_params(path)
    assert_unchanged(target, before)
    target.load_params(path, trusted=True)
    for key, value in source.params.items():
        assert np.array_equal(target.params[key], value), key


def test_plain_objects_of_other_kinds_are_refused_by_the_module():
    data = pickle.dumps({"ratio": fractions.Fraction(1, 3)})
    assert pickle.loads(data) == {"ratio": fractions.Fraction(1, 3)}
    with pytest.raises(RefusedPickle, match=r"fractions\.Fraction"):
        _safe_pickle.loads(data)


def test_npz_files_never_unpickle_even_when_trusted(tmp_path, monkeypatch):
    np.savez(tmp_path / "params.npz", W1=np.array([1.0, None], dtype=object))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(ValueError, match="allow_pickle"):
        network(seed=15).load_params(tmp_path / "params.npz", trusted=True)
