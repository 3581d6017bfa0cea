"""A Ctrl-C that cannot be lost. Python raises KeyboardInterrupt wherever the main thread happens to be; when that is a
finalizer (`__del__`, a weakref callback: joblib's and loky's run in the render's main thread while it waits for
its workers), Python prints "Exception ignored" and carries on, and a render went on renaming shards into place
until it was finished. `recorded()` also writes the signal down, and `check()`, called before each rename, raises it
again."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_pending = False


@contextlib.contextmanager
def recorded() -> Iterator[None]:
    """While the block runs, a SIGINT is remembered as well as raised. Only where Python's own handler is in place
    (the main thread of a program that did not set its own, or ignore the signal); elsewhere it changes nothing."""
    global _pending
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def handler(signum, frame):
        global _pending
        _pending = True
        raise KeyboardInterrupt

    _pending = False
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _pending = False


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT came during `recorded()`, even one something else swallowed."""
    if _pending:
        raise KeyboardInterrupt
