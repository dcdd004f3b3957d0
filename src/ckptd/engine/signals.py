"""Preemption signals: SIGTERM and SIGUSR1 request a checkpoint at the next step boundary.

A signal handler may run between any two bytecodes of the training loop, where the
state is half updated (mid optimizer step), so the handler only records the request;
``Checkpointer.step`` acts on it at the next boundary, where the state is consistent,
and makes that checkpoint durable before returning (and, after SIGTERM, before the
process exits). The previous handlers are put back when the checkpointer closes.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPT_SIGNALS) -> None:
        self.signals = signals
        self._previous: dict[signal.Signals, Any] = {}
        self.requested: signal.Signals | None = None
        """The first preemption signal received since the last ``clear``."""
        self.terminate = False
        """True once SIGTERM arrived: after the checkpoint the process should stop."""

    def install(self) -> bool:
        """Install the handlers; only possible on the main thread (returns False elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.requested is None:
            self.requested = sig
        if sig == signal.SIGTERM:
            self.terminate = True
        prev = self._previous.get(sig)
        # Chain to a Python handler someone installed before us (a launcher's or a logger's);
        # the default action (terminate) is exactly what we replace.
        if callable(prev) and prev not in (signal.SIG_DFL, signal.SIG_IGN):
            handler: Callable[[int, FrameType | None], Any] = prev
            handler(signum, frame)

    def clear(self) -> None:
        self.requested = None

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
