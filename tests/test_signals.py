"""Stop signals held back where acting on them at once is unsafe."""

from __future__ import annotations

import pytest


def test_a_stop_signal_inside_deferred_signals_acts_only_where_the_block_says() -> None:
    """A handler that raises (Ctrl-C's, `cleanup_on_sigterm`'s) ran wherever its signal landed,
    inside a process pool's bookkeeping too, whose shutdown then waited on a lock for good. Inside
    the block it is held back to `run_pending`, or to the block's end without an error; an ignored
    signal stays ignored, and the handlers are given back."""
    import os
    import signal

    from fastclr.signals import deferred_signals

    class Stop(Exception):
        pass

    def raises(signum: int, frame: object) -> None:
        raise Stop(signum)

    before_term, before_hup = signal.signal(signal.SIGTERM, raises), signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        reached = []
        with pytest.raises(Stop):
            with deferred_signals() as deferred:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing held, nothing raised
                reached.append("after the signals")
                assert deferred.pending == [signal.SIGTERM]
                deferred.run_pending()
                reached.append("after run_pending")
        assert reached == ["after the signals"]
        with pytest.raises(Stop):
            with deferred_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("the block's end")
        assert reached[-1] == "the block's end"
        assert signal.getsignal(signal.SIGTERM) is raises and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before_term)
        signal.signal(signal.SIGHUP, before_hup)
