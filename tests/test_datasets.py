"""progvq.datasets and ``progvq data``: known data sets downloaded from a local HTTP server, checked, resumed,
written out (CIFAR-10 as image folders the folder source reads), every refusal in one line; the MNIST test set
progvq ships; a missing data set's place named with the command that gets it.

The server runs on 127.0.0.1 in a thread and serves ``/NAME/FILE`` (the layout ``--mirror`` reads). MNIST's t10k
files are the published ones from ``../shared/data/mnist`` with their real checksums; the other files are small
ones made here, whose sizes and checksums replace the table's for the test.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from progvq import datasets
from progvq.config import load_config
from progvq.data import DataConfig, load_dataset, load_mnist
from progvq.datasets import KNOWN, SHIPPED_MNIST, get_command
from run_stage import main

from .conftest import MNIST_DIR, ROOT, SHARED_MNIST, TINY
from .helpers import idx_bytes

#: tests that compare with the shared folder itself (its SHA256SUMS, the shipped copy against it)
needs_shared_mnist = pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="no ../shared/data/mnist")
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------- a local server


@dataclasses.dataclass
class Server:
    """What the local server serves (``/NAME/FILE`` -> bytes) and how, and the requests it got."""

    url: str
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    requests: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)
    cut: dict[str, int] = dataclasses.field(default_factory=dict)  # path -> send bytes up to here once, then hang up
    unsized: set[str] = dataclasses.field(default_factory=set)  # paths sent without a Content-Length
    ignore_range: bool = False

    def add(self, dataset: str, files: dict[str, bytes]) -> None:
        self.files.update({f"/{dataset}/{name}": data for name, data in files.items()})


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked = self.headers.get("Range")
            server.requests.append((self.path, asked))
            body = server.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            if asked and not server.ignore_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", asked).group(1))  # type: ignore[union-attr]
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            if self.path not in server.unsized:
                self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            stop = server.cut.pop(self.path, len(body))  # HTTP/1.0: the connection closes after the response
            self.wfile.write(body[start:stop])

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", datasets.MIRROR_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets, "TIMEOUT_S", 10)  # a hang fails the test instead of stalling it
    served = Server("")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    served.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- data sets made here


def gz_idx(array: np.ndarray) -> bytes:
    return gzip.compress(idx_bytes(array), mtime=0)


def patch_table(monkeypatch: pytest.MonkeyPatch, name: str, files: dict[str, bytes]) -> None:
    """The table's size and SHA-256 of ``files`` (a data set's, by name) made those of the bytes given here."""
    dataset = KNOWN[name]
    remotes = tuple(
        dataclasses.replace(r, size=len(files[r.name]), sha256=hashlib.sha256(files[r.name]).hexdigest())
        if r.name in files else r
        for r in dataset.files
    )
    monkeypatch.setitem(KNOWN, name, dataclasses.replace(dataset, files=remotes))


@dataclasses.dataclass
class Mnist:
    files: dict[str, bytes]
    train_images: np.ndarray
    train_labels: np.ndarray


@pytest.fixture
def mnist(server: Server, monkeypatch: pytest.MonkeyPatch) -> Mnist:
    """MNIST on the server: the published t10k files (real checksums) and a small training set made here."""
    if not MNIST_DIR.is_dir():
        pytest.skip("no ../shared/data/mnist")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 40, dtype=np.uint8)
    made = {"train-images-idx3-ubyte.gz": gz_idx(images), "train-labels-idx1-ubyte.gz": gz_idx(labels)}
    patch_table(monkeypatch, "mnist", made)
    published = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    files = {**made, **{n: (MNIST_DIR / n).read_bytes() for n in published}}
    server.add("mnist", files)
    return Mnist(files, images, labels)


def cifar_archive(batches: dict[str, tuple[np.ndarray, list[int]]], names: list[str], *, extra: bool = True) -> bytes:
    """A cifar-10-python.tar.gz in the published format: a folder cifar-10-batches-py of Python pickles (protocol
    2, byte-string keys), each batch a dict with b'data' (N x 3072 uint8: red, green, blue planes) and b'labels',
    and batches.meta with b'label_names'."""
    members = {
        name: pickle.dumps(
            {b"batch_label": name.encode(), b"labels": labels, b"data": data,
             b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))]},
            protocol=2,
        )
        for name, (data, labels) in batches.items()
    }
    members["batches.meta"] = pickle.dumps(
        {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 10000, b"num_vis": 3072}, protocol=2
    )
    if extra:
        members["readme.html"] = b"<html>CIFAR-10</html>"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclasses.dataclass
class Cifar:
    archive: bytes
    # per split: images (N, 32, 32, 3) uint8 and labels (N,), in the order of the batches
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


def make_cifar(per_batch: int = 3, test: int = 5, seed: int = 0) -> tuple[dict[str, tuple[np.ndarray, list[int]]],
                                                                           Cifar]:
    rng = np.random.default_rng(seed)
    batches: dict[str, tuple[np.ndarray, list[int]]] = {}
    for name, n in [*((f"data_batch_{k}", per_batch) for k in range(1, 6)), ("test_batch", test)]:
        batches[name] = (rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist())

    def split(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        data = np.concatenate([batches[n][0] for n in names])
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.concatenate([batches[n][1] for n in names])

    train, test_ = split([f"data_batch_{k}" for k in range(1, 6)]), split(["test_batch"])
    archive = cifar_archive(batches, CIFAR_CLASSES)
    return batches, Cifar(archive, {"train": train[0], "test": test_[0]}, {"train": train[1], "test": test_[1]})


@pytest.fixture
def cifar(server: Server, monkeypatch: pytest.MonkeyPatch) -> Cifar:
    _, made = make_cifar()
    patch_table(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": made.archive})
    server.add("cifar10", {"cifar-10-python.tar.gz": made.archive})
    return made


# --------------------------------------------------------------------------- running the command


def get(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``progvq data get ARGS`` in this process: exit status, stdout, stderr."""
    capsys.readouterr()
    code = main(["data", "get", *args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))
    } if root.exists() else {}


def assert_refused(code: int, err: str, *needles: str) -> str:
    """One ``progvq: error:`` line with every needle, exit status 2; returns the line."""
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("progvq: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- the table


def test_the_table_names_every_file_with_its_size_and_sha256() -> None:
    assert list(KNOWN) == ["mnist", "fashion-mnist", "cifar10"]
    for dataset in KNOWN.values():
        assert dataset.files and dataset.licence and dataset.home.startswith("http")
        for remote in dataset.files:
            assert re.fullmatch(r"[0-9a-f]{64}", remote.sha256) and remote.size > 0
            assert remote.urls and all(u.startswith(("http://", "https://")) and u.endswith("/" + remote.name)
                                       for u in remote.urls)
    idx = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
           "t10k-labels-idx1-ubyte.gz"]
    assert [r.name for r in KNOWN["mnist"].files] == idx == [r.name for r in KNOWN["fashion-mnist"].files]
    assert any("ossci-datasets.s3.amazonaws.com/mnist/" in u for u in KNOWN["mnist"].files[0].urls)
    assert any("yann.lecun.com/exdb/mnist/" in u for u in KNOWN["mnist"].files[0].urls)
    assert any("fashion-mnist" in u for u in KNOWN["fashion-mnist"].files[0].urls)
    assert KNOWN["cifar10"].files[0].urls == ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)


@needs_shared_mnist
def test_the_tables_mnist_test_files_are_the_published_ones() -> None:
    sums = dict(line.split()[::-1] for line in (SHARED_MNIST / "SHA256SUMS").read_text().splitlines())
    for remote in KNOWN["mnist"].files:
        if remote.name.startswith("t10k"):
            assert remote.sha256 == sums[remote.name]
            assert remote.size == (SHARED_MNIST / remote.name).stat().st_size


def test_data_list_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for dataset in KNOWN.values():
        assert f"progvq data get {dataset.name} data/{dataset.name}" in out and dataset.licence in out
        for remote in dataset.files:
            assert remote.sha256 in out and all(url in out for url in remote.urls)


# --------------------------------------------------------------------------- downloads


def test_get_mnist_checks_every_file_and_the_source_reads_it(
    server: Server, mnist: Mnist, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "data" / "mnist"
    code, out, err = get(capsys, "mnist", str(folder), "--mirror", server.url)
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == sorted(mnist.files)  # no .part left
    for name, data in mnist.files.items():
        assert (folder / name).read_bytes() == data
    assert f"mnist is in {folder}: data.source: mnist, data.path: {folder}, data.prefix: train" in out
    assert [path for path, _ in server.requests] == [f"/mnist/{n}" for n in mnist.files]
    # the source reads both sets: the training set as packed, the test set as the published one
    train = load_dataset(DataConfig(source="mnist", path=str(folder), prefix="train", heldout=10))
    assert torch.equal(torch.cat([train.train, train.heldout])[:, 0], torch.from_numpy(mnist.train_images))
    labels = torch.cat([train.train_labels, train.heldout_labels])
    assert torch.equal(labels, torch.from_numpy(mnist.train_labels).long())
    test_images, test_labels = load_mnist(folder, "t10k")
    shared_images, shared_labels = load_mnist(MNIST_DIR, "t10k")
    assert torch.equal(test_images, shared_images) and torch.equal(test_labels, shared_labels)


def test_a_second_get_downloads_nothing(
    server: Server, mnist: Mnist, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mnist"
    assert get(capsys, "mnist", str(folder), "--mirror", server.url)[0] == 0
    before = snapshot(folder)
    server.requests.clear()
    code, out, _ = get(capsys, "mnist", str(folder), "--mirror", server.url)
    assert code == 0 and server.requests == [] and snapshot(folder) == before
    assert out.count("already there, SHA-256 checked") == 4


def test_get_cifar10_writes_class_folders_the_folder_source_reads(
    server: Server, cifar: Cifar, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "cifar10"
    code, out, err = get(capsys, "cifar10", str(folder), "--mirror", server.url)
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["cifar-10-python.tar.gz", "test", "train"]
    assert f"data.path: {folder}/train (50,000 images) or {folder}/test" in out
    for split in ("train", "test"):
        assert sorted(p.name for p in (folder / split).iterdir()) == CIFAR_CLASSES  # in label order
        images, labels = cifar.images[split], cifar.labels[split]
        # image i of the split is <class>/<i:05d>.png: the folder source reads them by class, then by number
        order = sorted(range(len(labels)), key=lambda i: (labels[i], i))
        names = sorted(str(p.relative_to(folder / split)) for p in (folder / split).rglob("*.png"))
        assert names == [f"{CIFAR_CLASSES[labels[i]]}/{i:05d}.png" for i in order]
        cfg = DataConfig(source="folder", path=str(folder / split), channels=3, heldout=1)
        data = load_dataset(cfg)
        every = torch.cat([data.train, data.heldout])
        every_labels = torch.cat([data.train_labels, data.heldout_labels])
        # the held-out pick is a hash of each path: compare as sets of (label, pixels), exactly
        got = sorted((int(y), x.permute(1, 2, 0).numpy().tobytes()) for x, y in zip(every, every_labels, strict=True))
        want = sorted((int(labels[i]), images[i].tobytes()) for i in range(len(labels)))
        assert got == want
    server.requests.clear()
    before = snapshot(folder)
    code, out, _ = get(capsys, "cifar10", str(folder), "--mirror", server.url)
    assert code == 0 and server.requests == [] and snapshot(folder) == before
    assert "already there, kept as it is" in out


def test_cifar10_class_folders_sort_in_label_order() -> None:
    assert datasets.class_folders(CIFAR_CLASSES) == CIFAR_CLASSES  # already in order: kept
    assert datasets.class_folders(["cat", "ant", "b/ee"]) == ["0-cat", "1-ant", "2-b_ee"]
    many = datasets.class_folders([f"c{k}" for k in range(12)][::-1])
    assert many == sorted(many) and many[0] == "00-c11"


def test_an_interrupted_download_resumes_where_it_stopped(
    server: Server, mnist: Mnist, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mnist"
    name = "t10k-images-idx3-ubyte.gz"
    server.cut[f"/mnist/{name}"] = 600_000  # the connection drops after 600,000 bytes, once
    code, _, err = get(capsys, "mnist", str(folder), "--mirror", server.url)
    line = assert_refused(code, err, name, "interrupted after 600,000 of 1,648,877 bytes", "resumes")
    assert ".tmp" not in line
    part = folder / f"{name}.part"
    assert part.read_bytes() == mnist.files[name][:600_000]
    assert not (folder / name).exists()  # a partial download never looks finished
    server.requests.clear()
    code, _, err = get(capsys, "mnist", str(folder), "--mirror", server.url)
    assert code == 0, err
    assert (f"/mnist/{name}", "bytes=600000-") in server.requests  # only the rest was asked for
    assert (folder / name).read_bytes() == mnist.files[name] and not part.exists()


def test_ctrl_c_keeps_the_partial_download_for_the_next_get(
    server: Server, mnist: Mnist, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Interrupting(datasets.tqdm):  # type: ignore[misc, name-defined]
        seen = 0

        def update(self, n: float | None = 1) -> bool | None:
            Interrupting.seen += int(n or 0)
            if Interrupting.seen > 300_000:
                raise KeyboardInterrupt
            return super().update(n)

    real = datasets.tqdm
    monkeypatch.setattr(datasets, "tqdm", Interrupting)
    folder = tmp_path / "mnist"
    code, _, err = get(capsys, "mnist", str(folder), "--mirror", server.url)
    assert code == 130 and "progvq: interrupted; to resume the download, run the same command again" in err
    name = "t10k-images-idx3-ubyte.gz"
    kept = (folder / f"{name}.part").read_bytes()
    assert 0 < len(kept) < len(mnist.files[name]) and mnist.files[name].startswith(kept)
    monkeypatch.setattr(datasets, "tqdm", real)
    server.requests.clear()
    code, _, err = get(capsys, "mnist", str(folder), "--mirror", server.url)
    assert code == 0, err
    assert (f"/mnist/{name}", f"bytes={len(kept)}-") in server.requests
    assert (folder / name).read_bytes() == mnist.files[name]


def test_a_server_that_ignores_range_restarts_the_file(
    server: Server, mnist: Mnist, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    name = "t10k-images-idx3-ubyte.gz"
    (folder / f"{name}.part").write_bytes(b"x" * 1000)  # not the file's first bytes: appending would break it
    server.ignore_range = True
    code, _, err = get(capsys, "mnist", str(folder), "--mirror", server.url)
    assert code == 0, err
    assert (f"/mnist/{name}", "bytes=1000-") in server.requests
    assert (folder / name).read_bytes() == mnist.files[name]


def test_the_mirror_variable_is_read(
    server: Server, mnist: Mnist, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(datasets.MIRROR_VARIABLE, server.url + "/")
    code, _, err = get(capsys, "mnist", str(tmp_path / "m"))
    assert code == 0, err
    assert len(server.requests) == 4 and all(path.startswith("/mnist/") for path, _ in server.requests)


def test_mirrors_are_tried_in_turn(server: Server, mnist: Mnist, tmp_path: Path) -> None:
    """A refused connection, a 404 and a wrong file go on to the next URL; the last gives the file."""
    name = "t10k-labels-idx1-ubyte.gz"
    remote = next(r for r in KNOWN["mnist"].files if r.name == name)
    server.files["/short/" + name] = b"not the labels"
    server.files["/wrong/" + name] = mnist.files[name][::-1]
    urls = (f"http://127.0.0.1:{closed_port()}/{name}", f"{server.url}/nowhere/{name}", f"{server.url}/short/{name}",
            f"{server.url}/wrong/{name}", f"{server.url}/mnist/{name}")
    logged: list[str] = []
    assert datasets.fetch(remote, tmp_path, urls, log=logged.append) is True
    assert (tmp_path / name).read_bytes() == mnist.files[name]
    assert logged == [f"{tmp_path / name}: 4,542 bytes, SHA-256 checked"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# --------------------------------------------------------------------------- refusals: one line, nothing left


def test_a_wrong_checksum_is_refused_and_the_download_deleted(
    server: Server, mnist: Mnist, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "train-labels-idx1-ubyte.gz"
    good = hashlib.sha256(mnist.files[name]).hexdigest()
    changed = bytearray(mnist.files[name])
    changed[len(changed) // 2] ^= 1  # one bit changed, same size
    server.files[f"/mnist/{name}"] = bytes(changed)
    bad = hashlib.sha256(server.files[f"/mnist/{name}"]).hexdigest()
    folder = tmp_path / "mnist"
    code, _, err = get(capsys, "mnist", str(folder), "--mirror", server.url)
    assert_refused(code, err, name, f"is {bad}, expected {good}", "download deleted")
    # the file before it stays (whole and checked); nothing of this one is left
    assert sorted(p.name for p in folder.iterdir()) == ["train-images-idx3-ubyte.gz"]


def test_an_unreachable_host_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.delenv(datasets.MIRROR_VARIABLE, raising=False)
    url = f"http://127.0.0.1:{closed_port()}"
    folder = tmp_path / "new" / "mnist"
    code, _, err = get(capsys, "mnist", str(folder), "--mirror", url)
    assert_refused(code, err, f"{url}/mnist/train-images-idx3-ubyte.gz: Connection refused")
    assert list(tmp_path.iterdir()) == []  # the folders made for it went again


def test_an_http_error_is_named(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = get(capsys, "fashion-mnist", str(tmp_path / "f"), "--mirror", server.url)
    assert_refused(code, err, f"{server.url}/fashion-mnist/train-images-idx3-ubyte.gz: HTTP 404 Not Found")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sized", [True, False])
def test_a_file_of_another_size_is_refused(
    sized: bool, server: Server, mnist: Mnist, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Announced, the size is refused before anything is written; unannounced, the download stops one block past
    it (a server streaming without end fills no disk)."""
    name = "train-images-idx3-ubyte.gz"
    size = len(mnist.files[name])
    server.files[f"/mnist/{name}"] = mnist.files[name] + b"\0" * 100_000
    if not sized:
        server.unsized.add(f"/mnist/{name}")
    code, _, err = get(capsys, "mnist", str(tmp_path / "m"), "--mirror", server.url)
    needle = f"is {size + 100_000:,} bytes, expected {size:,}" if sized else f"sends more than the {size:,} bytes"
    assert_refused(code, err, needle)
    assert list(tmp_path.iterdir()) == []


class _FullDisk(io.FileIO):
    """A file that takes this many bytes, then fails as a full disk does."""

    room = 10_000

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_full_disk_is_one_line_and_leaves_nothing(
    server: Server, mnist: Mnist, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setattr(datasets, "open", lambda path, mode: _FullDisk(path, mode), raising=False)
    folder = tmp_path / "mnist"
    code, _, err = get(capsys, "mnist", str(folder), "--mirror", server.url)
    line = assert_refused(code, err, f"{folder}/train-images-idx3-ubyte.gz: cannot write (No space left on device)")
    assert ".part" not in line
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_cifar10_images_leaves_no_split(
    server: Server, cifar: Cifar, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from PIL import Image

    real_save, saved = Image.Image.save, []

    def save(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        if len(saved) == 7:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        saved.append(fp)
        real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    folder = tmp_path / "cifar10"
    code, _, err = get(capsys, "cifar10", str(folder), "--mirror", server.url)
    assert_refused(code, err, f"{folder}/train: cannot write the images (No space left on device)")
    # the checked archive stays (the next get writes the images from it); no split, no temporary folder
    assert sorted(p.name for p in folder.iterdir()) == ["cifar-10-python.tar.gz"]


FULL_DISK = """
import dataclasses, hashlib, json, subprocess, sys
from pathlib import Path
from progvq import datasets
from run_stage import main

spec = json.loads(sys.argv[1])
mount = Path(spec["mount"])
mount.mkdir()
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
dataset = datasets.KNOWN["mnist"]
sizes = spec["sizes"]
datasets.KNOWN["mnist"] = dataclasses.replace(dataset, files=tuple(
    dataclasses.replace(r, size=sizes[r.name][0], sha256=sizes[r.name][1]) for r in dataset.files))
code = main(["data", "get", "mnist", str(mount / "mnist"), "--mirror", spec["url"], "--no-progress"])
print(json.dumps({"code": code, "left": sorted(str(p.relative_to(mount)) for p in mount.rglob("*"))}))
"""


def test_a_real_full_disk(server: Server, mnist: Mnist, tmp_path: Path) -> None:
    """On a 1 MiB file system, the 1.6 MB of the t10k images do not fit: one line, and no partial download."""
    if shutil.which("unshare") is None or subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, check=False
    ).returncode:
        pytest.skip("no user and mount namespaces here: cannot mount a small file system")
    sizes = {r.name: (r.size, r.sha256) for r in KNOWN["mnist"].files}
    spec = {"mount": str(tmp_path / "disk"), "url": server.url, "sizes": sizes}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", FULL_DISK, json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["code"] == 2
    assert_refused(2, done.stderr, "mnist/t10k-images-idx3-ubyte.gz: cannot write (No space left on device)")
    assert result["left"] == ["mnist", "mnist/train-images-idx3-ubyte.gz", "mnist/train-labels-idx1-ubyte.gz"]


def test_an_unknown_name_lists_the_known_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = get(capsys, "imagenet", str(tmp_path / "x"))
    assert_refused(code, err, "unknown data set 'imagenet'; known: mnist, fashion-mnist, cifar10")
    assert list(tmp_path.iterdir()) == []


def test_names_are_read_loosely() -> None:
    assert datasets.known("Fashion_MNIST").name == "fashion-mnist" and datasets.known("CIFAR-10").name == "cifar10"


@pytest.mark.parametrize("kind", ["a-file", "under-a-file", "read-only"])
def test_a_folder_that_cannot_be_written(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("mine")
    folders = {"a-file": tmp_path / "file", "under-a-file": tmp_path / "file" / "mnist", "read-only": tmp_path / "ro"}
    folder = folders[kind]
    needle = {"a-file": "not a folder", "under-a-file": "Not a directory", "read-only": "Permission denied"}[kind]
    if kind == "read-only":
        folder.mkdir()
        folder.chmod(0o555)
        if os.access(folder, os.W_OK):  # root writes anywhere: fail the way a read-only folder fails
            def refuse(*args: Any, **kwargs: Any) -> Any:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

            monkeypatch.setattr(datasets.tempfile, "mkstemp", refuse)
    before = snapshot(tmp_path)
    code, _, err = get(capsys, "mnist", str(folder), "--mirror", "http://127.0.0.1:9")
    assert_refused(code, err, str(folder), needle)
    assert snapshot(tmp_path) == before


def test_a_second_get_into_the_same_folder_waits_its_turn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, _, err = get(capsys, "mnist", str(tmp_path), "--mirror", "http://127.0.0.1:9")
    finally:
        os.close(fd)
    assert_refused(code, err, f"{tmp_path}: another `progvq data get` is writing there")


def test_a_file_already_there_with_another_checksum_is_kept(
    server: Server, mnist: Mnist, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "train-images-idx3-ubyte.gz"
    (tmp_path / name).write_bytes(b"someone's own file")
    code, _, err = get(capsys, "mnist", str(tmp_path), "--mirror", server.url)
    assert_refused(code, err, f"{tmp_path / name}: already there with SHA-256", "move it away")
    assert (tmp_path / name).read_bytes() == b"someone's own file" and server.requests == []


def test_a_bad_mirror_url_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    code, _, err = get(capsys, "mnist", str(tmp_path / "m"), "--mirror", "ftp://example.org/data")
    assert_refused(code, err, "--mirror 'ftp://example.org/data': not an http:// or https:// URL")
    monkeypatch.setenv(datasets.MIRROR_VARIABLE, "example.org")
    code, _, err = get(capsys, "mnist", str(tmp_path / "m"))
    assert_refused(code, err, f"{datasets.MIRROR_VARIABLE} 'example.org': not an http:// or https:// URL")
    assert list(tmp_path.iterdir()) == []


def test_a_cifar10_batch_that_asks_for_code_is_refused(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    batches, _ = make_cifar()
    archive = cifar_archive(batches, CIFAR_CLASSES)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    members["cifar-10-batches-py/test_batch"] = pickle.dumps({b"data": Payload(), b"labels": []}, protocol=2)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    patch_table(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": out.getvalue()})
    server.add("cifar10", {"cifar-10-python.tar.gz": out.getvalue()})
    folder = tmp_path / "cifar10"
    code, _, err = get(capsys, "cifar10", str(folder), "--mirror", server.url)
    assert_refused(code, err, "cifar-10-batches-py/test_batch]: not a CIFAR-10 batch", "system")
    assert not marker.exists() and sorted(p.name for p in folder.iterdir()) == ["cifar-10-python.tar.gz"]


def test_an_archive_without_a_batch_is_refused(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    batches, _ = make_cifar()
    del batches["data_batch_3"]
    archive = cifar_archive(batches, CIFAR_CLASSES)
    patch_table(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": archive})
    server.add("cifar10", {"cifar-10-python.tar.gz": archive})
    code, _, err = get(capsys, "cifar10", str(tmp_path), "--mirror", server.url)
    assert_refused(code, err, "no cifar-10-batches-py/data_batch_3 in it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]


def test_the_command_in_a_subprocess(server: Server, mnist: Mnist, tmp_path: Path) -> None:
    """The real program, its mirror from the environment: the table's checksums are the published ones, so the
    training files made here are refused, in one line, and the folder made for them goes again."""
    env = {**os.environ, datasets.MIRROR_VARIABLE: server.url, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "run_stage.py"), "data", "get", "mnist", "digits"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False,
    )
    made = len(mnist.files["train-images-idx3-ubyte.gz"])
    assert_refused(done.returncode, done.stderr, f"train-images-idx3-ubyte.gz is {made:,} bytes, expected 9,912,422")
    assert list(tmp_path.iterdir()) == []


def test_data_shapes_and_its_older_spelling(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "shapes", str(tmp_path / "new"), "--count", "12", "--size", "16"]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    old = subprocess.run(
        [sys.executable, "-m", "progvq.data", "shapes-folder", str(tmp_path / "old"), "--count", "12", "--size", "16"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert old.returncode == 0, old.stderr
    assert snapshot(tmp_path / "old") == snapshot(tmp_path / "new") != {}


# --------------------------------------------------------------------------- the shipped MNIST test set


def test_the_shipped_test_set_is_the_published_one() -> None:
    shipped = {p.name for p in SHIPPED_MNIST.iterdir()}
    assert shipped == {"README.md", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    readme = " ".join((SHIPPED_MNIST / "README.md").read_text().split())
    assert "Creative Commons Attribution-Share Alike 3.0" in readme and "Corinna Cortes" in readme
    for remote in KNOWN["mnist"].files:
        if remote.name.startswith("t10k"):
            data = (SHIPPED_MNIST / remote.name).read_bytes()
            assert len(data) == remote.size and hashlib.sha256(data).hexdigest() == remote.sha256
            assert remote.sha256 in readme


@needs_shared_mnist
def test_mnist_without_a_path_reads_the_shipped_set() -> None:
    cfg = load_config(TINY, ["data.source=mnist", "data.size=32", "data.heldout=1000", "data.limit=null"])
    assert cfg.data.path is None
    data = load_dataset(cfg.data, 4)
    shared = load_dataset(dataclasses.replace(cfg.data, path=str(SHARED_MNIST)), 4)
    assert data.train.shape == (9000, 1, 28, 28) and data.heldout.shape == (1000, 1, 28, 28)
    for a, b in ((data.train, shared.train), (data.heldout, shared.heldout), (data.train_labels, shared.train_labels),
                 (data.heldout_labels, shared.heldout_labels)):
        assert torch.equal(a, b)
    assert data.labels_from == str(SHIPPED_MNIST / "t10k-labels-idx1-ubyte.gz")


# --------------------------------------------------------------------------- a missing data set, named


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["data.source=folder", "data.path=data/cifar10/train"],
         "data.path: data/cifar10/train: image folder not found; get it with: progvq data get cifar10 data/cifar10"),
        (["data.source=folder", "data.path=data/cifar10"],
         ("data.path: data/cifar10: image folder not found; get it with: progvq data get cifar10 data/cifar10 "
         "(then data.path: data/cifar10/train)")),
        (["data.source=mnist", "data.path=data/fashion-mnist", "data.prefix=train"],
         ("data.path: data/fashion-mnist: MNIST folder not found; "
         "get it with: progvq data get fashion-mnist data/fashion-mnist")),
        (["data.source=mnist", "data.path=my digits"],
         "data.path: my digits: MNIST folder not found; get it with: progvq data get mnist 'my digits'"),
        (["data.source=mnist", "data.prefix=train"],
         ("data.path: not given, and MNIST's test set shipped with progvq has only t10k files, not data.prefix "
         "'train'; get the whole set with: progvq data get mnist data/mnist, and set data.path: data/mnist")),
        (["data.source=folder", "data.path=pictures"], "data.path: pictures: image folder not found"),
    ],
)
def test_a_missing_data_set_names_the_command_that_gets_it(
    sets: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["train", str(TINY), "--all", "--no-progress"]
    for s in sets:
        args += ["--set", s]
    capsys.readouterr()
    line = assert_refused(main(args), capsys.readouterr().err, needle)
    assert line.endswith(needle) and "progvq data get" in line or "pictures" in needle and "progvq data" not in line
    assert list(tmp_path.iterdir()) == []  # no run folder left


def test_an_empty_mnist_folder_names_the_command(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    cfg = DataConfig(source="mnist", path=str(tmp_path / "mnist"), prefix="train")
    with pytest.raises(datasets.DataError, match=r"no MNIST images file .*get it with: progvq data get mnist "):
        load_dataset(cfg)


def test_get_command_names_only_what_the_source_reads() -> None:
    assert get_command("data/cifar10/test", "folder") == "progvq data get cifar10 data/cifar10"
    assert get_command("/x/CIFAR-10/train", "folder") == "progvq data get cifar10 /x/CIFAR-10"
    assert get_command("data/cifar10/train", "mnist") == "progvq data get mnist data/cifar10/train"
    assert get_command("data/Fashion_MNIST", "mnist") == "progvq data get fashion-mnist data/Fashion_MNIST"
    assert get_command("data/mnist", "folder") is None and get_command("x.npy", "array") is None

