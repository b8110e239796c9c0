"""Writing files: where a write lands."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fastclr.errors import FastclrError
from fastclr.files import through_link, write_text


def test_a_runs_own_file_that_is_a_link_into_another_run_is_replaced_not_written_through(tmp_path: Path) -> None:
    """A run copied with links (`cp -rs`, a DVC cache): its resume, evaluation or report must not write
    into the other run's (or the cache's) files."""
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "metrics.jsonl").write_text("theirs\n")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "metrics.jsonl").symlink_to(tmp_path / "original" / "metrics.jsonl")
    write_text(copy / "metrics.jsonl", "mine\n")
    assert not (copy / "metrics.jsonl").is_symlink() and (copy / "metrics.jsonl").read_text() == "mine\n"
    assert (tmp_path / "original" / "metrics.jsonl").read_text() == "theirs\n"


def test_export_through_a_link_writes_the_linked_file_in_its_format_with_its_sidecar(tmp_path: Path) -> None:
    """`fastclr export RUN --out latest.pt`, a link into a models folder: the rename made the link a plain
    file beside the folder's, which kept its old bytes; the format and the sidecar's name follow the file
    the link leads to (its suffix says safetensors here). A read-only target is refused in one line."""
    from safetensors.torch import load_file

    from fastclr.cli import main
    from tiny import tiny_dataset, tiny_run

    run = tiny_run(tmp_path / "run", tiny_dataset(64))
    (tmp_path / "models").mkdir()
    target = tmp_path / "models" / "enc.safetensors"
    target.write_bytes(b"stale")
    link = tmp_path / "latest.pt"
    link.symlink_to(Path("models") / "enc.safetensors")  # relative, as `ln -s` makes them
    assert main(["export", str(run), "--format", "fastclr", "--out", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(Path("models") / "enc.safetensors") and load_file(str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "models", "run"]
    target.chmod(stat.S_IRUSR)
    if not os.access(target, os.W_OK):  # (root may write any file)
        assert main(["export", str(run), "--format", "fastclr", "--out", str(link)]) == 2
        with pytest.raises(FastclrError, match=r"latest.pt links to .*enc.safetensors, which is read-only"):
            through_link(link)


def test_embed_through_a_link_writes_the_linked_array_and_its_index_beside_it(tmp_path: Path) -> None:
    """`fastclr embed RUN DATA --out latest.npy`, a link into a shared folder: the pair was written beside
    the link, which became a plain file, and the folder kept the old array under a new index nowhere.
    Now the array lands at the link's target and its index beside the target, the link kept."""
    import numpy as np

    from fastclr.ingest.embed import INDEX_COLUMNS, write_embeddings

    shared = tmp_path / "shared"
    shared.mkdir()
    old = np.zeros((1, 4), np.float32)
    np.save(shared / "v3.npy", old)
    (shared / "v3.csv").write_text(",".join(INDEX_COLUMNS) + "\n")
    link = tmp_path / "latest.npy"
    link.symlink_to(Path("shared") / "v3.npy")
    rows = [{k: f"{k}{i}" for k in INDEX_COLUMNS[1:]} for i in range(2)]
    features = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert write_embeddings(link, features, rows) == (shared / "v3.npy", shared / "v3.csv")
    assert link.is_symlink() and np.array_equal(np.load(link), features)
    assert (shared / "v3.csv").read_text().splitlines()[1].startswith("0,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.npy", "shared"]
    # `--out current.csv`, a link to the index: the link was replaced by a file, beside a new current.npy
    index_link = tmp_path / "current.csv"
    index_link.symlink_to(Path("shared") / "v3.csv")
    assert write_embeddings(index_link, features[::-1].copy(), rows) == (shared / "v3.npy", shared / "v3.csv")
    assert index_link.is_symlink() and np.array_equal(np.load(shared / "v3.npy"), features[::-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.csv", "latest.npy", "shared"]


def test_a_write_removes_what_a_killed_write_of_the_same_file_left_and_nothing_else(tmp_path: Path) -> None:
    """`embed` killed with -9 while writing left `.feats.npy.XXXXXXXX.tmp` for good (only a run's own
    files were swept, under its lock). The next write of the same file removes its temporaries that
    no writer touched for 10 minutes; a fresh one (a live write), another file's and a user's file stay."""
    from fastclr.files import STALE_TEMPORARY_S

    old = os.path.getmtime(tmp_path) - STALE_TEMPORARY_S - 60
    names = {"stale": ".feats.npy.k3_x9q0a.tmp", "live": ".feats.npy.ab12cd34.tmp",
             "other file's": ".feats.npy.x.ab12cd34.tmp", "user's": ".feats.npy.notmine.tmp"}
    for what, name in names.items():
        (tmp_path / name).write_bytes(b"partial")
        if what != "live":
            os.utime(tmp_path / name, (old, old))
    write_text(tmp_path / "feats.npy", "whole")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["feats.npy", *(n for w, n in names.items() if w != "stale")])
    assert (tmp_path / "feats.npy").read_text() == "whole"
    # names past TEMP_NAME_KEPT bytes share their temporaries' cut prefix: another file's stays
    long_a, long_b = "x" * 200 + "_a.npy", "x" * 200 + "_b.npy"
    of_b = tmp_path / f".{'x' * 200}.k3_x9q0a.tmp"  # what b's killed write left: the same prefix as a's
    of_b.write_bytes(b"partial")
    os.utime(of_b, (old, old))
    write_text(tmp_path / long_a, "whole")
    assert of_b.exists() and (tmp_path / long_a).read_text() == "whole" and not (tmp_path / long_b).exists()


def test_an_unwritable_default_output_is_named_without_a_flag_the_user_never_gave(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fastclr report RUN` on a read-only run said "--out RUN: RUN is not writable; give another
    --out", with no --out given: the default place is named as such, and --out offered."""
    from fastclr.runs import refuse_unwritable_file

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != run)  # as for a user without write permission
    with pytest.raises(FastclrError) as given:
        refuse_unwritable_file(run / "report.html")
    with pytest.raises(FastclrError) as default:
        refuse_unwritable_file(run / "report.html", given=False)
    assert str(given.value) == f"--out {run}: {run} is not writable; give another --out or fix its permissions"
    assert str(default.value) == f"{run} is not writable; give --out elsewhere or fix its permissions"
