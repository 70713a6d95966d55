"""Is this fastconv built? Say so, and what to do, when its compiled extensions are missing.

The usual cause is running Python from a clone of the repository: the
current folder comes first on ``sys.path``, so ``import fastconv`` finds the
source tree, whose Cython extensions were never compiled, instead of the
installed package. ``fastconv info``, the reason a backend is unavailable
and the test suite all show ``diagnosis()``.
"""
import importlib.machinery
import os
import sys
from pathlib import Path

__all__ = ["missing_extensions", "diagnosis"]

_PACKAGE = Path(__file__).resolve().parent
_EXTENSIONS = _PACKAGE / "_ext"


def missing_extensions():
    """The modules of ``fastconv._ext`` whose Cython source has no compiled module beside it."""
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    return sorted(source.stem for source in _EXTENSIONS.glob("*.pyx")
                  if not any((_EXTENSIONS / (source.stem + suffix)).is_file() for suffix in suffixes))


def _other_installation():
    """The folder of another importable fastconv that this one hides, or None."""
    root = _PACKAGE.parent
    for finder in sys.meta_path:
        try:
            if finder is importlib.machinery.PathFinder:
                path = [entry for entry in sys.path if Path(entry or os.curdir).resolve() != root]
                spec = finder.find_spec("fastconv", path)
            elif hasattr(finder, "find_spec"):
                spec = finder.find_spec("fastconv", None)
            else:
                continue
        except (ImportError, OSError, ValueError, TypeError):
            continue
        if spec is not None and spec.origin:
            folder = Path(spec.origin).resolve().parent
            if folder != _PACKAGE:
                return folder
    return None


def diagnosis():
    """None when the compiled extensions are in place, else what is wrong and what to do (a str)."""
    missing = missing_extensions()
    if not missing:
        return None
    root = _PACKAGE.parent
    lines = [f"fastconv is imported from {_PACKAGE}, whose compiled extensions are not built "
             f"(missing: {', '.join(missing)}), so the cython backend cannot run."]
    other = _other_installation()
    if other is not None:
        lines.append(f"It hides the fastconv installed at {other}: Python looks in {root} first "
                     "(the current folder, or the script's).")
    lines.append(f"Either run from another folder, or build the extensions in place: cd {root} && "
                 "python setup.py build_ext --inplace (or pip install -e .).")
    return "\n".join(lines)
