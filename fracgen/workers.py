"""Worker processes that die with the render that started them."""

from __future__ import annotations

import os
import threading
import time

_watched: int | None = None


def watch_parent(parent_pid: int) -> None:
    """In a worker process: exit at once when the render that started it dies (kill -9 included), instead of
    rendering on for nothing. Files a worker writes are only temporaries; the parent renames them."""
    global _watched
    if _watched == parent_pid or os.getpid() == parent_pid:
        return
    _watched = parent_pid

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="fracgen-parent-watch", daemon=True).start()
