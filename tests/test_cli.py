"""The command line end to end, and its one-line errors (exit code 2, no traceback)."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import call_main, cli_env, run_cli, write_idx_dataset
from tiny import TINY_FLAGS as TINY

@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path)


def test_a_relative_data_root_is_recorded_so_later_commands_find_it_from_anywhere(tmp_path: Path,
                                                                                  env: dict[str, str]) -> None:
    """`--data-root data` was recorded as typed, and evaluate, export and the others (which have no
    --data-root) looked for `data` from their own directory: "the data root data is not a directory"."""
    given = {k: v for k, v in env.items() if k != "FASTCLR_DATA"}  # found through --data-root alone
    args = ["pretrain", "--data", "mnist", "--data-root", "data", "--epochs", "1", "--run-dir", "run", *TINY,
            "--probe", "false"]
    assert call_main(args, given, tmp_path).returncode == 0
    from fastclr.config import read_toml

    assert read_toml(tmp_path / "run" / "config.toml")["data.root"] == str(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    r = call_main(["evaluate", str(tmp_path / "run"), "--protocols", "knn"], given, tmp_path / "elsewhere")
    assert r.returncode == 0, r.stderr


def test_data_found_through_fastclr_data_is_recorded_so_later_commands_read_that_copy(tmp_path: Path,
                                                                                     env: dict[str, str]) -> None:
    """A run that read its data through $FASTCLR_DATA recorded no root, and `evaluate` in a shell
    without the variable measured another copy (the user cache's) without a word."""
    from fastclr.config import read_toml

    args = ["pretrain", "--data", "mnist", "--epochs", "1", "--run-dir", "run", *TINY, "--probe", "false"]
    assert call_main(args, dict(env, FASTCLR_DATA="data"), tmp_path).returncode == 0  # relative, as typed
    assert read_toml(tmp_path / "run" / "config.toml")["data.root"] == str(tmp_path / "data")
    write_idx_dataset(tmp_path / "cache" / "fastclr" / "mnist", n_train=128, n_test=32)  # another copy, elsewhere
    unset = {k: v for k, v in env.items() if k != "FASTCLR_DATA"}
    (tmp_path / "elsewhere").mkdir()
    r = call_main(["evaluate", str(tmp_path / "run"), "--protocols", "knn"], unset, tmp_path / "elsewhere")
    assert r.returncode == 0, r.stderr
    assert "256 train and 64 test images" in r.stdout, r.stdout
    # the recorded folder gone (a job's scratch, a run copied to another machine): every command that reads
    # the run was refused naming flags `evaluate` has not; it now searches the usual places, and says so
    (tmp_path / "data").rename(tmp_path / "moved")
    moved = dict(env, FASTCLR_DATA=str(tmp_path / "moved"))
    note = (f"note: {tmp_path / 'run'} recorded its data in {tmp_path / 'data'}, which is not a folder here; mnist is "
            "looked up in the usual places ($FASTCLR_DATA, the user cache, /usr/share/datasets)")
    r = call_main(["evaluate", str(tmp_path / "run"), "--protocols", "knn"], moved, tmp_path / "elsewhere")
    assert r.returncode == 0 and note in r.stdout + r.stderr and "256 train and 64 test images" in r.stdout, r.stderr
    r = call_main(["pretrain", "--resume", str(tmp_path / "run"), "--epochs", "2", "--quiet"], moved, tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_toml(tmp_path / "run" / "config.toml")["data.root"] == str(tmp_path / "moved")  # where it read now
    # the run's config.toml given to --config where that folder is not (another machine): searched past, said
    (tmp_path / "moved").rename(tmp_path / "moved2")
    config = tmp_path / "run" / "config.toml"
    r = call_main(["pretrain", "--config", str(config), "--run-dir", str(tmp_path / "run2"), "--epochs", "1",
                   "--probe", "false"], dict(env, FASTCLR_DATA=str(tmp_path / "moved2")), tmp_path)
    assert r.returncode == 0, r.stderr
    assert (f"note: --config {config} recorded its data in {tmp_path / 'moved'}, which is not a folder here; mnist "
            "is looked up in the usual places") in r.stderr, r.stderr
    assert read_toml(tmp_path / "run2" / "config.toml")["data.root"] == str(tmp_path / "moved2")


def test_pretrain_checkpoint_resume_probe(tmp_path: Path, env: dict[str, str]) -> None:
    """The first run through `python -m fastclr` (the entry point), its resume in this process."""
    run = tmp_path / "run"
    r = run_cli(["pretrain", "--data", "mnist", "--epochs", "1", "--run-dir", str(run), *TINY], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "linear-probe accuracy:" in r.stdout
    probe = json.loads((run / "probe.json").read_text())
    assert 0.25 < probe["accuracy"] <= 1.0 and probe["steps"] == 8
    assert (run / "encoder.safetensors").exists() and (run / "config.toml").exists()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [2, 4, 6, 8]
    assert any("knn_acc" in r for r in recs)
    # resume with more epochs: continues from step 8 to 16 and probes again
    r = call_main(["pretrain", "--resume", str(run), "--epochs", "2", "--quiet"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout and json.loads((run / "probe.json").read_text())["steps"] == 16
    assert 'epochs = 2.0' in (run / "config.toml").read_text()


def test_exported_encoder_reloads_and_matches(tmp_path: Path, env: dict[str, str]) -> None:
    import torch

    from fastclr.checkpoint import list_checkpoints, load_checkpoint
    from fastclr.errors import FastclrError
    from fastclr.export import load_encoder

    run = tmp_path / "run"
    assert call_main(["pretrain", "--data", "mnist", "--epochs", "0.5", "--run-dir", str(run), "--probe", "false", *TINY,
                     "--cnn-stages", "64|128|flat0"], env, tmp_path).returncode == 0
    enc, spec = load_encoder(run / "encoder.safetensors")
    state = load_checkpoint(list_checkpoints(run)[-1])["encoder"]
    assert state.keys() == enc.state_dict().keys()
    for k, v in enc.state_dict().items():
        assert torch.equal(v, state[k])
    # the shape asked for (x width 0.125: 8 | 16 channels, 7 x 7 x 16 h) is recorded and rebuilt
    assert spec.stages == "64|128|flat0" and spec.feature_dim == enc.feature_dim == 7 * 7 * 16
    assert len(spec.mean) == 1
    # ready to use: an image's h does not depend on the batch around it (BatchNorm's running statistics)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not enc.training and torch.allclose(enc(x[:2]), enc(x)[:2], atol=1e-5)
    # the run directory itself names its encoder; a directory without one is one line
    by_dir, _ = load_encoder(run)
    assert all(torch.equal(v, state[k]) for k, v in by_dir.state_dict().items())
    with pytest.raises(FastclrError, match=r"directory without encoder\.safetensors; give a run directory"):
        load_encoder(tmp_path)


@pytest.mark.parametrize("args,message", [
    (["--data", "imagenet22k"], "unknown dataset 'imagenet22k'; choose one of: fashion-mnist"),
    (["--encoder", "vgg"], "model.encoder = 'vgg' is not allowed: it must be one of: auto, cnn, resnet18"),
    (["--data", "cifar10", "--download", "false"], "cifar10 files not found"),
    (["--batch-size", "100000"], "batch size 100000 is larger than the dataset (256 images)"),
    (["--temperature", "0"], "train.temperature = 0.0 is not allowed: it must be >= 1e-06"),
    (["--temperature", "-1"], "train.temperature = -1.0 is not allowed: it must be >= 1e-06"),
    # 1 / t overflowed float32: every logit infinite, the run stopped at its first step after writing its directory
    (["--temperature", "1e-40"], "train.temperature = 1e-40 is not allowed: it must be >= 1e-06"),
    (["--batch-size", "many"], "train.batch_size must be an integer, got 'many'"),
    (["--temperature", "nan"], "train.temperature must be a finite number, got 'nan'"),
    (["--cnn-stages", "32|wide"], "cnn_stages '32|wide' is not a stage spec; write e.g. 32|256|fc512"),
    # a folder of images as --data: the store goes beside it, not into it (prepare refuses a folder of files)
    (["--data", "photos"], "photos is not a fastclr store (it has no store.json); if it holds your images, make one with "
                           "`fastclr prepare "),
    (["--data", "photos"], "photos --size S --out "),
    (["--data", "photos"], "photos.store` and give that"),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, env: dict[str, str], args: list[str], message: str,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the command's own main, in this process (the entry point is `sys.exit(main())`)."""
    from fastclr.cli import main

    for key in ("FASTCLR_DATA", "XDG_CACHE_HOME"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"")
    base = ["pretrain", "--data", "mnist", "--epochs", "1", "--run-dir", str(tmp_path / "r"), "--quiet", "--batch-size", "32"]
    capsys.readouterr()
    assert main(base + args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before the run directory is made


def test_unwritable_run_dir_and_resume_without_checkpoint(tmp_path: Path, env: dict[str, str]) -> None:
    if os.geteuid() != 0:  # root ignores directory permissions; the blocker case below covers root
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            r = call_main(["pretrain", "--data", "mnist", "--run-dir", str(locked / "run"), *TINY], env, tmp_path)
            assert r.returncode == 2 and "cannot create run directory" in r.stderr
        finally:
            locked.chmod(0o700)
    # a file where the run directory should be cannot be created, even as root
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = call_main(["pretrain", "--data", "mnist", "--run-dir", str(blocker / "run"), *TINY], env, tmp_path)
    assert r.returncode == 2 and "cannot create run directory" in r.stderr and "--run-dir" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.toml").write_text("[train]\nepochs = 1.0\n")
    r = call_main(["pretrain", "--resume", str(empty), "--quiet"], env, tmp_path)
    assert r.returncode == 2 and "holds no checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = call_main(["embed", str(empty), "--data", "mnist", "--out", str(tmp_path / "e.npy")], env, tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (  # not "start a new run without --resume", a pretrain flag
        f"error: {empty} has no encoder.safetensors and no checkpoint: it stopped before its first checkpoint; start it "
        f"again with the command that made it (its settings: {empty / 'config.toml'}), then embed it")


def test_a_peer_failure_exits_2_without_finalisation(tmp_path: Path, env: dict[str, str]) -> None:
    """After a peer died, the CLI prints its one line, flushes, and leaves without interpreter
    finalisation (CI once saw gloo's threads abort at normal exit: SIGABRT instead of exit 2).
    An atexit hook stands in for the C++ destructors: it must not run; buffered stdout must
    still arrive."""
    script = (
        "import atexit, sys\n"
        "from fastclr import cli\n"
        "from fastclr.errors import PeerFailure\n"
        "atexit.register(lambda: print('finalised', file=sys.stderr))\n"
        "def boom(args):\n"
        "    print('step 4 written')\n"
        "    raise PeerFailure('rank 0 of 2: lost contact with another rank (x)')\n"
        "cli.cmd_download = boom\n"
        "sys.exit(cli.main(['download', 'mnist']))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "step 4 written\n"
    assert r.stderr == "error: rank 0 of 2: lost contact with another rank (x)\n"


def test_a_mistyped_option_is_refused_by_its_command_with_the_nearest_one(capsys: pytest.CaptureFixture[str]) -> None:
    """`pretrain --time-budgt 5` printed fastclr's top-level usage (the list of commands) and no hint;
    then its own usage, 30 lines, before the one that says what is wrong; and `--set` was offered
    the hidden `--preset`, which only refuses itself."""
    from fastclr.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["pretrain", "--time-budgt", "5"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err == ("fastclr pretrain: error: unrecognized arguments: --time-budgt "
                                               "(--time-budgt: did you mean --time-budget?); `fastclr pretrain --help` "
                                               "lists the options\n")
    with pytest.raises(SystemExit):  # a command's own option given before the command
        main(["--quiet", "pretrain"])
    assert capsys.readouterr().err.strip().startswith("fastclr pretrain: error: unrecognized arguments: --quiet "
                                                      "(--quiet: give it after the command, as in `fastclr pretrain --quiet`)")
    with pytest.raises(SystemExit):
        main(["pretrain", "--set", "train.lr=1"])
    assert capsys.readouterr().err == ("fastclr pretrain: error: unrecognized arguments: --set (--set: did you mean "
                                       "--seed?); `fastclr pretrain --help` lists the options\n")  # not --preset
    # the start of an option's name is no option: argparse ran `--epoch 3` as --epochs 3 (a whole run), and
    # `evaluate --seed 3` as --seeds 3, where finetune's --seed is another setting
    for argv, name, near in ((["pretrain", "--epoch", "3"], "--epoch", "--epochs"),
                             (["evaluate", "RUN", "--seed", "3"], "--seed", "--seeds"),
                             (["pretrain", "--temp", "0.5"], "--temp", "--temperature")):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastclr {argv[0]}: error: unrecognized arguments: {name}") and err.count("\n") == 1
        assert f"({name}: did you mean {near}?)" in err
    with pytest.raises(SystemExit):
        main(["evaluate", "RUN", "--precision", "fp8"])  # argparse's own check of a choice: one line too
    assert capsys.readouterr().err.startswith("fastclr evaluate: error: argument --precision: invalid choice: 'fp8'")
    # the spellings the help text and English use run the same commands
    from fastclr.cli import parse_args

    assert parse_args(["distil", "T"]).func is parse_args(["distill", "T"]).func
    assert parse_args(["neighbors", "R", "--data", "S", "--query", "q"]).func is \
        parse_args(["neighbours", "R", "--data", "S", "--query", "q"]).func
    with pytest.raises(SystemExit):
        main(["evaluate", "RUN", "--zzz"])  # nothing near: no hint
    assert capsys.readouterr().err.strip().startswith("fastclr evaluate: error: unrecognized arguments: --zzz;")


def test_epochs_and_a_time_budget_given_together_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--epochs 0.01 --time-budget 0.1` trained 658 steps where 0.01 epochs is 19: the budget replaced
    the epochs without a word (config.toml recorded both). Either alone, or a budget of 0, is a length."""
    from fastclr.cli import main, resolve_config, parse_args

    assert main(["pretrain", "--epochs", "0.01", "--time-budget", "0.1", "--run-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == ("error: --epochs 0.01 and --time-budget 0.1 both set the run's length, and a "
                                       "time budget replaces the epochs; give one of them\n")
    assert not (tmp_path / "r").exists()
    cfg = resolve_config(parse_args(["pretrain", "--epochs", "3", "--time-budget", "0"]))
    assert (cfg.train.epochs, cfg.train.time_budget) == (3.0, 0.0)
    assert resolve_config(parse_args(["pretrain", "--epochs", "3"])).train.time_budget == 0.0


def test_a_time_budget_flag_over_a_config_file_that_trains_by_epochs_is_noted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A --config file with `epochs = 5` and `--time-budget 3`: the flag wins (flags over files) and the
    file's epochs went unused without a word. A note names it, and every other case where one length
    replaces another the files set."""
    from fastclr.cli import parse_args, resolve_config

    by_epochs = tmp_path / "epochs.toml"
    by_epochs.write_text("[train]\nepochs = 5\n")
    cfg = resolve_config(parse_args(["pretrain", "--config", str(by_epochs), "--time-budget", "3"]))
    assert (cfg.train.epochs, cfg.train.time_budget) == (5.0, 3.0)
    assert capsys.readouterr().err == ("note: --time-budget 3 sets the run's length; the config file's train.epochs 5 "
                                       "is not used (leave --time-budget out to train by epochs)\n")
    assert resolve_config(parse_args(["pretrain", "--config", str(by_epochs)])).train.time_budget == 0.0
    both = tmp_path / "both.toml"
    both.write_text("[train]\nepochs = 5\ntime_budget = 2.0\n")
    assert resolve_config(parse_args(["pretrain", "--config", str(both), "--time-budget", "3"])).train.time_budget == 3.0
    assert capsys.readouterr().err == ""
    # the files alone: a budget over epochs they set, in one file or across two; a run's own config.toml
    # (the default epochs beside its budget) says nothing
    budget = tmp_path / "budget.toml"
    budget.write_text("[train]\ntime_budget = 0.05\n")
    said = ("note: the config files' train.time_budget {} min sets the run's length; their train.epochs 5 is not used "
            "(time_budget = 0 trains by epochs)\n")
    assert resolve_config(parse_args(["pretrain", "--config", str(both)])).train.time_budget == 2.0
    assert capsys.readouterr().err == said.format(2.0)
    cfg = resolve_config(parse_args(["pretrain", "--config", str(by_epochs), "--config", str(budget)]))
    assert (cfg.train.epochs, cfg.train.time_budget) == (5.0, 0.05) and capsys.readouterr().err == said.format(0.05)
    cfg = resolve_config(parse_args(["pretrain", "--config", str(budget), "--config", str(by_epochs)]))
    assert (cfg.train.epochs, cfg.train.time_budget) == (5.0, 0.0)  # the later file's epochs, said
    assert capsys.readouterr().err == (f"note: config file {by_epochs}'s train.epochs 5 sets the run's length; an "
                                       "earlier file's train.time_budget 0.05 min is not used\n")
    saved = tmp_path / "saved.toml"
    saved.write_text("[train]\nepochs = 100.0\ntime_budget = 9.5\n")
    assert resolve_config(parse_args(["pretrain", "--config", str(saved)])).train.time_budget == 9.5
    assert capsys.readouterr().err == ""
    # an --epochs flag over a file's budget: epochs, said
    cfg = resolve_config(parse_args(["pretrain", "--config", str(budget), "--epochs", "0.02"]))
    assert (cfg.train.epochs, cfg.train.time_budget) == (0.02, 0.0)
    assert capsys.readouterr().err == ("note: --epochs 0.02 sets the run's length; the config file's train.time_budget "
                                       "0.05 min is not used\n")


@pytest.mark.parametrize("when", ["export", "exit"])
def test_a_stop_signal_after_the_last_step_is_said_to_have_come_too_late(tmp_path: Path, env: dict[str, str],
                                                                        when: str) -> None:
    """A SIGTERM while the encoder was exported, with no probe to follow, was answered "writing a
    checkpoint at the next step, then stopping" and the run then exited 0, finished; one in the
    interpreter's exit after the run (0.7 s) killed the complete run with 143, which a scheduler
    reads as failed. Both now exit 0, saying so. A real run whose export, or whose process once
    `main` has returned, sends the signal to itself."""
    run = tmp_path / "run"
    code = ("import os, signal, sys, time\n"
            "import fastclr.pretraining.loop as loop\n"
            "from fastclr.cli import main\n"
            "save = loop.save_encoder\n"
            "def save_then_signalled(*a, **k):\n"
            "    save(*a, **k)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            f"if {when == 'export'}:\n"
            "    loop.save_encoder = save_then_signalled\n"
            f"code = main(['pretrain', '--data', 'mnist', '--epochs', '1', '--run-dir', {str(run)!r}, "
            f"'--probe', 'false', *{TINY!r}])\n"
            f"if {when == 'exit'}:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.2)\n"
            "sys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr
    said = ["SIGTERM received: stopping once the encoder is saved (training is over)",
            "note: SIGTERM came too late to stop the run: it trained to its end and its encoder is saved; there is "
            "nothing to resume"] if when == "export" else ["SIGTERM received after the run finished: nothing to stop"]
    assert r.stderr.strip().splitlines()[-len(said):] == said, r.stderr
    assert (run / "encoder.safetensors").exists()


def test_a_reader_that_goes_away_does_not_end_the_run(tmp_path: Path, env: dict[str, str]) -> None:
    """`fastclr pretrain ... 2>&1 | head -1`: the first write after head exited raised BrokenPipeError,
    which ended the run at its first steps with exit 1, no message and no checkpoint. It now trains
    to its end, writes everything, and exits 0."""
    run = tmp_path / "run"
    flags = [f for f in TINY if f != "--quiet"]
    env = {k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as in a pipe
    p = subprocess.Popen([sys.executable, "-m", "fastclr", "pretrain", "--data", "mnist", "--run-dir", str(run),
                          "--epochs", "2", "--log-every", "1", *flags], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    first = p.stdout.readline()
    p.stdout.close()  # the reader is gone, as `head -1` after its line
    assert p.wait(timeout=240) == 0, first
    assert (run / "encoder.safetensors").exists() and (run / "probe.json").exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
             if '"loss"' in line]
    assert steps[-1] == 2 * (256 // 32)  # both epochs of the 256 synthetic images


@pytest.mark.parametrize("closed", [">&-", "2>&-", ">&- 2>&-"])
def test_a_command_started_with_its_output_closed_does_its_work(closed: str, tmp_path: Path,
                                                                env: dict[str, str]) -> None:
    """`fastclr prepare DIR --out S >&-`: Python starts with no sys.stdout, and the first line
    printed raised AttributeError (exit 120, the store written, pretrain dead at its first line).
    The command now runs to its end and exits 0, and its store holds every image."""
    from PIL import Image

    from fastclr.data.store import read_store

    (tmp_path / "images").mkdir()
    for i in range(6):
        Image.new("L", (12, 12), 40 * i).save(tmp_path / "images" / f"{i}.png")
    store = tmp_path / "store"
    argv = [sys.executable, "-m", "fastclr", "prepare", str(tmp_path / "images"), "--size", "8", "--out", str(store)]
    r = subprocess.run(["sh", "-c", f'exec "$@" {closed}', "sh", *argv], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    if closed == "2>&-":
        assert ": 6 images (unlabeled, 1 channel)" in r.stdout
    elif closed == ">&-":
        assert "Traceback" not in r.stderr and "prepare 6/6 files" in r.stderr
    images = read_store(store).images
    assert sorted(int(a[0, 0, 0]) for a in images) == [0, 40, 80, 120, 160, 200]


@pytest.mark.parametrize("error, says", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)"), "1.0 GiB more and the system"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 79.19 GiB"),
     "2.50 GiB more and the GPU"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
                  "allocate 3221225472 bytes."), "3.0 GiB more and the system"),  # Windows' wording
    (torch.OutOfMemoryError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB)"), ""),
    (MemoryError(), "system"),  # Python's, from NumPy or bytes (a checkpoint's hashing under a memory limit)
    (MemoryError("Unable to allocate 234. MiB for an array with shape (60000, 1024) and data type float32"),
     "234.0 MiB more and the system"),  # NumPy's _ArrayMemoryError
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"), None),
])
def test_out_of_memory_is_one_line_naming_the_size_and_the_fix(error: Exception, says: str | None,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A batch too large for the machine ended any command in a traceback (the CPU allocator's
    RuntimeError, CUDA's OutOfMemoryError, Python's MemoryError); another RuntimeError is a fault and
    keeps its traceback."""
    import fastclr.info
    from fastclr.cli import main

    def fails(**kwargs: object) -> int:
        raise error

    monkeypatch.setattr(fastclr.info, "main", fails)
    if says is None:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            main(["info", "--no-measure"])
        return
    assert main(["info", "--no-measure"]) == 2  # info can be given nothing that needs less
    asked = "ran out of system memory" if says == "system" else f"asked for {says} refused it" if says else \
        "ran out of device memory"
    assert capsys.readouterr().err == (f"error: out of memory: fastclr info {asked}; run where there is more memory; "
                                       "files already complete were kept\n")


@pytest.mark.parametrize("protocols, fix", [
    (None, "give a smaller --batch-size or --quality-images, or fewer --protocols, or "),
    ("linear,knn", ""),  # they share the features computed once: leaving one out frees nothing
    ("linear", ""),
    ("supervised", "give a smaller --batch-size, or "),
    ("quality,finetune", "give a smaller --batch-size or --quality-images, or fewer --protocols, or "),
    ("all", "give a smaller --batch-size or --quality-images, or fewer --protocols, or "),
])
def test_evaluate_out_of_memory_names_only_the_flags_its_protocols_use(protocols: str | None, fix: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--batch-size sets only the runs that train (supervised, finetune) and --quality-images only the
    label-free measures: the advice named both for `--protocols linear`, where neither lowers anything."""
    import fastclr.evaluation.cli
    from fastclr.cli import main

    def fails(args: object) -> int:
        raise MemoryError("Unable to allocate 1.50 GiB for an array with shape (60000, 6700) and data type float32")

    monkeypatch.setattr(fastclr.evaluation.cli, "cmd_evaluate", fails)
    argv = ["evaluate", str(tmp_path)] + ([] if protocols is None else ["--protocols", protocols])
    assert main(argv) == 2
    assert capsys.readouterr().err == ("error: out of memory: fastclr evaluate asked for 1.5 GiB more and the system "
                                       f"refused it; {fix}run where there is more memory; files already complete were kept\n")


# Limits its own address space to what it holds once torch and fastclr are imported, plus 2 GiB: a
# fixed limit depended on the build (CUDA's libraries map gigabytes) and the machine (thread stacks).
UNDER_A_LIMIT = """import resource, sys
from fastclr.entry import main
held = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) << 10
resource.setrlimit(resource.RLIMIT_AS, (held + (2 << 30), held + (2 << 30)))
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux: the address space read from /proc")
def test_a_batch_too_large_for_a_real_memory_limit_is_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    """The default network at 10x its width with 2 GiB of address space beyond what the imported
    program holds (ulimit -v): the allocator refuses its weights or the first step's activations,
    and the run ends in one line, exit 2 (a traceback before; the same for batch 8192 at width 1 on
    Fashion-MNIST). The checks made before the run pass: they see the machine's memory, not the
    address-space limit. Two threads and two malloc arenas, so that a many-core machine's reserved
    address space does not use up the limit first. (16x the width under 6 GiB took 50 s; this, 10 s.)"""
    r = subprocess.run([sys.executable, "-c", UNDER_A_LIMIT, "pretrain", "--data", "mnist", "--run-dir", str(tmp_path / "r"),
                        "--epochs", "1e-9", "--probe", "false", "--quiet", "--batch-size", "256", "--width", "10",
                        "--device", "cpu", "--threads", "2"],
                       env={**env, "MALLOC_ARENA_MAX": "2"}, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.splitlines()[-1]
    assert re.fullmatch(r"error: out of memory: fastclr pretrain (asked for [\d.]+ [KMG]iB more and the system "
                        r"refused it|ran out of system memory); give a smaller --batch-size or --width, or run where "
                        r"there is more memory; files already complete were kept", last), last
    assert not (tmp_path / "r" / "encoder.safetensors").exists()


@pytest.mark.skipif(not Path("/dev/full").exists() or not Path("/proc/self/fd").is_dir(), reason="Linux devices")
def test_output_sent_where_it_cannot_be_written_is_named_in_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    """`fastclr info > /dev/full` (as a full disk behind `> log`): one line naming the file stdout
    writes to, exit 2; it said "cannot write a file" with the current folder's free space."""
    with open("/dev/full", "w", encoding="utf-8") as full:
        r = subprocess.run([sys.executable, "-m", "fastclr", "info", "--no-measure"], stdout=full, stderr=subprocess.PIPE,
                           text=True, env=env, cwd=tmp_path, timeout=120)
    assert (r.returncode, r.stderr) == (2, "error: cannot write /dev/full (No space left on device); files already "
                                           "complete were kept; free space there or choose another place, and run the "
                                           "command again\n")


def test_a_refused_write_names_the_file_once_and_drops_what_follows(tmp_path: Path) -> None:
    from fastclr.streams import ClosedPipeGuard

    log = tmp_path / "log.txt"
    with open(log, "w", encoding="utf-8") as f:
        class Full:
            def write(self, s: str) -> int:
                raise OSError(errno.ENOSPC, "No space left on device")

            def fileno(self) -> int:
                return f.fileno()

        guard = ClosedPipeGuard(Full())  # type: ignore[arg-type]
        with pytest.raises(OSError) as e:
            guard.write("step 1\n")
        assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(log))
        assert guard.write("step 2\n") == 7 and guard.reader_gone  # the rest is dropped, not raised again


def test_a_terminal_that_hung_up_takes_no_more_output_and_ends_nothing() -> None:
    """A job left running when its terminal closed (disowned: no SIGHUP) gets EIO on each write there;
    the first ended the command with exit 2 and no checkpoint. Dropped, as a closed pipe's."""
    from fastclr.streams import ClosedPipeGuard

    class HungUp:
        def isatty(self) -> bool:
            return True

        def write(self, s: str) -> int:
            raise OSError(errno.EIO, "Input/output error")

        def fileno(self) -> int:
            raise OSError(errno.EBADF, "no descriptor here")

    guard = ClosedPipeGuard(HungUp())  # type: ignore[arg-type]
    assert guard.write("step 1\n") == 7 and guard.reader_gone


def test_the_free_space_is_named_only_for_a_file_on_a_disk(tmp_path: Path) -> None:
    from fastclr.files import write_failure_reason

    full = OSError(errno.ENOSPC, "No space left on device")
    for target in ("pipe:[12345]", "<stdout>", "socket:[7]"):
        assert write_failure_reason(full, Path(target)) == "No space left on device"
    assert "free there" in write_failure_reason(full, tmp_path / "log.txt")


def test_private_names_are_not_looked_up_as_submodules_of_the_package() -> None:
    """`hasattr(fastclr, "__main__")` imported fastclr/__main__.py, which ran the command line and exited."""
    import fastclr

    assert not hasattr(fastclr, "__main__") and not hasattr(fastclr, "_nothing")


def test_the_guard_passes_writes_through_until_the_pipe_closes() -> None:
    import io

    from fastclr.streams import ClosedPipeGuard

    class Pipe(io.StringIO):
        closed_by_reader = False

        def write(self, s: str) -> int:
            if self.closed_by_reader:
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(s)

    pipe = Pipe()
    guard = ClosedPipeGuard(pipe)  # type: ignore[arg-type]
    assert guard.write("step 1\n") == 7 and pipe.getvalue() == "step 1\n"
    pipe.closed_by_reader = True
    assert guard.write("step 2\n") == 7 and guard.reader_gone  # dropped, not raised
    pipe.closed_by_reader = False
    guard.write("step 3\n")
    assert pipe.getvalue() == "step 1\n" and guard.isatty() is False


def test_an_interrupted_command_exits_130_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C in a command (pretraining stops itself with EXIT_STOPPED instead) ends it with the
    status a shell gives a process killed by SIGINT, 128 + 2, and one line: no traceback."""
    import signal

    import fastclr.info
    from fastclr.cli import main

    def interrupted(**kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(fastclr.info, "main", interrupted)
    assert main(["info", "--no-measure"]) == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip() == "interrupted"


CTRL_C_IN_IMPORT = """
import importlib.abc, os, signal, sys

class CtrlC(importlib.abc.MetaPathFinder):  # SIGINT arrives while torch is being imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
from fastclr.entry import main
sys.exit(main(["info", "--no-measure"]))
"""


def test_ctrl_c_while_the_command_starts_exits_130_with_one_line(tmp_path: Path) -> None:
    """A real SIGINT during the first seconds (importing torch) ends the command as one later does:
    exit 130 and "interrupted", not a traceback through the import machinery."""
    import signal

    # As a terminal starts a command: a background job of a script (this suite's, maybe) starts with SIGINT
    # ignored, and Python then never raises KeyboardInterrupt.
    r = subprocess.run([sys.executable, "-c", CTRL_C_IN_IMPORT], capture_output=True, text=True, timeout=120,
                       env=cli_env(tmp_path), cwd=tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert (r.returncode, r.stderr.strip(), r.stdout) == (130, "interrupted", "")


def test_every_public_name_of_the_package_is_its_modules_own() -> None:
    """Imported on first use, each name in `fastclr.__all__` is the object its module defines; a
    submodule is reached as an attribute as before (`fastclr.models.ResNet` after `import fastclr`)."""
    import importlib

    import fastclr
    from fastclr.models import ResNet

    for name in fastclr.__all__:
        assert getattr(fastclr, name) is getattr(importlib.import_module(fastclr._WHERE.get(name, "fastclr.version")), name)
    assert fastclr.models.ResNet is ResNet and set(fastclr.__all__) <= set(dir(fastclr))
    with pytest.raises(AttributeError, match="has no attribute 'pretrian'"):
        fastclr.pretrian  # noqa: B018
    assert not hasattr(fastclr, "models.ResNet")  # raised ModuleNotFoundError, which hasattr does not catch
    # What a type checker sees (the TYPE_CHECKING imports) names what the interpreter gets: a name in
    # __all__ missing there is an error in a user's checked `from fastclr import ...`.
    import ast

    tree = ast.parse(Path(fastclr.__file__).read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    typed = {a.name: n.module for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert typed == fastclr._WHERE and set(fastclr.__all__) == set(typed) | {"__version__"}


def test_the_command_starts_without_importing_torch_until_it_can_catch_ctrl_c() -> None:
    """The entry point's own imports (the `fastclr` package included) leave torch for inside it."""
    code = "import sys, fastclr, fastclr.entry; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout == "[]\n"


@pytest.mark.parametrize("error, line", [
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere/x"),
     "error: cannot use /nowhere/x (No such file or directory); give another path, or fix it or its permissions"),
    (PermissionError(errno.EACCES, "Permission denied", "/etc/x"),
     "error: cannot use /etc/x (Permission denied); give another path, or fix it or its permissions"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "error: cannot write a file (Disk quota exceeded); files already "),
    (OSError(errno.ENOSPC, "No space left on device", "out.bin"),
     "error: cannot write out.bin (No space left on device; "),
])
def test_an_unusable_path_or_a_refused_write_is_one_line_exit_2(error: OSError, line: str,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An OSError no command turned into its own message: a path the user gave that cannot be used
    (missing, forbidden) or a write the file system refused (full, over quota) is one line and
    exit 2; any other OSError is a bug and keeps its traceback."""
    import fastclr.info
    from fastclr.cli import main

    def failing(**kwargs: object) -> int:
        raise error

    monkeypatch.setattr(fastclr.info, "main", failing)
    assert main(["info", "--no-measure"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
    monkeypatch.setattr(fastclr.info, "main", lambda **kwargs: (_ for _ in ()).throw(OSError(errno.ECONNREFUSED, "x")))
    with pytest.raises(ConnectionRefusedError):
        main(["info", "--no-measure"])


def test_a_refused_write_that_names_no_file_names_the_commands_output_and_its_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A library's writer failing without a file name (`prepare --builtin` onto a full disk) said
    "cannot write a file (No space left on device; 62.1 GiB free there)": the free space of the
    folder above the working directory, not of the full disk. It names the command's output now,
    and the space where that is."""
    import shutil

    import fastclr.ingest.builtin
    from fastclr.cli import main

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fastclr.ingest.builtin, "write_builtin_store", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0) if str(p) == str(tmp_path)
                        else shutil._ntuple_diskusage(10, 0, 62 * 2**30))
    out = tmp_path / "mn"
    assert main(["prepare", "--builtin", "mnist", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: cannot write into {out} (No space left on device; 0.0 B free there); "
                                       "files already complete were kept; free space there or choose another place, "
                                       "and run the command again\n")


def test_a_folder_on_a_read_only_file_system_is_told_to_be_remounted_not_given_permissions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a read-only mount every command said "not writable ... fix its permissions", which no
    chmod can: the file system is named, and the fix is to remount it (or write elsewhere)."""
    import os

    from fastclr.errors import FastclrError
    from fastclr.files import unwritable
    from fastclr.runs import prepare_run_dir, refuse_uncreatable

    class ReadOnly:
        f_flag = os.ST_RDONLY

    assert unwritable(tmp_path) == ("is not writable", "fix its permissions")
    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly())
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert unwritable(tmp_path) == ("is on a read-only file system", "remount it read-write")
    with pytest.raises(FastclrError) as e:
        refuse_uncreatable(tmp_path / "out")
    assert str(e.value) == (f"--out {tmp_path / 'out'}: {tmp_path} is on a read-only file system; give another --out or "
                            "remount it read-write")
    with pytest.raises(FastclrError) as e:
        prepare_run_dir(tmp_path)
    assert str(e.value) == (f"run directory {tmp_path} is on a read-only file system; choose another with --run-dir or "
                            "remount it read-write")
    with pytest.raises(FastclrError) as e:  # --resume D --run-dir E is refused: the way out is a copy
        prepare_run_dir(tmp_path, resuming=True)
    assert str(e.value) == (f"run directory {tmp_path} is on a read-only file system; copy it to a writable place and "
                            "resume the copy, or remount it read-write")


def test_a_writer_threads_full_disk_leaves_the_one_line_to_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    """TensorBoard's event writer thread, on a full disk, printed its whole traceback before the
    command's one line (the writer hands the error to the main thread at its next write). Inside a
    command a thread's refused write prints nothing; any other thread error keeps its traceback."""
    import threading

    from fastclr.cli import quiet_thread_write_errors

    class EventWriter(threading.Thread):  # as TensorBoard's _AsyncWriterThread is named
        pass
    EventWriter.__module__ = "tensorboard.summary.writer.event_file_writer"

    def run(error: BaseException, kind: type[threading.Thread] = EventWriter) -> str:
        def fail() -> None:
            raise error
        with quiet_thread_write_errors():
            t = kind(target=fail)
            t.start()
            t.join()
        return capsys.readouterr().err

    full = OSError(errno.ENOSPC, "No space left on device")
    assert run(full) == ""
    err = run(ValueError("a bug"))
    assert "Traceback" in err and "ValueError: a bug" in err
    # another thread's (an experiment tracker's, which hands nothing to the main thread) is shown
    assert "No space left on device" in run(full, threading.Thread)
    hook = threading.excepthook
    with quiet_thread_write_errors():
        pass
    assert threading.excepthook is hook


def test_a_path_the_output_encoding_lacks_is_written_escaped_not_a_traceback(tmp_path: Path) -> None:
    """Windows writes a redirected stdout in its ANSI code page: `pretrain --run-dir runs/猫x > log`
    ended in UnicodeEncodeError with a run half started, and `prepare` exited 1 after writing its
    store whole. The line is written with the character escaped, the rest of the text as it is."""
    import io

    from fastclr.streams import ClosedPipeGuard

    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="cp1252")
    guard = ClosedPipeGuard(stream)  # type: ignore[arg-type]
    guard.write("run runs/猫x: café\n")
    guard.flush()
    assert raw.getvalue().decode("cp1252") == "run runs/\\u732bx: café\n"
    env = cli_env(tmp_path)
    env["PYTHONIOENCODING"] = "cp1252"
    r = run_cli(["pretrain", "--data", "mnist", "--epochs", "0.1", "--probe", "false", *TINY, "runs/猫x"], env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "runs" / "猫x" / "encoder.safetensors").exists()


def test_a_symbolic_link_that_leads_to_itself_is_one_line(tmp_path: Path) -> None:
    """pathlib's resolve() raises RuntimeError('Symlink loop from ...') and open() ELOOP: each was a
    traceback (--run-dir, --config, export --out, ...)."""
    env = cli_env(tmp_path)
    (tmp_path / "L").symlink_to("L")
    r = call_main(["pretrain", "--data", "mnist", "--run-dir", "L/sub", *TINY], env, tmp_path)
    (line,) = r.stderr.strip().splitlines()
    assert r.returncode == 2 and line in (  # pathlib's error before Python 3.13, and the system's since
        f"error: cannot use '{tmp_path / 'L' / 'sub'}' (a symbolic link that leads back to itself); give another path, "
        "or fix the link",
        f"error: cannot use {tmp_path / 'L'} (Too many levels of symbolic links); give another path, or fix it or its "
        "permissions")
    r = call_main(["pretrain", "--config", "L", *TINY], env, tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: cannot use L (Too many levels of symbolic links); give another path, or fix it or its permissions"]


def test_an_error_naming_a_path_with_control_characters_reaches_no_terminal_raw(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file name with an escape sequence, named in an error line (a corrupt upload given to `neighbours
    --query`, a run directory), cleared the screen and retitled the window: every error line escapes them."""
    from fastclr.cli import main

    assert main(["evaluate", str(tmp_path / "\x1b]0;PWNED\x07\x1b[2Jrun")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and r"\x1b]0;PWNED\x07\x1b[2Jrun" in err, err
