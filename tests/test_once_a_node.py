"""A rank's one-line error under `fastclr-torchrun` is printed once a node: the first rank to claim
the line prints it, the others stay silent but return only once it is out (torchrun ends the
printing rank as soon as a silent one exits), and a claimant that never prints is stood in for."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest

from fastclr.scaleout.once import ONCE_DIR, print_once_a_node


def test_without_the_launchers_folder_every_call_prints() -> None:
    out = io.StringIO()
    assert print_once_a_node("error: x", file=out, environ={}) and print_once_a_node("error: x", file=out, environ={})
    assert out.getvalue() == "error: x\nerror: x\n"


def test_the_same_line_is_printed_once_in_a_folder_and_another_line_again(tmp_path: Path) -> None:
    env = {ONCE_DIR: str(tmp_path)}
    ranks = [io.StringIO() for _ in range(4)]
    printed = [print_once_a_node("error: bad temperature", file=r, environ=env, wait_s=5) for r in ranks]
    assert printed == [True, False, False, False]
    assert [r.getvalue() for r in ranks] == ["error: bad temperature\n", "", "", ""]
    other = io.StringIO()
    assert print_once_a_node("error: peer lost", file=other, environ=env) and other.getvalue() == "error: peer lost\n"
    # another launcher's folder (another node's) prints it again
    (tmp_path / "node1").mkdir()
    again = io.StringIO()
    assert print_once_a_node("error: bad temperature", file=again, environ={ONCE_DIR: str(tmp_path / "node1")})
    assert again.getvalue() == "error: bad temperature\n"


def test_a_silent_rank_returns_only_once_the_claimant_has_printed(tmp_path: Path) -> None:
    env = {ONCE_DIR: str(tmp_path)}
    first = io.StringIO()
    assert print_once_a_node("error: x", file=first, environ=env)
    (claim,) = tmp_path.iterdir()
    claim.write_bytes(b"")  # claimed, not yet printed
    silent, result = io.StringIO(), []
    t = threading.Thread(target=lambda: result.append(print_once_a_node("error: x", file=silent, environ=env,
                                                                        wait_s=30)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and result == []  # still waiting for the line to be out
    claim.write_bytes(b"printed")
    t.join(10)
    assert result == [False] and silent.getvalue() == ""


def test_a_claimant_that_never_prints_is_stood_in_for(tmp_path: Path) -> None:
    env = {ONCE_DIR: str(tmp_path)}
    assert print_once_a_node("error: x", file=io.StringIO(), environ=env)
    (claim,) = tmp_path.iterdir()
    claim.write_bytes(b"")  # the claimant died between its claim and its line
    out = io.StringIO()
    assert print_once_a_node("error: x", file=out, environ=env, wait_s=0.05) and out.getvalue() == "error: x\n"


def test_a_folder_that_is_gone_prints_rather_than_loses_the_line(tmp_path: Path) -> None:
    out = io.StringIO()
    assert print_once_a_node("error: x", file=out, environ={ONCE_DIR: str(tmp_path / "gone")})
    assert out.getvalue() == "error: x\n"


def test_a_folder_removed_while_a_silent_rank_waits_ends_its_wait_without_an_error(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher removes its folder once its ranks are over: a rank still waiting returns quietly."""
    waiting, sleep = threading.Event(), time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: (waiting.set(), sleep(s))[1])  # the rank is in its wait
    folder = tmp_path / "once"
    folder.mkdir()
    env = {ONCE_DIR: str(folder)}
    assert print_once_a_node("error: x", file=io.StringIO(), environ=env)
    (claim,) = folder.iterdir()
    claim.write_bytes(b"")
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(print_once_a_node("error: x", file=io.StringIO(), environ=env,
                                                                        wait_s=30)))
    t.start()
    assert waiting.wait(10)
    claim.unlink()
    t.join(10)
    assert result == [False]


def test_a_usage_error_is_printed_once_a_node_as_a_settings_error_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown flag under `fastclr-torchrun` was printed by argparse once a rank."""
    from fastclr.cli import main

    monkeypatch.setenv(ONCE_DIR, str(tmp_path))
    for _ in range(2):  # two ranks of one node
        with pytest.raises(SystemExit) as e:
            main(["pretrain", "--bogus-flag"])
        assert e.value.code == 2
    assert capsys.readouterr().err == ("fastclr pretrain: error: unrecognized arguments: --bogus-flag; `fastclr "
                                       "pretrain --help` lists the options\n")


def test_the_way_to_resume_is_the_command_this_process_was_started_by() -> None:
    """A rank under plain torchrun was told the fastclr-torchrun command, and one refused an existing
    run directory under either launcher `fastclr pretrain --resume`, which trains as one process."""
    from fastclr.scaleout.once import resume_command

    assert resume_command("r", {ONCE_DIR: "/tmp/x", "WORLD_SIZE": "2"}) == "the same fastclr-torchrun command and --resume r"
    assert resume_command("r", {"WORLD_SIZE": "2"}) == "the same torchrun command and --resume r"
    assert resume_command("r", {"WORLD_SIZE": "1"}) == resume_command("r", {}) == "`fastclr pretrain --resume r`"
