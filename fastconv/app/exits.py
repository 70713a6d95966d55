"""How ``fastconv train`` and ``fastconv sweep`` end: their exit codes and the command that continues a run.

Exit codes of ``fastconv train`` and ``fastconv sweep``:

- 0 success
- 1 unexpected failure (or the app's dependencies, or with --dask the dask extra, are not
  installed)
- 2 bad arguments (a --dask scheduler that does not answer too), or an output folder that does not fit them (it holds
  another run, cannot be written, has a damaged checkpoint, or the run
  recorded other MNIST files than those found)
- 3 MNIST missing (and not downloadable) or unreadable
- 4 the training diverged (the loss became NaN or infinite)
- 130 interrupted by Ctrl-C (a checkpoint is saved; continue with --resume)
"""
import shlex

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_NO_DATA", "EXIT_DIVERGED", "EXIT_INTERRUPTED",
           "exit_code", "resume_command"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NO_DATA, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

# The options a resumed command repeats (they say where and how it ran), in the order it gives them.
_RESUME_OPTIONS = ("data_dir", "no_download", "backend", "quiet", "jobs", "dask")


def exit_code(error, *, starting=False):
    """The exit code for ``error``, or None for an error the commands do not expect (it is to propagate).

    ``starting``: the error came while the command checked its arguments and
    set up where to train, before anything trained; there any ``ValueError``
    or ``OSError`` means a bad argument. Once training runs, only the errors
    the app raises itself, and Ctrl-C, have exit codes.
    """
    from fastconv.app.checkpoint import CheckpointError
    from fastconv.app.executors import DaskMissing
    from fastconv.app.runs import RunError
    from fastconv.app.training import TrainingDiverged
    from fastconv.datasets import MNISTFormatError, MNISTNotFoundError

    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, DaskMissing):
        return EXIT_FAILURE
    if isinstance(error, (MNISTNotFoundError, MNISTFormatError)):
        return EXIT_NO_DATA
    if isinstance(error, TrainingDiverged):
        return EXIT_DIVERGED
    if isinstance(error, (RunError, CheckpointError)) or (starting and isinstance(error, (ValueError, OSError))):
        return EXIT_USAGE
    return None


def resume_command(command, out, args):
    """The shell command that continues the ``command`` ("train" or "sweep") run in ``out``.

    It repeats the options of ``args`` (the parsed command line) that say where
    and how the run ran, so it works as printed.
    """
    words = ["fastconv", command, "--resume", "--out", str(out)]
    for name in _RESUME_OPTIONS:
        value = getattr(args, name, None)
        option = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            words += [option] if value else []
        elif value is not None and value != "":
            words += [option, str(value)]
    return " ".join(shlex.quote(word) for word in words)
