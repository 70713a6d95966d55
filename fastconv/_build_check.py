"""Is this fastconv built? Say so, and what to do, when its compiled extensions are missing.

The usual cause is running Python from a clone of the repository: the
current folder comes first on ``sys.path``, so ``import fastconv`` finds the
source tree, whose Cython extensions were never compiled, instead of the
installed package. ``fastconv info``, the reason a backend is unavailable
and the test suite all show ``diagnosis()``.

The other cause is an install that built no extensions: where they do not
compile (no C compiler), ``setup.py`` installs fastconv without them and
writes why in ``_ext/_not_built.json`` (``build_record()``). Such an install
has the numba and reference backends; ``diagnosis()`` then gives the recorded
reason and how to get the cython backend, and ``skipped_reason()`` tells the
two causes apart.
"""
import importlib.machinery
import json
import os
import sys
from pathlib import Path

__all__ = ["missing_extensions", "build_record", "skipped_reason", "diagnosis"]

_PACKAGE = Path(__file__).resolve().parent
_EXTENSIONS = _PACKAGE / "_ext"
# written by setup.py when it installs fastconv without the compiled extensions, removed when it builds them
NOT_BUILT_RECORD = _EXTENSIONS / "_not_built.json"
REQUIRE_VARIABLE = "FASTCONV_REQUIRE_EXTENSIONS"


def missing_extensions():
    """The modules of ``fastconv._ext`` whose Cython source has no compiled module beside it."""
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    return sorted(source.stem for source in _EXTENSIONS.glob("*.pyx")
                  if not any((_EXTENSIONS / (source.stem + suffix)).is_file() for suffix in suffixes))


def build_record():
    """What the build that skipped the compiled extensions wrote (a dict with at least "reason"), or None
    when no build skipped them."""
    try:
        record = json.loads(NOT_BUILT_RECORD.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable: still a record that the extensions were skipped
        return {"reason": f"the build record {NOT_BUILT_RECORD} is unreadable ({exc})"}
    if not isinstance(record, dict) or not isinstance(record.get("reason"), str):
        return {"reason": f"the build record {NOT_BUILT_RECORD} says nothing readable ({record!r})"}
    return record


def skipped_reason():
    """Why fastconv was installed without its compiled extensions, or None when it was not (they are built,
    or missing for another reason: a source tree not built in place)."""
    if not missing_extensions():
        return None
    record = build_record()
    return None if record is None else record["reason"]


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
    skipped = skipped_reason()
    if skipped is not None:
        return (f"fastconv was installed without its compiled extensions, so without the cython backend: {skipped}. "
                "The numba and reference backends work. For the cython backend install a C compiler and reinstall "
                f"fastconv ({REQUIRE_VARIABLE}=1 makes a build without the extensions fail instead).")
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
