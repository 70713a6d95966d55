"""Learning-rate schedules: the learning rate as a function of the training step.

A schedule is called with the step index (0 for the first update) and
returns the learning rate for that update (``describe()`` says it in
words); the training loop assigns it to ``optimizer.lr`` before every
update. Every optimizer of ``fastconv.optimizer`` reads ``self.lr`` at
each update, so this is all the decay needs.
"""
import math

__all__ = ["Constant", "StepDecay", "CosineDecay", "make_schedule", "SCHEDULES"]


class Constant:
    """The same learning rate throughout (the book's training)."""

    def __init__(self, lr):
        self.lr = float(lr)

    def __call__(self, step):
        return self.lr

    def __repr__(self):
        return f"Constant(lr={self.lr:g})"

    def describe(self):
        return f"lr {self.lr:g}, constant"


class StepDecay:
    """Multiply the learning rate by ``factor`` at each milestone.

    ``milestones`` are fractions of ``total_steps`` (default: halfway and at
    three quarters), so with factor 0.1 the rate is lr, lr/10, then lr/100.
    """

    def __init__(self, lr, total_steps, factor=0.1, milestones=(0.5, 0.75)):
        self.lr = float(lr)
        self.factor = float(factor)
        self.boundaries = sorted(int(round(m * total_steps)) for m in milestones)

    def __call__(self, step):
        passed = sum(step >= boundary for boundary in self.boundaries)
        return self.lr * self.factor ** passed

    def __repr__(self):
        return f"StepDecay(lr={self.lr:g}, factor={self.factor:g}, boundaries={self.boundaries})"

    def describe(self):
        steps = " and ".join(str(b) for b in self.boundaries)
        return f"lr {self.lr:g}, x{self.factor:g} at steps {steps}"


class CosineDecay:
    """Half a cosine from ``lr`` at step 0 down to ``lr_min`` at the last step.

    lr(s) = lr_min + (lr - lr_min) * (1 + cos(pi * s / (total_steps - 1))) / 2
    """

    def __init__(self, lr, total_steps, lr_min=0.0):
        self.lr = float(lr)
        self.lr_min = float(lr_min)
        self.last_step = max(int(total_steps) - 1, 1)

    def __call__(self, step):
        progress = min(max(step, 0), self.last_step) / self.last_step
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __repr__(self):
        return f"CosineDecay(lr={self.lr:g}, lr_min={self.lr_min:g}, steps={self.last_step + 1})"

    def describe(self):
        return f"lr {self.lr:g} decayed along a cosine to {self.lr_min:g}"


SCHEDULES = ("none", "step", "cosine")


def make_schedule(name, lr, total_steps, lr_min=None):
    """The schedule called ``name`` ("none", "step" or "cosine") for a run of ``total_steps`` updates.

    ``lr_min`` (cosine only) defaults to lr / 100.
    """
    if name == "none":
        return Constant(lr)
    if name == "step":
        return StepDecay(lr, total_steps)
    if name == "cosine":
        return CosineDecay(lr, total_steps, lr / 100 if lr_min is None else lr_min)
    raise ValueError(f"unknown learning-rate schedule {name!r}; choose one of {SCHEDULES}")
