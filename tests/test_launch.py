"""`fastclr-torchrun`: torchrun's launcher with fastclr's exit codes. A stop signal, whether it
reaches the launcher (which forwards it) or only the ranks, ends in exit 75 with the stop step
checkpointed, and the same launcher resumes the run to its end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env
from dist_helpers import free_port
from fastclr.checkpoint import latest_valid_checkpoint, list_checkpoints, load_checkpoint
from fastclr.scaleout import launch
from fastclr.scaleout.launch import share_cpus
from tiny import TINY_FLAGS as TINY


def launcher(run: Path, *extra: str) -> list[str]:
    """`fastclr-torchrun --nproc_per_node=2 -m fastclr pretrain ...` for a tiny 5-epoch run (40 steps:
    a stop after the second checkpoint has 38 steps, not 14 (1.4 s here), to land before the end)."""
    return [sys.executable, "-m", "fastclr.scaleout.launch", "--nproc_per_node=2", "--master_port", str(free_port()),
            "-m", "fastclr", "pretrain", "--data", "mnist", "--epochs", "5", "--run-dir", str(run), *TINY,
            "--checkpoint-every", "1", "--probe", "false", "--device", "cpu", "--threads", "1", *extra]


def children(pid: int) -> list[int]:
    """The direct child processes of `pid` (torchrun's ranks), from /proc."""
    found = []
    for thread in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (thread / "children").read_text().split()]
    return found


def stop_mid_run(tmp_path: Path, target: str) -> tuple[subprocess.CompletedProcess[str], Path, dict[str, str]]:
    """Start the launcher, wait for two checkpoints, send SIGTERM to `target` ("group": the
    launcher and its ranks, as a terminal's Ctrl-C or a scheduler does; "ranks": the ranks only)."""
    env, run = cli_env(tmp_path), tmp_path / "run"
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.Popen(launcher(run), env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        end = time.monotonic() + 120
        while len(list_checkpoints(run)) < 2 and time.monotonic() < end and p.poll() is None:
            time.sleep(0.05)
        assert p.poll() is None and len(list_checkpoints(run)) >= 2, "the run ended or was too slow"
        if target == "group":  # three times, as an impatient Ctrl-C: the launcher still waits for its ranks
            for _ in range(3):
                os.killpg(p.pid, signal.SIGTERM)
                time.sleep(0.2)
        else:
            ranks = children(p.pid)
            assert len(ranks) == 2, ranks
            for r in ranks:
                os.kill(r, signal.SIGTERM)
        out, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), run, env


@pytest.mark.parametrize("target", ["group", "ranks"])
def test_a_stop_under_the_launcher_exits_75_and_resumes_to_the_end(tmp_path: Path, target: str) -> None:
    r, run, env = stop_mid_run(tmp_path, target)
    assert r.returncode == 75, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "continue with" in r.stderr.splitlines()[-1]
    stopped = latest_valid_checkpoint(run)[1]["step"]
    assert 2 <= stopped < 40 and r.stdout.count("stopped at step") == 1  # rank 0 says it, once, with the launcher
    assert f"stopped at step {stopped}; checkpoint written; continue with the same fastclr-torchrun command and " \
           f"--resume {run}" in r.stdout
    if target == "ranks":
        return  # the resume below is the same for both ways of stopping
    done = subprocess.run(launcher(run, "--resume", str(run)), env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(list_checkpoints(run)[-1])["step"] == 40


def test_a_rank_that_fails_with_one_line_gives_exit_2_not_a_traceback(tmp_path: Path) -> None:
    """A setting error every rank finds alike: its line is printed once on the node, not once a
    rank, the launcher exits 2 and adds one line, and leaves no folder behind."""
    env = cli_env(tmp_path)
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    r = subprocess.run(launcher(tmp_path / "run", "--temperature", "-1"), env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if "temperature" in line] == [
        "error: train.temperature = -1.0 is not allowed: it must be >= 1e-06; e.g. --temperature 0.2"], r.stderr[-3000:]
    assert r.stderr.splitlines()[-1].startswith("error: a rank ended with an error")
    assert list((tmp_path / "tmp").glob("fastclr-torchrun-*")) == []  # torchrun's own folder is its own


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_ranks_one_line_error_leaves_without_interpreter_finalisation(world: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A torchrun rank's error leaves through os._exit, as its result does: a normal exit can abort
    in the communication library's thread destructors (-6 and a traceback instead of the 2 documented).
    One process returns the code as any command does."""
    from fastclr import cli

    left: list[int] = []

    def exit_now(code: int) -> None:
        left.append(code)
        raise SystemExit(code)
    monkeypatch.setattr(cli, "_exit_now", exit_now)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(SystemExit) if world == "2" else contextlib.nullcontext():
        code = cli.main(["pretrain", str(tmp_path / "run"), "--temperature", "-1"])
    assert left == ([2] if world == "2" else []) and (world == "2" or code == 2)
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "run").exists()


@pytest.mark.parametrize("nproc, cpus, preset, expected", [
    (8, 64, None, 8),    # eight GPUs on a 64-core node: eight threads a rank, not torchrun's one
    (2, 2, None, 1),
    (3, 2, None, 1),     # more ranks than CPUs: still one each
    (2, 3, None, 1),     # a share rounds down: 2 x 2 threads would take turns on 3 CPUs
    (1, 16, None, None),  # one rank: PyTorch's own count, as without the launcher
    (4, 64, "2", None),  # the user's OMP_NUM_THREADS stands
])
def test_each_rank_gets_its_share_of_the_node_cpus(nproc: int, cpus: int, preset: str | None,
                                                   expected: int | None) -> None:
    environ = {} if preset is None else {"OMP_NUM_THREADS": preset}
    assert share_cpus(nproc, cpus, environ) == expected
    assert environ.get("OMP_NUM_THREADS") == (preset if expected is None else str(expected))


def test_the_launcher_starts_torchrun_with_the_share_set(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []
    monkeypatch.setenv("OMP_NUM_THREADS", "unset below; restored after the test")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(launch, "usable_cpus", lambda: 16)
    # main installs its stop handler in torch's elastic module: put torch's own back afterwards
    monkeypatch.setattr(launch.elastic_api, "_terminate_process_handler", launch.elastic_api._terminate_process_handler)
    monkeypatch.setattr(launch, "run", lambda args: seen.append(os.environ.get("OMP_NUM_THREADS")))
    assert launch.main(["--nproc_per_node=4", "-m", "fastclr", "pretrain"]) == 0
    assert seen == ["4"]


@pytest.mark.parametrize("codes, expected", [
    # rank 1 killed outright (the OOM killer); rank 0 then lost its peer (2), rank 2 was ended by torchrun
    ({0: 2, 1: -signal.SIGKILL, 2: -signal.SIGTERM},
     "error: rank 1 was killed by SIGKILL (the kernel's out-of-memory killer sends it, as do kill -9 and torchrun "
     "ending a rank that hung)"),
    # NCCL's watchdog aborts the survivors (SIGABRT): the segfault is the cause
    ({0: -signal.SIGABRT, 3: -signal.SIGSEGV}, "error: rank 3 was killed by SIGSEGV"),
    ({0: 1, 1: -signal.SIGTERM}, "error: rank 0 failed with exit code 1 (its output above says why)"),
])
def test_a_rank_killed_or_crashed_is_named_in_one_line_not_a_traceback(
        codes: dict[int, int], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`kill -9` of a rank gave the launcher's 30-line traceback around torchrun's table, exit 1."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failures = {r: ProcessFailure(local_rank=r, pid=1000 + r, exitcode=c, error_file=str(tmp_path / "none"))
                for r, c in codes.items()}
    for f in failures.values():
        f.timestamp = 1  # one poll of torchrun's saw them all
    monkeypatch.setattr(launch.elastic_api, "_terminate_process_handler", launch.elastic_api._terminate_process_handler)

    def failed(args: object) -> None:
        raise ChildFailedError("fastclr", failures)
    monkeypatch.setattr(launch, "run", failed)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launch.main(["--nproc_per_node=4", "-m", "fastclr", "pretrain"]) == 1
    err = capsys.readouterr().err
    assert err == (f"{expected}; a run's last checkpoint, if it wrote one, is kept: once the cause is fixed, "
                   "continue with the same command and --resume auto RUN_DIR (afresh where none was written)\n")


def _failed_launch(codes: dict[int, tuple[int, float]], monkeypatch: pytest.MonkeyPatch) -> int:
    """`launch.main` where torchrun reports these ranks' (exit code, time of failure)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failures = {r: ProcessFailure(local_rank=r, pid=1000 + r, exitcode=c, error_file="/nonexistent/error.json")
                for r, (c, _) in codes.items()}
    for r, f in failures.items():
        f.timestamp = int(codes[r][1])
    monkeypatch.setattr(launch.elastic_api, "_terminate_process_handler", launch.elastic_api._terminate_process_handler)

    def failed(args: object) -> None:
        raise ChildFailedError("fastclr", failures)
    monkeypatch.setattr(launch, "run", failed)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return launch.main(["--nproc_per_node=4", "-m", "fastclr", "pretrain"])


def test_the_rank_named_is_the_one_that_failed_first(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Two ranks crashed on their own: the earlier failure is the cause, whichever rank number it has."""
    assert _failed_launch({1: (1, 7.0), 2: (-signal.SIGSEGV, 5.0), 0: (-signal.SIGTERM, 8.0)}, monkeypatch) == 1
    assert capsys.readouterr().err.startswith("error: rank 2 was killed by SIGSEGV;")


@pytest.mark.parametrize("codes, expected", [
    ({0: (75, 1.0), 1: (-signal.SIGTERM, 1.0)}, 75),  # rank 1 ended by torchrun before its handler was in
    ({0: (2, 1.0), 1: (-signal.SIGTERM, 1.0)}, 2),
])
def test_ranks_ended_by_torchrun_after_a_stop_or_a_one_line_error_do_not_change_the_exit_code(
        codes: dict[int, tuple[int, float]], expected: int, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert _failed_launch(codes, monkeypatch) == expected
    assert "Traceback" not in capsys.readouterr().err


def test_nodes_that_never_meet_or_a_port_that_is_none_are_one_line(tmp_path: Path) -> None:
    """One node of two started alone waited out the rendezvous in silence, then ended in a 40-80
    line traceback (exit 1); a port past 65535 was a ValueError traceback. Each is one line, exit 2."""
    env = cli_env(tmp_path)
    tail = ["-m", "fastclr", "pretrain", "--data", "mnist", "--epochs", "0.1", "--run-dir", str(tmp_path / "run"), *TINY,
            "--device", "cpu"]
    port = free_port()
    alone = [sys.executable, "-m", "fastclr.scaleout.launch", "--nnodes=2", "--node_rank=0", "--nproc_per_node=1",
             "--master_addr=127.0.0.1", f"--master_port={port}", "--rdzv-conf", "timeout=3", *tail]
    r = subprocess.run(alone, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1].startswith("error: the nodes did not meet (")
    assert r.stderr.splitlines()[-1].endswith(f"start every node with the same --nnodes (2) and rendezvous address "
                                              f"(127.0.0.1:{port}), all within the rendezvous timeout (--rdzv-conf "
                                              "timeout=SECONDS), and check that this host can reach it")
    bad = [sys.executable, "-m", "fastclr.scaleout.launch", "--nproc_per_node=1", "--master_port=295001", *tail]
    r = subprocess.run(bad, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --master_port 295001 is not a TCP port (1-65535); give the same free port on every node"]
    assert not (tmp_path / "run").exists()


def test_arguments_torchrun_met_with_a_traceback_are_one_line_before_anything_starts(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """c10d's rendezvous timeout carries no text (the launcher's own line then failed with an
    IndexError traceback), and c10d reads `join_timeout`, not the static form's `timeout`; a process
    count of 0 or of 'abc' was torchrun's traceback; restarts of CPU (gloo) ranks hang in this torch."""
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    from fastclr.scaleout import launch

    started: list[object] = []
    monkeypatch.setattr(launch, "run", started.append)
    tail = ["-m", "fastclr", "pretrain"]
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: False)
    for nproc, why in (("0", "not a count of 1 or more"), ("abc", "Unsupported nproc_per_node value: abc")):
        assert launch.main(["--standalone", f"--nproc_per_node={nproc}", *tail]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: --nproc_per_node {nproc} ({why}); give the processes to start on this node: a count of 1 or "
            "more, or cpu or auto (no GPU is visible here)"]
    assert launch.main(["--standalone", "--nproc_per_node=2", "--max-restarts=1", *tail]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: --max-restarts 1: a restarted round of CPU")
    assert started == []
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: True)  # NCCL's own rendezvous: left to torchrun
    assert launch.main(["--standalone", "--nproc_per_node=1", "--max-restarts=1", *tail]) == 0 and len(started) == 1

    def never_met(args: object) -> None:
        raise RendezvousTimeoutError()

    monkeypatch.setattr(launch, "run", never_met)
    c10d = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:29562", *tail]
    assert launch.main(c10d) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: the nodes did not meet (RendezvousTimeoutError); start every node with the same --nnodes (2) and "
        "rendezvous address (127.0.0.1:29562), all within the rendezvous timeout (--rdzv-conf join_timeout=SECONDS), "
        "and check that this host can reach it")


def test_torchruns_failure_record_is_dropped_only_for_ranks_that_said_why() -> None:
    """torchrun logs "failed (exitcode: N) ... of binary" as an error for any failed rank; for a fastclr
    rank's 2 (its one line said why) and 75 (stopped, resumable) it repeated them under the launcher's
    own line, and a crash or a kill keeps it."""
    import logging

    from fastclr.scaleout.launch import said_exit

    def record(code: int, msg: str = "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s") -> logging.LogRecord:
        return logging.LogRecord("torch.distributed.elastic.multiprocessing.api", logging.ERROR, "api.py", 1002, msg,
                                 (code, 0, 123, "python"), None)
    assert [said_exit(record(c)) for c in (2, 75, 1, -9, -6)] == [False, False, True, True, True]
    assert said_exit(record(2, msg="Sending process %s closing signal %s %s %s"))
    # torchrun's own wording, as this torch logs it, is what the filter reads
    import inspect

    import torch.distributed.elastic.multiprocessing.api as api
    assert '"failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s"' in inspect.getsource(api)
