"""The one exception type users see: a single line that names the problem and the fix; and the
one way a warning line reaches them."""

import re
import sys


def warn_stderr(line: str) -> None:
    """A user-facing warning line, on stderr: stdout stays the command's output (`info --json`)."""
    print(line, file=sys.stderr)


def narrate(line: str) -> None:
    """A run's line (`pretrain`'s default log): stdout, but a warning on stderr as `warn_stderr` puts
    every other, so that `fastclr pretrain > run.txt` still shows it."""
    if line.startswith("warning:"):
        warn_stderr(line)
    else:
        print(line)


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


def out_of_memory(e: BaseException) -> str | None:
    """The size an allocation that failed asked for ("1.0 GiB"; "" where the error does not say),
    where `e` is PyTorch's out-of-memory error (the CPU allocator's RuntimeError, CUDA's or MPS's
    torch.OutOfMemoryError) or Python's MemoryError (a buffer NumPy or Python could not get), else
    None: this machine's memory, not the input, and never a reason to call a file damaged."""
    from fastclr.files import size_text  # files imports this module

    text = str(e)
    if isinstance(e, MemoryError):  # NumPy's says "Unable to allocate 234. MiB for an array with shape ..."
        numpy = re.search(r"Unable to allocate ([\d.]+) ([KMGTP]?i?B)", text)
        return f"{float(numpy.group(1)):.1f} {numpy.group(2)}" if numpy else ""
    cpu = re.search(r"(?:can't allocate memory|not enough memory): you tried to allocate (\d+) bytes", text)  # Linux, Windows
    if cpu:
        return size_text(int(cpu.group(1)))
    gpu = re.search(r"out of memory\. Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
    if gpu or type(e).__name__ == "OutOfMemoryError":
        return gpu.group(1) if gpu else ""
    return None
