"""A training run on disk: the output folder that ``fastconv train`` fills.

Layout of ``out/`` for one model::

    config.json        the settings (read back by --resume)
    params.npz         the trained parameters (DeepConvNet.load_params reads them)
    history.json       per-epoch accuracies, losses and time split, per-step losses, final result
    curves.png         learning curves
    misclassified.png  the misclassified test digits, true / predicted label
    checkpoint.npz     only while the run is unfinished (interrupted, or between epochs)

With ``--ensemble N`` each member trains in ``out/member-K/`` (its own
params, history, curves and checkpoint) and ``out/history.json`` holds the
members' and the ensemble's test accuracy.
"""
import json
import time
from pathlib import Path

import numpy as np

import fastconv
from fastconv.app.checkpoint import write_atomically
from fastconv.app.plots import plot_learning_curves, plot_misclassified
from fastconv.app.training import TrainConfig, Training, predict_proba
from fastconv.datasets import load_mnist
from fastconv.models import DeepConvNet

__all__ = ["run", "load_data", "saved_config", "checkpoints", "RunError", "CHECKPOINT"]

CONFIG = "config.json"
CHECKPOINT = "checkpoint.npz"
PARAMS = "params.npz"
HISTORY = "history.json"
CURVES = "curves.png"
MISCLASSIFIED = "misclassified.png"


class RunError(Exception):
    """The output folder does not fit the request (e.g. resume without a checkpoint)."""


def load_data(config, data_dir=None, download=True):
    """MNIST as (N, 1, 28, 28) float32 images and class labels, cut to the config's limits."""
    (x_train, t_train), (x_test, t_test) = load_mnist(normalize=True, flatten=False, data_dir=data_dir,
                                                      download=download)
    return ((x_train[:config.limit_train], t_train[:config.limit_train]),
            (x_test[:config.limit_test], t_test[:config.limit_test]))


def _member_dirs(out, config):
    if config.ensemble == 1:
        return [out]
    return [out / f"member-{k + 1}" for k in range(config.ensemble)]


def _write_json(path, document):
    write_atomically(path, lambda f: f.write(json.dumps(document, indent=1).encode()))


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def saved_config(out):
    """The settings of the run in folder ``out`` (its config.json)."""
    path = Path(out) / CONFIG
    if not path.is_file():
        raise RunError(f"nothing to resume in {out}: no {CONFIG}")
    return TrainConfig.from_dict(_read_json(path))


def checkpoints(out):
    """The checkpoints of unfinished models in folder ``out``."""
    out = Path(out)
    return sorted(out.glob(CHECKPOINT)) + sorted(out.glob(f"member-*/{CHECKPOINT}"))


def _prepare(out, config, resume):
    """Check the folder against the request; return the settings to run with."""
    if resume:
        saved = saved_config(out)
        if config is not None and config != saved:
            changed = [f"{k}={v!r} (saved {getattr(saved, k)!r})" for k, v in config.to_dict().items()
                       if getattr(saved, k) != v]
            raise RunError(f"cannot resume {out} with other settings: {', '.join(changed)}")
        return saved
    if config is None:
        raise RunError("no settings given")
    unfinished = checkpoints(out)
    if unfinished:
        raise RunError(f"{out} holds an unfinished run ({unfinished[0]}); "
                       "continue it with --resume, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / CONFIG, config.to_dict())
    return config


def _completed(folder):
    if not (folder / HISTORY).is_file() or not (folder / PARAMS).is_file():
        return None
    history = _read_json(folder / HISTORY)
    return history if history.get("completed") else None


def _train_member(folder, config, seed, data, resume, progress, log, on_step):
    """Train (or continue) one model in ``folder``; return (network, history, test softmax)."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / CHECKPOINT
    if resume and checkpoint.is_file():
        training = Training.resume(checkpoint, data, progress=progress, log=log, config=config)
        log(f"resuming {checkpoint} at epoch {training.epoch + 1}, step {training.step}")
    else:
        training = Training(config, seed, data, checkpoint_path=checkpoint, progress=progress, log=log)
    training.run(on_step=on_step)

    history = dict(training.history, completed=True, test_acc=training.history["epochs"][-1]["test_acc"],
                   test_images=int(data[1][0].shape[0]), dtype=config.dtype, backend=fastconv.get_backend(),
                   training_seconds=sum(r["total_seconds"] for r in training.history["epochs"]))
    training.network.save_params(folder / PARAMS)
    plot_learning_curves(history, folder / CURVES)
    _write_json(folder / HISTORY, history)
    checkpoint.unlink(missing_ok=True)
    return training.network, history, training.test_proba


def _load_member(folder, history, config, x_test):
    network = DeepConvNet(dtype=np.dtype(config.dtype))
    network.load_params(folder / PARAMS)
    return network, history, predict_proba(network, x_test)


def run(config, out, *, resume=False, data_dir=None, download=True, progress=True, log=print, on_step=None):
    """Train, evaluate and write the output folder ``out``; return the final summary (a dict).

    ``config`` is a ``TrainConfig`` (None with ``resume``: the saved one is
    used). ``on_step(training)`` is called after every step. A
    ``KeyboardInterrupt`` leaves a checkpoint in ``out`` and propagates.
    """
    started = time.perf_counter()
    out = Path(out)
    config = _prepare(out, config, resume)
    data = load_data(config, data_dir, download)
    (_, _), (x_test, t_test) = data
    log(f"training DeepConvNet on {data[0][0].shape[0]} images, testing on {x_test.shape[0]}; "
        f"backend {fastconv.get_backend()}, {config.dtype}, recipe {config.recipe}: {config.epochs} epochs, "
        f"batch {config.batch_size}, {config.optimizer} lr {config.lr:g} ({config.lr_schedule}), "
        f"augment {'on' if config.augment else 'off'}, seed {config.seed}"
        + (f", ensemble of {config.ensemble}" if config.ensemble > 1 else ""))

    members = []
    for k, folder in enumerate(_member_dirs(out, config)):
        seed = config.seed + k
        done = _completed(folder) if resume else None
        if config.ensemble > 1:
            log(f"member {k + 1}/{config.ensemble} (seed {seed})" + (": already trained" if done else ""))
        if done:
            members.append(_load_member(folder, done, config, x_test))
        else:
            members.append(_train_member(folder, config, seed, data, resume, progress, log, on_step))

    probabilities = np.mean([proba for _, _, proba in members], axis=0)
    predicted = probabilities.argmax(axis=1)
    test_acc = float(np.mean(predicted == t_test))
    plot_misclassified(x_test, t_test, predicted, out / MISCLASSIFIED)
    wall = time.perf_counter() - started

    files = []
    for folder in _member_dirs(out, config):
        files += [folder / PARAMS, folder / HISTORY, folder / CURVES]
    files += [out / MISCLASSIFIED]
    if config.ensemble > 1:
        files.append(out / HISTORY)
        member_accs = [float(np.mean(proba.argmax(axis=1) == t_test)) for _, _, proba in members]
        summary = {"config": config.to_dict(), "backend": fastconv.get_backend(), "test_images": int(t_test.size),
                   "members": [{"seed": config.seed + k, "folder": str(folder), "test_acc": acc}
                               for k, (folder, acc) in enumerate(zip(_member_dirs(out, config), member_accs))],
                   "test_acc": test_acc, "wall_time_s": wall, "files": [str(f) for f in files]}
        _write_json(out / HISTORY, summary)
        for k, acc in enumerate(member_accs):
            log(f"member {k + 1} (seed {config.seed + k}) test accuracy: {100 * acc:.2f} %")
        log(f"ensemble of {config.ensemble} (mean of softmax outputs) test accuracy: "
            f"{100 * test_acc:.2f} % on {t_test.size} test images")
    else:
        summary = dict(members[0][1], config=config.to_dict(), wall_time_s=wall, files=[str(f) for f in files])
        _write_json(out / HISTORY, summary)
        log(f"test accuracy: {100 * test_acc:.2f} % on {t_test.size} test images")
    log(f"wall time: {wall:.1f} s")
    log("files written:\n" + "\n".join(f"  {f}" for f in files))
    return summary
