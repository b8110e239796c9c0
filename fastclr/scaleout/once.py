"""A rank's one-line error, printed once a node instead of once a rank.

A setting error is found by every rank alike, so eight ranks printed the same line eight times.
Under `fastclr-torchrun` the launcher makes a folder for its ranks (`ONCE_DIR` in their
environment): the first rank to claim a line there by creating a file named after it prints it;
a rank that finds the line claimed stays silent. It waits until the line is printed before it
returns (and prints it itself if it never is), because torchrun ends the other ranks as soon as one fails: if the silent rank exited first,
the printing one could be killed before its line was out. A line only some ranks reach (a file one
node lacks, a peer one rank lost) is still printed by each rank that reaches a different one.
Without the launcher's folder (plain torchrun, one process) every line is printed.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

ONCE_DIR = "FASTCLR_ONCE_DIR"


def resume_command(run_dir: object, environ: Mapping[str, str] = os.environ) -> str:
    """How to continue `run_dir` as this process was started: a rank under `fastclr-torchrun` (its
    folder in the environment) or plain torchrun (WORLD_SIZE above 1) is told its launcher's command
    (told `fastclr pretrain --resume`, the run would go on as one process), a single process
    `fastclr pretrain --resume`."""
    if environ.get(ONCE_DIR):
        return f"the same fastclr-torchrun command and --resume {run_dir}"
    if environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        return f"the same torchrun command and --resume {run_dir}"
    return f"`fastclr pretrain --resume {run_dir}`"
_PRINTED = b"printed"


def print_once_a_node(line: str, *, file: TextIO, environ: Mapping[str, str] = os.environ,
                      wait_s: float = 10.0) -> bool:
    """Print `line` to `file` unless another rank of this launcher printed it; True when printed here.
    A rank that finds it claimed returns once the claimant has printed it; if that has not happened
    within `wait_s` (the claimant died), it prints the line itself: a duplicate, never a lost line."""
    folder = environ.get(ONCE_DIR)
    if not folder:
        print(line, file=file, flush=True)
        return True
    claim = Path(folder) / hashlib.sha256(line.encode()).hexdigest()[:32]
    try:
        fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            try:
                if claim.read_bytes() == _PRINTED:
                    return False
            except FileNotFoundError:  # the launcher removed its folder: its ranks are over
                return False
            time.sleep(0.01)
        print(line, file=file, flush=True)
        return True
    except OSError:  # the folder is gone or unwritable: a duplicate line, never a lost one
        print(line, file=file, flush=True)
        return True
    try:
        print(line, file=file, flush=True)
        os.write(fd, _PRINTED)
    finally:
        os.close(fd)
    return True
