"""Checkpoints: the whole state of a training run, in one ``.npz`` file without pickles.

A checkpoint holds the parameters, the optimizer's state (its arrays and
scalars, whatever optimizer it is), the order of the current epoch, both
random number generators (NumPy's global one, which initializes the
network and draws the dropout masks, and the ``Generator`` that shuffles
and augments) and a JSON document with the counters and the history. A run
continued from it takes exactly the steps it would have taken uninterrupted.
"""
import json
import os
import re
import secrets
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["save_checkpoint", "load_checkpoint", "restore_state", "capture_rng", "restore_rng", "write_atomically",
           "remove_temporaries", "CheckpointError"]

_FORMAT = 1


_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp$")  # the names write_atomically writes to


class CheckpointError(ValueError):
    """A checkpoint file is damaged, truncated or not a checkpoint."""


def write_atomically(path, write):
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``.

    Readers see the old file or the complete new one, never a partial one:
    the data reaches the disk (fsync) before the rename, and the rename
    before this returns. The file gets the mode any new file gets (0666
    less the umask). A process killed during the write can leave its
    temporary file (``.NAME.<hex>.tmp``); ``remove_temporaries`` clears them.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        _sync_folder(path.parent)
    finally:
        if temporary.exists():
            temporary.unlink()


def _sync_folder(folder):
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(folder):
    """Delete the temporary files that ``write_atomically`` calls in ``folder`` left behind; return them."""
    folder = Path(folder)
    stale = [p for p in folder.glob(".*.tmp") if _TEMPORARY.match(p.name) and p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def capture_rng(generator):
    """The state of ``np.random`` and of ``generator``, as (arrays, JSON-able dict)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    arrays = {"np_random_keys": np.array(keys, dtype=np.uint32)}
    scalars = {
        "np_random": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
        "generator": generator.bit_generator.state,
    }
    return arrays, scalars


def restore_rng(generator, arrays, scalars):
    """Put ``np.random`` and ``generator`` back into a state ``capture_rng`` returned."""
    legacy = scalars["np_random"]
    np.random.set_state((legacy["kind"], np.asarray(arrays["np_random_keys"], dtype=np.uint32),
                         legacy["pos"], legacy["has_gauss"], legacy["cached_gaussian"]))
    generator.bit_generator.state = scalars["generator"]


def _optimizer_state(optimizer):
    """Split the optimizer's attributes into arrays (per-parameter dicts) and plain scalars."""
    arrays, scalars = {}, {}
    for name, value in vars(optimizer).items():
        if isinstance(value, dict):
            for key, array in value.items():
                arrays[f"optimizer.{name}.{key}"] = np.asarray(array)
            scalars[name] = {"dict": sorted(value)}
        elif value is None or isinstance(value, (bool, int, float, np.integer, np.floating)):
            scalars[name] = value.item() if isinstance(value, np.generic) else value
        else:
            raise TypeError(f"cannot checkpoint optimizer attribute {name!r} of type {type(value).__name__}")
    return arrays, scalars


def _restore_optimizer(optimizer, arrays, scalars):
    for name, value in scalars.items():
        if isinstance(value, dict):
            # copies: the optimizer updates these in place
            value = {key: np.array(arrays[f"optimizer.{name}.{key}"]) for key in value["dict"]}
        setattr(optimizer, name, value)


def save_checkpoint(path, params, optimizer, rng_state, order, meta):
    """Write a checkpoint of a run to ``path`` (atomically).

    ``rng_state`` is what ``capture_rng`` returned at the point the run is to
    continue from. ``meta`` is a JSON-able dict (counters, configuration, history); it comes
    back from ``load_checkpoint`` unchanged.
    """
    arrays = {f"param.{key}": np.asarray(value) for key, value in params.items()}
    optimizer_arrays, optimizer_scalars = _optimizer_state(optimizer)
    rng_arrays, rng_scalars = rng_state
    arrays.update(optimizer_arrays)
    arrays.update(rng_arrays)
    if order is not None:
        arrays["order"] = np.asarray(order)
    document = {"format": _FORMAT, "meta": meta, "optimizer": optimizer_scalars, "rng": rng_scalars}
    arrays["document"] = np.array(json.dumps(document))
    write_atomically(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path):
    """Read a checkpoint: a dict with ``params``, ``order`` (None if absent), ``meta`` and ``state``.

    ``state`` goes to ``restore_state`` together with the optimizer and the
    generator of the run being continued. Raises ``CheckpointError`` naming
    the file when it is truncated, damaged or not a checkpoint.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        document = json.loads(str(arrays.pop("document")))
        if document.get("format") != _FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {document.get('format')!r} is not {_FORMAT}")
        params = {key[len("param."):]: value for key, value in arrays.items() if key.startswith("param.")}
        state = {"arrays": arrays, "optimizer": document["optimizer"], "rng": document["rng"]}
        return {"params": params, "order": arrays.get("order"), "meta": document["meta"], "state": state}
    except CheckpointError:
        raise
    except (OSError, EOFError, ValueError, KeyError, AttributeError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None


def restore_state(state, optimizer, generator):
    """Put the optimizer, ``np.random`` and ``generator`` back as the checkpoint has them."""
    _restore_optimizer(optimizer, state["arrays"], state["optimizer"])
    restore_rng(generator, state["arrays"], state["rng"])
