"""One writer per output folder: an exclusive lock held for the whole run.

The lock is `flock` on FOLDER/.fracgen.lock, so the kernel releases it when its holder dies, even by kill -9: a
lock is never left held by a dead process on this host. The file also names its holder (pid, host, start time,
command) for the message a refused writer prints. The holder empties it when it finishes; a file that still names
someone while nobody holds the lock was left by a run that died: on this host that is certain (its pid is gone or
holds no lock) and the lock is taken over with a note; a holder on another host may be alive on a file system that
does not share flocks between hosts, so that case is refused with the command that clears it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fracgen.errors import FracgenError
from fracgen.untrusted import parse_json, redact

LOCK_NAME = ".fracgen.lock"


class FolderBusy(FracgenError):
    """Another live process holds the folder's lock (a caller that can wait for it tells this case apart)."""


def _describe(holder: dict) -> str:
    if holder.get("pid") is None:  # it holds the lock but has not written its record yet
        return "another process that has just started"
    started = holder.get("started")
    since = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{since}{command}"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class FolderLock:
    """`with FolderLock(folder, command): ...` holds the folder for one writer; raises FracgenError when another
    run holds it. `note` receives the one-line message when a stale lock is taken over."""

    def __init__(self, folder: str | Path, command: str = "", note: Callable[[str], None] | None = None):
        self.folder, self.command, self.note = Path(folder), command, note
        self.fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16)
        try:
            holder = parse_json(raw, str(self.path)) if raw.strip() else {}
        except FracgenError:
            holder = {"pid": "?", "host": "?"}
        return holder if isinstance(holder, dict) else {"pid": "?", "host": "?"}

    def __enter__(self) -> FolderLock:
        try:  # never through a link: the holder record would truncate whatever the link points at
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise FracgenError(f"{self.path} is a symbolic link, not a lock fracgen made: remove it "
                                   "(fracgen writes into its lock file and will not write through a link)") from None
            raise FracgenError(f"cannot create the lock {self.path}: {e.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise FracgenError(f"{self.path} is not a regular file, so not a lock fracgen made: remove it")
        if info.st_nlink > 1:  # a hard link: writing the holder record would truncate the file it shares
            os.close(fd)
            raise FracgenError(f"{self.path} has {info.st_nlink} names (a hard link), so it is not a lock fracgen "
                               "made: remove it (fracgen writes into its lock file and will not write another file)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise FolderBusy(f"{self.folder} is being written by {_describe(holder)}: one writer per folder; wait "
                               "for it to finish or choose another folder") from None
        holder = self._read(fd)
        host = socket.gethostname()
        if holder.get("pid") not in (None, os.getpid()):
            if holder.get("host") != host:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                raise FracgenError(f"{self.folder} is locked by {_describe(holder)}, another host, whose run this "
                                   f"host cannot see; if it has ended, delete {self.path}")
            if self.note:
                state = "still running but not holding it" if _pid_alive(holder["pid"]) else "no longer running"
                self.note(f"taking over the lock of {self.folder} left by pid {holder['pid']} ({state})")
        record = json.dumps({"pid": os.getpid(), "host": host, "started": time.time(),
                             "command": redact(self.command)})  # readable by all: no password of a URL
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode() + b"\n", 0)
            os.fsync(fd)
        except OSError as e:  # a full disk: name the file (the error names none)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise FracgenError(f"cannot write the lock {self.path}: {e.strerror or e}") from None
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # nobody holds it now; the file stays, so a waiting opener locks the same one
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


@contextmanager
def waiting_lock(folder: str | Path, command: str = "", note: Callable[[str], None] | None = None,
                 wait: float = 3600.0, poll: float = 2.0) -> Iterator[FolderLock]:
    """Hold `folder`'s lock, waiting up to `wait` seconds (one note when the wait begins) while another live process
    holds it: for caches that several jobs of one host fill, where the second should use what the first fetched."""
    start, said = time.monotonic(), False
    while True:
        try:
            lock = FolderLock(folder, command, note).__enter__()
            break
        except FolderBusy as e:
            if time.monotonic() - start > wait:
                raise
            if note and not said:
                note(f"waiting: {e}")
                said = True
            time.sleep(poll)
    try:
        yield lock
    finally:
        lock.__exit__(None, None, None)


@contextmanager
def writing_folder(folder: str | Path, command: str = "", note: Callable[[str], None] | None = None,
                   name: str | None = None) -> Iterator[FolderLock]:
    """Create `folder` if needed and hold its lock for the block. A run that fails before writing anything into a
    folder it created leaves no folder behind. `name` is how messages call the folder (e.g. "--out DIR")."""
    folder = Path(folder)
    name = name or str(folder)
    if folder.exists() and not folder.is_dir():
        raise FracgenError(f"{name} exists and is not a directory")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FracgenError(f"cannot create {name}: {e.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FracgenError(f"{name} is not writable")
    held = False
    try:
        with FolderLock(folder, command, note) as lock:
            held = True
            yield lock
            held = False
    except BaseException:
        # Only a run that held the lock may take the folder away: two runs can both find it missing and create it,
        # and the one refused by the lock must leave it to the other.
        if held and created and folder.is_dir() and {p.name for p in folder.iterdir()} <= {LOCK_NAME}:
            (folder / LOCK_NAME).unlink(missing_ok=True)
            folder.rmdir()
        raise
