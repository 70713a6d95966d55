"""MNIST in the book's format, found locally or downloaded once.

``load_mnist`` returns ``(x_train, t_train), (x_test, t_test)`` exactly as the
book's ``dataset.mnist.load_mnist`` does (same shapes and dtypes). The four
IDX ``.gz`` files are looked for, in order, in

1. the folder named by the environment variable ``FASTCONV_DATA``,
2. the user cache folder ``$XDG_CACHE_HOME/fastconv/mnist`` (default
   ``~/.cache/fastconv/mnist``),

and the first folder holding all four is used. Otherwise the missing files
are downloaded into the cache folder from public mirrors. A ``data_dir``
given as an argument is the only place looked at: when it lacks a file,
that is an error naming it, never a fall-through to other copies. Downloads are
accepted only with the official MD5 checksum and are written atomically, so
a partial or corrupt file never lands in the cache. Local files are checked
by their IDX header and size, not by checksum, so that a re-encoded copy of
the data set loads too.
"""
import gzip
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

__all__ = ["load_mnist", "find_mnist", "locate_mnist", "mnist_file_paths", "download_mnist", "read_idx", "write_idx",
           "default_cache_dir", "MNISTNotFoundError", "MNISTFormatError", "MNIST_FILES", "MIRRORS", "CHECKSUMS", "ENV_VAR"]

ENV_VAR = "FASTCONV_DATA"

# key -> (file name, IDX magic number, number of items)
MNIST_FILES = {
    "train_img": ("train-images-idx3-ubyte.gz", 2051, 60000),
    "train_label": ("train-labels-idx1-ubyte.gz", 2049, 60000),
    "test_img": ("t10k-images-idx3-ubyte.gz", 2051, 10000),
    "test_label": ("t10k-labels-idx1-ubyte.gz", 2049, 10000),
}

# Official MD5 checksums of the compressed files, as published with the data set.
CHECKSUMS = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

# Tried in order; each URL is a folder holding the four files.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

IMAGE_SIDE = 28
_IDX_NDIM = {2051: 3, 2049: 1}  # magic number -> dimensions (unsigned bytes)
_DOWNLOAD_TIMEOUT_S = 30
_CHUNK = 1 << 16


class MNISTNotFoundError(FileNotFoundError):
    """The MNIST files are neither on disk nor downloadable."""


class MNISTFormatError(ValueError):
    """A file is not the MNIST IDX file it is named after (header, size or labels)."""


def default_cache_dir():
    """``$XDG_CACHE_HOME/fastconv/mnist``, or ``~/.cache/fastconv/mnist``."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "fastconv" / "mnist"


def _local_file(folder, name):
    """The file ``name`` in ``folder``, or its unpacked twin (no ``.gz``); None if neither exists."""
    for candidate in (Path(folder) / name, Path(folder) / name[:-len(".gz")]):
        if candidate.is_file():
            return candidate
    return None


def _open(path):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def read_idx(path, magic, count=None):
    """Read an IDX file (gzip-compressed or not) of unsigned bytes, checking its header.

    ``magic`` is 2051 for images (``count`` x 28 x 28) and 2049 for labels
    (``count``). Raises ``MNISTFormatError`` (a ``ValueError``) naming the
    file when its header, size or label values are not what MNIST has.
    """
    if magic not in _IDX_NDIM:
        raise ValueError(f"magic must be 2051 (images) or 2049 (labels), got {magic}")
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # what gzip raises for damaged files
        raise MNISTFormatError(f"{path}: cannot be read as an IDX file ({exc})") from None
    ndim = _IDX_NDIM[magic]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise MNISTFormatError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    header = np.frombuffer(data, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise MNISTFormatError(f"{path}: IDX magic number is {int(header[0])}, expected {magic}")
    dims = tuple(int(d) for d in header[1:])
    if count is not None and dims[0] != count:
        raise MNISTFormatError(f"{path}: holds {dims[0]} items, expected {count}")
    if ndim == 3 and dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise MNISTFormatError(f"{path}: images are {dims[1]}x{dims[2]}, expected {IMAGE_SIDE}x{IMAGE_SIDE}")
    expected_size = header_size + int(np.prod(dims))
    if len(data) != expected_size:
        raise MNISTFormatError(f"{path}: {len(data)} bytes, expected {expected_size} for items of shape {dims}")
    array = np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)
    if ndim == 1 and array.size and array.max() > 9:
        raise MNISTFormatError(f"{path}: label {int(array.max())} out of range 0..9")
    return array


def write_idx(path, array):
    """Write a uint8 array as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    Images (N, 28, 28) get magic 2051 and labels (N,) magic 2049, as in
    MNIST; ``read_idx`` reads the file back.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = {3: 2051, 1: 2049}.get(array.ndim)
    if magic is None:
        raise ValueError(f"expected images (N, H, W) or labels (N,), got shape {array.shape}")
    header = np.array((magic,) + array.shape, dtype=">u4").tobytes()
    opener = (lambda p: gzip.open(p, "wb", compresslevel=6)) if str(path).endswith(".gz") else (lambda p: open(p, "wb"))
    with opener(path) as f:
        f.write(header)
        f.write(array.tobytes())
    return Path(path)


def _candidate_folders(data_dir):
    if data_dir is not None:
        return [Path(data_dir)]
    folders = []
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        folders.append(Path(env))
    folders.append(default_cache_dir())
    return folders


def _missing_files(folder):
    return [name for name, _, _ in MNIST_FILES.values() if _local_file(folder, name) is None]


def find_mnist(data_dir=None):
    """The folder holding all four files: ``data_dir`` (None if it does not), or without it the first
    of the lookup order (None if none does)."""
    for folder in _candidate_folders(data_dir):
        if not _missing_files(folder):
            return folder
    return None


def mnist_file_paths(folder):
    """``{file name: path}`` of the four files in ``folder`` (each the ``.gz`` or its unpacked twin)."""
    paths = {name: _local_file(folder, name) for name, _, _ in MNIST_FILES.values()}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        raise MNISTNotFoundError(f"{folder} lacks the MNIST files {', '.join(missing)}")
    return paths


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url, dest, expected_md5, timeout):
    """Download ``url`` to ``dest`` if its MD5 is ``expected_md5``; never leaves a partial ``dest``."""
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            announced = response.headers.get("Content-Length")
            shutil.copyfileobj(response, out, _CHUNK)
            received = out.tell()
        if announced is not None and received != int(announced):
            raise ValueError(f"truncated: received {received} of {announced} bytes")
        actual = _md5(tmp_name)
        if actual != expected_md5:
            raise ValueError(f"MD5 {actual} does not match the official {expected_md5}")
        os.replace(tmp_name, dest)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


def download_mnist(dest, mirrors=None, checksums=None, timeout=_DOWNLOAD_TIMEOUT_S):
    """Download the MNIST files missing from ``dest``, trying ``mirrors`` in order.

    ``mirrors`` and ``checksums`` default to the module's ``MIRRORS`` and
    ``CHECKSUMS``. Each file must match its MD5 in ``checksums``; a
    mismatched, truncated or failed download is discarded and the next
    mirror is tried. Raises ``MNISTNotFoundError`` listing every attempt
    when a file cannot be had.
    """
    mirrors = MIRRORS if mirrors is None else mirrors
    checksums = CHECKSUMS if checksums is None else checksums
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, _, _ in MNIST_FILES.values():
        if _local_file(dest, name) is not None:
            continue
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            try:
                _fetch(url, dest / name, checksums[name], timeout)
                break
            except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
                failures.append(f"  {url}: {exc}")
        else:
            raise MNISTNotFoundError(f"could not download {name}:\n" + "\n".join(failures))
    return dest


def _not_found_message(data_dir, reason):
    names = ", ".join(name for name, _, _ in MNIST_FILES.values())
    if data_dir is not None:
        folder = Path(data_dir)
        state = (f"lacks {', '.join(_missing_files(folder))}" if folder.is_dir()
                 else "is not a folder" if folder.exists() else "does not exist")
        return (f"MNIST not found: the data folder {folder} {state}.\n"
                f"It must hold the four files {names} (or their unpacked twins without .gz).")
    places = "\n".join(f"  {folder}" for folder in _candidate_folders(None))
    return (
        f"MNIST not found and not downloadable ({reason}).\n"
        f"Put the four files {names} into one of these folders (searched in this order):\n{places}\n"
        f"or point the environment variable {ENV_VAR} (or --data-dir / data_dir=) at a folder holding them."
    )


def locate_mnist(data_dir=None, *, download=True, mirrors=None, checksums=None):
    """The folder ``load_mnist`` reads, downloading into the cache folder when the lookup finds none.

    With ``data_dir`` only that folder counts. Raises ``MNISTNotFoundError``
    saying where the files were looked for.
    """
    folder = find_mnist(data_dir)
    if folder is not None:
        return folder
    if data_dir is not None:
        raise MNISTNotFoundError(_not_found_message(data_dir, "missing"))
    if not download:
        raise MNISTNotFoundError(_not_found_message(None, "downloading disabled"))
    try:
        return download_mnist(default_cache_dir(), mirrors=mirrors, checksums=checksums)
    except (MNISTNotFoundError, OSError) as exc:
        raise MNISTNotFoundError(_not_found_message(None, "download failed") + f"\n{exc}") from None


def _one_hot(labels):
    table = np.zeros((labels.size, 10))  # float64, as the book's
    table[np.arange(labels.size), labels] = 1
    return table


def load_mnist(normalize=True, flatten=True, one_hot_label=False, data_dir=None, *,
               download=True, mirrors=None, checksums=None):
    """MNIST as ``(x_train, t_train), (x_test, t_test)``, like the book's ``load_mnist``.

    normalize : images as float32 in [0, 1] (divided by 255), else uint8 in 0..255.
    flatten : images of shape (N, 784), else (N, 1, 28, 28).
    one_hot_label : labels as float64 one-hot rows (N, 10), else uint8 class indices (N,).
    data_dir : the folder holding the files; None: the lookup order of the module docstring.
    download : without ``data_dir``, when no folder has the files, fetch them into the cache folder.
    mirrors, checksums : where to download from and the MD5 each file must have
        (default: the module's ``MIRRORS`` and ``CHECKSUMS``).
    """
    paths = mnist_file_paths(locate_mnist(data_dir, download=download, mirrors=mirrors, checksums=checksums))
    arrays = {key: read_idx(paths[name], magic, count) for key, (name, magic, count) in MNIST_FILES.items()}
    result = []
    for split in ("train", "test"):
        images = arrays[f"{split}_img"]
        labels = arrays[f"{split}_label"].copy()
        images = images.astype(np.float32) / np.float32(255.0) if normalize else images.copy()
        shape = (-1, IMAGE_SIDE * IMAGE_SIDE) if flatten else (-1, 1, IMAGE_SIDE, IMAGE_SIDE)
        images = images.reshape(shape)
        result.append((images, _one_hot(labels) if one_hot_label else labels))
    return tuple(result)
