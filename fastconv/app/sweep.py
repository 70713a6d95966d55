"""``fastconv sweep``: every combination of a grid of settings, trained as independent runs.

Like scikit-learn's ``GridSearchCV(param_grid=...)``: each grid option takes
several values (``--lr 0.001 0.0005 --lr-schedule none cosine --seed 0 1 2``)
and every combination is trained, on the same executors as ensemble members
(``--jobs``, ``--dask``). The folder ``--out`` holds::

    sweep.json      the grid and the settings shared by all runs
    data.json       where the MNIST files came from, with their SHA-256
    NAME/           one run per combination, named by its values (lr=0.001,lr_schedule=cosine,seed=0):
                    config.json, data.json, params.npz, history.json, curves.png
    summary.json    one row per run, best test accuracy first; with several seeds,
                    also each combination's mean, lowest and highest over its seeds

``--resume`` continues an interrupted sweep: finished runs are kept, the
others continue from their checkpoints.
"""
import itertools
import json
import statistics
from pathlib import Path

__all__ = ["GRID_SETTINGS", "SHARED_SETTINGS", "expand_grid", "setting_name", "grid_runs", "saved_sweep",
           "run_sweep", "summarize", "format_table"]

# TrainConfig settings a sweep can vary: (type, help)
GRID_SETTINGS = {
    "epochs": (int, "passes over the training set"),
    "batch_size": (int, "images per mini-batch"),
    "optimizer": (str, "the book's optimizers"),
    "lr": (float, "learning rate (the initial one with a schedule)"),
    "lr_schedule": (str, "none, step or cosine"),
    "lr_min": (float, "final learning rate of the cosine schedule"),
    "dtype": (str, "float64 or float32"),
    "seed": (int, "seeds (one run per seed: their spread is the noise of a setting)"),
    "elastic_alpha": (float, "size of the elastic distortions (0: none)"),
    "elastic_sigma": (float, "smoothness of the elastic distortions (pixels)"),
    "cutout": (int, "side of the square cut out of the training images (0: none)"),
}
# Settings shared by all runs of a sweep.
SHARED_SETTINGS = ("recipe", "augment", "limit_train", "limit_test", "validation", "eval_train_size")
SWEEP, SUMMARY = "sweep.json", "summary.json"


def expand_grid(grid):
    """Every combination of ``grid`` ({setting: [values]}), as dicts, the last setting varying fastest."""
    unknown = sorted(set(grid) - set(GRID_SETTINGS))
    if unknown:
        raise ValueError(f"a sweep cannot vary {unknown}; it varies {sorted(GRID_SETTINGS)}")
    names = list(grid)
    for name in names:
        if not grid[name] or len(set(grid[name])) != len(grid[name]):
            raise ValueError(f"--{name.replace('_', '-')} needs distinct values, got {grid[name]}")
    return [dict(zip(names, values)) for values in itertools.product(*(grid[name] for name in names))]


def setting_name(setting):
    """The folder name of a combination: its values, e.g. ``lr=0.001,seed=2`` (``run`` for no values)."""
    return ",".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                    for name, value in setting.items()) or "run"


def _varied(grid):
    return {name: values for name, values in grid.items() if len(values) > 1}


def grid_runs(shared, grid):
    """The runs of a sweep, as ``[(name, setting, TrainConfig)]``: one per combination of the values that vary.

    Raises ``ValueError`` for a grid or settings that make no sense.
    """
    from fastconv.app.settings import TrainConfig

    varied = _varied(grid)
    fixed = {name: values[0] for name, values in grid.items() if len(values) == 1}
    shared = dict(shared)
    recipe = shared.pop("recipe", None) or "book"
    runs = []
    for setting in expand_grid(varied):
        config = TrainConfig.from_recipe(recipe, **shared, **fixed, **setting)
        runs.append((setting_name(setting), setting, config))
    return runs


def summarize(rows, grid):
    """The summary document: rows best first; with several seeds, each combination over its seeds."""
    ranked = sorted(rows, key=lambda row: -row["test_acc"])
    document = {"grid": grid, "runs": ranked}
    varied = _varied(grid)
    if "seed" in varied:
        groups = {}
        for row in rows:
            key = setting_name({k: v for k, v in row["setting"].items() if k != "seed"})
            groups.setdefault(key, []).append(row["test_acc"])
        document["over_seeds"] = sorted(
            ({"setting": key, "seeds": len(accs), "mean_test_acc": statistics.fmean(accs),
              "min_test_acc": min(accs), "max_test_acc": max(accs)} for key, accs in groups.items()),
            key=lambda group: -group["mean_test_acc"])
    return document


def format_table(document):
    """The summary as text: the runs best first, then (with several seeds) the combinations."""
    lines = [f"{'rank':>4}  {'test acc':>8}  {'train loss':>10}  {'time (s)':>8}  run"]
    for rank, row in enumerate(document["runs"], start=1):
        lines.append(f"{rank:>4}  {100 * row['test_acc']:>7.2f}%  {row['train_loss']:>10.4f}  "
                     f"{row['training_seconds']:>8.1f}  {row['name']}")
    if "over_seeds" in document:
        lines += ["", f"{'mean':>8}  {'lowest':>8}  {'highest':>8}  seeds  setting"]
        for group in document["over_seeds"]:
            lines.append(f"{100 * group['mean_test_acc']:>7.2f}%  {100 * group['min_test_acc']:>7.2f}%  "
                         f"{100 * group['max_test_acc']:>7.2f}%  {group['seeds']:>5}  {group['setting'] or 'all'}")
    return "\n".join(lines)


def _row(name, setting, history):
    row = {"name": name, "setting": setting, "test_acc": history["test_acc"],
           "train_loss": history["epochs"][-1]["train_loss"], "train_acc": history["epochs"][-1]["train_acc"],
           "training_seconds": history["training_seconds"], "test_images": history["test_images"]}
    if "val_acc" in history:
        row.update(val_acc=history["val_acc"], val_images=history["val_images"])
    return row


def saved_sweep(out):
    """The shared settings and the grid of the sweep in ``out``."""
    from fastconv.app.runs import RunError

    try:
        saved = json.loads((Path(out) / SWEEP).read_text())
        return saved["shared"], saved["grid"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"nothing to resume in {out}: no readable {SWEEP} ({exc})") from None


def run_sweep(shared, grid, out, parallel, *, resume=False, data_dir=None, download=True, log=print):
    """Train every combination of ``grid`` with the ``shared`` settings on ``parallel``; return the summary.

    ``shared``: recipe, augment, limit_train, limit_test, validation,
    eval_train_size (None: the recipe's). ``grid``: {setting: [values]} of ``GRID_SETTINGS``.
    With ``resume`` both come from ``out/sweep.json``.
    """
    from fastconv.app import runs

    out = Path(out)
    if resume:
        shared, grid = saved_sweep(out)
        try:
            recorded = json.loads((out / runs.DATA).read_text())
        except (OSError, ValueError) as exc:
            raise runs.RunError(f"{out / runs.DATA} is not readable ({exc})") from None
    else:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise runs.RunError(f"{out} is not an empty folder; choose another --out, or continue the sweep "
                                "there with --resume")
        recorded = None
    models = grid_runs(shared, grid)
    data, source = runs.load_data(models[0][2], data_dir, download, recorded)
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
        runs.write_json(out / SWEEP, {"shared": shared, "grid": grid})
        runs.write_json(out / runs.DATA, source)
    log(f"sweep of {len(models)} runs ({' x '.join(f'{len(v)} {k}' for k, v in _varied(grid).items()) or 'one'}) "
        f"on {data[0][0].shape[0]} images; {parallel.description}")

    histories, waiting = {}, []
    for name, setting, config in models:
        folder = out / name
        done = runs.finished_history(folder, config, config.seed) if folder.is_dir() else None
        if done:
            histories[name] = done
            log(f"{name}: already trained")
            continue
        if not (folder / runs.CONFIG).is_file():
            folder.mkdir(exist_ok=True)
            runs.write_json(folder / runs.CONFIG, config.to_dict())
            runs.write_json(folder / runs.DATA, source)
        waiting.append((name, folder, config, config.seed, folder))
    for (name, *_), (_, history, *_) in zip(waiting, parallel.train_models(source, data, waiting, log)):
        histories[name] = history

    document = summarize([_row(name, setting, histories[name]) for name, setting, _ in models], grid)
    runs.write_json(out / SUMMARY, document)
    log(format_table(document))
    log(f"summary: {out / SUMMARY}")
    return document
