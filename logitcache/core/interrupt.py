"""Ctrl-C that is never lost.

Python drops a KeyboardInterrupt raised inside a fork handler (the moment a DataLoader
starts its workers), and the run would go on as if nothing happened. The CLI's handler
therefore also records the signal, and the training and dump loops re-raise it at their
next step. Signals are process-wide, so this state is too.

Worker processes (`train-student --jobs`) follow their parent: they stop the same way when
the parent asks them to, and exit at once when the parent is gone (killed, or ended by a
signal it does not catch), instead of training on with nobody to receive the result.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

_received = threading.Event()


def install() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        sys.unraisablehook = _quiet_interrupt


def _quiet_interrupt(info, default=sys.unraisablehook) -> None:
    """A swallowed Ctrl-C is recorded, not printed as a traceback; after Ctrl-C, so is the noise of objects it cut
    off half-built (a DataLoader iterator stopped while starting its workers fails in its destructor); anything
    else as usual."""
    if _received.is_set() or (info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt)):
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


def follow_parent(stop, poll: float = 0.5) -> None:
    """In a worker process: stop as on Ctrl-C once the parent sets `stop` (a multiprocessing Event), and exit
    at once when the parent is gone; what is left on disk is then what a kill leaves, resumable state only."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            if stop.wait(poll):
                _received.set()
                time.sleep(poll)
        os._exit(1)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()
