"""Ctrl-C that is never lost.

Python drops a KeyboardInterrupt raised inside a fork handler (the moment a DataLoader
starts its workers), and the run would go on as if nothing happened. The CLI's handler
therefore also records the signal, and the training and dump loops re-raise it at their
next step. Signals are process-wide, so this state is too.
"""

from __future__ import annotations

import signal
import sys
import threading

_received = threading.Event()


def install() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        sys.unraisablehook = _quiet_interrupt


def _quiet_interrupt(info, default=sys.unraisablehook) -> None:
    """A swallowed Ctrl-C is recorded, not printed as a traceback; anything else as usual."""
    if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
        _received.set()
        return
    default(info)


def _handler(signum, frame) -> None:
    _received.set()
    raise KeyboardInterrupt


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came, even when its first KeyboardInterrupt was swallowed."""
    if _received.is_set():
        raise KeyboardInterrupt
