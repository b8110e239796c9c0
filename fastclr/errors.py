"""The one exception type users see: a single line that names the problem and the fix; and the
one way a warning line reaches them."""

import sys


def warn_stderr(line: str) -> None:
    """A user-facing warning line, on stderr: stdout stays the command's output (`info --json`)."""
    print(line, file=sys.stderr)


def first_sentence(e: BaseException, limit: int = 160) -> str:
    """The first sentence of a library's message, for quoting inside a one-line error: torch's run on
    for several lines of advice ("PytorchStreamReader failed reading zip archive: failed finding central
    directory. This is an internal miniz error. If you are seeing ..."), which cut at a character count
    ends mid-word. A sentence longer than `limit` is cut at a word and marked with an ellipsis."""
    text = str(e).strip()
    text = text.splitlines()[0] if text else type(e).__name__
    end = text.find(". ")
    text = text[:end] if end > 0 else text.rstrip(".")
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + "..."
    return text


class FastclrError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits with code 2, no traceback.

    Messages are one line and say what to do, e.g.
    ``unknown encoder 'resnet19'; choose one of: cnn, resnet18, resnet34, resnet50``.
    """


class PeerFailure(FastclrError):
    """A collective failed: another rank died, hung past the timeout, or the network broke.
    The CLI exits at once after printing it (see `fastclr.cli._exit_now`)."""
