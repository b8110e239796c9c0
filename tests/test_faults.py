"""Fault injection: each test injects a fault and checks the promised outcome (README "Guarantees")."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import call_main, cli_env
from tiny import TINY_FLAGS as TINY
from fastclr.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from fastclr.errors import FastclrError
from fastclr.runs import prepare_run_dir
from fastclr.pretraining.losses import nt_xent
from fastclr.signals import EXIT_STOPPED, STOP_SIGNALS, graceful_stop


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path)


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fastclr", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=cwd)


def wait_for(cond, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def metric_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    ended = text[: text.rfind("\n") + 1]  # a line still being appended is not read
    return [json.loads(line)["step"] for line in ended.splitlines() if line.strip() and '"loss"' in line]


def test_sigkill_at_random_moments_during_checkpoint_writes_never_loses_the_run(tmp_path: Path, env: dict[str, str]) -> None:
    """A checkpoint every step, with a wide head so each write takes a while. SIGKILL many times:
    at random moments, and as soon as a temporary checkpoint file appears (inside a write). Every
    file under a checkpoint's name always verifies, and the run resumes to the end."""
    run = tmp_path / "run"
    args = ["pretrain", "--resume", "auto", str(run), "--data", "mnist", "--epochs", "4", *TINY,
            "--head-hidden", "8192", "--checkpoint-every", "1", "--monitor-every", "0", "--probe", "false"]
    rng = random.Random(0)
    temps = lambda: list((run / "checkpoints").glob(".step-*.tmp"))  # noqa: E731
    killed_mid_write, best = 0, 0
    for i in range(6):  # three kills at random moments, three as soon as a write has begun
        proc = start(args, env, tmp_path)
        before = {p.name for p in list_checkpoints(run)}
        try:
            if i % 2:
                wait_for(lambda b=before, q=proc: {p.name for p in list_checkpoints(run)} - b or q.poll() is not None)
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                wait_for(lambda q=proc: temps() or q.poll() is not None)
        finally:
            proc.kill()
            proc.wait()
        killed_mid_write += bool(temps())
        for p in list_checkpoints(run):
            load_checkpoint(p)  # raises if any checkpoint-named file is incomplete or damaged
        if list_checkpoints(run) or best:  # once a checkpoint was complete, one always verifies
            _, state = latest_valid_checkpoint(run)
            assert state["step"] >= best
            best = state["step"]
    assert killed_mid_write >= 2, "too few kills landed inside a write; the test did not exercise what it claims"
    done = call_main(args, env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(list_checkpoints(run)[-1])["step"] == 32
    assert not temps()


def test_enospc_during_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(3)})

    def full_disk(obj, f):  # type: ignore[no-untyped-def]
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fastclr.checkpoint.torch.save", full_disk)
    with pytest.raises(FastclrError) as e:
        save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(3)})
    msg = str(e.value)
    assert "No space left on device" in msg and "step-000000001.pt written before is intact" in msg and "--resume" in msg
    assert list_checkpoints(tmp_path) == [good]
    assert torch.equal(load_checkpoint(good)["w"], torch.ones(3))
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_enospc_in_a_real_run_exits_2_with_an_explanation(tmp_path: Path, env: dict[str, str]) -> None:
    """The CLI in a subprocess whose second checkpoint write hits ENOSPC."""
    run = tmp_path / "run"
    script = f"""
import errno, sys, torch, fastclr.checkpoint as c
real, calls = torch.save, []
def save(obj, f):
    calls.append(1)
    if len(calls) == 2:
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    real(obj, f)
c.torch.save = save
from fastclr.cli import main
sys.exit(main({["pretrain", "--data", "mnist", "--epochs", "3", "--run-dir", str(run), *TINY]!r}))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "No space left on device" in r.stderr and "step-000000008.pt written before is intact" in r.stderr
    _, state = latest_valid_checkpoint(run)
    assert state["step"] == 8


def test_a_run_whose_every_checkpoint_is_damaged_says_a_way_out_that_works(tmp_path: Path) -> None:
    """It said "start a new run", and a new run in that directory was refused ("already holds a
    run; continue it with --resume"): the advice went round in a circle. And `--resume FILE` was
    "no such run directory" though the path exists."""
    from fastclr.cli import resume_config

    path = save_checkpoint(tmp_path, {"step": 3, "w": torch.arange(4.0)}, keep=5)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FastclrError, match=rf"; start a new run with another --run-dir \(this one is refused while it "
                                           rf"holds them\), or move {re.escape(str(tmp_path / 'checkpoints'))} away$"):
        latest_valid_checkpoint(tmp_path)
    (tmp_path / "config.toml").write_text("", encoding="utf-8")  # as a run's directory holds it
    with pytest.raises(FastclrError, match=r"already holds a run"):
        prepare_run_dir(tmp_path)  # why the old advice could not be followed
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FastclrError, match=rf"^--resume {re.escape(str(tmp_path / 'afile'))}: a file, not a run "
                                           r"directory; give the directory of an earlier run$"):
        resume_config(tmp_path / "afile", None)  # type: ignore[arg-type]
    # an empty folder: what is wrong, and (it said nothing more) what to give instead
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastclrError, match=rf"^{re.escape(str(tmp_path / 'empty'))} holds no config.toml; it is not a "
                                           r"fastclr run directory: give the directory an earlier `fastclr pretrain` "
                                           r"wrote \(`--resume auto` starts a run where there is none\)$"):
        resume_config(tmp_path / "empty", None)  # type: ignore[arg-type]


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip-bytes"])
def test_auto_resume_skips_a_damaged_newest_checkpoint_and_says_so(tmp_path: Path, damage: str) -> None:
    old = save_checkpoint(tmp_path, {"step": 3, "w": torch.arange(4.0)}, keep=5)
    new = save_checkpoint(tmp_path, {"step": 6, "w": torch.arange(4.0) * 2}, keep=5)
    raw = new.read_bytes()
    if damage == "truncate":
        new.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        new.write_bytes(b"")
    else:  # same size, a tensor byte changed: only the checksum can tell
        state = torch.load(new, weights_only=True)
        state["w"][0] = 99.0
        torch.save(state, new)
    messages: list[str] = []
    path, state = latest_valid_checkpoint(tmp_path, warn=messages.append)
    assert path == old and state["step"] == 3
    assert len(messages) == 1 and new.name in messages[0]


def test_rotation_after_a_skipped_damaged_checkpoint_keeps_the_good_ones(tmp_path: Path) -> None:
    """Resumed from step 3 past a damaged step 6, the run saves 4 and 5: rotation by name kept the
    damaged 6 and deleted the good ones, leaving one valid checkpoint. Now the two newest up to the
    step written stay, and the damaged one is replaced when the run reaches its step."""
    for step in (3, 6):
        save_checkpoint(tmp_path, {"step": step, "w": torch.arange(4.0) * step})
    damaged = list_checkpoints(tmp_path)[-1]
    damaged.write_bytes(b"")
    for step in (4, 5):
        save_checkpoint(tmp_path, {"step": step, "w": torch.arange(4.0) * step})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000004.pt", "step-000000005.pt", damaged.name]
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path)[:2]] == [4, 5]
    save_checkpoint(tmp_path, {"step": 6, "w": torch.arange(4.0) * 6})
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path)] == [5, 6]


def test_cli_auto_resume_reports_the_damaged_file_by_name(tmp_path: Path, env: dict[str, str]) -> None:
    run = tmp_path / "run"
    args = ["pretrain", "--data", "mnist", "--epochs", "2", "--run-dir", str(run), *TINY, "--probe", "false"]
    assert call_main(args, env, tmp_path).returncode == 0
    newest = list_checkpoints(run)[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    r = call_main(["pretrain", "--resume", "auto", str(run), "--quiet", "--probe", "false"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"skipping {newest.name}" in r.stdout and "from step-000000008.pt" in r.stdout


def test_sigterm_mid_epoch_checkpoints_exits_75_and_resumes_exactly(tmp_path: Path, env: dict[str, str]) -> None:
    common = ["--data", "mnist", "--epochs", "2", *TINY, "--log-every", "1", "--monitor-every", "0", "--probe", "false",
              "--head-hidden", "256", "--batch-size", "16"]  # 16 steps per epoch
    straight = tmp_path / "straight"
    assert call_main(["pretrain", "--run-dir", str(straight), *common], env, tmp_path).returncode == 0
    run = tmp_path / "stopped"
    proc = start(["pretrain", "--run-dir", str(run), *common], env, tmp_path)
    wait_for(lambda: len(metric_steps(run)) >= 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, err
    stopped_at = load_checkpoint(list_checkpoints(run)[-1])["step"]
    assert "SIGTERM received" in err and out.count("stopped at step") == 1  # said once, by the loop
    assert f"stopped at step {stopped_at}; checkpoint written; continue with `fastclr pretrain --resume {run}`" in out
    assert 3 <= stopped_at < 32
    r = call_main(["pretrain", "--resume", str(run), "--quiet"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    a = load_checkpoint(list_checkpoints(straight)[-1])
    b = load_checkpoint(list_checkpoints(run)[-1])
    assert a["step"] == b["step"] == 32
    for part in ("encoder", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    # the learning rate and the loss (so the data and augmentations) agree at every logged step
    la = {r["step"]: (r["lr"], r["loss"]) for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())
          if "loss" in r}
    lb = {r["step"]: (r["lr"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
          if "loss" in r}
    assert set(la) == set(lb) == set(range(1, 33))
    assert all(la[s] == lb[s] for s in la)


def test_repeated_signals_while_stopping_do_not_corrupt(tmp_path: Path, env: dict[str, str]) -> None:
    """Ctrl-C hammered during stopping, checkpointing and interpreter shutdown: still exit 75, valid files.

    CI once caught a second SIGINT landing after the handler was restored (KeyboardInterrupt in
    torch's atexit); the signals below are spread to hit the loop, the write and the teardown."""
    run = tmp_path / "run"
    proc = start(["pretrain", "--run-dir", str(run), "--data", "mnist", "--epochs", "4", *TINY, "--log-every", "1",
                  "--head-hidden", "1024", "--monitor-every", "0", "--probe", "false"], env, tmp_path)
    wait_for(lambda: len(metric_steps(run)) >= 2)
    for _ in range(200):
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert list_checkpoints(run)
    for p in list_checkpoints(run):
        load_checkpoint(p)


def test_graceful_stop_acknowledges_further_signals_and_keeps_handling_them(capsys: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGINT)
    with graceful_stop() as stop:
        assert not stop(0)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the Python-level handler runs at the next bytecode boundary
        assert stop(1) and stop.signal == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
    err = capsys.readouterr().err
    assert "SIGINT received: writing a checkpoint" in err
    assert "SIGINT received again: already stopping" in err
    # stopped: the acknowledging handler stays until exit instead of the previous one
    assert signal.getsignal(signal.SIGINT) is not before
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    assert "already stopping" in capsys.readouterr().err
    signal.signal(signal.SIGINT, before)


def test_graceful_stop_restores_handlers_when_not_stopped() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with graceful_stop() as stop:
        assert signal.getsignal(signal.SIGTERM) is not before
    assert not stop(0)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stopped_process_ignores_the_stop_signals_from_its_first_exit_callback_on(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Once a stop was asked for, graceful_stop leaves an exit callback that ignores every stop
    signal: interpreter shutdown resets handlers to the default action, which would turn a late
    Ctrl-C into a kill (exit -2) instead of exit 75."""
    import atexit

    from fastclr.signals import STOP_SIGNALS

    callbacks: list[tuple[object, tuple[object, ...]]] = []
    monkeypatch.setattr(atexit, "register", lambda fn, *args: callbacks.append((fn, args)))
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        with graceful_stop() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        assert stop.signal == signal.SIGTERM and len(callbacks) == 1
        fn, args = callbacks[0]
        fn(*args)  # type: ignore[operator]
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in STOP_SIGNALS)
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    capsys.readouterr()


def test_a_signal_after_an_interruptible_phase_asks_for_a_checkpoint_again(capsys: pytest.CaptureFixture[str]) -> None:
    """Inside interruptible() a stop signal ends the phase at once; once the phase is over (it
    returned), a signal is again a request to stop at the next step, not an exception."""
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        with graceful_stop() as stop:
            with stop.interruptible():
                pass
            assert not stop.raising
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs here: with the phase still raising, StopRequested
            assert stop(1) and stop.signal == signal.SIGINT
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    assert "SIGINT received: writing a checkpoint at the next step" in capsys.readouterr().err


def test_malicious_pickle_as_checkpoint_is_refused_without_running(tmp_path: Path, env: dict[str, str]) -> None:
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text('[data]\nname = "mnist"\n')
    evil = run / "checkpoints" / "step-000000005.pt"
    torch.save({"step": 5, "format": 1, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    for args in (["pretrain", "--resume", str(run), "--quiet"], ["evaluate", str(run), "--quiet"],
                 ["embed", str(run), "--data", "mnist", "--out", str(tmp_path / "feats")]):
        r = call_main(args, env, tmp_path)
        assert r.returncode == 2 and "refusing to load" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert "(Trying to load unsupported GLOBAL posix.system" in r.stderr  # what it holds, not torch's preamble
        assert not marker.exists()
    # a plain pickle file (not even torch's zip format) is refused too, without torch's warning about its protocol
    evil.write_bytes(pickle.dumps(Payload()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = call_main(["pretrain", "--resume", str(run), "--quiet"], env, tmp_path)
    assert r.returncode == 2 and not marker.exists()
    assert "it is not a plain-tensor checkpoint (Unsupported operand" in r.stderr, r.stderr
    assert not [w for w in caught if "pickle protocol" in str(w.message)]


def test_resume_with_a_changed_batch_size_is_refused_naming_the_key_and_a_changed_network_always(
        tmp_path: Path, env: dict[str, str]) -> None:
    run = tmp_path / "run"
    assert call_main(["pretrain", "--data", "mnist", "--epochs", "1", "--run-dir", str(run), *TINY, "--probe", "false"],
                    env, tmp_path).returncode == 0
    r = call_main(["pretrain", "--resume", str(run), "--batch-size", "16", "--quiet"], env, tmp_path)
    assert r.returncode == 2 and "train.batch_size (16 here, 32 in the checkpoint) differs from the checkpoint's " \
        "config; give its value (--batch-size 32), or pass --allow-config-change to change it deliberately" in r.stderr
    # The network and the optimiser cannot change even when asked: the checkpoint's weights and
    # optimiser state would not fit (it crashed after rewriting config.toml). Refused before any write.
    saved = (run / "config.toml").read_bytes()
    for flags, keys in ((["--encoder", "resnet18"], "model.encoder"), (["--optimizer", "lars"], "optim.optimizer"),
                        (["--width", "0.25", "--learn-temperature", "true"], "model.width, train.learn_temperature")):
        r = call_main(["pretrain", "--resume", str(run), *flags, "--allow-config-change", "--quiet"], env, tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"cannot resume: {keys} differ{'' if ',' in keys else 's'} from" in r.stderr
        assert f"--init {run / 'encoder.safetensors'}" in r.stderr
        assert (run / "config.toml").read_bytes() == saved
    (run / "encoder.safetensors").unlink()  # as an unfinished run: checkpoints only, so the way out exports first
    r = call_main(["pretrain", "--resume", str(run), "--encoder", "resnet18", "--quiet"], env, tmp_path)
    assert r.returncode == 2 and f"(`fastclr export {run} --out weights.safetensors`, then --init weights.safetensors)" \
        in r.stderr
    r = call_main(["pretrain", "--resume", str(run), "--batch-size", "16", "--epochs", "2", "--allow-config-change",
                  "--quiet", "--probe", "false"], env, tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_is_finite_at_temperature_001_under_low_precision_autocast(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 64)
    x = torch.randn(256, 32) * 10  # large activations: logits up to 1/t = 100
    with torch.autocast("cpu", dtype=dtype):
        z = layer(x)
        assert z.dtype == dtype
        loss = nt_xent(*z.chunk(2), 0.01)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    # and it is the loss of those z: the logits are computed in float32 (fp16 logits at 1/t = 100
    # stay finite but are each off by up to 0.05)
    from test_losses import reference_nt_xent

    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_nt_xent(*z.detach().double().chunk(2), 0.01).item(), rel=1e-5)


def test_checkpoints_carry_version_and_checksum(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, {"step": 2, "rng": torch.get_rng_state()})
    raw = torch.load(path, weights_only=True)
    assert raw["fastclr_version"] and len(raw["sha256"]) == 64 and raw["rng"].dtype == torch.uint8


def test_a_run_directory_belongs_to_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A second pretrain on a directory a live run is writing is refused by the owner's PID and
    host; once that run is killed, its lock is taken over and said so. The owner is a subprocess;
    the others run in this process, through the command's own main."""
    from fastclr.cli import main

    env, run = cli_env(tmp_path), tmp_path / "run"
    for key in ("FASTCLR_DATA", "XDG_CACHE_HOME"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.chdir(tmp_path)
    args = ["pretrain", "--data", "mnist", "--epochs", "200", "--run-dir", str(run), *TINY, "--probe", "false",
            "--checkpoint-every", "1", "--monitor-every", "0"]
    first = subprocess.Popen([sys.executable, "-m", "fastclr", *args], env=env, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 90
        while not list_checkpoints(run) and time.monotonic() < end and first.poll() is None:
            time.sleep(0.05)
        assert list_checkpoints(run), first.stderr.read() if first.poll() is not None else "too slow"
        capsys.readouterr()
        assert main(["pretrain", "--resume", str(run), "--quiet"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: {run} is being written by PID {first.pid} on {socket.gethostname()}; "
            "wait for it to finish (or stop it), or choose another --run-dir")
        assert main(args) == 2  # a new run over it
        assert "already holds a run" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait(10)
    assert main(["pretrain", "--resume", str(run), "--epochs", "0.5", "--quiet", "--allow-config-change"]) == 0
    assert f"took over {run / '.lock'} from PID {first.pid} on {socket.gethostname()}, which is no longer running" \
        in capsys.readouterr().out
    assert not (run / ".lock").exists()  # released at the end


def test_a_run_that_finishes_while_another_waits_for_its_lock_is_not_written_into(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new run looks at its directory, then takes its lock, waiting up to half a second for an
    owner. A run that finished and let go in that half second was taken: its TensorBoard events were
    deleted, and config.toml, metrics.jsonl and encoder.safetensors became the second run's. Here the
    other run finishes into the directory just before the lock is taken; the look is made again
    with the lock held, and the finished run is left as it was."""
    import shutil

    import fastclr.pretraining.loop as loop
    from fastclr.pretraining.loop import pretrain
    from tiny import tiny_config, tiny_dataset

    ds, done, run = tiny_dataset(), tmp_path / "done", tmp_path / "run"
    pretrain(tiny_config(done, train__epochs=1.0), dataset=ds, progress=False, log=lambda s: None)
    run.mkdir()
    real = loop.RunLock

    def finishing_first(run_dir: Path, log: object) -> object:  # the other run's last writes, then its lock let go
        shutil.copytree(done, run_dir, dirs_exist_ok=True)
        return real(run_dir, log)

    monkeypatch.setattr(loop, "RunLock", finishing_first)
    before = {p.relative_to(done): p.read_bytes() for p in done.rglob("*") if p.is_file()}
    assert {Path("encoder.safetensors"), Path("config.toml"), Path("metrics.jsonl")} <= set(before)
    with pytest.raises(FastclrError, match=re.escape(f"{run} already holds a run; continue it with `fastclr pretrain "
                                                     f"--resume {run}`, or choose a new --run-dir")):
        pretrain(tiny_config(run, train__epochs=1.0, train__seed=7), dataset=ds, progress=False, log=lambda s: None)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_a_directory_of_the_users_files_is_never_a_run_directory(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    mine = tmp_path / "notes"
    (mine / "sub").mkdir(parents=True)
    (mine / "data.csv").write_text("a,b\n1,2\n")
    before = sorted(str(p.relative_to(mine)) for p in mine.rglob("*"))
    r = call_main(["pretrain", "--data", "mnist", "--epochs", "1", "--run-dir", str(mine), *TINY], env, tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: --run-dir {mine} holds files that are not a fastclr run (data.csv, sub); nothing was written: "
        "choose a new --run-dir")
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == before
    (tmp_path / "afile").write_text("x")
    r = call_main(["pretrain", "--data", "mnist", "--epochs", "1", "--run-dir", str(tmp_path / "afile"), *TINY], env,
                 tmp_path)
    assert r.returncode == 2 and "is a file, not a directory" in r.stderr
    store = tmp_path / "store"  # what makes a folder a store: its store.json and images.u8
    store.mkdir()
    (store / "store.json").write_text("{}")
    (store / "images.u8").write_bytes(b"")
    r = call_main(["pretrain", "--data", "mnist", "--epochs", "1", "--run-dir", str(store / "run"), *TINY], env,
                 tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (f"error: --run-dir {store / 'run'} is inside the store {store}, "
                                                      "whose files fastclr reads; choose a --run-dir outside it")
    assert sorted(p.name for p in store.iterdir()) == ["images.u8", "store.json"]
    # The default name (runs/DATA-TIME, claimed by making it) started inside the store: refused alike, and the
    # folders it claimed are removed (they made the store refuse its next update, as holding 'runs').
    r = call_main(["pretrain", "--data", "mnist", "--epochs", "1", *TINY], env, store)
    assert r.returncode == 2 and "is inside the store" in r.stderr, r.stderr
    assert sorted(p.name for p in store.iterdir()) == ["images.u8", "store.json"]


def test_files_follow_the_users_umask(tmp_path: Path) -> None:
    """In a process of its own: fastclr reads the umask it starts under."""
    env, run = cli_env(tmp_path), tmp_path / "run"
    r = subprocess.run(["sh", "-c", f"umask 022 && exec {sys.executable} -m fastclr pretrain --data mnist --epochs 1 "
                        f"--run-dir {run} {' '.join(TINY)} --probe false"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    for p in [run / "encoder.safetensors", run / "config.toml", *list_checkpoints(run)]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_a_stop_during_the_final_probe_ends_it_at_once_and_keeps_the_encoder(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while the probe runs (here: a probe that would take 60 s) ends the probe within
    seconds; training is complete, so the encoder is exported and the run says it was stopped in
    the probe; nothing half-written remains."""
    import fastclr.pretraining.loop as loop
    from fastclr.pretraining import pretrain
    from tiny import tiny_config, tiny_dataset

    def slow_probe(*args: object) -> object:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        raise AssertionError("the probe was not interrupted")

    monkeypatch.setattr(loop, "final_probe", slow_probe)
    t0 = time.monotonic()
    with graceful_stop() as stop:
        res = pretrain(tiny_config(tmp_path, eval__probe=True, train__epochs=1.0), dataset=tiny_dataset(),
                       progress=False, log=lambda s: None, stop=stop)
    assert time.monotonic() - t0 < 30
    assert res.stopped and res.stopped_in == "probe" and res.steps == 6
    assert (tmp_path / "encoder.safetensors").exists() and not (tmp_path / "probe.json").exists()
    assert not (tmp_path / ".lock").exists()


def test_a_lock_released_between_anothers_open_and_lock_is_not_held_on_a_removed_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner releases (and removes) .lock just after a second process opened it: the second must
    end up holding the file at the path, where a third process and `locked_by_another` look; a lock
    on the removed file would let a third process own the directory too."""
    import fastclr.locks as runs

    first = runs.RunLock(tmp_path, log=lambda s: None)
    real, calls = runs.fcntl.flock, []  # type: ignore[union-attr]

    def flock(fd: int, op: int) -> None:
        if not calls:
            calls.append(fd)
            first.release()  # between the second's open and its lock
        real(fd, op)

    monkeypatch.setattr(runs.fcntl, "flock", flock)
    second = runs.RunLock(tmp_path, log=lambda s: None)
    monkeypatch.setattr(runs.fcntl, "flock", real)
    assert os.fstat(second._fd).st_ino == os.stat(tmp_path / ".lock").st_ino
    assert runs.locked_by_another(tmp_path) == f"PID {os.getpid()} on {socket.gethostname()}"
    with pytest.raises(FastclrError, match="is being written by"):
        runs.RunLock(tmp_path, log=lambda s: None)
    second.release()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_filesystem_without_locks_warns_and_runs_instead_of_naming_a_writer(
        code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flock fails with ENOLCK on NFS without lockd and ENOSYS on Lustre without -o flock: every run
    was refused as "being written by another process". Only EWOULDBLOCK means another holds it."""
    import fastclr.locks as runs

    def no_locks(fd: int, op: int) -> None:
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(runs.fcntl, "flock", no_locks)
    said: list[str] = []
    lock = runs.RunLock(tmp_path, log=said.append)
    assert said == [f"warning: cannot lock {tmp_path / '.lock'} ({os.strerror(code)}): this filesystem has no file "
                    "locks, so nothing stops a second process writing this run; start one at a time"]
    assert runs.locked_by_another(tmp_path) == ""  # readers are not told of a writer that cannot be known
    lock.release()  # holds nothing: releasing is a no-op


def test_a_held_lock_is_still_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fastclr.locks as runs

    (tmp_path / ".lock").write_text("PID 7 on node3", encoding="utf-8")

    def held(fd: int, op: int) -> None:
        raise BlockingIOError(errno.EWOULDBLOCK, os.strerror(errno.EWOULDBLOCK))
    monkeypatch.setattr(runs.fcntl, "flock", held)
    with pytest.raises(FastclrError, match=f"^{tmp_path} is being written by PID 7 on node3; wait"):
        runs.RunLock(tmp_path, log=lambda s: None)
    assert runs.locked_by_another(tmp_path) == "PID 7 on node3"


def test_a_checkpoint_written_after_resume_chose_its_own_is_not_passed_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume reads the newest checkpoint, then takes the run's lock: if the run's owner wrote a
    newer one in between (its stop checkpoint) and exited, the resume refuses in one line and
    leaves it, instead of continuing from the older one and dropping its steps."""
    import fastclr.pretraining.loop as loop
    from fastclr.pretraining.loop import pretrain
    from tiny import tiny_config, tiny_dataset

    ds = tiny_dataset()
    cfg = tiny_config(tmp_path, train__epochs=1.0, train__checkpoint_every=2)
    pretrain(cfg, dataset=ds, progress=False, log=lambda s: None)
    newest = load_checkpoint(list_checkpoints(tmp_path)[-1])
    real_lock = loop.RunLock

    def lock_after_the_owner_wrote_more(run_dir: Path, log):  # type: ignore[no-untyped-def]
        save_checkpoint(run_dir, dict(newest, step=newest["step"] + 1))
        return real_lock(run_dir, log)

    monkeypatch.setattr(loop, "RunLock", lock_after_the_owner_wrote_more)
    longer = tiny_config(tmp_path, train__epochs=2.0, train__checkpoint_every=2)
    with pytest.raises(FastclrError, match="got a newer checkpoint while this process was starting"):
        pretrain(longer, dataset=ds, resume=tmp_path, progress=False, log=lambda s: None)
    assert load_checkpoint(list_checkpoints(tmp_path)[-1])["step"] == newest["step"] + 1
    assert not (tmp_path / ".lock").exists()


def test_a_process_told_to_die_with_its_parent_gets_the_signal_when_the_parent_is_killed(tmp_path: Path) -> None:
    """torchrun starts each rank with setsid(), apart from its launcher, so a launcher killed outright left its ranks
    training and holding the run's lock; a rank asks for SIGTERM at its parent's death (it then
    stops with a checkpoint). Here: a parent starts such a child and is SIGKILLed."""
    got, ready = tmp_path / "got", tmp_path / "ready"
    child = (f"import os, pathlib, signal, time\nfrom fastclr.signals import die_with_parent\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(got)!r} + '.part').write_text('SIGTERM'),\n"
             f"  pathlib.Path({str(got)!r} + '.part').rename({str(got)!r}), os._exit(0)))\n"
             f"die_with_parent(os.getppid(), signal.SIGTERM)\npathlib.Path({str(ready)!r}).touch()\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(120)\n"],
                              env=cli_env(tmp_path))
    try:
        wait_for(ready.exists, timeout=60)
        parent.kill()
        parent.wait()
        wait_for(got.exists, timeout=30)
    finally:
        parent.kill()
    assert got.read_text() == "SIGTERM"


def test_a_process_whose_parent_is_already_gone_gets_the_signal_at_once() -> None:
    """die_with_parent(parent, sig) in a process whose parent is no longer `parent` (it died before
    the call; the process was reparented): no death is left to signal it, so it signals itself at
    once. A process whose parent is `parent` goes on."""
    from fastclr.signals import die_with_parent

    gone = subprocess.Popen(["true"])
    gone.wait()
    statuses = []
    for parent in (gone.pid, os.getpid()):
        pid = os.fork()
        if pid == 0:  # the child: nothing but the call, then a normal exit
            try:
                die_with_parent(parent, signal.SIGUSR1)
            finally:
                os._exit(0)
        statuses.append(os.waitpid(pid, 0)[1])
    assert os.WIFSIGNALED(statuses[0]) and os.WTERMSIG(statuses[0]) == signal.SIGUSR1
    assert os.WIFEXITED(statuses[1]) and os.WEXITSTATUS(statuses[1]) == 0


@pytest.mark.parametrize("alter", ["none", "rename-key", "list-item", "nested-in-list", "dtype"])
def test_the_checksum_covers_every_key_list_item_and_dtype(tmp_path: Path, alter: str) -> None:
    """A checkpoint altered anywhere fails its checksum: a tensor moved under another key, a value in
    a list (the optimiser's param_groups, an anchor), one in a dict inside a list, a tensor read as
    another dtype with the same bytes and shape. Saved again unaltered, it verifies."""
    path = save_checkpoint(tmp_path, {"step": 4, "w": torch.arange(4, dtype=torch.int32), "anchor": [3, 0.5],
                                      "groups": [{"lr": 0.1, "params": [0, 1]}]})
    raw = torch.load(path, weights_only=True)
    if alter == "rename-key":
        raw["v"] = raw.pop("w")
    elif alter == "list-item":
        raw["anchor"][1] = 0.25
    elif alter == "nested-in-list":
        raw["groups"][0]["lr"] = 1.0
    elif alter == "dtype":
        raw["w"] = raw["w"].view(torch.float32)
    torch.save(raw, path)
    if alter == "none":
        assert torch.equal(load_checkpoint(path)["w"], torch.arange(4, dtype=torch.int32))
    else:
        with pytest.raises(CheckpointError, match="fails its checksum"):
            load_checkpoint(path)


def test_a_checkpoint_of_another_format_is_refused_even_with_a_valid_checksum(tmp_path: Path) -> None:
    """A file whose checksum verifies but whose format is not this version's (a later fastclr's) is
    not read as if it were one."""
    from fastclr.checkpoint import FORMAT, checkpoint_name, content_sha256

    payload = {"step": 3, "w": torch.ones(2), "format": FORMAT + 1, "fastclr_version": "99.0"}
    payload["sha256"] = content_sha256(payload)
    path = tmp_path / "checkpoints" / checkpoint_name(3)
    path.parent.mkdir()
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f"is not a fastclr checkpoint of format {FORMAT}"):
        load_checkpoint(path)


def test_a_failed_write_deletes_no_older_checkpoint_and_names_the_newest(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Older checkpoints are deleted only once the new one is written: the disk full while writing a
    third (keep=2) leaves both earlier ones, and the message names the newer as the one to go on from."""
    first = save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(3)})
    second = save_checkpoint(tmp_path, {"step": 2, "w": torch.full((3,), 2.0)})

    def full_disk(obj, f):  # type: ignore[no-untyped-def]
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fastclr.checkpoint.torch.save", full_disk)
    with pytest.raises(FastclrError, match="the checkpoint step-000000002.pt written before is intact"):
        save_checkpoint(tmp_path, {"step": 3, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [first, second]
    assert torch.equal(load_checkpoint(second)["w"], torch.full((3,), 2.0))


def test_only_files_named_as_checkpoints_are_listed_and_pruned(tmp_path: Path) -> None:
    """A user's copy beside the checkpoints (step-000000001.pt.bak, step-1.pt) is not a checkpoint:
    never resumed from, never deleted when newer checkpoints are kept."""
    from fastclr.checkpoint import checkpoint_name

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    mine = [folder / "step-000000001.pt.bak", folder / "step-1.pt", folder / "step-0000000001.pt"]
    for p in mine:
        p.write_bytes(b"mine")
    for step in (2, 3, 4):
        save_checkpoint(tmp_path, {"step": step, "w": torch.zeros(1)}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(3), checkpoint_name(4)]
    assert all(p.read_bytes() == b"mine" for p in mine)


def test_the_first_checkpoint_and_the_folder_it_makes_are_flushed_to_disk(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A power loss after the first save keeps the checkpoint: its bytes, its name in the checkpoints
    folder and that new folder's name in the run directory are each fsynced."""
    synced: set[tuple[int, int]] = set()
    real = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(2)})
    identity = {(os.stat(p).st_dev, os.stat(p).st_ino) for p in (tmp_path, path.parent, path)}
    assert identity <= synced


def test_a_stop_already_asked_for_ends_an_interruptible_phase_before_it_starts() -> None:
    """A signal that came before the final probe (between the last step and the probe) ends the
    probe at once: its body never runs, and the flag is left not raising."""
    from fastclr.signals import StopFlag, StopRequested

    flag, ran = StopFlag(), []
    flag.signal = signal.SIGTERM
    with pytest.raises(StopRequested):
        with flag.interruptible():
            ran.append("probe")
    assert ran == [] and not flag.raising


def test_a_sigterm_outside_a_run_cleans_up_and_exits_as_killed_by_it() -> None:
    """cleanup_on_sigterm: SIGTERM (left at its default action) raises SystemExit(128 + SIGTERM),
    so `finally` blocks remove what they made and a shell still sees the status of a kill by
    SIGTERM (143); the default action is back afterwards."""
    from fastclr.signals import cleanup_on_sigterm

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cleaned: list[str] = []
    try:
        with pytest.raises(SystemExit) as e:
            with cleanup_on_sigterm():
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # the handler raises at once
                finally:
                    cleaned.append("part file removed")
        assert e.value.code == 128 + signal.SIGTERM == 143 and cleaned == ["part file removed"]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX: Windows has no SIGHUP")
def test_a_hangup_or_interrupt_the_process_was_told_to_ignore_stays_ignored() -> None:
    """Under `nohup` SIGHUP is ignored from the start: neither a training run's stop nor the
    clean-up of other commands takes it over, so closing the terminal neither stops nor ends them.
    Nor SIGINT ignored from the start (a script's background job: the shell keeps a Ctrl-C meant for
    the command in the foreground from it). SIGTERM, a scheduler's request, is taken over whatever."""
    from fastclr.signals import cleanup_on_sigterm

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        with graceful_stop() as stop, cleanup_on_sigterm():
            assert signal.getsignal(signal.SIGHUP) == signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.01)
        assert stop.signal is None and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX: Windows has no SIGHUP")
def test_a_closed_terminal_stops_a_run_with_a_checkpoint_it_resumes_from(tmp_path: Path, env: dict[str, str]) -> None:
    """The terminal a run writes to goes away (an SSH connection lost): SIGHUP, and every write there
    fails (EIO). The run stops as on SIGTERM: a checkpoint, exit 75, resumable to the end. Its
    default action killed it, losing the steps since the last checkpoint."""
    import pty
    import select
    import threading

    args = ["pretrain", "--run-dir", str(tmp_path / "run"), "--data", "mnist", "--epochs", "2", *TINY, "--log-every",
            "1", "--monitor-every", "0", "--probe", "false", "--head-hidden", "256", "--batch-size", "16"]
    master, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "fastclr", *args], stdout=terminal, stderr=terminal, env=env,
                            cwd=tmp_path, start_new_session=True,  # SIGHUP at its default, as in a terminal (not nohup)
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    os.close(terminal)
    shown = bytearray()
    closing = threading.Event()

    def read() -> None:  # the terminal shows what it is sent, until it is closed
        while not closing.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    shown.extend(os.read(master, 65536))
                except OSError:
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: len(metric_steps(tmp_path / "run")) >= 3)
        closing.set()
        reader.join(10)
        os.close(master)  # the terminal is gone: writes to it fail from now on
        proc.send_signal(signal.SIGHUP)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == EXIT_STOPPED, bytes(shown)[-2000:]
    stopped_at = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])["step"]
    assert 3 <= stopped_at < 32
    r = call_main(["pretrain", "--resume", str(tmp_path / "run"), "--quiet"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(list_checkpoints(tmp_path / "run")[-1])["step"] == 32


def test_a_sigterm_in_a_run_that_handles_it_is_left_to_the_run() -> None:
    """cleanup_on_sigterm inside a training run (its stop flag handles SIGTERM): the run's handler
    stays, so SIGTERM asks for a checkpoint and a stop as ever instead of ending the process."""
    from fastclr.signals import cleanup_on_sigterm

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        with graceful_stop() as stop:
            handler = signal.getsignal(signal.SIGTERM)
            with cleanup_on_sigterm():
                assert signal.getsignal(signal.SIGTERM) is handler
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
            assert stop.signal == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is handler
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_a_stop_arriving_as_an_interruptible_phase_begins_ends_it() -> None:
    """The phase checked for a pending stop, then set the flag that makes the handler raise: a signal
    between the two set the pending stop and did not raise, and the whole probe ran after Ctrl-C.
    Here the signal lands the moment the phase announces itself."""
    from fastclr.signals import StopFlag, StopRequested

    class SignalledAsItBegins(StopFlag):
        @property
        def raising(self) -> bool:
            return self._raising

        @raising.setter
        def raising(self, value: bool) -> None:
            self._raising = value
            if value:
                self.signal = 15  # the handler's first act; with raising now True it would also raise

    flag, ran = SignalledAsItBegins(), []
    with pytest.raises(StopRequested):
        with flag.interruptible():
            ran.append(True)
    assert ran == [] and flag.raising is False


def test_a_process_refused_as_the_owner_takes_the_lock_still_names_the_owner(tmp_path: Path) -> None:
    """The owner writes its PID and host just after taking the lock: two runs started together saw
    the lock held and the file still empty, and said "being written by another process"."""
    import fcntl
    import threading

    from fastclr.locks import LOCK_FILE, RunLock, locked_by_another

    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, its line not yet written
    writer = threading.Timer(0.15, lambda: os.pwrite(fd, b"PID 4242 on node7", 0))
    writer.start()
    try:
        with pytest.raises(FastclrError, match=r"is being written by PID 4242 on node7;"):
            RunLock(tmp_path, log=lambda s: None)
        assert locked_by_another(tmp_path) == "PID 4242 on node7"
    finally:
        writer.join()
        os.close(fd)



def test_a_claim_made_while_a_reader_probes_the_lock_waits_for_the_probe(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`locked_by_another` holds a shared lock for an instant; a run or prepare taking the directory
    in that instant was refused as "being written by another process"."""
    import fcntl
    import threading

    from fastclr import locks
    from fastclr.locks import LOCK_FILE, RunLock

    monkeypatch.setattr(locks, "OWNER_WAIT_S", 30.0)  # the wait's length is not what is tested: no stall outlasts it

    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a reader's probe, held a little long
    probe = threading.Timer(0.1, lambda: fcntl.flock(fd, fcntl.LOCK_UN))
    probe.start()
    try:
        lock = RunLock(tmp_path, log=lambda s: None)
        assert (tmp_path / LOCK_FILE).read_text(encoding="utf-8").startswith(f"PID {os.getpid()} on ")
        lock.release()
    finally:
        probe.join()
        os.close(fd)


def test_write_failures_survive_a_process_pools_pickle() -> None:
    """`pretrain` run under multiprocessing or concurrent.futures sends its error back pickled: a
    checkpoint's or a file's write failure came back as a TypeError about missing arguments."""
    import pickle

    from fastclr.checkpoint import CheckpointWriteFailed
    from fastclr.files import WriteFailed

    for e in (CheckpointWriteFailed(Path("run/checkpoints/step-000000001.pt"), "No space left on device", "kept"),
              WriteFailed(Path("out.npy"), "No space left on device")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.reason == e.reason


def test_a_folder_with_a_config_toml_of_its_own_is_not_taken_for_a_run(tmp_path: Path) -> None:
    """A folder of the user's files holding a config.toml (a site's, an overrides file) passed for a
    run's directory: the run replaced the file and wrote in beside them, exit 0. A run's own, complete
    config.toml (a run killed before its first checkpoint) is still started over in place."""
    from fastclr.config import Config
    from fastclr.runs import write_config

    site = tmp_path / "site"
    site.mkdir()
    (site / "config.toml").write_text('baseURL = "https://example.org/"\ntitle = "notes"\n', encoding="utf-8")
    (site / "index.md").write_text("# mine\n", encoding="utf-8")
    overrides = tmp_path / "exp1"
    overrides.mkdir()
    (overrides / "config.toml").write_text("# t for exp1\n[train]\ntemperature = 0.5\n", encoding="utf-8")
    for folder in (site, overrides):
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        with pytest.raises(FastclrError, match=rf"^--run-dir {re.escape(str(folder))} holds a config.toml that is not a "
                                               r"fastclr run's .*nothing was written: choose a new --run-dir$"):
            prepare_run_dir(folder)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    killed = tmp_path / "killed"
    killed.mkdir()
    write_config(killed, Config())
    (killed / "metrics.jsonl").write_text("", encoding="utf-8")
    assert prepare_run_dir(killed) == killed


def test_a_config_file_in_the_new_runs_own_place_is_refused_before_it_is_replaced(tmp_path: Path) -> None:
    """`pretrain --config exp1/config.toml --run-dir exp1`: the run wrote its resolved settings over the
    file it had read them from, the user's comments lost."""
    env = cli_env(tmp_path)
    exp = tmp_path / "exp1"
    exp.mkdir()
    text = "# t for exp1: a full run's settings, copied\n" + (tmp_path / "x").as_posix()[:0]
    from fastclr.config import Config, to_toml

    (exp / "config.toml").write_text(text + to_toml(Config()), encoding="utf-8")
    saved = (exp / "config.toml").read_bytes()
    r = call_main(["pretrain", "--config", "exp1/config.toml", "--run-dir", str(exp), *TINY, "--data", "mnist"], env,
                  tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().endswith("--config exp1/config.toml is where the run writes its own settings (config.toml of "
                                     "its directory), which would replace it and what it holds beside them "
                                     "(comments, layout); keep it elsewhere, or give another run directory"), r.stderr
    assert (exp / "config.toml").read_bytes() == saved and sorted(p.name for p in exp.iterdir()) == ["config.toml"]
    # A run killed before its first checkpoint, started again with its own settings: nothing to lose.
    from fastclr.presets import config_for

    (exp / "config.toml").write_text(to_toml(config_for("mnist", {"train.run_dir": str(exp)})), encoding="utf-8")
    r = call_main(["pretrain", "--config", "exp1/config.toml", "--run-dir", str(exp), *TINY, "--data", "mnist",
                   "--epochs", "1"], env, tmp_path)
    assert r.returncode == 0 and (exp / "checkpoints").is_dir(), r.stderr


def test_settings_alone_of_an_earlier_version_may_be_replaced_and_a_users_layout_may_not(tmp_path: Path) -> None:
    """A run's config.toml written by an earlier version (fewer keys) holds settings alone, as one of
    this version does: a killed run of it started again with `--config RUN/config.toml --run-dir RUN`
    was refused, said to hold "comments, layout". A comment, a blank line, a key written another way
    or unknown to this version is the user's and keeps the file."""
    from fastclr.config import Config, to_toml
    from fastclr.runs import settings_alone

    now = to_toml(Config())
    earlier = "".join(line for line in now.splitlines(keepends=True) if not line.startswith("knn_k = "))
    assert earlier != now
    for text, alone in ((now, True), (earlier, True), ("# mine\n" + now, False), (now.replace("\n[", "\n\n[", 1), False),
                        (now.replace("batch_size = ", "batch_size= ", 1), False), (now + "[train]\nbatchsize = 8\n", False),
                        ("[train]\nepochs = 100.0\n", False)):  # a user's short file, of a run's form
        (tmp_path / "config.toml").write_text(text, encoding="utf-8")
        assert settings_alone(tmp_path / "config.toml") is alone, text[:80]
