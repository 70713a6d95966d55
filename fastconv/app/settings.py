"""The settings of a training run (``TrainConfig``), its recipes, and what follows from them.

- ``TrainConfig``: everything that determines what a run computes
- ``RECIPES``: named base settings (``--recipe``)
- ``split_validation``: the run's training, test and validation images
- ``make_augmenter``: the augmentation of a model's training batches
- ``describe``: the settings in words
"""
import dataclasses
import math
from typing import Optional

import numpy as np

from fastconv.app.augment import Compose, RandomAffine, RandomCutout, RandomElastic
from fastconv.app.schedules import SCHEDULES, make_schedule
from fastconv.datasets import MNIST_FILES
from fastconv.optimizer import OPTIMIZERS

__all__ = ["TrainConfig", "RECIPES", "steps_per_epoch", "split_validation", "member_strength", "make_augmenter",
           "describe", "TRAIN_IMAGES"]

TRAIN_IMAGES = MNIST_FILES["train_img"][2]  # in MNIST's training set

# Training recipes; options given explicitly override them.
RECIPES = {
    # The book's chapter-8 run (train_deepnet.py).
    "book": {"epochs": 20, "batch_size": 100, "optimizer": "adam", "lr": 0.001,
             "lr_schedule": "none", "lr_min": None, "augment": False},
    # The book's network and optimizer, trained longer on shifted, rotated and
    # scaled digits with the learning rate decayed to 1/100.
    "best": {"epochs": 30, "batch_size": 100, "optimizer": "adam", "lr": 0.001,
             "lr_schedule": "cosine", "lr_min": 1e-5, "augment": True},
    # As best, with elastic distortions on top of the affine ones, and longer.
    "elastic": {"epochs": 40, "batch_size": 100, "optimizer": "adam", "lr": 0.001,
                "lr_schedule": "cosine", "lr_min": 1e-5, "augment": True, "elastic_alpha": 36.0,
                "elastic_sigma": 6.0},
}


def steps_per_epoch(train_images, batch_size):
    """Updates per epoch: every image once, the last batch possibly smaller."""
    return math.ceil(train_images / batch_size)


def _positive_integer(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass
class TrainConfig:
    """Everything that determines what a training run computes."""

    recipe: str = "book"
    epochs: int = 20
    batch_size: int = 100
    optimizer: str = "adam"
    lr: float = 0.001
    lr_schedule: str = "none"
    lr_min: Optional[float] = None  # cosine schedule's final rate; None: lr / 100
    augment: bool = False
    shift: float = 2.0  # augmentation: largest shift (pixels),
    rotation: float = 10.0  # largest rotation (degrees),
    scale_min: float = 0.9  # and zoom range
    scale_max: float = 1.1
    elastic_alpha: float = 0.0  # elastic distortions: their size (0: none)
    elastic_sigma: float = 6.0  # and smoothness (pixels)
    cutout: int = 0  # side of the square of zeros cut out of an image (0: none)
    cutout_prob: float = 0.5  # probability that an image gets one
    augment_strength: Optional[list] = None  # ensemble member K's augmentation scaled by value K; None: 1
    dtype: str = "float64"
    seed: int = 0
    ensemble: int = 1
    limit_train: Optional[int] = None  # use only the first N training images
    limit_test: Optional[int] = None  # use only the first N test images
    validation: Optional[int] = None  # hold the last N of the training images used out, to score each epoch
    eval_train_size: int = 10000  # training images scored after each epoch

    @classmethod
    def from_recipe(cls, recipe="book", **overrides):
        """The recipe's settings, then ``overrides`` (None values are ignored)."""
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
        values = dict(RECIPES[recipe], recipe=recipe)
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values).validated()

    def validated(self):
        """Return self, or raise ``ValueError`` naming the first setting that makes no sense."""
        positive = ["epochs", "batch_size", "ensemble", "eval_train_size"]
        positive += [name for name in ("limit_train", "limit_test", "validation") if getattr(self, name) is not None]
        for name in positive:
            value = getattr(self, name)
            if not _positive_integer(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        lr_min_ok = self.lr_min is None or (math.isfinite(self.lr_min) and 0 <= self.lr_min <= self.lr)
        if not (math.isfinite(self.lr) and self.lr > 0) or not lr_min_ok:
            raise ValueError(f"need a finite lr > 0 and 0 <= lr_min <= lr, got lr={self.lr}, lr_min={self.lr_min}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.lr_schedule!r}; choose one of {SCHEDULES}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        self._validate_augmentation()
        used = self.limit_train if self.limit_train is not None else TRAIN_IMAGES
        if self.validation is not None and self.validation >= used:
            raise ValueError(f"validation must leave training images: {self.validation} of the {used} used "
                             "would leave none")
        return self

    def _validate_augmentation(self):
        if self.shift < 0 or self.rotation < 0 or not 0 < self.scale_min <= self.scale_max:
            raise ValueError("augmentation needs shift >= 0, rotation >= 0 and 0 < scale_min <= scale_max")
        if not (math.isfinite(self.elastic_alpha) and self.elastic_alpha >= 0
                and math.isfinite(self.elastic_sigma) and self.elastic_sigma > 0):
            raise ValueError(f"elastic distortions need alpha >= 0 and sigma > 0, got alpha={self.elastic_alpha}, "
                             f"sigma={self.elastic_sigma}")
        if not (self.cutout == 0 or _positive_integer(self.cutout)) or not 0 <= self.cutout_prob <= 1:
            raise ValueError(f"cut-out needs a whole size >= 0 and a probability in [0, 1], got size "
                             f"{self.cutout!r}, probability {self.cutout_prob}")
        strengths = self.augment_strength
        if strengths is not None:
            numbers = isinstance(strengths, (list, tuple)) and all(
                isinstance(s, (int, float, np.integer, np.floating)) and not isinstance(s, bool) for s in strengths)
            if not numbers or not strengths or not all(math.isfinite(s) and s >= 0 for s in strengths):
                raise ValueError(f"augment_strength must be a list of numbers >= 0, got {strengths!r}")
            self.augment_strength = [float(s) for s in strengths]  # as config.json gives them back
            if self.augment and 1 - max(strengths) * (1 - self.scale_min) <= 0:
                raise ValueError(f"augmentation strength {max(strengths)} would scale digits down to nothing "
                                 f"(scale_min {self.scale_min})")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """The settings ``values`` (as ``to_dict`` gives them) name; settings they leave out are the defaults."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return cls(**values).validated()


def split_validation(data, config):
    """``(train, test, validation)``: the last ``config.validation`` of the training images of ``data`` held out.

    ``data`` is ``((x_train, t_train), (x_test, t_test))``; without a split
    the validation part is None. Data already in three parts is returned as
    it is. The validation images are the same whatever the seed.
    """
    if len(data) == 3:
        return tuple(data)
    (x_train, t_train), test = data
    held_out = config.validation
    if held_out is None:
        return (x_train, t_train), test, None
    if held_out >= x_train.shape[0]:
        raise ValueError(f"validation {held_out} leaves none of the {x_train.shape[0]} training images")
    cut = x_train.shape[0] - held_out
    return (x_train[:cut], t_train[:cut]), test, (x_train[cut:], t_train[cut:])


def member_strength(config, member):
    """The augmentation strength of model ``member`` (0 for the first) of a run: its value of ``augment_strength``.

    The values are used in turn (member K gets value K, starting over after
    the last); without them every model has strength 1.
    """
    if not config.augment_strength:
        return 1.0
    return float(config.augment_strength[member % len(config.augment_strength)])


def make_augmenter(config, rng, strength=1.0):
    """The augmentation of the training batches, drawing from ``rng``, or None when the settings ask for none.

    Affine transforms (``augment``), then elastic distortions
    (``elastic_alpha`` > 0), then cut-out (``cutout`` > 0). ``strength``
    scales the largest shift and rotation, the zoom range's distance from 1,
    the elastic distortions' alpha and the cut-out's side.
    """
    scaled = strength != 1
    steps = []
    if config.augment:
        shift, rotation, scale = config.shift, config.rotation, (config.scale_min, config.scale_max)
        if scaled:
            shift, rotation = strength * shift, strength * rotation
            scale = (1 - strength * (1 - scale[0]), 1 + strength * (scale[1] - 1))
        steps.append(RandomAffine(shift, rotation, scale, rng))
    if config.elastic_alpha > 0:
        steps.append(RandomElastic(strength * config.elastic_alpha if scaled else config.elastic_alpha,
                                   config.elastic_sigma, rng))
    if config.cutout > 0:
        steps.append(RandomCutout(round(strength * config.cutout) if scaled else config.cutout, config.cutout_prob,
                                  rng))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else Compose(steps)


def _augmentation_words(config):
    if not (config.elastic_alpha > 0 or config.cutout > 0):
        words = "on" if config.augment else "off"
    else:
        kinds = ["affine"] * config.augment
        if config.elastic_alpha > 0:
            kinds.append(f"elastic (alpha {config.elastic_alpha:g}, sigma {config.elastic_sigma:g})")
        if config.cutout > 0:
            kinds.append(f"cut-out {config.cutout} px (p {config.cutout_prob:g})")
        words = " + ".join(kinds)
    if config.augment_strength and words != "off":
        words += ", strength " + "/".join(f"{s:g}" for s in config.augment_strength) + " by model"
    return words


def describe(config, train_images):
    """The training settings in words (all but the seed), as a run's log and figures say them."""
    schedule = make_schedule(config.lr_schedule, config.lr,
                             config.epochs * steps_per_epoch(train_images, config.batch_size), config.lr_min)
    epochs = f"{config.epochs} epoch" + ("s" if config.epochs != 1 else "")
    return (f"recipe {config.recipe}: {epochs}, batch {config.batch_size}, {config.optimizer} "
            f"{schedule.describe()}, augmentation {_augmentation_words(config)}, {config.dtype}")
