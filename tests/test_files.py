"""Writing files: where a write lands."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastclr.files import WriteFailed, atomic_write, write_text


def test_a_write_to_a_symbolic_link_lands_in_its_target_and_the_link_stays(tmp_path: Path) -> None:
    """`--out latest.npy`, a link into a results folder: the rename made the link a plain file beside
    the folder's, which kept its old bytes."""
    (tmp_path / "results").mkdir()
    target = tmp_path / "results" / "v3.txt"
    target.write_text("old")
    link = tmp_path / "latest.txt"
    link.symlink_to(Path("results") / "v3.txt")  # relative, as `ln -s` makes them
    write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(Path("results") / "v3.txt")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.rglob("*")) == ["latest.txt", "results",
                                                                                           "v3.txt"]
    chain = tmp_path / "chain.txt"  # a link to the link
    chain.symlink_to(link)
    atomic_write(chain, lambda f: f.write(b"newer"))
    assert chain.is_symlink() and link.is_symlink() and target.read_text() == "newer"


def test_a_link_to_a_directory_is_refused_and_kept(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    link = tmp_path / "out.txt"
    link.symlink_to(tmp_path / "folder")
    with pytest.raises(WriteFailed):
        write_text(link, "x")
    assert link.is_symlink() and list((tmp_path / "folder").iterdir()) == [] and \
        sorted(p.name for p in tmp_path.iterdir()) == ["folder", "out.txt"]


def test_export_through_a_link_updates_the_linked_file(tmp_path: Path) -> None:
    """The command a user runs, end to end: `fastclr export RUN --out latest.safetensors`."""
    from safetensors.torch import load_file

    from fastclr.cli import main
    from tiny import tiny_dataset, tiny_run

    run = tiny_run(tmp_path / "run", tiny_dataset(64))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "enc.safetensors").write_bytes(b"stale")
    link = tmp_path / "latest.safetensors"
    link.symlink_to(tmp_path / "models" / "enc.safetensors")
    assert main(["export", str(run), "--format", "fastclr", "--out", str(link)]) == 0
    assert link.is_symlink() and load_file(str(tmp_path / "models" / "enc.safetensors"))
