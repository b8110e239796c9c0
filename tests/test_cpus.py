"""CPUs a process may use (affinity and cgroup CPU quota; reading the quota: test_cgroups.py) and
the thread count fastclr sets from them: PyTorch's count capped by it, an explicit count above it
warned about, and the caller's count given back."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout

import pytest
import torch

import fastclr.cpus as cpus
from fastclr.cli import main as cli_main
from fastclr.cpus import gives_threads_back, set_threads, usable_cpus
from real_cgroup import run_in_cgroup

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("limit", "expected"), [
    (0.25, 1),  # a fraction of a CPU still runs one thread
    (1.0, 1),
    (1.5, min(AFFINITY, 2)),  # rounded up: two threads share 1.5 CPUs' time, one would leave 0.5 idle
    (1000.0, AFFINITY),  # never more than the affinity mask allows
])
def test_usable_cpus_is_the_affinity_mask_capped_by_the_quota(limit: float, expected: int) -> None:
    assert usable_cpus(limit) == expected


@pytest.fixture
def caller_threads() -> object:
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_the_default_count_is_capped_at_the_usable_cpus(monkeypatch: pytest.MonkeyPatch, caller_threads: object) -> None:
    torch.set_num_threads(4)  # what PyTorch picks on a larger host, whose quota allows one CPU
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 1)
    warned: list[str] = []
    assert set_threads(0, warn=warned.append) == 1 and torch.get_num_threads() == 1 and warned == []
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 8)
    torch.set_num_threads(2)
    assert set_threads(0, warn=warned.append) == 2  # never raised above PyTorch's own choice
    assert warned == []


def test_an_explicit_count_above_the_usable_cpus_runs_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                                       caller_threads: object) -> None:
    """The warning names what leaving --threads out gives: PyTorch's own count, capped (1 under
    torchrun's OMP_NUM_THREADS=1, not the 2 CPUs)."""
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 2)
    warned: list[str] = []
    for own, default in ((4, 2), (1, 1)):
        torch.set_num_threads(own)
        assert set_threads(3, warn=warned.append) == 3
        assert warned.pop() == ("warning: --threads 3 is more than the 2 CPUs this process may use (its affinity "
                                "mask and cgroup CPU quota), so the threads take turns on them; leave --threads out "
                                f"to use {default}")
    assert set_threads(2, warn=warned.append) == 2 and warned == []



def test_a_negative_count_is_refused_by_every_command(caller_threads: object, capsys: pytest.CaptureFixture[str]) -> None:
    """`evaluate --threads -1` ran silently on the default count, while `pretrain --threads -1` was
    refused: every command sets its threads here; `embed --workers -2` was accepted for a store."""
    from fastclr.cli import main
    from fastclr.errors import FastclrError

    torch.set_num_threads(1)
    with pytest.raises(FastclrError, match=r"^--threads must be 0 \(one per usable CPU\) or more, got -1$"):
        set_threads(-1)
    assert torch.get_num_threads() == 1
    for argv in (["evaluate", "RUN", "--threads", "-1"], ["report", "RUN", "--threads", "-1"],
                 ["embed", "RUN", "--data", "S", "--out", "e", "--workers", "-2"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: --") and "must be 0" in err and err.count("\n") == 1, err


def test_a_count_past_64_a_cpu_is_refused_before_any_work(caller_threads: object, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    """`--threads 100000` on 2 CPUs: the OpenMP runtime crashed starting the pool (SIGSEGV, exit 139,
    after the warning line only). 64 a CPU is the most taken; past it, one line and nothing changed."""
    from fastclr.cli import main
    from fastclr.errors import FastclrError

    monkeypatch.setattr("fastclr.cpus.usable_cpus", lambda: 2)
    torch.set_num_threads(1)
    assert set_threads(128, warn=lambda line: None) == 128
    torch.set_num_threads(1)
    with pytest.raises(FastclrError, match=r"^--threads 129 is more than 64 for each of the 2 CPUs this process may "
                                           r"use; give at most 128, or leave --threads out to use 1$"):
        set_threads(129)
    assert torch.get_num_threads() == 1
    run = os.path.join(str(tmp_path), "never")
    assert main(["pretrain", "--data", "mnist", "--threads", "100000", "--run-dir", run]) == 2
    assert "--threads 100000 is more than 64 for each" in capsys.readouterr().err
    assert not os.path.exists(run)


def test_the_callers_count_is_given_back_on_return_and_on_error(caller_threads: object) -> None:
    @gives_threads_back
    def work(n: int, fail: bool) -> int:
        torch.set_num_threads(n)
        if fail:
            raise RuntimeError("boom")
        return torch.get_num_threads()

    torch.set_num_threads(3)
    assert work(1, fail=False) == 1 and torch.get_num_threads() == 3
    with pytest.raises(RuntimeError, match="boom"):
        work(2, fail=True)
    assert torch.get_num_threads() == 3


def test_info_reports_the_quota_and_the_threads_fastclr_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastclr.info as info

    monkeypatch.setattr(info, "cgroup_cpu_limit", lambda: 1.0)
    monkeypatch.setattr(info, "available_memory", lambda: 3 * 2**29)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli_main(["info", "--json", "--no-measure"]) == 0
    report = json.loads(buf.getvalue())
    cpu = report["cpu"]
    assert cpu["cgroup_cpu_quota"] == 1.0 and cpu["cores_usable"] == 1 and cpu["torch_threads"] == 1
    assert report["memory_available_gib"] == 1.5
    text = info.format_report(report)
    assert "1 usable cores (cgroup CPU quota 1), 1 torch threads" in text and "memory      1.5 GiB available" in text


def test_a_real_quota_caps_the_threads_a_run_uses() -> None:
    """The real kernel files, not a layout written by the test: a process moved into a cgroup with a
    quota of one CPU reads 1.0, and its default thread count drops to 1 on any machine."""
    out = run_in_cgroup("cpu", "cpu.cfs_quota_us", "100000", "import torch; from fastclr.cpus import "
                        "cgroup_cpu_limit, set_threads; print(cgroup_cpu_limit(), set_threads(0))")
    assert out.split() == ["1.0", "1"]


@pytest.mark.parametrize(("limit", "expected"), [(2.01, 3), (2.5, 3), (3.5, 4), (6.0, 6), (63.2, 64), (100.0, 64)])
def test_a_quota_is_rounded_up_on_a_large_host(monkeypatch: pytest.MonkeyPatch, limit: float, expected: int) -> None:
    """On a 64-CPU host a quota of 2.01 or 2.5 CPUs' time runs 3 threads (never fewer than the quota
    keeps busy), an integral quota its own count, and no quota more than the 64 CPUs."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert usable_cpus(limit) == expected


def test_a_few_label_fit_of_at_most_a_thousand_images_runs_on_one_thread(caller_threads: object,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A few-label fit's matrices are too small for a second thread to pay much, and beside another
    busy process the threads wait on each other (5 subsets of 100 labels per class: 5.9-8.2 s on 2
    threads against 2.0-2.5 s on one, on a 2-vCPU Xeon): up to ONE_THREAD_UP_TO images it runs on one
    thread, above it on the caller's count, which it gives back."""
    import fastclr.evaluation.fewshot as fewshot

    seen: list[int] = []
    monkeypatch.setattr(fewshot, "linear_probe", lambda *a, **k: seen.append(torch.get_num_threads()))
    torch.set_num_threads(3)
    for n in (10, fewshot.ONE_THREAD_UP_TO, fewshot.ONE_THREAD_UP_TO + 1):
        fewshot.fewshot_fit(torch.zeros(n, 4), torch.zeros(n, dtype=torch.long), torch.zeros(2, 4),
                            torch.zeros(2, dtype=torch.long), seed=0)
    assert seen == [1, 1, 3] and torch.get_num_threads() == 3
    with pytest.raises(RuntimeError, match="boom"), fewshot.at_most_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 3
