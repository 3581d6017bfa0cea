"""Where a render's jobs run: worker processes on this machine that die with the render that started them (here),
or a Dask cluster's workers (`fracgen.cluster`). Both are pools with one method, `map_unordered(fn, jobs)`, that
yields each job's result as it finishes; only the render process keeps records and renames shards into place."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from joblib import Parallel, delayed

_watched: int | None = None

# A file the render writes into --out for its workers to look for: the token in it says they see this very folder,
# not another machine's folder of the same name (`fracgen.cluster`). None: the workers are on this machine.
Probe = tuple[str, str]  # (file name in --out, token it holds)
PROBE_PREFIX = ".fracgen-probe-"


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


def sees_folder(out: Path, probe: Probe | None) -> bool:
    """Whether this worker sees the render's --out (always, for the render's own machine)."""
    if probe is None:
        return True
    try:
        return (Path(out) / probe[0]).read_text() == probe[1]
    except (OSError, UnicodeDecodeError):
        return False


def _watched_call(parent_pid: int, fn: Callable, *args):
    watch_parent(parent_pid)
    return fn(*args)


class LocalPool:
    """`workers` processes on this machine (joblib's loky), each watching the render that started it."""

    probe: Probe | None = None  # the workers share this machine's folders

    def __init__(self, workers: int):
        self.workers = workers

    def attach(self, out: Path) -> str | None:
        """Called once --out exists and is locked; a cluster checks what its workers see there (a note, or None)."""
        return None

    def map_unordered(self, fn: Callable, jobs: list[tuple]) -> Iterator:
        """fn(*args) for each args in `jobs`, in worker processes; the results in the order they finish."""
        tasks = (delayed(_watched_call)(os.getpid(), fn, *args) for args in jobs)
        yield from Parallel(n_jobs=min(self.workers, max(1, len(jobs))), return_as="generator_unordered")(tasks)

    def close(self) -> None:
        pass
