"""The `fastclr` command's first code: it imports the CLI (and with it torch, about 2 s) where a
Ctrl-C meanwhile ends the command as one inside it does, with "interrupted" and exit code 130."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from fastclr.cli import main as run
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return run(argv)
