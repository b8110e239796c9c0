"""Downloads that fail part-way: a broken connection, a full disk, SIGTERM, an interrupted set of
files; each ends in one line naming the fix, and leaves no part file and no half-replaced folder."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import os
import re
import shutil
import signal
import socket
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import write_idx, write_idx_dataset
from fastclr.data import formats
from fastclr.data.datasets import IDX_FILES, REGISTRY, ensure, load_builtin, locate
from fastclr.data import download
from fastclr.data.download import DownloadWriteFailed, RemoteFile, fetch, remove_leftovers, unpack
from fastclr.errors import FastclrError


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """`serve(reply)` -> the URL of a one-connection server on localhost whose reply is `reply(conn)`."""
    threads: list[threading.Thread] = []

    def serve(reply: Callable[[socket.socket], None]) -> str:
        listener = socket.create_server(("127.0.0.1", 0))

        def run() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)  # the request
                reply(conn)
            listener.close()

        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}/f.gz"

    yield serve
    for t in threads:
        t.join(timeout=10)


def _parts(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".part")] if folder.exists() else []


@pytest.mark.parametrize("reply, seen", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n0123456789", "IncompleteRead"),  # cut off mid-chunk
    (b"SSH-2.0-OpenSSH_9.6\r\n", "BadStatusLine"),  # not HTTP: a wrong port, a proxy
])
def test_a_broken_or_foreign_reply_is_a_one_line_error_and_leaves_nothing(
        raw_server: Callable[..., str], tmp_path: Path, reply: bytes, seen: str) -> None:
    url = raw_server(lambda conn: conn.sendall(reply))
    with pytest.raises(FastclrError) as e:
        fetch(RemoteFile(url, "0" * 32), tmp_path / "root" / "dest")
    assert f"cannot download {url} (the connection broke off: {seen}" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no part file, and no folder the download made for it


def test_a_failed_download_into_a_folder_that_was_there_keeps_it_and_its_files(tmp_path: Path) -> None:
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "other.bin").write_bytes(b"x")
    with pytest.raises(FastclrError):
        fetch(RemoteFile("http://127.0.0.1:9/f.gz", "0" * 32), tmp_path / "dest" / "sub")
    assert [p.name for p in tmp_path.rglob("*")] == ["dest", "other.bin"]


def test_sigterm_during_a_download_removes_its_part_file_and_exits_as_killed(
        raw_server: Callable[..., str], tmp_path: Path) -> None:
    """The server sends half the body, then SIGTERM reaches the main thread, blocked in the read:
    the process ends with SystemExit(128 + 15), as a kill by SIGTERM, after its finally blocks ran."""
    main = threading.main_thread().ident
    assert main is not None

    def reply(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4000000\r\n\r\n" + b"x" * 2_000_000)
        time.sleep(0.2)
        signal.pthread_kill(main, signal.SIGTERM)
        time.sleep(0.2)
        conn.sendall(b"x" * 1000)  # wakes the read, should the signal not have

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a plain `fastclr download`
    try:
        url = raw_server(reply)
        with pytest.raises(SystemExit) as e:
            fetch(RemoteFile(url, "0" * 32), tmp_path / "dest")
        assert e.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored on the way out
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []  # no part file, and not the folder the download made


def test_leftovers_of_a_killed_download_are_removed_by_the_next_and_nothing_else(tmp_path: Path) -> None:
    """A process killed outright (SIGKILL) leaves its part file or its unpack folder (2.6 GB each for
    STL-10): the next download removes each one untouched for 10 minutes that no live process holds
    (its flock, which the kernel drops with the process). It keeps one a live process holds, whatever
    its age (a slow link); one touched in the last 10 minutes, held or not (where flock is node-local,
    another node's live download looks unheld); and names not of fetch's own shape (another
    program's hidden files in a shared folder)."""
    import subprocess
    import sys

    old_part, fresh_part, held_part = (tmp_path / f".f.gz.{n * 8}.part" for n in "abc")
    other_part, old_unpack, held_unpack = (tmp_path / ".g.gz.aaaaaaaa.part", tmp_path / ".unpack-aaaaaaaa",
                                           tmp_path / ".unpack-bbbbbbbb")
    foreign = [tmp_path / ".f.gz.part", tmp_path / ".unpack-mine", tmp_path / ".video.mp4.abcdefgh.part"]
    for p in (old_part, fresh_part, held_part, other_part, *foreign):
        p.write_bytes(b"x")
    for d in (old_unpack, held_unpack):
        (d / "stl10_binary").mkdir(parents=True)
        (d / "stl10_binary" / "unlabeled_X.bin").write_bytes(b"x")
    kept = tmp_path / "train-images-idx3-ubyte.gz"
    kept.write_bytes(b"x")
    stale = time.time() - 601
    for p in (old_part, held_part, other_part, old_unpack, held_unpack, kept, *foreign):
        os.utime(p, (stale, stale))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "for p in sys.argv[1:]: fcntl.flock(os.open(p, os.O_RDONLY), fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(60)", str(held_part), str(held_unpack)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert remove_leftovers(tmp_path, ("f.gz", "g.gz")) == [old_part, other_part, old_unpack]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [fresh_part.name, held_part.name, held_unpack.name, kept.name, *(p.name for p in foreign)])
    finally:
        holder.kill()  # as SIGKILL ends a download: the kernel drops its locks
        holder.wait()
    assert remove_leftovers(tmp_path, ("f.gz",)) == [held_part, held_unpack]


def test_a_complete_copy_is_not_fetched_again_but_what_a_killed_download_left_beside_it_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTCLR_DATA", str(tmp_path))
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "none")
    write_idx_dataset(tmp_path / "mnist")
    left = [tmp_path / "mnist" / ".train-images-idx3-ubyte.gz.x2345678.part", tmp_path / ".unpack-x2345678"]
    left[0].write_bytes(b"x")
    left[1].mkdir()
    for p in left:
        os.utime(p, (time.time() - 601, time.time() - 601))
    assert ensure("mnist", download=False) == tmp_path / "mnist" and all(p.exists() for p in left)  # reading alone
    assert ensure("mnist") == tmp_path / "mnist" and not any(p.exists() for p in left)


def test_where_the_file_system_has_no_locks_a_leftover_untouched_for_ten_minutes_is_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, live = tmp_path / ".f.gz.abcdefgh.part", tmp_path / ".f.gz.ijklmnop.part"
    for p in (old, live):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 601, time.time() - 601))
    os.utime(live, (time.time() - 599, time.time() - 599))
    monkeypatch.setattr("fastclr.data.download.fcntl", None)
    assert remove_leftovers(tmp_path, ("f.gz",)) == [old] and [p.name for p in tmp_path.iterdir()] == [live.name]


@pytest.mark.parametrize("locks", [True, False])
def test_a_download_holds_its_part_file_and_its_unpack_folder_while_it_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locks: bool) -> None:
    """What the sweep reads: while `fetch` unpacks an archive, its part file and its staging folder
    are held (another download's sweep, made to count anything as old, keeps both) and touched at
    every member; afterwards neither is left. Without locks (Windows) nothing is held open, so the
    rename and the removal go through, and the sweep's age rule then stands alone."""
    archive = _targz({"pkg/a_batch": b"A", "pkg/b_batch": b"B"})
    src = tmp_path / "server" / "pkg.tar.gz"
    src.parent.mkdir()
    src.write_bytes(archive)
    dest = tmp_path / "dest"
    if not locks:
        monkeypatch.setattr(download, "fcntl", None)
    swept: list[list[Path]] = []
    ages: list[float] = []
    real = download.extract_data

    def extract_and_sweep(tar: tarfile.TarFile, folder: Path, touching: tuple[Path, ...] = ()) -> None:
        for p in touching:
            os.utime(p, (time.time() - 601, time.time() - 601))
        real(tar, folder, touching)
        ages.extend(time.time() - p.stat().st_mtime for p in touching)
        if locks:
            monkeypatch.setattr(download, "STALE_PART_S", -1.0)
            swept.append(remove_leftovers(dest, ("pkg.tar.gz",)))

    monkeypatch.setattr(download, "extract_data", extract_and_sweep)
    fetch(RemoteFile(src.as_uri(), hashlib.md5(archive).hexdigest(), extract=True), dest)
    assert len(ages) == 2 and max(ages) < 60  # the staging folder and the archive: touched as it went
    assert swept == ([[]] if locks else [])
    assert sorted(p.name for p in dest.iterdir()) == ["pkg"]


def test_a_full_disk_is_named_as_such_not_as_a_network_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while writing the download: the error says the disk and the fix (free space or another
    root), not "cannot download" and not the hint to fetch the files by hand, which would fail alike."""
    payload = b"p" * 1000
    src = tmp_path / "server" / "cifar-10-python.tar.gz"
    src.parent.mkdir()
    src.write_bytes(payload)
    remote = RemoteFile(src.as_uri(), hashlib.md5(payload).hexdigest(), extract=True)
    monkeypatch.setitem(REGISTRY, "cifar10", dataclasses.replace(REGISTRY["cifar10"], remote=(remote,)))
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fd: int, mode: str) -> None:
            self.f = real_fdopen(fd, mode)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *a: Any) -> None:
            self.f.close()

        def write(self, block: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fastclr.data.download.os.fdopen", Full)
    (tmp_path / "root").mkdir()
    with pytest.raises(DownloadWriteFailed) as e:
        ensure("cifar10", tmp_path / "root")
    msg = str(e.value)
    assert msg.startswith(f"cannot write cifar-10-python.tar.gz into {tmp_path / 'root'} (No space left on device")
    assert "free space there or choose another --root" in msg and "cannot download" not in msg
    assert "cs.toronto.edu" not in msg and _parts(tmp_path / "root") == []


def test_an_interrupted_download_into_a_root_fetches_only_what_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two of the four files came whole before the network failed: the same command completes the
    folder (the two it has are verified by checksum and not fetched again; their URLs here lead
    nowhere), where it used to be refused as an incomplete root."""
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTCLR_DATA", raising=False)
    write_idx_dataset(tmp_path / "server", n_train=16, n_test=8)
    folder = tmp_path / "root" / "fashion-mnist"
    folder.mkdir(parents=True)
    remotes = []
    for i, name in enumerate(IDX_FILES):
        data = (tmp_path / "server" / name).read_bytes()
        if i < 2:
            (folder / name).write_bytes(data)
        url = (tmp_path / "nowhere" / name).as_uri() if i < 2 else (tmp_path / "server" / name).as_uri()
        remotes.append(RemoteFile(url, hashlib.md5(data).hexdigest()))
    monkeypatch.setitem(REGISTRY, "fashion-mnist", dataclasses.replace(REGISTRY["fashion-mnist"], remote=tuple(remotes)))
    with pytest.raises(FastclrError, match=r"fastclr download fashion-mnist --root .*fetches them"):
        locate("fashion-mnist", tmp_path / "root")  # asked for without a download: refused, and told how
    ds = load_builtin("fashion-mnist", tmp_path / "root")
    assert ds.origin == str(folder) and len(ds.train) == 16 and len(ds.test) == 8


def test_idx_files_of_no_images_or_a_header_that_wraps_are_refused(tmp_path: Path) -> None:
    """A header of 65536^4 items wraps to 0 in int64, so a 20-byte file looked complete; and a
    dataset of 0 images was accepted as "read and checked"."""
    wraps = tmp_path / "wraps.idx"
    wraps.write_bytes(bytes([0, 0, 0x08, 4]) + (65536).to_bytes(4, "big") * 4)
    with pytest.raises(FastclrError, match="wraps.idx is truncated: header says"):
        formats.read_idx(wraps)
    longer = tmp_path / "longer.idx"  # a header of 3 labels, then 5 bytes: not "truncated"
    longer.write_bytes(bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big") + bytes(5))
    with pytest.raises(FastclrError, match=r"longer.idx holds 2 bytes more than its header declares for \(3,\): not "
                                           "this dataset's file, or damaged; delete it and fetch it again"):
        formats.read_idx(longer)
    write_idx_dataset(tmp_path / "fashion-mnist", n_train=16, n_test=8)
    write_idx(tmp_path / "fashion-mnist" / IDX_FILES[0], formats.np.zeros((0, 28, 28), formats.np.uint8))
    write_idx(tmp_path / "fashion-mnist" / IDX_FILES[1], formats.np.zeros((0,), formats.np.uint8))
    with pytest.raises(FastclrError, match="the pretraining split holds no images; the files are empty or damaged"):
        load_builtin("fashion-mnist", tmp_path, download=False)


def _targz(members: dict[str, bytes]) -> bytes:
    """A .tar.gz holding `members` (name -> content), as the publishers' archives hold files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


@pytest.mark.parametrize(("members", "in_the_way", "said"), [
    ({"pkg/a_batch": b"NEW-A", "pkg/z_batch": b"NEW-Z"}, "pkg/z_batch/", "z_batch is a folder where the archive has a file"),
    ({"pkg/a_batch": b"NEW-A", "pkg/sub/z_batch": b"NEW-Z"}, "pkg/sub", "sub is a file where the archive has a folder"),
])
def test_an_archive_a_target_cannot_take_replaces_nothing(tmp_path: Path, members: dict[str, bytes], in_the_way: str,
                                                          said: str) -> None:
    """Files move into place one by one; a target that cannot take its file (a folder there, or a
    file where the archive has a folder) is found before the first move, so the folder is not left
    half old, half new."""
    archive = tmp_path / "pkg.tar.gz"
    archive.write_bytes(_targz(members))
    dest = tmp_path / "data"
    (dest / "pkg").mkdir(parents=True)
    (dest / "pkg" / "a_batch").write_bytes(b"OLD-A")
    if in_the_way.endswith("/"):
        (dest / in_the_way).mkdir()
    else:
        (dest / in_the_way).write_bytes(b"a file")
    with pytest.raises(FastclrError, match=rf"{said}.*nothing was replaced"):
        unpack(archive, dest, "pkg.tar.gz")
    assert (dest / "pkg" / "a_batch").read_bytes() == b"OLD-A"
    assert sorted(p.name for p in dest.iterdir()) == ["pkg"]  # no staging folder left


def test_a_download_removes_a_killed_ones_part_file_and_keeps_a_slow_live_ones(tmp_path: Path) -> None:
    """`fetch` itself clears the part files a killed download left (untouched for 10 minutes, no process
    holds them), and keeps one a live download holds, untouched for longer (a slow link)."""
    import fcntl

    payload = b"idx bytes"
    src = tmp_path / "server" / "f.gz"
    src.parent.mkdir()
    src.write_bytes(payload)
    dest = tmp_path / "dest"
    dest.mkdir()
    killed, slow = dest / ".f.gz.abcdefgh.part", dest / ".f.gz.ijklmnop.part"
    for part, age in ((killed, 601), (slow, 700)):
        part.write_bytes(b"x")
        os.utime(part, (time.time() - age, time.time() - age))
    with open(slow, "rb") as live:  # its own open file description: a lock as another process's
        fcntl.flock(live.fileno(), fcntl.LOCK_EX)
        assert fetch(RemoteFile(src.as_uri(), hashlib.md5(payload).hexdigest()), dest).read_bytes() == payload
    assert sorted(p.name for p in dest.iterdir()) == sorted(["f.gz", slow.name])


def test_a_slow_live_download_has_on_disk_what_it_has_received(
        raw_server: Callable[..., str], tmp_path: Path) -> None:
    """A live download writes whatever each read brings, not once per full 1 MiB block (which a link
    under 1.7 KB/s takes longer than the 10 minutes after which another download of the file removes
    an untouched part file as a killed one's): the first 10 bytes of a 20-byte body are in the part
    file while the server holds back the rest."""
    dest, body, on_disk = tmp_path / "dest", b"0123456789abcdefghij", []

    def reply(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + body[:10])
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not any(p.stat().st_size for p in _parts(dest)):
            time.sleep(0.01)
        on_disk.extend(p.read_bytes() for p in _parts(dest))
        conn.sendall(body[10:])

    assert fetch(RemoteFile(raw_server(reply), hashlib.md5(body).hexdigest()), dest).read_bytes() == body
    assert on_disk == [body[:10]]


def test_the_part_file_a_download_writes_is_one_the_next_download_can_clear(
        raw_server: Callable[..., str], tmp_path: Path) -> None:
    """The part file seen while a download runs, left as a SIGKILL would leave it, is one that
    `remove_leftovers` finds: a killed download's part is not kept forever. The
    body cut off short of its Content-Length is said to be that, not a checksum mismatch (urllib
    ends such a body without an error)."""
    dest = tmp_path / "dest"
    dest.mkdir()  # there before: a failed download keeps the folders it did not make
    seen: list[str] = []

    def reply(conn: socket.socket) -> None:
        seen.extend(p.name for p in dest.iterdir())  # the download has made its part file by now
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)  # then cut off

    with pytest.raises(FastclrError, match=r"the connection broke off after 10 of 100 bytes\); run the download again"):
        fetch(remote := RemoteFile(raw_server(reply), "0" * 32), dest)
    assert len(seen) == 1 and seen[0].endswith(".part")
    left = dest / seen[0]
    left.write_bytes(b"x" * 10)
    os.utime(left, (time.time() - 601, time.time() - 601))
    assert remove_leftovers(dest, (remote.filename,)) == [left] and list(dest.iterdir()) == []


def test_a_downloaded_archive_is_unpacked_and_then_deleted(tmp_path: Path) -> None:
    """What stays of an archive download is its files; the archive (STL-10's is 2.5 GB) is deleted."""
    archive = _targz({"pkg/a_batch": b"A", "pkg/sub/z_batch": b"Z"})
    src = tmp_path / "server" / "pkg.tar.gz"
    src.parent.mkdir()
    src.write_bytes(archive)
    dest = tmp_path / "data"
    assert fetch(RemoteFile(src.as_uri(), hashlib.md5(archive).hexdigest(), extract=True), dest) == dest
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["pkg", "pkg/a_batch", "pkg/sub", "pkg/sub/z_batch"]
    assert (dest / "pkg" / "sub" / "z_batch").read_bytes() == b"Z"


def test_an_archive_member_reaching_outside_the_folder_is_refused(tmp_path: Path) -> None:
    """A member named ../../escaped (an archive that passed its checksum can still be hostile once
    the source changed hands) writes nothing outside the data root, nor anything inside it."""
    archive = tmp_path / "pkg.tar.gz"
    archive.write_bytes(_targz({"pkg/a_batch": b"A", "../../escaped": b"owned"}))
    dest = tmp_path / "root" / "data"
    dest.mkdir(parents=True)
    with pytest.raises(FastclrError, match=r"cannot unpack pkg.tar.gz into .*nothing of it was kept"):
        unpack(archive, dest, "pkg.tar.gz")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "root" / "escaped").exists()
    assert list(dest.iterdir()) == []


def test_a_failure_after_some_files_moved_says_how_many_were_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A target refused mid-way (its folder read-only): the files moved before it are whole and in
    place, and the message counts them instead of saying nothing was kept."""
    archive = tmp_path / "pkg.tar.gz"
    archive.write_bytes(_targz({"pkg/a_batch": b"NEW-A", "pkg/b_batch": b"NEW-B"}))
    dest = tmp_path / "data"
    dest.mkdir()
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "b_batch":
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr("fastclr.data.download.os.replace", replace)
    with pytest.raises(FastclrError, match=r"Permission denied.*; 1 of its files were already in place and are kept"):
        unpack(archive, dest, "pkg.tar.gz")
    assert (dest / "pkg" / "a_batch").read_bytes() == b"NEW-A" and not (dest / "pkg" / "b_batch").exists()


def _idx_remotes(server: Path) -> tuple[RemoteFile, ...]:
    """The four IDX files written in `server`, published there with their MD5s."""
    return tuple(RemoteFile((server / name).as_uri(), hashlib.md5((server / name).read_bytes()).hexdigest())
                 for name in IDX_FILES)


def test_a_present_file_that_fails_its_checksum_is_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Completing an interrupted download keeps a present file only when its MD5 is the publisher's:
    a readable labels file of other labels is replaced, and the dataset has the published labels."""
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _, ytr, _, _ = write_idx_dataset(tmp_path / "server", n_train=16, n_test=8)
    folder = tmp_path / "root" / "fashion-mnist"
    write_idx(folder / IDX_FILES[1], (ytr.astype(formats.np.uint8) + 1) % 4)  # other labels, same shape
    monkeypatch.setitem(REGISTRY, "fashion-mnist", dataclasses.replace(REGISTRY["fashion-mnist"],
                                                                       remote=_idx_remotes(tmp_path / "server")))
    ds = load_builtin("fashion-mnist", tmp_path / "root")
    assert ds.train is not None and ds.train.labels is not None
    assert ds.train.labels.tolist() == ytr.tolist()
    assert (folder / IDX_FILES[1]).read_bytes() == (tmp_path / "server" / IDX_FILES[1]).read_bytes()


def test_download_with_no_download_never_fetches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`fastclr download NAME --no-download` only checks: with the files reachable it still says they
    are missing, and writes nothing; without the flag the same command fetches them."""
    from fastclr.cli import main

    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTCLR_DATA", str(tmp_path / "data"))
    write_idx_dataset(tmp_path / "server", n_train=16, n_test=8)
    monkeypatch.setitem(REGISTRY, "fashion-mnist", dataclasses.replace(REGISTRY["fashion-mnist"],
                                                                       remote=_idx_remotes(tmp_path / "server")))
    assert main(["download", "fashion-mnist", "--no-download"]) == 2
    assert "fashion-mnist files not found" in capsys.readouterr().err and not (tmp_path / "data").exists()
    assert main(["download", "fashion-mnist"]) == 0
    assert "16 images for pretraining; 16 train, 8 test" in capsys.readouterr().out


def test_fastclr_data_is_chosen_as_a_root_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$FASTCLR_DATA is read as the shell would have written it ("~/data" from a .env file or a
    Dockerfile's ENV made a folder named "~" under the current directory), a copy of part of a
    dataset there is named (it was passed over for another copy without a word, or reported "not
    found"), and one that is a file is refused; a relative $XDG_CACHE_HOME is ignored, as the XDG
    spec says (it put the cache under whatever directory a command ran in)."""
    from fastclr.data.datasets import search_roots, user_cache

    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "none")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert user_cache() == tmp_path / "home" / ".cache" / "fastclr"
    monkeypatch.setenv("FASTCLR_DATA", "~/data")
    assert search_roots()[0] == tmp_path / "home" / "data"
    write_idx_dataset(tmp_path / "home" / ".cache" / "fastclr" / "mnist", n_train=16, n_test=8)  # a whole copy
    write_idx_dataset(tmp_path / "home" / "data" / "mnist", n_train=16, n_test=8)
    (tmp_path / "home" / "data" / "mnist" / IDX_FILES[3]).unlink()
    with pytest.raises(FastclrError, match=rf"mnist holds 3 of the 4 files of mnist but not {IDX_FILES[3]}; add them "
                                           r"there \(`fastclr download mnist` fetches them\), or give --data-root "
                                           rf"{tmp_path / 'home' / '.cache' / 'fastclr'} to use the whole copy"):
        locate("mnist")
    shutil.rmtree(tmp_path / "home" / ".cache")
    with pytest.raises(FastclrError, match=r"fetches them\), or unset FASTCLR_DATA to use another copy"):
        locate("mnist")  # no whole copy: the other way out
    write_idx_dataset(tmp_path / "home" / ".cache" / "fastclr" / "mnist", n_train=16, n_test=8)
    assert locate("mnist", partial_ok=True) is None  # a download completes that folder, not another one
    monkeypatch.setenv("FASTCLR_DATA", str(tmp_path / "home" / "data" / "mnist" / IDX_FILES[0]))
    with pytest.raises(FastclrError, match=r"FASTCLR_DATA=.* is not a directory"):
        locate("mnist")
    monkeypatch.setenv("FASTCLR_DATA", str(tmp_path / "absent"))
    assert locate("mnist") == tmp_path / "home" / ".cache" / "fastclr" / "mnist"  # a missing one is a download's


def test_download_into_a_root_puts_the_dataset_there_even_where_another_copy_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`fastclr download NAME --root R` made R and reported the copy in the user cache, fetching
    nothing into R, which the error of `--data-root R` had said it would; --no-download still only
    checks, looking in R first."""
    from fastclr.cli import main

    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTCLR_DATA", raising=False)
    write_idx_dataset(tmp_path / "cache" / "fastclr" / "fashion-mnist", n_train=16, n_test=8)
    write_idx_dataset(tmp_path / "server", n_train=16, n_test=8)
    monkeypatch.setitem(REGISTRY, "fashion-mnist", dataclasses.replace(REGISTRY["fashion-mnist"],
                                                                       remote=_idx_remotes(tmp_path / "server")))
    root = tmp_path / "root"
    with pytest.raises(FastclrError, match=rf"`fastclr download fashion-mnist --root {root}` makes it and fetches"):
        locate("fashion-mnist", root)
    assert main(["download", "fashion-mnist", "--root", str(root), "--no-download"]) == 2  # no root: one line
    capsys.readouterr()
    assert main(["download", "fashion-mnist", "--root", str(root)]) == 0
    assert capsys.readouterr().out.startswith(f"fashion-mnist: {root / 'fashion-mnist'} (")
    assert sorted(p.name for p in (root / "fashion-mnist").iterdir()) == sorted(IDX_FILES)
    assert locate("fashion-mnist", root) == root / "fashion-mnist"
    (tmp_path / "other").mkdir()
    assert main(["download", "fashion-mnist", "--root", str(tmp_path / "other"), "--no-download"]) == 0
    assert capsys.readouterr().out.startswith(f"fashion-mnist: {tmp_path / 'cache' / 'fastclr' / 'fashion-mnist'} (")


def test_info_names_absent_data_roots_and_a_partial_copy_as_not_found(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`fastclr info` said nothing of a $FASTCLR_DATA that does not exist; a folder holding part of a
    dataset there is not found (the download's to complete), and a $FASTCLR_DATA that is a file
    does not stop the report."""
    from fastclr import info

    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_idx_dataset(tmp_path / "cache" / "fastclr" / "mnist", n_train=16, n_test=8)
    monkeypatch.setenv("FASTCLR_DATA", str(tmp_path / "gone"))
    report = info.machine_report(measure=False)
    assert report["datasets"]["mnist"] == str(tmp_path / "cache" / "fastclr" / "mnist")
    assert report["data_roots_absent"] == [str(tmp_path / "gone"), str(tmp_path / "none")]
    assert info.format_report(report).splitlines()[-1] == (f"data roots  {tmp_path / 'gone'} (absent), "
                                                           f"{tmp_path / 'cache' / 'fastclr'}, {tmp_path / 'none'} (absent)")
    # where a dataset not found would go: the folder the variable names, made by the download
    assert report["data_download_to"] == str(tmp_path / "gone")
    assert f"data        cifar10: not found (fastclr download cifar10 puts it in {tmp_path / 'gone'})" in \
        info.format_report(report).splitlines()
    write_idx_dataset(tmp_path / "gone" / "mnist", n_train=16, n_test=8)
    (tmp_path / "gone" / "mnist" / IDX_FILES[0]).unlink()
    assert info.machine_report(measure=False)["datasets"]["mnist"] == ""
    afile = tmp_path / "gone" / "mnist" / IDX_FILES[1]
    monkeypatch.setenv("FASTCLR_DATA", str(afile))
    report = info.machine_report(measure=False)
    assert report["datasets"]["mnist"] == "" and report["data_download_to"] == ""  # no download can go there
    lines = info.format_report(report).splitlines()
    assert "data        cifar10: not found (fastclr download cifar10)" in lines
    assert lines[-1].startswith(f"data roots  {afile} (a file, not a folder), ")


def test_without_a_home_the_data_is_found_elsewhere_and_a_download_names_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container run as a user with no passwd entry and no HOME: `Path.home()` raised
    RuntimeError in a traceback from every command that looked for data, though Fashion-MNIST was
    in the system folder."""
    from fastclr.data.datasets import download_root

    def no_home(cls: type) -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", classmethod(no_home))
    for key in ("HOME", "XDG_CACHE_HOME", "FASTCLR_DATA"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "system")
    write_idx_dataset(tmp_path / "system" / "fashion-mnist", n_train=16, n_test=8)
    assert locate("fashion-mnist") == tmp_path / "system" / "fashion-mnist"
    with pytest.raises(FastclrError, match=r"no home directory is known here .*; set FASTCLR_DATA \(or XDG_CACHE_HOME, "
                                           r"or HOME\) to a writable folder"):
        download_root()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert download_root() == tmp_path / "cache" / "fastclr"


def test_a_partial_copy_in_fastclr_data_names_the_whole_copy_elsewhere(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder in $FASTCLR_DATA holding part of a dataset is completed, not passed over; where the
    download fails (offline) the error said "not found (looked in ...)" of a whole copy it had
    looked in: it names the partial folder and offers the whole copy. An empty folder there (a
    failed download's) holds nothing to pass over."""
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTCLR_DATA", str(tmp_path / "shared"))
    write_idx_dataset(tmp_path / "system" / "mnist", n_train=16, n_test=8)
    (tmp_path / "shared" / "mnist").mkdir(parents=True)
    assert locate("mnist") == tmp_path / "system" / "mnist"  # empty: the whole copy is used
    write_idx_dataset(tmp_path / "shared" / "mnist", n_train=16, n_test=8)
    (tmp_path / "shared" / "mnist" / IDX_FILES[2]).unlink()
    unreachable = tuple(RemoteFile((tmp_path / "nowhere" / f).as_uri(), "0" * 32) for f in IDX_FILES)
    monkeypatch.setitem(REGISTRY, "mnist", dataclasses.replace(REGISTRY["mnist"], remote=unreachable))
    with pytest.raises(FastclrError) as e:
        ensure("mnist")
    text = str(e.value)
    assert text.startswith(f"{tmp_path / 'shared' / 'mnist'} holds 3 of the 4 files of mnist, and the rest could not be "
                           "fetched (")
    assert text.endswith(f"; or give --data-root {tmp_path / 'system'} to use the whole copy in "
                         f"{tmp_path / 'system' / 'mnist'}")
    with pytest.raises(FastclrError, match=rf"or give --data-root {tmp_path / 'system'} to use the whole copy in "):
        ensure("mnist", download=False)
    assert ensure("mnist", tmp_path / "system", download=False) == tmp_path / "system" / "mnist"  # as it says


def test_a_failed_download_into_a_root_names_the_copy_elsewhere_and_leaves_no_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Offline, `download NAME --root R` said "files not found (looked in ...)" of a copy in a folder
    it listed, and left the empty R it had made (and with --root R/deep/er, R and R/deep); the
    --data-root it names is `download`'s too."""
    from fastclr.cli import main

    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTCLR_DATA", raising=False)
    write_idx_dataset(tmp_path / "system" / "mnist", n_train=16, n_test=8)
    unreachable = tuple(RemoteFile((tmp_path / "nowhere" / f).as_uri(), "0" * 32) for f in IDX_FILES)
    monkeypatch.setitem(REGISTRY, "mnist", dataclasses.replace(REGISTRY["mnist"], remote=unreachable))
    assert main(["download", "mnist", "--root", str(tmp_path / "R" / "deep" / "er")]) == 2
    assert not (tmp_path / "R").exists()
    capsys.readouterr()
    assert main(["download", "mnist", "--root", str(tmp_path / "R")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: mnist could not be fetched into {tmp_path / 'R' / 'mnist'} (")
    assert f"a whole copy is in {tmp_path / 'system' / 'mnist'}: give --data-root {tmp_path / 'system'} to use it" in err
    assert not (tmp_path / "R").exists()
    assert main(["download", "mnist", "--data-root", str(tmp_path / "system"), "--no-download"]) == 0
    assert capsys.readouterr().out.startswith(f"mnist: {tmp_path / 'system' / 'mnist'} (")
    # a run's --data-root whose folder of the dataset is there and empty: "not found (looked in R/mnist,
    # SYSTEM/mnist ...)", while SYSTEM/mnist held the whole dataset (the download goes to R, not a look there)
    (tmp_path / "E" / "mnist").mkdir(parents=True)
    with pytest.raises(FastclrError, match=re.escape(f"a whole copy is in {tmp_path / 'system' / 'mnist'}: give "
                                                     f"--data-root {tmp_path / 'system'} to use it there")):
        ensure("mnist", tmp_path / "E")


def test_a_download_into_a_root_that_fails_names_only_that_root_as_looked_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`download NAME --root R` failing said "looked in R/..., the user cache, /usr/share/...", though
    only R is used; and a SIGTERM's exit from it left the R it had made."""
    from fastclr.cli import main

    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTCLR_DATA", raising=False)
    unreachable = tuple(RemoteFile((tmp_path / "nowhere" / f).as_uri(), "0" * 32) for f in IDX_FILES)
    monkeypatch.setitem(REGISTRY, "mnist", dataclasses.replace(REGISTRY["mnist"], remote=unreachable))
    assert main(["download", "mnist", "--root", str(tmp_path / "R")]) == 2
    assert f"(looked in {tmp_path / 'R' / 'mnist'}) and cannot download" in capsys.readouterr().err

    def killed(*args: object, **kwargs: object) -> None:
        raise SystemExit(128 + signal.SIGTERM)  # as cleanup_on_sigterm ends the process

    monkeypatch.setattr("fastclr.data.datasets.fetch", killed)
    with pytest.raises(SystemExit):
        main(["download", "mnist", "--root", str(tmp_path / "R" / "deep")])
    assert not (tmp_path / "R").exists()


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_a_folder_a_download_cannot_write_into_names_the_folder_and_the_way_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """A cache folder that cannot be written (no permission, a read-only mount) failed before the
    download's own handling: the generic "choose another place", not --root or $FASTCLR_DATA."""
    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code), str(tmp_path / "dest"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(DownloadWriteFailed) as e:
        fetch(RemoteFile((tmp_path / "f.gz").as_uri(), "0" * 32), tmp_path / "dest")
    assert str(e.value).startswith(f"cannot write f.gz into {tmp_path / 'dest'} ({os.strerror(code)}")
    assert "another --root or $FASTCLR_DATA" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "dest").exists()  # the folder it made is gone


def test_a_download_completing_uncompressed_files_fetches_and_names_only_the_missing_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A root holding three of the four IDX files, uncompressed, as a user unpacks them: the download
    of the rest began with the first file's .gz, present already as its unpacked file, and offline
    its failure named that file (train-images), not the one missing."""
    import gzip

    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTCLR_DATA", raising=False)
    folder = tmp_path / "R" / "mnist"
    write_idx_dataset(folder, n_train=16, n_test=8)
    for name in IDX_FILES:
        (folder / name.removesuffix(".gz")).write_bytes(gzip.decompress((folder / name).read_bytes()))
        (folder / name).unlink()
    (folder / IDX_FILES[3].removesuffix(".gz")).unlink()
    unreachable = tuple(RemoteFile((tmp_path / "nowhere" / f).as_uri(), "0" * 32) for f in IDX_FILES)
    monkeypatch.setitem(REGISTRY, "mnist", dataclasses.replace(REGISTRY["mnist"], remote=unreachable))
    with pytest.raises(FastclrError) as e:
        ensure("mnist", tmp_path / "R")
    fetched = [f for f in IDX_FILES if f"nowhere/{f}" in str(e.value)]  # the files the failure names as fetched
    assert fetched == [IDX_FILES[3]], str(e.value)


def test_a_download_fetches_the_missing_file_before_present_ones_of_another_md5(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's Fashion-MNIST .gz files are repacked (the same images, other MD5s than the
    publisher's): a root holding three of them and missing the fourth fetched the present first,
    and offline its failure named train-images, present, not train-labels, missing."""
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTCLR_DATA", raising=False)
    folder = tmp_path / "R" / "fashion-mnist"
    write_idx_dataset(folder, n_train=16, n_test=8)
    (folder / IDX_FILES[1]).unlink()
    unreachable = tuple(RemoteFile((tmp_path / "nowhere" / f).as_uri(), "0" * 32) for f in IDX_FILES)
    monkeypatch.setitem(REGISTRY, "fashion-mnist", dataclasses.replace(REGISTRY["fashion-mnist"], remote=unreachable))
    with pytest.raises(FastclrError) as e:
        ensure("fashion-mnist", tmp_path / "R")
    fetched = [f for f in IDX_FILES if f"nowhere/{f}" in str(e.value)]
    assert fetched == [IDX_FILES[1]], str(e.value)


def _tar_with(tmp_path: Path, add: Any) -> Path:
    """A .tar.gz holding `pkg/ok` and what `add(tar)` puts in it."""
    path = tmp_path / "pkg.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("pkg/ok")
        info.size, info.mode = 2, 0o4777  # setuid and world-writable in the archive
        info.uid, info.gid, info.uname, info.gname = 1234, 1234, "someone", "others"
        tar.addfile(info, io.BytesIO(b"ok"))
        add(tar)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> Any:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        info.size = 3 if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(b"bad") if kind == tarfile.REGTYPE else None)
    return add


@pytest.mark.parametrize("pep706", [True, False])
@pytest.mark.parametrize("bad", ["../escaped", "pkg/../../escaped", "link", "hardlink", "device", "/absolute"])
def test_an_archive_member_outside_the_folder_or_not_a_file_is_refused_with_or_without_pep_706(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str, pep706: bool) -> None:
    """Python before 3.11.4 (Debian 12's python3 is 3.11.2) has no tarfile filter: the members are
    checked by fastclr there, with the refusals the filter makes; nothing of a refused archive is
    kept, and a good one's modes lose setuid and others' write either way."""
    if not pep706:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    kinds = {"link": _member("pkg/l", tarfile.SYMTYPE, "/etc/passwd"), "hardlink": _member("pkg/h", tarfile.LNKTYPE, "/etc/passwd"),
             "device": _member("pkg/d", tarfile.CHRTYPE)}
    archive = _tar_with(tmp_path, kinds.get(bad, _member(bad)))
    dest = tmp_path / "root" / "data"
    dest.mkdir(parents=True)
    if bad == "/absolute":  # taken inside the folder, as the filter takes it
        unpack(archive, dest, "pkg.tar.gz")
        assert (dest / "absolute").read_bytes() == b"bad" and not Path("/absolute").exists()
        (dest / "absolute").unlink()
        shutil.rmtree(dest / "pkg")
    else:
        with pytest.raises(FastclrError, match="cannot unpack pkg.tar.gz"):
            unpack(archive, dest, "pkg.tar.gz")
    assert list(dest.iterdir()) == [] and sorted(p.name for p in (tmp_path / "root").iterdir()) == ["data"]
    good = _tar_with(tmp_path, lambda tar: None)
    unpack(good, dest, "pkg.tar.gz")
    assert (dest / "pkg" / "ok").read_bytes() == b"ok"
    made = (dest / "pkg" / "ok").stat()
    assert not made.st_mode & (stat.S_ISUID | stat.S_IWOTH) and made.st_mode & stat.S_IRUSR
    assert (made.st_uid, made.st_gid) == (os.getuid(), os.getgid())  # as root, not the archive's owner (1234)


def test_a_gzip_file_that_unpacks_far_past_its_header_is_refused_having_read_little(tmp_path: Path) -> None:
    """A 60 MB train-images .gz of 13 GiB unpacked ended in MemoryError (or the out-of-memory killer): the
    whole file was unpacked before its header was read. Only what the header declares, and LOOK_PAST more,
    is unpacked now; here 3 labels then 256 MiB of zeros."""
    import gzip
    import tracemalloc

    bomb = tmp_path / "train-labels-idx1-ubyte.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        f.write(bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 3]))
        for _ in range(256):
            f.write(bytes(1 << 20))
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(FastclrError, match=rf"holds at least {formats.LOOK_PAST} bytes more than its header "
                                               r"declares for \(3,\): not this dataset's file"):
            formats.read_idx(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # bytes: far from the 256 MiB unpacked whole
    plain = tmp_path / "plain-idx1-ubyte.gz"
    with gzip.open(plain, "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 3]))
    assert formats.read_idx(plain).tolist() == [1, 2, 3]


def test_out_of_memory_reading_a_plausible_idx_file_is_not_called_damaged(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Short of memory while reading MNIST's 47 MB images, the file was called damaged ("declares
    (60000, 28, 28) (0.0 GiB), more than this machine can hold ... delete it and fetch it again"): the
    MemoryError now reaches the command, which says out of memory. A header declaring more than the
    machine holds is still the file's fault, its size written in binary units."""
    labels = tmp_path / "labels-idx1-ubyte"
    labels.write_bytes(bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 3]))

    def short(f: object, limit: int) -> bytes:
        raise MemoryError

    monkeypatch.setattr(formats, "_read_at_most", short)
    with pytest.raises(MemoryError):
        formats.read_idx(labels)
    monkeypatch.setattr(formats, "_physical_memory", lambda: 2)
    with pytest.raises(FastclrError, match=r"labels-idx1-ubyte declares \(3,\) \(3.0 B\), more than this machine can "
                                           "hold: not this dataset's file, or damaged; delete it and fetch it again"):
        formats.read_idx(labels)
