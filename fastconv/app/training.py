"""The training loop of ``fastconv train``: one DeepConvNet, interruptible and resumable.

``Training`` runs epochs of shuffled mini-batches (every image once per
epoch), with optional augmentation and learning-rate decay, evaluates after
each epoch, and records a history with the time spent in each phase. It
keeps the point to continue from current after every step, so Ctrl-C or a
``KeyboardInterrupt`` raised anywhere saves a checkpoint from which
``Training.resume`` takes exactly the steps the uninterrupted run would
have taken.
"""
import math
import time
from pathlib import Path

import numpy as np

from fastconv.app._interrupts import deferred_interrupts
from fastconv.app.checkpoint import CheckpointError, capture_rng, load_checkpoint, restore_state, save_checkpoint
from fastconv.app.schedules import make_schedule
from fastconv.app.settings import (RECIPES, TrainConfig, describe, make_augmenter, member_strength,  # noqa: F401
                                   split_validation, steps_per_epoch)
from fastconv.functions import cross_entropy_error, softmax
from fastconv.models import DeepConvNet
from fastconv.optimizer import OPTIMIZERS

# TrainConfig, RECIPES, describe and steps_per_epoch live in ``settings``; they are named here too.
__all__ = ["TrainConfig", "RECIPES", "Training", "TrainingDiverged", "predict_proba", "describe", "steps_per_epoch",
           "PHASES", "LOSS_NOTE"]

# Where the time of an epoch goes; recorded per epoch in the history.
PHASES = ("data", "augment", "forward", "backward", "update", "evaluate")

# Why the training loss looks high next to the accuracies; said wherever the loss is shown.
LOSS_NOTE = ("the training loss is measured as trained, with dropout on; the book's network also drops half of "
             "its output scores, so this loss stays far above what the accuracies (measured without dropout) suggest")


class TrainingDiverged(ArithmeticError):
    """The training loss became NaN or infinite: the parameters are no longer usable."""


def predict_proba(network, x, batch_size=100, on_batch=None):
    """Softmax outputs of ``network`` (inference mode) for all of ``x``, in batches.

    ``on_batch(n)`` is called after each batch of ``n`` images.
    """
    chunks = []
    for start in range(0, x.shape[0], batch_size):
        chunks.append(softmax(network.predict(x[start:start + batch_size], train_flg=False)))
        if on_batch is not None:
            on_batch(chunks[-1].shape[0])
    return np.concatenate(chunks)


def _fresh_epoch_totals():
    return {"seconds": {phase: 0.0 for phase in PHASES}, "train_seconds": 0.0, "loss_sum": 0.0, "images": 0}


class Training:
    """Train one ``DeepConvNet`` on ``(x_train, t_train)``, scoring it on ``(x_test, t_test)``.

    ``data`` is ``((x_train, t_train), (x_test, t_test))``; with
    ``config.validation`` the last images of the training part are held out
    and scored after every epoch (``settings.split_validation``; data
    already split in three parts is used as it is).
    ``seed`` seeds ``np.random`` before the network is built (so its
    initial weights are the book's for that seed; dropout draws from it too)
    and a separate ``numpy.random.Generator`` for shuffling and augmentation.
    Model K of an ensemble (seed ``config.seed + K - 1``) gets augmentation
    strength K of ``config.augment_strength``.
    Images are (N, 1, 28, 28) floats, labels class indices.
    """

    def __init__(self, config, seed, data, checkpoint_path=None, progress=False, log=print):
        (self.x_train, self.t_train), (self.x_test, self.t_test), validation = split_validation(data, config)
        self.x_val, self.t_val = validation if validation is not None else (None, None)
        self.config = config
        self.seed = int(seed)
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.progress = progress
        self.log = log

        np.random.seed(self.seed)
        self.network = DeepConvNet(dtype=np.dtype(config.dtype))
        self.optimizer = OPTIMIZERS[config.optimizer](lr=config.lr)
        self.rng = np.random.default_rng(self.seed)
        self.augment_strength = member_strength(config, self.seed - config.seed)
        self.augmenter = make_augmenter(config, self.rng, self.augment_strength)
        self.steps_per_epoch = steps_per_epoch(self.x_train.shape[0], config.batch_size)
        self.schedule = make_schedule(config.lr_schedule, config.lr, config.epochs * self.steps_per_epoch,
                                      config.lr_min)

        # The point the run continues from: counters, epoch order, RNG states, partial epoch totals.
        self.epoch = 0
        self.step = 0
        self.order = None
        self.rng_state = capture_rng(self.rng)
        self.totals = _fresh_epoch_totals()
        self.history = {"seed": self.seed, "steps_per_epoch": self.steps_per_epoch, "epochs": [], "step_loss": []}
        if config.augment_strength:
            self.history["augment_strength"] = self.augment_strength
        self.test_proba = None  # softmax outputs on the test set after the last evaluation
        self.val_proba = None  # and on the validation images

    @property
    def finished(self):
        return self.epoch >= self.config.epochs

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, on_step=None):
        """Train until the last epoch is scored. ``on_step(self)`` is called after every step.

        On ``KeyboardInterrupt`` a checkpoint is written (when the run has a
        checkpoint path) and the interrupt propagates.
        """
        try:
            while not self.finished:
                if self.order is None:
                    with deferred_interrupts():
                        self.order = self.rng.permutation(self.x_train.shape[0])
                        self.rng_state = capture_rng(self.rng)
                self._train_epoch(on_step)
                self._end_epoch()
        except KeyboardInterrupt:
            if self.checkpoint_path is not None:
                with deferred_interrupts():
                    self.save_checkpoint()
            raise
        if self.test_proba is None:  # resumed after the last epoch was scored
            self.test_proba = predict_proba(self.network, self.x_test)
        if self.val_proba is None and self.x_val is not None:
            self.val_proba = predict_proba(self.network, self.x_val)
        return self

    def _train_epoch(self, on_step):
        cfg = self.config
        seconds = self.totals["seconds"]
        bar = self._bar(total=self.steps_per_epoch, initial=self.step, unit="step",
                        desc=f"epoch {self.epoch + 1}/{cfg.epochs}")
        try:
            while self.step < self.steps_per_epoch:
                started = time.perf_counter()
                lr = self.schedule(self.epoch * self.steps_per_epoch + self.step)
                batch = self.order[self.step * cfg.batch_size:(self.step + 1) * cfg.batch_size]
                x, t = self.x_train[batch], self.t_train[batch]
                after_data = time.perf_counter()
                if self.augmenter is not None:
                    x = self.augmenter(x)
                after_augment = time.perf_counter()
                loss = float(self.network.loss(x, t))
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"the training loss became {loss} at epoch {self.epoch + 1}, step {self.step + 1} "
                        f"(learning rate {lr:g}); the parameters are no longer usable: train again with a lower "
                        f"learning rate")
                after_forward = time.perf_counter()
                grads = self.network.backward()
                after_backward = time.perf_counter()
                with deferred_interrupts():  # the update and the bookkeeping that says it happened
                    self.optimizer.lr = lr
                    self.optimizer.update(self.network.params, grads)
                    self.step += 1
                    self.rng_state = capture_rng(self.rng)
                    self.history["step_loss"].append(loss)
                    done = time.perf_counter()
                    seconds["data"] += after_data - started
                    if self.augmenter is not None:  # stays 0 without augmentation, so reports can leave it out
                        seconds["augment"] += after_augment - after_data
                    seconds["forward"] += after_forward - after_augment
                    seconds["backward"] += after_backward - after_forward
                    seconds["update"] += done - after_backward
                    self.totals["train_seconds"] += done - started
                    self.totals["loss_sum"] += loss * len(batch)
                    self.totals["images"] += len(batch)
                if self.progress:
                    bar.set_postfix({"loss": f"{self.totals['loss_sum'] / self.totals['images']:.4f}",
                                     "lr": f"{lr:.2e}",
                                     "img/s": f"{self.totals['images'] / self.totals['train_seconds']:.0f}",
                                     "run left": bar.format_interval(self.seconds_left())},
                                    refresh=False)
                    bar.update()
                if on_step is not None:
                    on_step(self)
        finally:
            bar.close()

    def _bar(self, **kwargs):
        from tqdm import tqdm  # here, so the command line can say it is missing before it is needed

        return tqdm(leave=False, disable=not self.progress, **kwargs)

    def _evaluated_images(self):
        validation = 0 if self.x_val is None else self.x_val.shape[0]
        return min(self.config.eval_train_size, self.x_train.shape[0]) + validation + self.x_test.shape[0]

    def seconds_left(self):
        """An estimate of the time the rest of the run takes: its steps and its evaluations.

        Steps take what the steps so far took on average; an evaluation what
        the last one took, or before the first, what the forward passes of
        as many training images took.
        """
        records = self.history["epochs"]
        steps_done = len(records) * self.steps_per_epoch + self.step
        step_seconds = self.totals["train_seconds"] + sum(r["total_seconds"] - r["seconds"]["evaluate"]
                                                          for r in records)
        if steps_done == 0:
            return 0.0
        steps_left = (self.config.epochs - self.epoch) * self.steps_per_epoch - self.step
        if records:
            evaluation = records[-1]["seconds"]["evaluate"]
        else:
            forward_per_image = self.totals["seconds"]["forward"] / max(self.totals["images"], 1)
            evaluation = forward_per_image * self._evaluated_images()
        return steps_left * step_seconds / steps_done + (self.config.epochs - self.epoch) * evaluation

    def _end_epoch(self):
        cfg = self.config
        started = time.perf_counter()
        n_eval = min(cfg.eval_train_size, self.x_train.shape[0])
        bar = self._bar(total=self._evaluated_images(), unit="img", desc=f"epoch {self.epoch + 1}/{cfg.epochs} "
                                                                          "evaluating")
        try:
            train_pred = predict_proba(self.network, self.x_train[:n_eval], on_batch=bar.update).argmax(axis=1)
            val_proba = None if self.x_val is None else predict_proba(self.network, self.x_val, on_batch=bar.update)
            test_proba = predict_proba(self.network, self.x_test, on_batch=bar.update)
        finally:
            bar.close()
        evaluate_seconds = time.perf_counter() - started

        totals = self.totals
        seconds = dict(totals["seconds"], evaluate=totals["seconds"]["evaluate"] + evaluate_seconds)
        record = {
            "epoch": self.epoch + 1,
            "lr": self.optimizer.lr,
            "train_loss": totals["loss_sum"] / max(totals["images"], 1),
            "train_acc": float(np.mean(train_pred == self.t_train[:n_eval])),
            **({} if val_proba is None else {"val_loss": float(cross_entropy_error(val_proba, self.t_val)),
                                             "val_acc": float(np.mean(val_proba.argmax(axis=1) == self.t_val))}),
            "test_acc": float(np.mean(test_proba.argmax(axis=1) == self.t_test)),
            "images_per_s": totals["images"] / totals["train_seconds"] if totals["train_seconds"] else None,
            "seconds": seconds,
            "total_seconds": totals["train_seconds"] + seconds["evaluate"],
        }
        with deferred_interrupts():
            self.history["epochs"].append(record)
            self.test_proba = test_proba
            self.val_proba = val_proba
            self.epoch += 1
            self.step = 0
            self.order = None
            self.totals = _fresh_epoch_totals()
        if self.checkpoint_path is not None and not self.finished:
            self.save_checkpoint()  # survives crashes too, not only Ctrl-C
        self.log(format_epoch(record, cfg.epochs))

    # -- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self, path=None):
        path = Path(path or self.checkpoint_path)
        meta = {
            "config": self.config.to_dict(), "seed": self.seed,
            "epoch": self.epoch, "step": self.step, "totals": self.totals, "history": self.history,
        }
        save_checkpoint(path, self.network.params, self.optimizer, self.rng_state, self.order, meta)
        return path

    @classmethod
    def resume(cls, path, data, progress=False, log=print, config=None):
        """A ``Training`` in the state saved at ``path``, checkpointing there again."""
        checkpoint = load_checkpoint(path)
        meta = checkpoint["meta"]
        try:
            saved = TrainConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: the settings it holds are not readable ({exc})") from None
        if config is not None and config != saved:
            raise ValueError(f"{path} was written by a run with other settings: {saved}")
        training = cls(saved, meta["seed"], data, checkpoint_path=path, progress=progress, log=log)
        try:
            restore_state(checkpoint["state"], training.optimizer, training.rng)
            training.network.set_params(checkpoint["params"])
            training.order = checkpoint["order"]
            training.epoch, training.step = meta["epoch"], meta["step"]
            training.totals = meta["totals"]
            training.history = meta["history"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} is incomplete or does not fit this run ({type(exc).__name__}: "
                                  f"{exc})") from None
        training.rng_state = capture_rng(training.rng)
        return training


def format_epoch(record, epochs):
    """One line summing up an epoch: accuracies, loss, throughput and where the time went."""
    seconds = record["seconds"]
    split = ", ".join(f"{phase} {seconds[phase]:.1f}" for phase in PHASES if phase != "augment" or seconds[phase] > 0)
    rate = "" if record["images_per_s"] is None else f"{record['images_per_s']:.0f} img/s  "
    validation = f"val acc {100 * record['val_acc']:.2f} %  " if "val_acc" in record else ""
    return (f"epoch {record['epoch']:>3}/{epochs}  loss {record['train_loss']:.4f}  "
            f"train acc {100 * record['train_acc']:.2f} %  {validation}test acc {100 * record['test_acc']:.2f} %  "
            f"lr {record['lr']:.2e}  {rate}"
            f"time {record['total_seconds']:.1f} s ({split})")
