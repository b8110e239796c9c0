"""What differs on Windows and macOS, checked here on Linux with the difference put in place: the
POSIX-only modules and calls taken away, a directory entry's stat without an identity, files that
stay mapped, and each system's answer to how much memory is available. (No Windows or macOS
machine runs this suite; these are the platforms' documented behaviours.)"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import fastclr.files as files
import fastclr.ingest.walk as walk
from fastclr.data.store import IMAGES, StoreWriter
from fastclr.ingest import DecodeOptions, prepare_store
from fastclr.ingest.embed import embed
from ingest_fixtures import bar_images

QUIET = dict(progress=False, log=lambda s: None)
REPO = Path(__file__).resolve().parents[1]

WITHOUT_POSIX = """
import os, signal, sys
sys.modules["resource"] = None  # an import of it raises ImportError, as on Windows
sys.modules["fcntl"] = None
del os.fchmod                   # Windows before Python 3.13
del signal.SIGKILL
from pathlib import Path
import fastclr.cli
from fastclr.files import atomic_write, write_failure_reason
from fastclr.ingest.prepare import _init
from fastclr.ingest import DecodeOptions
out = Path(sys.argv[1])
atomic_write(out, lambda f: f.write(b"whole"))
print(out.read_bytes().decode(), write_failure_reason(OSError(28, "No space left on device"), out).split(";")[0])
_init(out.parent, DecodeOptions(16), frozenset(), os.getpid())  # a decoding process's start
"""


def test_fastclr_imports_and_writes_without_the_posix_only_modules(tmp_path: Path) -> None:
    """`import resource` at the top of fastclr.files made every command an ImportError on Windows,
    and the file mode and a decoder's parent-death signal were AttributeErrors after it."""
    out = subprocess.run([sys.executable, "-c", WITHOUT_POSIX, str(tmp_path / "f.bin")], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["whole", "No", "space", "left", "on", "device"]


def test_fsync_on_windows_opens_files_for_writing_and_leaves_directories(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows flushes only through a handle open for writing (FlushFileBuffers) and cannot open a
    directory: os.open of one raised PermissionError after every rename."""
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def recording_open(path: Any, flags: int, *a: Any) -> int:
        opened.append((str(path), flags))
        return real_open(path, flags, *a)

    monkeypatch.setattr(files, "WINDOWS", True)
    monkeypatch.setattr(files.os, "open", recording_open)
    files.atomic_write(tmp_path / "a.txt", lambda f: f.write(b"text"))  # fsyncs the directory after its rename
    assert (tmp_path / "a.txt").read_bytes() == b"text"
    assert [p for p, _ in opened if not p.endswith(".tmp")] == []  # the temporary file is mkstemp's
    files.fsync_path(tmp_path / "a.txt")
    assert opened[-1] == (str(tmp_path / "a.txt"), os.O_RDWR)


class _NoIdentity:
    """A scandir entry as Windows gives it: its stat has st_ino and st_dev 0 (Python's docs)."""

    def __init__(self, entry: os.DirEntry[str]) -> None:
        self._entry, self.name, self.path = entry, entry.name, entry.path

    def is_symlink(self) -> bool:
        return self._entry.is_symlink()

    def stat(self, follow_symlinks: bool = True) -> Any:
        st = self._entry.stat(follow_symlinks=follow_symlinks)
        return SimpleNamespace(st_mode=st.st_mode, st_size=st.st_size, st_mtime_ns=st.st_mtime_ns, st_ino=0, st_dev=0)


_SCANDIR = os.scandir


class _Listing:
    def __init__(self, path: Any) -> None:
        self._it = _SCANDIR(path)

    def __enter__(self) -> list[_NoIdentity]:
        return [_NoIdentity(e) for e in self._it]

    def __exit__(self, *exc: object) -> None:
        self._it.close()


def test_class_folders_without_a_scandir_identity_are_all_walked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every directory keyed (0, 0), the second class folder was skipped as a duplicate of the
    first and nested folders as symlink loops: a store of one class, and no error."""
    rels = bar_images(tmp_path / "photos", n_per_class=2, size=8, classes=3)
    (tmp_path / "photos" / "class1" / "deeper").mkdir()
    os.replace(tmp_path / "photos" / rels[2], tmp_path / "photos" / "class1" / "deeper" / "x.png")
    monkeypatch.setattr(walk.os, "scandir", _Listing)
    found = walk.walk_folder(tmp_path / "photos")
    assert sorted(f.rel for f in found.files) == sorted([*rels[:2], "class1/deeper/x.png", *rels[3:]])
    assert found.skipped == []
    # a file system that gives no file ID even to os.stat: directories are told apart by their real paths
    real_stat = os.stat

    def no_file_id(path: Any, *a: Any, **kw: Any) -> Any:
        st = real_stat(path, *a, **kw)
        if not str(path).startswith(str(tmp_path / "photos")):
            return st
        return SimpleNamespace(st_mode=st.st_mode, st_size=st.st_size, st_mtime_ns=st.st_mtime_ns, st_ino=0, st_dev=0)

    monkeypatch.setattr(walk.os, "stat", no_file_id)
    again = walk.walk_folder(tmp_path / "photos")
    assert sorted(f.rel for f in again.files) == sorted(f.rel for f in found.files) and again.skipped == []


def test_links_and_the_store_inside_are_told_apart_without_a_scandir_identity(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a directory entry's stat has no file ID, a directory's identity is taken from os.stat, as
    the folder's own and the excluded store's are: a link back to the folder is still a loop, a link
    to a class folder still a duplicate, the store inside still passed over: the walk with file IDs."""
    rels = bar_images(tmp_path / "photos", n_per_class=2, size=8)
    (tmp_path / "photos" / "class0" / "loop").symlink_to(tmp_path / "photos")
    (tmp_path / "photos" / "class1" / "again").symlink_to(tmp_path / "photos" / "class0")
    store = prepare_store(tmp_path / "photos", tmp_path / "photos" / "store", DecodeOptions(8), workers=1, **QUIET).store
    want = walk.walk_folder(tmp_path / "photos", exclude=store)
    assert [f.rel for f in want.files] == rels
    assert [(s.rel, s.reason) for s in want.skipped] == [("class0/loop/", "symlink-loop"),
                                                         ("class1/again/", "duplicate-directory")]
    monkeypatch.setattr(walk.os, "scandir", _Listing)
    assert walk.walk_folder(tmp_path / "photos", exclude=store) == want


def _mapped(prefix: Path) -> list[str]:
    """Files under `prefix` this process has memory-mapped (Linux's /proc/self/maps)."""
    with open("/proc/self/maps", encoding="utf-8") as f:
        return [line.split(None, 5)[5].strip() for line in f if str(prefix) in line and len(line.split(None, 5)) == 6]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the mappings from Linux's /proc")
def test_a_rerun_of_prepare_unmaps_the_old_store_before_replacing_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows refuses to replace a file that is mapped; the old store's images were mapped
    (reused rows are read from them) until after the new store's commit."""
    bar_images(tmp_path / "photos", n_per_class=3, size=8)
    store = tmp_path / "store"
    prepare_store(tmp_path / "photos", store, DecodeOptions(8), workers=1, **QUIET)
    first = np.fromfile(store / IMAGES, np.uint8)
    at_commit: list[list[str]] = []
    real_commit = StoreWriter.commit

    def commit(self: StoreWriter, *a: Any, **kw: Any) -> Path:
        at_commit.append(_mapped(store / IMAGES))
        return real_commit(self, *a, **kw)

    monkeypatch.setattr(StoreWriter, "commit", commit)
    result = prepare_store(tmp_path / "photos", store, DecodeOptions(8), workers=1, **QUIET)
    assert result.reused == 6 and at_commit == [[]]
    assert np.array_equal(np.fromfile(store / IMAGES, np.uint8), first)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the mappings from Linux's /proc")
def test_embedding_a_folder_unmaps_its_temporary_store_before_removing_it(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows cannot delete a mapped file: the temporary store of a folder's embedding was still
    mapped when its directory was removed, an error after the embeddings were written."""
    from test_ingest_embed import make_run

    bar_images(tmp_path / "photos", n_per_class=2, size=28)
    run = make_run(tmp_path / "run", channels=3)
    at_removal: list[list[str]] = []
    real_rmtree = __import__("shutil").rmtree

    def rmtree(path: Any, *a: Any, **kw: Any) -> None:
        if "fastclr-embed-" in str(path):
            at_removal.append(_mapped(Path(path)))
        real_rmtree(path, *a, **kw)

    monkeypatch.setattr("shutil.rmtree", rmtree)
    npy, _ = embed(run, str(tmp_path / "photos"), tmp_path / "e.npy", torch.device("cpu"), log=lambda s: None)
    assert at_removal == [[]] and np.load(npy).shape == (4, run.spec.feature_dim)


def _calls_without_encoding(tree: ast.AST) -> list[int]:
    """Lines of open()/read_text()/write_text() calls in text mode with no encoding argument."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        if name in ("read_text", "write_text") and isinstance(f, ast.Attribute) and owner != "files":
            lines.append(node.lineno)
        elif name == "open" and owner in ("", "io", "Path") or name == "open" and isinstance(f, ast.Attribute) \
                and owner not in ("os", "Image", "tarfile", "gzip", "zipfile", "bz2", "lzma", "safe_open", "np"):
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            if not (isinstance(mode, ast.Constant) and "b" in str(mode.value)):
                lines.append(node.lineno)
    return lines


def test_fastclr_never_reads_or_writes_text_in_the_locales_encoding() -> None:
    """Everything fastclr writes is UTF-8; text opened without an encoding is read in the locale's
    (cp1252 on Windows), so a config.toml holding a path like C:\\Users\\Zoë came back garbled. ruff's
    PLW1514 misses calls on a Path it cannot infer (`(run_dir / "config.toml").read_text()`)."""
    found = {str(p.relative_to(REPO)): lines for p in sorted((REPO / "fastclr").rglob("*.py"))
             if (lines := _calls_without_encoding(ast.parse(p.read_text(encoding="utf-8"))))}
    assert found == {}


@pytest.mark.parametrize(("nccl", "expected"), [(True, "nccl"), (False, "gloo")])
def test_cuda_ranks_join_through_gloo_where_the_build_has_no_nccl(nccl: bool, expected: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows builds of PyTorch have no NCCL: asking for it failed as 'check MASTER_ADDR/MASTER_PORT'."""
    import torch.distributed as dist

    from fastclr.scaleout import distributed

    joined: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: nccl)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.append(backend))
    monkeypatch.setattr(distributed, "job_store", lambda *args: dist.HashStore())  # no other rank to meet
    monkeypatch.setattr(distributed, "check_in", lambda *args: None)
    ctx = distributed.setup(torch.device("cuda", 1), timeout_s=5.0)
    assert joined == [expected] and (ctx.rank, ctx.world_size) == (1, 2)


# `vm_stat` of macOS 14 on an Apple M2 (16 KiB pages), as it prints them
VM_STAT = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                                3932.
Pages active:                            208427.
Pages inactive:                          205371.
Pages speculative:                         2118.
Pages throttled:                              0.
Pages wired down:                        130364.
Pages purgeable:                           5306.
"Translation faults":                 862913530.
Pages copy-on-write:                   29048366.
Pages zero filled:                    325469698.
Pages reactivated:                     12003400.
Pages purged:                           4563826.
File-backed pages:                       133473.
Anonymous pages:                         282443.
Pages stored in compressor:              872123.
Pages occupied by compressor:            294227.
Decompressions:                        27349744.
Compressions:                          39282738.
Pageins:                               10290432.
Pageouts:                                154424.
Swapins:                                 109282.
Swapouts:                                159858.
"""


def test_the_memory_checks_read_macos_vm_stat(monkeypatch: pytest.MonkeyPatch) -> None:
    """On macOS (no /proc/meminfo) the checks before large allocations read `vm_stat`: free +
    speculative + inactive pages times the page size; refused as on Linux when it would not fit;
    off (None), not an error, when vm_stat cannot run or prints something else."""
    import fastclr.host_memory as host_memory
    import fastclr.runtime as runtime
    from fastclr.errors import FastclrError

    available = 16384 * (3932 + 2118 + 205371)
    assert host_memory.parse_vm_stat(VM_STAT) == available
    assert host_memory.parse_vm_stat(VM_STAT.replace("Pages inactive:", "Pages idle:")) is None
    assert host_memory.parse_vm_stat("vm_stat: unknown") is None
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(runtime, "smallest_limit", lambda kind: None)  # no Linux cgroup on a Mac
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: SimpleNamespace(stdout=VM_STAT) if argv == ["vm_stat"]
                        else pytest.fail(f"ran {argv}"))
    assert runtime.available_memory() == available
    runtime.require_memory(int(0.9 * available) - 1, "the probe", "use fewer features")
    with pytest.raises(FastclrError, match=r"^the probe needs about 2\.9 GiB but 3\.2 GiB are available; use fewer"):
        runtime.require_memory(int(0.9 * available) + 2**20, "the probe", "use fewer features")

    def missing(argv: list[str], **kw: Any) -> None:
        raise FileNotFoundError(2, "No such file or directory", argv[0])

    monkeypatch.setattr(subprocess, "run", missing)
    assert runtime.available_memory() is None
    runtime.require_memory(10**15, "the probe", "use fewer features")  # unknown: not refused


def test_the_memory_checks_ask_windows_for_its_available_physical_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Windows the checks ask GlobalMemoryStatusEx, with MEMORYSTATUSEX's 64-byte layout and its
    dwLength set as the API requires; a failed call turns the checks off."""
    import ctypes

    import fastclr.runtime as runtime
    from fastclr.host_memory import MemoryStatus

    assert ctypes.sizeof(MemoryStatus) == 64 and MemoryStatus.ullAvailPhys.offset == 16
    calls: list[int] = []

    def global_memory_status_ex(ref: Any) -> int:
        status = ref._obj
        calls.append(status.dwLength)
        status.ullTotalPhys, status.ullAvailPhys = 16 * 2**30, 5 * 2**30 + 123
        return 1

    kernel32 = SimpleNamespace(GlobalMemoryStatusEx=global_memory_status_ex)
    monkeypatch.setattr(ctypes, "windll", SimpleNamespace(kernel32=kernel32), raising=False)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(runtime, "smallest_limit", lambda kind: None)
    assert runtime.available_memory() == 5 * 2**30 + 123 and calls == [64]
    kernel32.GlobalMemoryStatusEx = lambda ref: 0  # the call failed
    assert runtime.available_memory() is None
