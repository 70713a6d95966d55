"""The ``fastconv`` command line: ``fastconv info``, ``fastconv train`` and ``fastconv sweep``.

Their exit codes are those of ``fastconv.app.exits``.
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

from fastconv.app.exits import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, exit_code, resume_command

# TrainConfig settings that have a command-line option; None means "not given".
_TRAIN_SETTINGS = ("recipe", "epochs", "batch_size", "optimizer", "lr", "lr_schedule", "lr_min", "augment",
                   "elastic_alpha", "elastic_sigma", "cutout", "cutout_prob", "augment_strength", "dtype", "seed",
                   "ensemble", "limit_train", "limit_test", "validation", "eval_train_size")


def _add_train_parser(commands):
    from fastconv.app.parallel import add_parallel_arguments
    from fastconv.app.schedules import SCHEDULES
    from fastconv.app.settings import RECIPES
    from fastconv.optimizer import OPTIMIZERS

    train = commands.add_parser(
        "train", help="train the book's DeepConvNet on MNIST and evaluate it",
        description="Train the book's DeepConvNet on MNIST, evaluate it on the test set and write parameters, "
                    "history (JSON) and figures (PNG) to --out. Options not given come from --recipe.")
    recipe = ", ".join(f"{name}: " + " ".join(f"{k}={v}" for k, v in values.items())
                       for name, values in RECIPES.items())
    train.add_argument("--recipe", choices=sorted(RECIPES), help=f"base settings (default book; {recipe})")
    train.add_argument("--epochs", type=int, help="passes over the training set")
    train.add_argument("--batch-size", type=int, help="images per mini-batch")
    train.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help="the book's optimizers")
    train.add_argument("--lr", type=float, help="learning rate (the initial one with a schedule)")
    train.add_argument("--lr-schedule", choices=SCHEDULES,
                       help="none; step: x0.1 at 1/2 and 3/4 of the steps; cosine: down to --lr-min")
    train.add_argument("--lr-min", type=float, help="final learning rate of the cosine schedule (default lr/100)")
    train.add_argument("--augment", action=argparse.BooleanOptionalAction,
                       help="random shifts (+-2 px), rotations (+-10 deg) and scaling (0.9-1.1) of training images")
    train.add_argument("--elastic-alpha", type=float, metavar="ALPHA",
                       help="elastic distortions of training images (Simard et al. 2003): random displacement fields "
                            "smoothed by a Gaussian of --elastic-sigma, times ALPHA (default 0: none)")
    train.add_argument("--elastic-sigma", type=float, metavar="SIGMA",
                       help="smoothness of the elastic distortions in pixels (default 6)")
    train.add_argument("--cutout", type=int, metavar="SIZE",
                       help="cut-out: zero a random SIZE x SIZE square of a training image (default 0: none)")
    train.add_argument("--cutout-prob", type=float, metavar="P",
                       help="probability that a training image gets a cut-out square (default 0.5)")
    train.add_argument("--augment-strength", type=float, nargs="+", metavar="S",
                       help="scale the augmentation of ensemble model K by the K-th value, starting over after the "
                            "last (e.g. 0.5 1 1.5; default 1)")
    train.add_argument("--dtype", choices=("float64", "float32"), help="float64 (default, the book's) or float32")
    train.add_argument("--seed", type=int, help="seed of the weights, dropout, shuffling and augmentation (default 0)")
    train.add_argument("--ensemble", type=int, metavar="N",
                       help="train N models (seeds seed..seed+N-1) and average their softmax outputs")
    train.add_argument("--limit-train", type=int, metavar="N", help="use only the first N training images")
    train.add_argument("--limit-test", type=int, metavar="N", help="use only the first N test images")
    train.add_argument("--validation", type=int, metavar="N",
                       help="hold out the last N of the training images used (after --limit-train) and score them "
                            "after each epoch; the same images whatever the seed")
    train.add_argument("--eval-train-size", type=int, metavar="N",
                       help="training images scored after each epoch (default 10000)")
    train.add_argument("--backend", help="kernel backend (default: the fastest available; see `fastconv info`)")
    train.add_argument("--data-dir", help="folder with the four MNIST .gz files (without it: $FASTCONV_DATA, "
                                          "the user cache, or a download; with --resume: the run's own)")
    train.add_argument("--no-download", action="store_true", help="fail instead of downloading missing MNIST files")
    train.add_argument("--out", help="output folder (default runs/train-YYYYmmdd-HHMMSS)")
    train.add_argument("--resume", action="store_true",
                       help="continue the interrupted run in --out from its checkpoint, with its settings and data")
    train.add_argument("--overwrite", action="store_true",
                       help="let a new run delete the run already in --out (without it, a used --out is refused)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_parallel_arguments(train)


def _add_sweep_parser(commands):
    from fastconv.app.parallel import add_parallel_arguments
    from fastconv.app.settings import RECIPES
    from fastconv.app.sweep import GRID_SETTINGS

    sweep = commands.add_parser(
        "sweep", help="train every combination of several settings (a grid) as independent runs",
        description="Train one model for every combination of the values given (e.g. --lr 0.001 0.0005 "
                    "--seed 0 1 2: six runs), in parallel, one folder per run in --out, and print a table "
                    "of the results, best first (also in --out/summary.json).")
    sweep.add_argument("--recipe", choices=sorted(RECIPES), help="base settings of every run (default book)")
    for name, (kind, text) in GRID_SETTINGS.items():
        sweep.add_argument(f"--{name.replace('_', '-')}", type=kind, nargs="+", metavar="V", help=text)
    sweep.add_argument("--augment", action=argparse.BooleanOptionalAction, help="augmentation in every run")
    for name in ("limit_train", "limit_test", "validation", "eval_train_size"):
        sweep.add_argument(f"--{name.replace('_', '-')}", type=int, metavar="N", help="as for fastconv train")
    sweep.add_argument("--backend", help="kernel backend (default: the fastest available)")
    sweep.add_argument("--data-dir", help="folder with the four MNIST .gz files")
    sweep.add_argument("--no-download", action="store_true", help="fail instead of downloading MNIST")
    sweep.add_argument("--out", required=True, help="the sweep's folder")
    sweep.add_argument("--resume", action="store_true", help="continue the sweep in --out with its own grid")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    add_parallel_arguments(sweep)


def build_parser():
    parser = argparse.ArgumentParser(prog="fastconv", description="Fast convolution layers for NumPy deep learning.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, backends, SIMD variant and threads on this machine")
    _add_train_parser(commands)
    _add_sweep_parser(commands)
    return parser


def _error(command, message):
    print(f"fastconv {command}: error: {message}", file=sys.stderr)


def _failed(command, error, *, starting=False, message=None):
    """Say ``error`` (or ``message``) and return its exit code; raise it again if it has none."""
    code = exit_code(error, starting=starting)
    if code is None:
        raise error
    _error(command, error if message is None else message)
    return code


def _missing_app_dependencies():
    """The training app's packages (the ``app`` extra) that do not import, as a list of names."""
    import importlib.util

    missing = []
    for name in ("matplotlib", "tqdm"):
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ImportError:
            missing.append(name)
    return missing


def train_command(args):
    """Run ``fastconv train``; return its exit code."""
    missing = _missing_app_dependencies()
    if missing:
        _error("train", f"training needs {' and '.join(missing)}: pip install \"fastconv[app]\"")
        return EXIT_FAILURE
    import fastconv
    from fastconv.app import runs
    from fastconv.app.checkpoint import CheckpointError
    from fastconv.app.parallel import parallel_training
    from fastconv.app.settings import TrainConfig

    given = {name: getattr(args, name) for name in _TRAIN_SETTINGS if getattr(args, name) is not None}
    out = args.out or time.strftime("runs/train-%Y%m%d-%H%M%S")
    try:
        if args.resume:
            if not args.out:
                raise runs.RunError("--resume needs --out, the folder of the run to continue")
            saved = runs.saved_config(out)
            conflicts = [f"--{k.replace('_', '-')} {v} (the run has {getattr(saved, k)})"
                         for k, v in given.items() if getattr(saved, k) != v]
            if conflicts:
                raise runs.RunError("a resumed run keeps its settings; drop " + ", ".join(conflicts))
            config = None
        else:
            config = TrainConfig.from_recipe(given.pop("recipe", "book"), **given)
        if args.backend and args.backend.strip().lower() not in fastconv.available_backends():
            status = fastconv.backend_status().get(args.backend.strip().lower(), "unknown backend")
            raise runs.RunError(f"backend {args.backend!r} cannot be used ({status}); "
                                f"available: {', '.join(fastconv.available_backends())}")
        parallel = parallel_training((config or saved).ensemble, jobs=args.jobs, dask=args.dask,
                                     download=not args.no_download, progress=not args.quiet)
    except Exception as exc:
        return _failed("train", exc, starting=True)

    backend = fastconv.use_backend(args.backend) if args.backend else contextlib.nullcontext()
    try:
        with backend, (parallel or contextlib.nullcontext()):
            runs.run(config, out, resume=args.resume, overwrite=args.overwrite, data_dir=args.data_dir,
                     download=not args.no_download, progress=not args.quiet, parallel=parallel)
    except KeyboardInterrupt:
        saved = runs.checkpoints(out)
        if not (Path(out) / runs.CONFIG).is_file():
            print("\ninterrupted before the run started; nothing was written", file=sys.stderr)
        else:
            where = (f"a checkpoint is saved in {saved[0].parent}" if saved
                     else "no checkpoint was written yet, so it starts over")
            print(f"\ninterrupted: {where}; continue with\n  {resume_command('train', out, args)}",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        damaged = isinstance(exc, CheckpointError)
        return _failed("train", exc, message=f"{exc}; move it away to start that model over with --resume"
                       if damaged else None)
    return EXIT_OK


def sweep_command(args):
    """Run ``fastconv sweep``; return its exit code (those of ``fastconv train``)."""
    import fastconv
    from fastconv.app import runs, sweep
    from fastconv.app.parallel import parallel_training

    grid = {name: getattr(args, name) for name in sweep.GRID_SETTINGS if getattr(args, name) is not None}
    shared = {name: getattr(args, name) for name in sweep.SHARED_SETTINGS if getattr(args, name) is not None}
    try:
        if args.resume and (grid or shared):
            raise runs.RunError("a resumed sweep keeps its grid and settings; give only --out and where to run")
        # every combination is checked before anything starts
        count = len(sweep.grid_runs(*(sweep.saved_sweep(args.out) if args.resume else (shared, grid))))
        if args.backend:
            with fastconv.use_backend(args.backend):  # an unknown name is a ValueError
                pass
        parallel = parallel_training(count, jobs=args.jobs, dask=args.dask, download=not args.no_download,
                                     progress=not args.quiet, here_for_one=False)
    except Exception as exc:
        return _failed("sweep", exc, starting=True)

    backend = fastconv.use_backend(args.backend) if args.backend else contextlib.nullcontext()
    try:
        with backend, parallel:
            sweep.run_sweep(shared, grid, args.out, parallel, resume=args.resume, data_dir=args.data_dir,
                            download=not args.no_download)
    except KeyboardInterrupt:
        print("\ninterrupted: each unfinished run keeps its checkpoint; continue with\n  "
              + resume_command("sweep", args.out, args), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        return _failed("sweep", exc)
    return EXIT_OK


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad arguments, 0 after --help
        return exc.code
    if args.command == "info":
        from fastconv.info import main as info_main
        return info_main()
    if args.command == "train":
        return train_command(args)
    if args.command == "sweep":
        return sweep_command(args)
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
