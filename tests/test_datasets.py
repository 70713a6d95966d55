"""MNIST loading: IDX parsing and validation, lookup order, downloads from a local HTTP server."""
import gzip
import hashlib
import http.server
import os
import shutil
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from fastconv import datasets
from fastconv.datasets import MNISTFormatError, MNISTNotFoundError, load_mnist, read_idx, write_idx

NAMES = [name for name, _, _ in datasets.MNIST_FILES.values()]


def idx_bytes(magic, dims, payload):
    """An IDX file written by hand: big-endian magic and dimensions, then the bytes."""
    return struct.pack(f">{1 + len(dims)}I", magic, *dims) + bytes(payload)


def synthetic_mnist(folder, seed):
    """Full-size MNIST look-alike: image i is black but for one white pixel at (label, 27 - label)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = {}
    for split, count in (("train", 60000), ("t10k", 10000)):
        t = rng.integers(0, 10, count).astype(np.uint8)
        x = np.zeros((count, 28, 28), dtype=np.uint8)
        x[np.arange(count), t, 27 - t] = 255
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", t)
        labels[split] = t
    return labels


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mnist-synthetic")
    labels = synthetic_mnist(folder, seed=0)
    return folder, labels


@pytest.fixture(autouse=True)
def isolated_lookup(monkeypatch, tmp_path):
    """No test may see the user's MNIST or reach the internet: empty cache, no env var, dead mirror."""
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "MIRRORS", (f"http://127.0.0.1:{closed_port()}/",))


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- IDX files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_parses_hand_written_files(tmp_path, suffix):
    pixels = list(range(2 * 28 * 28))
    pixels = [p % 256 for p in pixels]
    images = tmp_path / f"images{suffix}"
    labels = tmp_path / f"labels{suffix}"
    write = gzip.open if suffix else open
    with write(images, "wb") as f:
        f.write(idx_bytes(2051, (2, 28, 28), pixels))
    with write(labels, "wb") as f:
        f.write(idx_bytes(2049, (2,), [7, 0]))

    x = read_idx(images, 2051, count=2)
    assert x.dtype == np.uint8 and x.shape == (2, 28, 28)
    assert x[0, 0, 0] == 0 and x[0, 0, 5] == 5 and x[1, 27, 27] == (2 * 784 - 1) % 256
    assert read_idx(labels, 2049).tolist() == [7, 0]


def test_write_idx_writes_the_standard_header(tmp_path):
    path = write_idx(tmp_path / "labels", np.array([3, 1, 4], dtype=np.uint8))
    assert path.read_bytes() == idx_bytes(2049, (3,), [3, 1, 4])


@pytest.mark.parametrize("content, message", [
    (idx_bytes(2049, (1, 28, 28), [0] * 784), "magic number is 2049"),
    (idx_bytes(2051, (3, 28, 28), [0] * 784 * 3), "holds 3 items, expected 2"),
    (idx_bytes(2051, (2, 27, 28), [0] * 27 * 28 * 2), "27x28"),
    (idx_bytes(2051, (2, 28, 28), [0] * (784 * 2 - 1)), "bytes, expected"),
    (idx_bytes(2051, (2, 28, 28), [0] * (784 * 2 + 1)), "bytes, expected"),
    (b"\x00\x00\x08", "too short"),
])
def test_read_idx_rejects_bad_images(tmp_path, content, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(MNISTFormatError, match=message) as info:
        read_idx(path, 2051, count=2)
    assert str(path) in str(info.value)


def test_read_idx_rejects_labels_out_of_range(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(2049, (2,), [3, 10]))
    with pytest.raises(MNISTFormatError, match="label 10 out of range"):
        read_idx(path, 2049)


def test_read_idx_rejects_a_damaged_gzip(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx_bytes(2049, (100,), [1] * 100))[:-20])
    with pytest.raises(MNISTFormatError, match="cannot be read"):
        read_idx(path, 2049)


def test_read_idx_reports_every_damaged_gzip_as_a_format_error_or_reads_it_unchanged(tmp_path):
    # Single bit flips anywhere in a gzip file: zlib, gzip's CRC or the IDX checks must catch each one.
    labels = np.random.default_rng(0).integers(0, 10, 3000).astype(np.uint8)
    original = gzip.compress(idx_bytes(2049, (labels.size,), labels))
    rng = np.random.default_rng(1)
    outcomes = {"format error": 0, "unchanged": 0}
    path = tmp_path / "labels.gz"
    for position in rng.integers(0, len(original), 300):
        damaged = bytearray(original)
        damaged[position] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(damaged))
        try:
            read = read_idx(path, 2049)
        except MNISTFormatError:
            outcomes["format error"] += 1
        else:
            assert np.array_equal(read, labels)  # a flip in a header field gzip ignores (e.g. the mtime)
            outcomes["unchanged"] += 1
    assert outcomes["format error"] > 200, outcomes


# -- load_mnist from local folders -------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("one_hot_label", [True, False])
def test_load_mnist_has_the_books_shapes_and_dtypes(synthetic_dir, normalize, flatten, one_hot_label):
    folder, labels = synthetic_dir
    (x_train, t_train), (x_test, t_test) = load_mnist(normalize, flatten, one_hot_label, data_dir=folder)

    image_shape = (784,) if flatten else (1, 28, 28)
    assert x_train.shape == (60000,) + image_shape and x_test.shape == (10000,) + image_shape
    assert x_train.dtype == (np.float32 if normalize else np.uint8)
    assert x_train.max() == (1.0 if normalize else 255) and x_train.min() == 0
    if one_hot_label:
        assert t_train.shape == (60000, 10) and t_train.dtype == np.float64
        assert np.array_equal(t_train.sum(axis=1), np.ones(60000))
        t_train, t_test = t_train.argmax(axis=1), t_test.argmax(axis=1)
    else:
        assert t_train.shape == (60000,) and t_train.dtype == np.uint8
    assert np.array_equal(t_train, labels["train"]) and np.array_equal(t_test, labels["t10k"])
    # each image still sits with its label: its white pixel is at (label, 27 - label)
    first = x_test[:50].reshape(50, 28, 28)
    rows, cols = np.unravel_index(first.reshape(50, -1).argmax(axis=1), (28, 28))
    assert np.array_equal(rows, labels["t10k"][:50]) and np.array_equal(cols, 27 - labels["t10k"][:50])


def test_load_mnist_normalizes_by_255_in_float32(synthetic_dir):
    folder, _ = synthetic_dir
    (raw, _), _ = load_mnist(normalize=False, data_dir=folder)
    (scaled, _), _ = load_mnist(normalize=True, data_dir=folder)
    assert np.array_equal(scaled, raw.astype(np.float32) / np.float32(255))


def test_load_mnist_reads_unpacked_files(synthetic_dir, tmp_path):
    folder, labels = synthetic_dir
    for name in NAMES:
        with gzip.open(folder / name) as src, open(tmp_path / name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    (_, t_train), _ = load_mnist(data_dir=tmp_path)
    assert np.array_equal(t_train, labels["train"])


def linked_copy(src, dst, seed):
    """A folder with ``src``'s images (symlinked) and its own labels drawn from ``seed``."""
    dst.mkdir(parents=True)
    for name in NAMES:
        if "images" in name:
            os.symlink(src / name, dst / name)
    t = {split: np.random.default_rng(seed).integers(0, 10, n).astype(np.uint8)
         for split, n in (("train", 60000), ("t10k", 10000))}
    for split, labels in t.items():
        write_idx(dst / f"{split}-labels-idx1-ubyte.gz", labels)
    return t["train"]


def test_lookup_order_is_argument_env_var_cache(synthetic_dir, tmp_path, monkeypatch):
    folder, _ = synthetic_dir
    given = linked_copy(folder, tmp_path / "given", seed=1)
    from_env = linked_copy(folder, tmp_path / "env", seed=2)
    cached = linked_copy(folder, datasets.default_cache_dir(), seed=3)
    monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path / "env"))

    def train_labels(**kwargs):
        return load_mnist(download=False, **kwargs)[0][1]

    assert np.array_equal(train_labels(data_dir=tmp_path / "given"), given)
    assert np.array_equal(train_labels(), from_env)
    monkeypatch.delenv(datasets.ENV_VAR)
    assert np.array_equal(train_labels(), cached)


def test_cache_folder_honours_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.default_cache_dir() == tmp_path / "xdg" / "fastconv" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert datasets.default_cache_dir() == Path.home() / ".cache" / "fastconv" / "mnist"


def test_local_file_with_a_bad_header_is_an_error_naming_it(synthetic_dir, tmp_path):
    folder, _ = synthetic_dir
    for name in NAMES:
        shutil.copy(folder / name, tmp_path / name)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(9999, dtype=np.uint8))
    with pytest.raises(MNISTFormatError, match="t10k-labels.*holds 9999 items, expected 10000"):
        load_mnist(data_dir=tmp_path)


def test_local_folders_are_not_checked_against_the_official_md5(synthetic_dir):
    folder, _ = synthetic_dir
    assert md5(folder / NAMES[0]) != datasets.CHECKSUMS[NAMES[0]]
    load_mnist(data_dir=folder, download=False)


@pytest.mark.mnist
def test_shared_copy_loads_although_one_md5_is_not_official(mnist_dir):
    (x_train, t_train), (x_test, t_test) = load_mnist(flatten=False, data_dir=mnist_dir, download=False)
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    # the first training labels of MNIST are 5, 0, 4, 1, 9; the first test labels 7, 2, 1, 0, 4
    assert t_train[:5].tolist() == [5, 0, 4, 1, 9] and t_test[:5].tolist() == [7, 2, 1, 0, 4]
    assert np.bincount(t_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# -- downloads from a local server -------------------------------------------------------------------


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` under /good/, altered copies under /corrupt/ and /truncated/, and 404 elsewhere."""

    files = {}
    requests = []

    def do_GET(self):
        self.requests.append(self.path)
        kind, _, name = self.path.strip("/").partition("/")
        body = self.files.get(name)
        if body is None or kind not in ("good", "corrupt", "truncated"):
            self.send_error(404)
            return
        if kind == "corrupt":
            body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "truncated":
            body = body[:len(body) // 2]  # the connection closes before Content-Length bytes
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def mirror(synthetic_dir):
    folder, labels = synthetic_dir
    MirrorHandler.files = {name: (folder / name).read_bytes() for name in NAMES}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MirrorHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    checksums = {name: md5(folder / name) for name in NAMES}
    yield f"http://127.0.0.1:{server.server_address[1]}", checksums, labels
    server.shutdown()
    server.server_close()


@pytest.fixture
def requests():
    MirrorHandler.requests.clear()
    return MirrorHandler.requests


def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).exists() else []


def test_download_falls_back_through_the_mirrors(mirror, tmp_path, requests):
    url, checksums, labels = mirror
    dead = f"http://127.0.0.1:{closed_port()}/"
    datasets.download_mnist(tmp_path, mirrors=[dead, url + "/missing/", url + "/good/"], checksums=checksums)
    assert leftovers(tmp_path) == sorted(NAMES)
    for name in NAMES:
        assert md5(tmp_path / name) == checksums[name]
    assert requests.count(f"/missing/{NAMES[0]}") == 1 and requests.count(f"/good/{NAMES[0]}") == 1


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_a_bad_download_is_discarded_and_the_next_mirror_tried(mirror, tmp_path, kind):
    url, checksums, _ = mirror
    datasets.download_mnist(tmp_path, mirrors=[f"{url}/{kind}/", f"{url}/good/"], checksums=checksums)
    for name in NAMES:
        assert md5(tmp_path / name) == checksums[name]
    assert leftovers(tmp_path) == sorted(NAMES)


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_a_bad_download_never_lands_in_the_folder(mirror, tmp_path, kind):
    url, checksums, _ = mirror
    with pytest.raises(MNISTNotFoundError, match=f"/{kind}/train-images"):
        datasets.download_mnist(tmp_path, mirrors=[f"{url}/{kind}/"], checksums=checksums)
    assert leftovers(tmp_path) == []


def test_download_fetches_only_the_missing_files(mirror, tmp_path, requests, synthetic_dir):
    url, checksums, _ = mirror
    folder, _ = synthetic_dir
    shutil.copy(folder / NAMES[0], tmp_path / NAMES[0])
    datasets.download_mnist(tmp_path, mirrors=[url + "/good/"], checksums=checksums)
    assert sorted(requests) == sorted(f"/good/{name}" for name in NAMES[1:])


def test_load_mnist_downloads_once_into_the_cache(mirror, requests):
    url, checksums, labels = mirror
    (_, t_train), (_, t_test) = load_mnist(mirrors=[url + "/good/"], checksums=checksums)
    assert np.array_equal(t_train, labels["train"]) and np.array_equal(t_test, labels["t10k"])
    assert leftovers(datasets.default_cache_dir()) == sorted(NAMES)
    assert len(requests) == 4
    load_mnist(mirrors=[url + "/good/"], checksums=checksums)
    assert len(requests) == 4


def test_the_official_checksums_guard_downloads(mirror):
    url, _, _ = mirror
    # the synthetic files are not MNIST: with the default checksum table they are refused
    with pytest.raises(MNISTNotFoundError, match="does not match the official f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        load_mnist(mirrors=[url + "/good/"])
    assert leftovers(datasets.default_cache_dir()) == []


def test_offline_error_says_where_to_put_the_files(tmp_path):
    with pytest.raises(MNISTNotFoundError) as info:
        load_mnist()
    message = str(info.value)
    for expected in [str(datasets.default_cache_dir()), "FASTCONV_DATA", *NAMES, "download failed", "127.0.0.1"]:
        assert expected in message


@pytest.mark.parametrize("state", ["does not exist", "is not a folder", "lacks"])
def test_a_given_data_dir_without_the_files_is_reported_missing(synthetic_dir, tmp_path, monkeypatch, state):
    # other copies exist (the environment variable's and a mirror): a given folder never falls through to them
    folder, _ = synthetic_dir
    monkeypatch.setenv(datasets.ENV_VAR, str(folder))
    monkeypatch.setattr(datasets, "download_mnist", lambda *a, **k: pytest.fail("tried to download"))
    given = tmp_path / "given"
    if state == "is not a folder":
        given.write_text("")
    elif state == "lacks":
        given.mkdir()
        shutil.copy(folder / NAMES[0], given / NAMES[0])
    with pytest.raises(MNISTNotFoundError) as info:
        load_mnist(data_dir=given)
    message = str(info.value)
    assert str(given) in message and state in message
    if state == "lacks":
        assert NAMES[0] not in message.split("lacks")[1].split(".\n")[0] and NAMES[1] in message


def test_no_download_fails_without_touching_the_network(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(datasets, "download_mnist", refuse)
    with pytest.raises(MNISTNotFoundError, match="downloading disabled"):
        load_mnist(download=False)
