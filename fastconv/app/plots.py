"""PNG figures of a training run, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Each function writes to ``file``: a path or a binary file object.
"""
import numpy as np

from fastconv.util import smooth_curve

__all__ = ["plot_learning_curves", "plot_misclassified"]


def _figure(width, height):
    # imported here: matplotlib is slow to import and only needed once a run ends
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_learning_curves(history, file, title=None):
    """Loss per step (raw and smoothed) and train/validation/test accuracy per epoch, side by side, under ``title``.

    The validation curve is drawn for the epochs whose records hold ``val_acc``.
    """
    from matplotlib.ticker import MaxNLocator

    figure = _figure(11, 4)
    loss_axes, accuracy_axes = figure.subplots(1, 2)

    step_loss = np.asarray(history["step_loss"], dtype=np.float64)
    steps = np.arange(1, step_loss.size + 1)
    loss_axes.plot(steps, step_loss, color="0.75", linewidth=0.5, label="per step")
    if step_loss.size >= 11:
        loss_axes.plot(steps, smooth_curve(step_loss), color="C0", label="smoothed")
    positive = step_loss.size and step_loss.min() > 0
    loss_axes.set(xlabel="step", ylabel="training loss (dropout on, as trained)",
                  yscale="log" if positive else "linear")
    loss_axes.legend()

    records = history["epochs"]
    epochs = [r["epoch"] for r in records]
    accuracy_axes.plot(epochs, [100 * r["train_acc"] for r in records], "o-", label="train")
    validated = [r for r in records if "val_acc" in r]
    if validated:
        accuracy_axes.plot([r["epoch"] for r in validated], [100 * r["val_acc"] for r in validated], "^-",
                           label="validation")
    accuracy_axes.plot(epochs, [100 * r["test_acc"] for r in records], "s-", label="test")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy (%)")
    accuracy_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    accuracy_axes.grid(alpha=0.3)
    accuracy_axes.legend(loc="lower right")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(file, format="png", dpi=100)


def plot_misclassified(images, labels, predicted, file, limit=100, columns=10):
    """A grid of the first ``limit`` misclassified images, each titled with its true and predicted label."""
    labels = np.asarray(labels)
    predicted = np.asarray(predicted)
    wrong = np.flatnonzero(labels != predicted)
    shown = wrong[:limit]
    rows = max(1, -(-shown.size // columns))
    figure = _figure(columns * 1.1, rows * 1.25 + 0.4)
    figure.suptitle(f"{wrong.size} of {labels.size} test images misclassified"
                    + (f" (first {shown.size} shown)" if wrong.size > shown.size else "") + ": true / predicted")
    for slot, index in enumerate(shown):
        axes = figure.add_subplot(rows, columns, slot + 1)
        axes.imshow(np.asarray(images[index]).reshape(28, 28), cmap="gray_r", vmin=0, vmax=1)
        axes.set_title(f"{labels[index]} / {predicted[index]}", fontsize=9, color="C3")
        axes.set_xticks([])
        axes.set_yticks([])
    figure.tight_layout()
    figure.savefig(file, format="png", dpi=100)
