"""SIGTERM (a scheduler's preemption notice) as a flag every rank of the training loop polls at step boundaries."""
from __future__ import annotations

import os
import signal
from typing import Any


class GracefulExit:
    """Turn SIGTERM (e.g. a scheduler's preemption notice) into a flag the training loop polls.

        with GracefulExit() as stop:            # or: stop = install_sigterm_handler()
            for step in ...:
                train_step()
                if stop():                      # collective: every rank calls it at the same points
                    save_checkpoint(...)
                    break

    ``stop()`` (= ``should_stop()``) is True on EVERY rank once ANY rank got the signal, so all ranks save and
    leave at the same step boundary (a rank-local flag would let one rank enter the collective save alone and
    hang). ``requested`` is the rank-local flag. A second signal restores the previous handler and re-delivers
    the signal, so a double kill / Ctrl-C still exits at once. Leaving the ``with`` block (or ``restore()``)
    reinstalls the previous handlers. Main thread only (a Python rule for signal handlers).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.requested = True

    def install(self) -> GracefulExit:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    __enter__ = install

    def __exit__(self, *exc) -> None:
        self.restore()

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank received the signal (all-reduce max; call on all ranks)."""
        from grpo.distributed import all_reduce_max

        return all_reduce_max(1.0 if self.requested else 0.0) > 0.0

    __call__ = should_stop


def install_sigterm_handler() -> GracefulExit:
    """Install the SIGTERM handler for the rest of the process; call the result (collectively) to poll it."""
    return GracefulExit().install()
