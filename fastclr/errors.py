"""The one exception type users see: a single line that names the problem and the fix; and the
one way a warning line reaches them."""

import sys


def warn_stderr(line: str) -> None:
    """A user-facing warning line, on stderr: stdout stays the command's output (`info --json`)."""
    print(line, file=sys.stderr)


class FastclrError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits with code 2, no traceback.

    Messages are one line and say what to do, e.g.
    ``unknown encoder 'resnet19'; choose one of: cnn, resnet18, resnet34, resnet50``.
    """


class PeerFailure(FastclrError):
    """A collective failed: another rank died, hung past the timeout, or the network broke.
    The CLI exits at once after printing it (see `fastclr.cli._exit_now`)."""
