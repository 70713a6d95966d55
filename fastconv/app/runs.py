"""A training run on disk: the output folder that ``fastconv train`` fills.

Layout of ``out/`` for one model::

    config.json        the settings (read back by --resume)
    data.json          where the MNIST files came from, with their SHA-256 (a resumed run must find the same)
    params.npz         the trained parameters (DeepConvNet.load_params reads them)
    history.json       per-epoch accuracies, losses and time split, per-step losses, final result
    curves.png         learning curves
    misclassified.png  the misclassified test digits, true / predicted label
    checkpoint.npz     only while the run is unfinished (interrupted, or between epochs)

With ``--ensemble N`` each member trains in ``out/member-K/`` (its own
params, history, curves and checkpoint) and ``out/history.json`` holds the
members' and the ensemble's test accuracy (and validation accuracy, with a
validation split).

A run is never overwritten or mixed with another: a new run needs a folder
that does not exist or is empty (``overwrite=True`` first deletes the files
of the run there, and nothing else), and nothing is written until the data
has loaded. A new run that fails before it has saved anything removes what
it wrote.
"""
import hashlib
import json
import os
import re
import textwrap
import time
from pathlib import Path

import numpy as np

import fastconv
from fastconv.app.checkpoint import remove_temporaries, write_atomically
from fastconv.app.plots import plot_learning_curves, plot_misclassified
from fastconv.app.settings import TrainConfig, describe, split_validation
from fastconv.app.training import LOSS_NOTE, Training, predict_proba
from fastconv.datasets import find_mnist, load_mnist, locate_mnist, mnist_file_paths
from fastconv.models import DeepConvNet

__all__ = ["run", "load_data", "saved_config", "checkpoints", "finished_history", "member_outcome", "write_member",
           "write_json", "RunError", "CONFIG", "CHECKPOINT", "DATA"]

CONFIG = "config.json"
DATA = "data.json"
CHECKPOINT = "checkpoint.npz"
PARAMS = "params.npz"
HISTORY = "history.json"
CURVES = "curves.png"
MISCLASSIFIED = "misclassified.png"
_RUN_FILES = (CONFIG, DATA, CHECKPOINT, PARAMS, HISTORY, CURVES, MISCLASSIFIED)
_MEMBER_FOLDER = re.compile(r"^member-[1-9][0-9]*$")
_HASH_CHUNK = 1 << 20


class RunError(Exception):
    """The output folder does not fit the request (e.g. resume without a checkpoint)."""


# -- the data a run trains on ------------------------------------------------------------------------


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def load_data(config, data_dir=None, download=True, recorded=None):
    """MNIST cut to the config's limits and split as it says, and a record of where it came from.

    Returns ``(((x_train, t_train), (x_test, t_test), validation), source)``:
    images (N, 1, 28, 28) float32, class labels; ``validation`` is
    ``(x_val, t_val)``, the last ``config.validation`` of the first
    ``config.limit_train`` training images (which ``x_train`` then leaves
    out), or None; ``source`` = ``{"folder", "sha256": {file name:
    digest}}``. With ``recorded`` (the source of an earlier start of the
    run) the files must be the same: without ``data_dir`` they are looked
    for in the recorded folder first, and other files are refused with
    ``RunError``.
    """
    if recorded is not None and data_dir is None and find_mnist(recorded["folder"]) is not None:
        data_dir = recorded["folder"]
    folder = locate_mnist(data_dir, download=download)
    source = {"folder": str(Path(folder).resolve()),
              "sha256": {name: _sha256(path) for name, path in mnist_file_paths(folder).items()}}
    if recorded is not None and source["sha256"] != recorded["sha256"]:
        differing = sorted(name for name in set(recorded["sha256"]) | set(source["sha256"])
                           if recorded["sha256"].get(name) != source["sha256"].get(name))
        raise RunError(f"the MNIST files in {source['folder']} are not the ones this run trained on "
                       f"({', '.join(differing)} differ from the SHA-256 recorded in {DATA}, taken in "
                       f"{recorded['folder']}); give --data-dir a folder with the run's files")
    (x_train, t_train), (x_test, t_test) = load_mnist(normalize=True, flatten=False, data_dir=folder,
                                                      download=False)
    data = ((x_train[:config.limit_train], t_train[:config.limit_train]),
            (x_test[:config.limit_test], t_test[:config.limit_test]))
    return split_validation(data, config), source


# -- the folder --------------------------------------------------------------------------------------


def _member_dirs(out, config):
    if config.ensemble == 1:
        return [out]
    return [out / f"member-{k + 1}" for k in range(config.ensemble)]


def write_json(path, document):
    """Write ``document`` to ``path`` as indented JSON, atomically."""
    write_atomically(path, lambda f: f.write(json.dumps(document, indent=1).encode()))


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def saved_config(out):
    """The settings of the run in folder ``out`` (its config.json)."""
    path = Path(out) / CONFIG
    if not path.is_file():
        raise RunError(f"nothing to resume in {out}: no {CONFIG}")
    try:
        return TrainConfig.from_dict(_read_json(path))
    except (OSError, ValueError, TypeError) as exc:
        raise RunError(f"{path} is not readable ({exc})") from None


def checkpoints(out):
    """The checkpoints of unfinished models in folder ``out``."""
    out = Path(out)
    return sorted(out.glob(CHECKPOINT)) + sorted(out.glob(f"member-*/{CHECKPOINT}"))


def _check_writable(out):
    """Raise ``RunError`` unless ``out`` is a folder, or can be made one, that this process can write in."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    place = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not place.is_dir():
        raise RunError(f"--out {out}: {place} is a file, not a folder")
    if not os.access(place, os.W_OK | os.X_OK):
        raise RunError(f"--out {out}: no permission to write in {place}")


def _foreign_entries(out):
    """What in ``out`` is not a file of a run (so ``overwrite`` must not delete it)."""
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.is_file() and entry.name in _RUN_FILES:
            continue
        if entry.is_dir() and _MEMBER_FOLDER.match(entry.name):
            foreign += [inner for inner in sorted(entry.iterdir())
                        if not (inner.is_file() and inner.name in _RUN_FILES)]
            continue
        foreign.append(entry)
    return foreign


def _describe_contents(out):
    if checkpoints(out) or ((out / CONFIG).is_file() and not (out / HISTORY).is_file()):
        return "an unfinished run (continue it with --resume)"
    if (out / HISTORY).is_file():
        return "a finished run"
    return "other files"


def _prepare(out, config, resume, overwrite):
    """Check the folder against the request, before anything is loaded or written; return the settings."""
    _check_writable(out)
    if resume:
        if overwrite:
            raise RunError("--overwrite starts a new run; it does not go with --resume")
        saved = saved_config(out)
        if config is not None and config != saved:
            changed = [f"{k}={v!r} (saved {getattr(saved, k)!r})" for k, v in config.to_dict().items()
                       if getattr(saved, k) != v]
            raise RunError(f"cannot resume {out} with other settings: {', '.join(changed)}")
        return saved
    if config is None:
        raise RunError("no settings given")
    if out.is_dir():
        remove_temporaries(out)
        if any(out.iterdir()):
            if not overwrite:
                raise RunError(f"{out} already holds {_describe_contents(out)}; choose another --out, "
                               "or replace it with --overwrite")
            foreign = _foreign_entries(out)
            if foreign:
                raise RunError(f"--overwrite deletes only the files of a run, and {out} holds others too "
                               f"({', '.join(str(p) for p in foreign[:3])}); choose another --out")
    return config


def _delete_run_files(out):
    """Delete the files of a run in ``out`` (only those; ``_foreign_entries`` found no others)."""
    for entry in out.iterdir():
        if entry.is_dir() and _MEMBER_FOLDER.match(entry.name):
            for inner in entry.iterdir():
                if inner.name in _RUN_FILES:
                    inner.unlink()
            entry.rmdir()
        elif entry.name in _RUN_FILES:
            entry.unlink()


def _start(out, config, source, overwrite):
    """Create the folder of a new run; return the folders this call created (to undo a failed start)."""
    if overwrite and out.is_dir():
        _delete_run_files(out)
    created = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"--out {out}: cannot create the folder ({exc})") from None
    write_json(out / CONFIG, config.to_dict())
    write_json(out / DATA, source)
    return created


def _undo_start(out, config, created):
    """Remove what a new run wrote, when it failed before saving any training progress."""
    folders = _member_dirs(out, config)
    if any((folder / name).exists() for folder in folders for name in (CHECKPOINT, PARAMS)):
        return
    for folder in folders:
        remove_temporaries(folder)
        for name in _RUN_FILES:
            (folder / name).unlink(missing_ok=True)
        if folder != out and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    for folder in created:  # innermost first
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


# -- training ----------------------------------------------------------------------------------------


def _same_training(history, config, seed):
    """Whether a finished member's history was trained with these settings and seed."""
    if history.get("seed") != seed:
        return False
    trained = history.get("config")
    if trained is None:  # written before histories held their settings
        return True
    try:  # with the settings added since it was written at their defaults
        trained = TrainConfig.from_dict(trained).to_dict()
    except (TypeError, ValueError):
        return False
    ignore = ("ensemble", "seed")  # members are single runs with their own seeds
    return ({k: v for k, v in trained.items() if k not in ignore}
            == {k: v for k, v in config.to_dict().items() if k not in ignore})


def finished_history(folder, config, seed):
    """The history of the finished model in ``folder``, or None if there is none (or it is unfinished).

    Raises ``RunError`` when the model there was trained with other settings or another seed.
    """
    if not (folder / HISTORY).is_file() or not (folder / PARAMS).is_file():
        return None
    history = _read_json(folder / HISTORY)
    if not history.get("completed"):
        return None
    if not _same_training(history, config, seed):
        raise RunError(f"{folder} holds a model trained with other settings or another seed than this run's "
                       f"(seed {seed}); it cannot be part of this run")
    return history


def _title(config, seed, train_images, test_acc, test_images):
    settings = textwrap.fill(describe(config, train_images), width=140, break_on_hyphens=False)  # the figure's width
    return (f"DeepConvNet on {train_images} MNIST images, seed {seed}: {100 * test_acc:.2f} % on {test_images} "
            f"test images\n{settings}")


def _train_member(folder, config, seed, data, resume, progress, log, on_step):
    """Train (or continue) one model in ``folder``; return (network, history, test softmax, validation softmax)."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / CHECKPOINT
    if resume and checkpoint.is_file():
        training = Training.resume(checkpoint, data, progress=progress, log=log, config=config)
        log(f"resuming {checkpoint} at epoch {training.epoch + 1}, step {training.step}")
    else:
        training = Training(config, seed, data, checkpoint_path=checkpoint, progress=progress, log=log)
    training.run(on_step=on_step)
    params, history = member_outcome(training, data)
    write_member(folder, config, seed, data, params, history)
    return training.network, history, training.test_proba, training.val_proba


def member_outcome(training, data):
    """The parameters and the final history of a finished ``Training`` on ``data``."""
    config, (_, (x_test, _), validation) = training.config, split_validation(data, training.config)
    last = training.history["epochs"][-1]
    scores = {"test_acc": last["test_acc"], "test_images": int(x_test.shape[0])}
    if validation is not None:
        scores.update(val_acc=last["val_acc"], val_images=int(validation[0].shape[0]))
    history = dict(training.history, completed=True, config=config.to_dict(), **scores, dtype=config.dtype,
                   backend=fastconv.get_backend(),
                   training_seconds=sum(r["total_seconds"] for r in training.history["epochs"]))
    params = {key: np.asarray(value) for key, value in training.network.params.items()}
    return params, history


def write_member(folder, config, seed, data, params, history):
    """Write a finished model's parameters, curves and history to ``folder``; drop its checkpoint."""
    (x_train, _), (x_test, _), _ = split_validation(data, config)
    write_atomically(folder / PARAMS, lambda f: np.savez(f, **params))
    title = _title(config, seed, x_train.shape[0], history["test_acc"], x_test.shape[0])
    write_atomically(folder / CURVES, lambda f: plot_learning_curves(history, f, title=title))
    write_json(folder / HISTORY, history)
    (folder / CHECKPOINT).unlink(missing_ok=True)


def _load_member(folder, history, config, x_test, validation):
    network = DeepConvNet(dtype=np.dtype(config.dtype))
    network.load_params(folder / PARAMS)
    val_proba = None if validation is None else predict_proba(network, validation[0])
    return network, history, predict_proba(network, x_test), val_proba


def run(config, out, *, resume=False, overwrite=False, data_dir=None, download=True, progress=True, log=print,
        on_step=None, parallel=None):
    """Train, evaluate and write the output folder ``out``; return the final summary (a dict).

    ``config`` is a ``TrainConfig`` (None with ``resume``: the saved one is
    used). ``overwrite`` lets a new run replace the run in ``out``.
    ``on_step(training)`` is called after every step. A
    ``KeyboardInterrupt`` leaves a checkpoint in ``out`` and propagates.
    ``parallel`` (a ``fastconv.app.parallel.ParallelTraining``) trains the
    models that are not finished as independent tasks on its executor
    (``on_step`` and the per-epoch bars are then not used).
    """
    started = time.perf_counter()
    out = Path(out)
    config = _prepare(out, config, resume, overwrite)
    recorded = _read_json(out / DATA) if resume and (out / DATA).is_file() else None
    data, source = load_data(config, data_dir, download, recorded)
    if resume:
        for folder in _member_dirs(out, config):
            remove_temporaries(folder)
        if recorded is None:  # a folder assembled by hand, or written before data sources were recorded
            write_json(out / DATA, source)
        created = None
    else:
        created = _start(out, config, source, overwrite)
    try:
        return _run(out, config, data, source, resume, progress, log, on_step, started, parallel)
    except Exception:
        if created is not None:
            _undo_start(out, config, created)
        raise


def _run(out, config, data, source, resume, progress, log, on_step, started, parallel=None):
    (x_train, _), (x_test, t_test), validation = data
    held_out = "" if validation is None else f", validating on the {validation[0].shape[0]} after them"
    log(f"training DeepConvNet on {x_train.shape[0]} images from {source['folder']}{held_out}, testing on "
        f"{x_test.shape[0]}; backend {fastconv.get_backend()}; {describe(config, x_train.shape[0])}, seed "
        f"{config.seed}" + (f", ensemble of {config.ensemble}" if config.ensemble > 1 else "")
        + (f"; {parallel.description}" if parallel is not None else ""))
    log(f"note: {LOSS_NOTE}")
    if fastconv.get_backend() == "numba":
        log("numba backend: its kernels compile during the first steps (about 15 s; the machine code is "
            "cached for later runs)")

    members, waiting = [], []  # members: (network, history, test softmax, validation softmax)
    for k, folder in enumerate(_member_dirs(out, config)):
        seed = config.seed + k
        done = finished_history(folder, config, seed) if resume else None
        if config.ensemble > 1:
            log(f"member {k + 1}/{config.ensemble} (seed {seed})" + (": already trained" if done else ""))
        if done:
            members.append(_load_member(folder, done, config, x_test, validation))
        elif parallel is not None:
            members.append(None)
            waiting.append((k, folder, seed))
        else:
            members.append(_train_member(folder, config, seed, data, resume, progress, log, on_step))
    if waiting:
        trained = parallel.train(config, source, data, [(folder, seed) for _, folder, seed in waiting], out, log)
        for (k, _, _), member in zip(waiting, trained):
            members[k] = member

    probabilities = np.mean([member[2] for member in members], axis=0)
    predicted = probabilities.argmax(axis=1)
    test_acc = float(np.mean(predicted == t_test))
    write_atomically(out / MISCLASSIFIED, lambda f: plot_misclassified(x_test, t_test, predicted, f))
    wall = time.perf_counter() - started

    files = []
    for folder in _member_dirs(out, config):
        files += [folder / PARAMS, folder / HISTORY, folder / CURVES]
    files += [out / MISCLASSIFIED]
    if config.ensemble > 1:
        files.append(out / HISTORY)
        summary = _ensemble_summary(out, config, members, t_test, validation)
        summary.update(wall_time_s=wall, files=[str(f) for f in files])
        write_json(out / HISTORY, summary)
        for k, member in enumerate(summary["members"]):
            log(f"member {k + 1} (seed {config.seed + k}) test accuracy: {100 * member['test_acc']:.2f} %"
                + (f", validation accuracy: {100 * member['val_acc']:.2f} %" if validation is not None else ""))
        log(f"ensemble of {config.ensemble} (mean of softmax outputs) test accuracy: "
            f"{100 * test_acc:.2f} % on {t_test.size} test images"
            + (f"; validation accuracy: {100 * summary['val_acc']:.2f} % on {summary['val_images']} images"
               if validation is not None else ""))
    else:
        summary = dict(members[0][1], config=config.to_dict(), wall_time_s=wall, files=[str(f) for f in files])
        write_json(out / HISTORY, summary)
        if validation is not None:
            log(f"validation accuracy: {100 * summary['val_acc']:.2f} % on {summary['val_images']} images")
        log(f"test accuracy: {100 * test_acc:.2f} % on {t_test.size} test images")
    log(f"wall time: {wall:.1f} s")
    log("files written:\n" + "\n".join(f"  {f}" for f in files))
    return summary


def _accuracy(probabilities, labels):
    return float(np.mean(probabilities.argmax(axis=1) == labels))


def _ensemble_summary(out, config, members, t_test, validation):
    """The ensemble's history: each member's accuracies (and augmentation strength) and the ensemble's."""
    rows = []
    for k, (folder, (_, history, test_proba, val_proba)) in enumerate(zip(_member_dirs(out, config), members)):
        row = {"seed": config.seed + k, "folder": str(folder), "test_acc": _accuracy(test_proba, t_test)}
        if validation is not None:
            row["val_acc"] = _accuracy(val_proba, validation[1])
        if "augment_strength" in history:
            row["augment_strength"] = history["augment_strength"]
        rows.append(row)
    summary = {"config": config.to_dict(), "backend": fastconv.get_backend(), "test_images": int(t_test.size),
               "members": rows, "test_acc": _accuracy(np.mean([m[2] for m in members], axis=0), t_test)}
    if validation is not None:
        summary.update(val_images=int(validation[1].size),
                       val_acc=_accuracy(np.mean([m[3] for m in members], axis=0), validation[1]))
    return summary
