"""Writes that really fail: a full file system and a file-size limit, not an injected exception.

Two real faults, both made by the kernel so that every writer (torch's, numpy's, safetensors',
plain `open`) raises exactly what it raises for a user:
- a file-size limit (RLIMIT_FSIZE, what `ulimit -f` sets; SIGXFSZ ignored, so write() returns
  EFBIG): available to any process, so these tests always run;
- a real full disk: a small tmpfs mounted in a private mount namespace (`unshare -m`), where
  the machine allows it (root or user namespaces); skipped, and said, where it does not.
torch's writer raises RuntimeError ("unexpected pos ...") on both, never OSError.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import call_main, cli_env, file_size_limit, limit_files
from ingest_fixtures import bar_images
from tiny import TINY_FLAGS
from fastclr.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from fastclr.errors import FastclrError
from fastclr.files import WriteFailed, atomic_write, atomic_write_all, npy_writer


def limited_cli(args: list[str], env: dict[str, str], cwd: Path, limit: int) -> subprocess.CompletedProcess[str]:
    """`python -m fastclr ARGS` in a process whose files may not grow past `limit` bytes."""
    return subprocess.run([sys.executable, "-m", "fastclr", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=240, preexec_fn=lambda: limit_files(limit))


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    return lines[0]


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*") if p.name.endswith(".tmp") or ".partial" in p.name]


def test_the_real_torch_writer_failure_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(8)})
    with file_size_limit(64 * 1024), pytest.raises(FastclrError) as e:
        save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(1 << 20)})  # 4 MiB of tensor: past the limit
    msg = str(e.value)
    assert "the writer stopped" in msg and "files are limited to 64.0 KiB (ulimit -f)" in msg
    assert "step-000000001.pt written before is intact" in msg and f"--resume {tmp_path}" in msg
    assert list_checkpoints(tmp_path) == [good] and torch.equal(load_checkpoint(good)["w"], torch.ones(8))
    assert no_temporaries(tmp_path)


@pytest.mark.parametrize("writer", ["numpy", "bytes"])
def test_atomic_write_leaves_the_old_file_whole_when_the_kernel_refuses(tmp_path: Path, writer: str) -> None:
    import numpy as np

    path = tmp_path / "out.bin"
    path.write_bytes(b"old contents")
    big = np.zeros(1 << 20, np.float32)
    write = (lambda f: np.save(f, big)) if writer == "numpy" else (lambda f: f.write(big.tobytes()))
    with file_size_limit(4096), pytest.raises(WriteFailed) as e:
        atomic_write(path, write)
    # numpy says "1048576 requested and 992 written", a plain write "File too large": either way
    # the limit is named, and the old file is whole.
    assert "files are limited to 4.0 KiB (ulimit -f)" in e.value.reason and path.read_bytes() == b"old contents"
    assert no_temporaries(tmp_path)


def test_a_npy_cut_short_in_its_last_buffer_is_a_failure_not_a_file(tmp_path: Path) -> None:
    """Given a real file, numpy writes through C stdio and drops the error of its final flush: an
    array whose last 16 bytes pass the limit became a truncated .npy and no error. `npy_writer`
    writes through Python's checked writes: the same array fails, the old file stays whole."""
    import numpy as np

    arr = np.arange(2020, dtype=np.float32)  # 8080 bytes after a 128-byte header: 16 past the limit
    path = tmp_path / "e.npy"
    path.write_bytes(b"old contents")
    with file_size_limit(8192):
        atomic_write(tmp_path / "numpy.npy", lambda f: np.save(f, arr))  # the fault is real: no error...
        with pytest.raises(WriteFailed):
            atomic_write(path, npy_writer(arr))
    assert (tmp_path / "numpy.npy").stat().st_size == 8192  # ...and a file cut short
    assert path.read_bytes() == b"old contents" and no_temporaries(tmp_path)
    atomic_write(path, npy_writer(arr))
    assert np.array_equal(np.load(path), arr)


def test_files_written_together_are_replaced_together_or_not_at_all(tmp_path: Path) -> None:
    """`atomic_write_all`: when the second file fails, the first keeps its old contents too (an
    embedding's rows and its index must not come from two different runs)."""
    a, b = tmp_path / "a.npy", tmp_path / "a.csv"
    a.write_bytes(b"old array")
    b.write_bytes(b"old index")
    with file_size_limit(4096), pytest.raises(WriteFailed) as e:
        atomic_write_all([(a, lambda f: f.write(b"new array")), (b, lambda f: f.write(bytes(8192)))])
    assert e.value.path == b and a.read_bytes() == b"old array" and b.read_bytes() == b"old index"
    assert no_temporaries(tmp_path)
    atomic_write_all([(a, lambda f: f.write(b"new array")), (b, lambda f: f.write(b"new index"))])
    assert a.read_bytes() == b"new array" and b.read_bytes() == b"new index"


@pytest.fixture
def finished_run(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    env = cli_env(tmp_path)
    run = tmp_path / "run"
    r = call_main(["pretrain", "--data", "mnist", "--epochs", "1", "--run-dir", str(run), *TINY_FLAGS], env, tmp_path)
    assert r.returncode == 0, r.stderr
    return run, env


def test_pretrain_whose_first_checkpoint_cannot_be_written(tmp_path: Path) -> None:
    env, run = cli_env(tmp_path), tmp_path / "run"
    r = limited_cli(["pretrain", "--data", "mnist", "--epochs", "1", "--run-dir", str(run), *TINY_FLAGS], env,
                    tmp_path, limit=16 * 1024)
    line = one_line_error(r)
    # no --resume to suggest: it would find no checkpoint to resume from
    assert "cannot write checkpoint" in line and "no earlier checkpoint exists" in line and "--resume" not in line
    assert "then run the same command again (the run starts over)" in line
    assert not list_checkpoints(run) and not (run / "encoder.safetensors").exists() and no_temporaries(run)


def test_evaluate_report_and_embed_on_a_refusing_disk(finished_run: tuple[Path, dict[str, str]],
                                                      tmp_path: Path) -> None:
    run, env = finished_run
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    cases = {
        "evaluate": (["evaluate", str(run), "--protocols", "linear,knn", "--device", "cpu"], 256, run / "eval.json"),
        "report": (["report", str(run), "--device", "cpu", "--map", "pca"], 4096, run / "report.html"),
        "embed": (["embed", str(run), "--data", "mnist", "--out", str(tmp_path / "emb"), "--device", "cpu"], 4096,
                  tmp_path / "emb.npy"),
    }
    for name, (args, limit, product) in cases.items():
        r = limited_cli(args, env, tmp_path, limit)
        line = one_line_error(r)
        assert "cannot write" in line and str(product) in line and "ulimit -f" in line, (name, line)
        # with the way on, as pretrain's and prepare's lines have (they named the problem alone)
        assert line.endswith("; files already complete were kept; free space there or choose another place, and run "
                             "the command again"), (name, line)
        assert not product.exists(), name
        if name == "evaluate":  # the minutes of results are on the screen, though their file could not be written
            assert "linear probe on h" in r.stdout and "kNN on h (k=20)" in r.stdout, r.stdout
            assert "results in" not in r.stdout  # (said once the file is there)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before and no_temporaries(tmp_path)


def test_a_file_output_that_cannot_be_written_is_refused_before_the_work(finished_run: tuple[Path, dict[str, str]],
                                                                        tmp_path: Path) -> None:
    """export (its ONNX check included), report (its map) and neighbours (its search) did their work,
    then failed on a folder standing at the output's name or a file standing at its folder's,
    with free space as the hint. Now one line first, naming the fix, and nothing written."""
    run, env = finished_run
    (tmp_path / "adir.onnx").mkdir()
    (tmp_path / "a.html").mkdir()
    (tmp_path / "g.png").mkdir()
    (tmp_path / "afile").write_text("x")
    bar_images(tmp_path / "bars", n_per_class=3, size=28)
    assert call_main(["prepare", str(tmp_path / "bars"), "--size", "28", "--out", str(tmp_path / "s")], env,
                     tmp_path).returncode == 0
    query = str(next((tmp_path / "bars").rglob("*.png")))
    cases = [
        (["export", str(run), "--out", str(tmp_path / "adir.onnx")],
         f"--out {tmp_path / 'adir.onnx'} is a folder; give a file name (in it, or elsewhere)"),
        (["export", str(run), "--out", str(tmp_path / "afile" / "enc.safetensors")],
         f"--out {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, not a folder; give another --out"),
        (["report", str(run), "--map", "pca", "--out", str(tmp_path / "a.html")],
         f"--out {tmp_path / 'a.html'} is a folder; give a file name (in it, or elsewhere)"),
        (["neighbours", str(run), "--data", str(tmp_path / "s"), "--query", query, "--grid", str(tmp_path / "g.png")],
         f"--grid {tmp_path / 'g.png'} is a folder; give a file name (in it, or elsewhere)"),
    ]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    for args, message in cases:
        r = call_main(args, env, tmp_path)
        assert r.returncode == 2 and r.stderr == f"error: {message}\n" and r.stdout == "", (args, r.stderr, r.stdout)
    (run / "report.html").mkdir()  # the report's own place, without --out
    r = call_main(["report", str(run), "--map", "pca"], env, tmp_path)
    assert r.stderr == f"error: {run / 'report.html'} is a folder; give --out elsewhere\n"  # no --out was given
    (run / "report.html").rmdir()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "adir.onnx", "afile", "bars", "data", "g.png", "run", "s"]


def test_prepare_on_a_refusing_disk_removes_its_partial_files(tmp_path: Path) -> None:
    bar_images(tmp_path / "bars", n_per_class=40, size=32)
    store = tmp_path / "store"
    r = limited_cli(["prepare", str(tmp_path / "bars"), "--out", str(store), "--size", "32", "--workers", "1"],
                    cli_env(tmp_path), tmp_path, limit=8192)
    line = one_line_error(r)
    assert f"cannot write the store {store}" in line and "File too large" in line and line.endswith("choose another --out, and run the command again")
    assert not store.exists()


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
                       capture_output=True, timeout=30)
    return r.returncode == 0


_FULL_DISK_DRIVER = """
import contextlib, io, json, os, subprocess, sys
from pathlib import Path
from fastclr.checkpoint import latest_valid_checkpoint, list_checkpoints
from fastclr.cli import main
disk, flags = Path(sys.argv[1]), json.loads(sys.argv[2])

def cli(*args):  # the command's own main in this process, inside the namespace: one interpreter start, not four
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return {"rc": rc, "stderr": err.getvalue()}

def state(run):
    ckpts = list_checkpoints(run)
    step = latest_valid_checkpoint(run)[1]["step"] if ckpts else None
    temps = [p.name for p in run.rglob(".*") if p.name.endswith(".tmp")]
    return {"checkpoints": [p.name for p in ckpts], "step": step, "temporaries": temps,
            "encoder": (run / "encoder.safetensors").exists()}

args = ["pretrain", "--data", "mnist", "--checkpoint-every", "4", *flags]
probe = disk / "probe"
out = {"probe": cli(*args, "--epochs", "1", "--run-dir", str(probe))}
size = max(p.stat().st_size for p in list_checkpoints(probe))
subprocess.run(["rm", "-rf", str(probe)], check=True)
st = os.statvfs(disk)
room = int(2.5 * size) + 128 * 1024  # two checkpoints, config and metrics fit; a third does not
filler = disk / "users-other-files.bin"
filler.write_bytes(b"x" * (st.f_bavail * st.f_frsize - room))
run = disk / "run"
out["first"] = cli(*args, "--epochs", "3", "--run-dir", str(run)); out["after_first"] = state(run)
out["resume_full"] = cli("pretrain", "--resume", str(run)); out["after_resume_full"] = state(run)
filler.unlink()
out["resume_free"] = cli("pretrain", "--resume", str(run)); out["after_resume_free"] = state(run)
print(json.dumps(out))
"""


def test_a_real_full_disk_during_pretrain_and_resume(tmp_path: Path) -> None:
    """tmpfs of 64 MiB filled by another file until two checkpoints fit and a third does not."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("this machine cannot mount a tmpfs in a private mount namespace (unshare -m)")
    env = cli_env(tmp_path)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(_FULL_DISK_DRIVER))
    flags = json.dumps([*TINY_FLAGS])
    cmd = f"mount -t tmpfs -o size=64m tmpfs {disk} && exec {sys.executable} {driver} {disk} '{flags}'"
    r = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["probe"]["rc"] == 0, out["probe"]["stderr"][-2000:]
    for phase in ("first", "resume_full"):
        res = subprocess.CompletedProcess([], out[phase]["rc"], "", out[phase]["stderr"])
        line = one_line_error(res)
        assert "No space left on device" in line or "the writer stopped" in line, line
        assert "is intact" in line and "--resume" in line, line
        kept = out["after_" + phase]
        assert kept["step"] is not None and kept["checkpoints"] and not kept["temporaries"] and not kept["encoder"]
    assert out["after_first"]["step"] == 8  # steps 4 and 8 written, 12 did not fit
    assert out["after_resume_full"]["step"] == 8  # resumed at 8, 12 did not fit again
    assert out["resume_free"]["rc"] == 0, out["resume_free"]["stderr"][-2000:]
    done = out["after_resume_free"]
    assert done["step"] == 24 and done["encoder"] and not done["temporaries"]


@pytest.mark.parametrize("limit, text", [(1536, "1.5 KiB"), (1 << 20, "1.0 MiB"), (10 << 20, "10.0 MiB"),
                                         (3 << 30, "3.0 GiB")])
def test_a_failed_writes_reason_states_the_file_size_limit_in_binary_units(tmp_path: Path, limit: int,
                                                                          text: str) -> None:
    """`ulimit -f` counts KiB of 1024 bytes: a limit of exactly 1 MiB reads "1.0 MiB" (not
    "1024.0 KiB"), 10 MiB "10.0 MiB" (not the 10.5 of decimal megabytes)."""
    from fastclr.files import write_failure_reason

    with file_size_limit(limit):
        reason = write_failure_reason(OSError(errno.EFBIG, "File too large"), tmp_path / "x.bin")
    assert reason.startswith("File too large; ") and reason.endswith(f"; files are limited to {text} (ulimit -f)")


def test_files_written_together_are_renamed_in_the_order_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once every file is written, the final names are replaced in the order given (an array before
    the index of its rows): a rename refused between them leaves the files before it replaced, the
    one refused and those after it as they were, and no temporary behind."""
    import os

    import fastclr.files as files

    a, b, c = (tmp_path / n for n in ("a.npy", "a.csv", "a.json"))
    for p in (a, b, c):
        p.write_bytes(b"old")
    real = os.replace

    def replace(src: str, dst: str | Path) -> None:
        if Path(dst) == b:
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(WriteFailed) as e:
        atomic_write_all([(p, lambda f: f.write(b"new")) for p in (a, b, c)])
    assert e.value.path == b and [p.read_bytes() for p in (a, b, c)] == [b"new", b"old", b"old"]
    assert no_temporaries(tmp_path)


@pytest.mark.skipif(sys.platform == "win32", reason="os.kill ends the process on Windows")
def test_a_stop_signal_during_the_renames_is_taken_after_the_last(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C (here SIGTERM, whose handler raises) arriving after the first rename ran its
    handler there: a new array beside the old index of its rows. It now waits for the last rename,
    and is then raised as before."""
    import os
    import signal

    import fastclr.files as files

    class Stopped(Exception):
        pass

    def stop(signum: int, frame: object) -> None:
        raise Stopped()

    a, b = tmp_path / "a.npy", tmp_path / "a.csv"
    for p in (a, b):
        p.write_bytes(b"old")
    real = os.replace

    def replace(src: str, dst: str | Path) -> None:
        real(src, dst)
        if Path(dst) == a:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # bytecodes enough for a pending handler to run, were it not held
                pass

    monkeypatch.setattr(files.os, "replace", replace)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stopped):
            atomic_write_all([(p, lambda f: f.write(b"new")) for p in (a, b)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [p.read_bytes() for p in (a, b)] == [b"new", b"new"]
    assert no_temporaries(tmp_path)


def test_a_writer_failure_is_told_by_its_own_words_without_the_source_location(tmp_path: Path) -> None:
    """torch's writer raises "[enforce fail at inline_container.cc:672] . unexpected pos ..." on a
    full disk: the reason keeps what it says, not where in torch's C++ it was said."""
    from fastclr.files import write_failure_reason

    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598\nmore detail")
    reason = write_failure_reason(error, tmp_path / "step-000000002.pt")
    assert reason.startswith("the writer stopped: unexpected pos 704 vs 598; ") and "inline_container" not in reason
    assert write_failure_reason(RuntimeError(), tmp_path / "x.pt").startswith("the writer stopped: RuntimeError")


@pytest.mark.parametrize("code, way", [
    (errno.ENOSPC, "free space there or choose another --out"),
    (errno.EDQUOT, "free space there or choose another --out"),
    (errno.EROFS, "choose another --out on a writable file system (or remount it read-write)"),
    (errno.EIO, "check the disk (the system reported an I/O error)"),
])
def test_a_failed_writes_way_out_fits_its_cause(tmp_path: Path, code: int, way: str) -> None:
    """A read-only file system was told to free space (with the space there, beside the point)."""
    from fastclr.files import write_failure_reason, write_way_out

    e = OSError(code, os.strerror(code))
    assert write_way_out(e, "another --out") == way
    reason = write_failure_reason(e, tmp_path / "x.bin")
    assert reason.startswith(e.strerror) and (("free there" in reason) == (code != errno.EROFS))


def test_prepare_onto_a_read_only_file_system_says_to_write_elsewhere(tmp_path: Path) -> None:
    """A real read-only mount (a tmpfs mounted ro in a private mount namespace): one line naming the
    cause and a way out that can work, nothing about free space."""
    if not _can_mount_tmpfs(tmp_path / "probe"):
        pytest.skip("cannot mount a tmpfs here (needs root or user namespaces)")
    bar_images(tmp_path / "bars", n_per_class=4, size=16)
    ro = tmp_path / "ro"
    ro.mkdir()
    argv = [sys.executable, "-m", "fastclr", "prepare", str(tmp_path / "bars"), "--out", str(ro / "store"), "--size",
            "16", "--workers", "1"]
    r = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro,size=64k tmpfs "$0" && exec "$@"', str(ro),
                        *argv], capture_output=True, text=True, env=cli_env(tmp_path), cwd=tmp_path, timeout=240)
    line = one_line_error(r)
    assert line == (f"error: cannot write {ro / 'store'} (Read-only file system); files already complete were kept; "
                    "choose another place on a writable file system (or remount it read-write), and run the command "
                    "again")


def test_a_name_of_up_to_255_bytes_is_written_and_a_longer_one_is_named_as_too_long(tmp_path: Path) -> None:
    """`.NAME.XXXXXXXX.tmp` of a valid name of 238 to 255 bytes passed the file system's 255-byte
    limit: the write failed, and its message blamed the disk ("56.0 GiB free there ... free space")."""
    from fastclr.files import write_failure_reason, write_way_out

    longest = tmp_path / ("é" * 120 + "x" * 15)  # 255 bytes in UTF-8
    assert len(longest.name.encode()) == 255
    atomic_write(longest, lambda f: f.write(b"whole"))
    assert longest.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == [longest.name]
    with pytest.raises(WriteFailed) as e:
        atomic_write(tmp_path / ("x" * 256), lambda f: f.write(b"whole"))
    cause = e.value.cause
    assert isinstance(cause, OSError) and cause.errno == errno.ENAMETOOLONG
    assert write_failure_reason(cause, tmp_path / ("x" * 256)) == os.strerror(errno.ENAMETOOLONG)  # no free space
    assert write_way_out(cause, "another place") == "choose a shorter name (255 bytes at most on most file systems)"
    assert [p.name for p in tmp_path.iterdir()] == [longest.name]
