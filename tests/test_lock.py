"""fracgen/lock.py in one process (issue 39): one writer per folder, each message a refused writer reads, a stale
record taken over on this host and refused from another, the holder record's exact fields, and a folder a failed
first run created taken away again. The CLI-level tests (tests/test_reliability.py) start processes, which a mutation
pass cannot follow."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from fracgen.errors import FracgenError
from fracgen.lock import LOCK_NAME, FolderBusy, FolderLock, waiting_lock, writing_folder


def _dead_pid() -> int:
    dead = subprocess.Popen(["true"])  # not Python: a mutation pass skips tests that start Python
    dead.wait()
    return dead.pid


def _default_signals() -> None:
    """In a child before exec: every signal back to its default action, so that one sent to it ends it even where
    the tests run under nohup (SIGHUP ignored, and an ignored signal stays ignored across exec)."""
    for number in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            signal.signal(number, signal.SIG_DFL)


def test_the_holder_record_names_this_process_and_is_emptied_at_the_end(tmp_path):
    before = time.time()
    with FolderLock(tmp_path, "fracgen render --out https://user:secret@host/x") as lock:
        assert lock.path == tmp_path / LOCK_NAME
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert set(record) == {"pid", "host", "started", "command"}
        assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
        assert before <= record["started"] <= time.time()
        assert "secret" not in record["command"] and record["command"].startswith("fracgen render --out https://")
        assert (tmp_path / LOCK_NAME).read_bytes().endswith(b"}\n")
        assert lock.fd is not None
    assert lock.fd is None
    with FolderLock(tmp_path):  # no command given: an empty one, not a made-up one
        assert json.loads((tmp_path / LOCK_NAME).read_text())["command"] == ""
    assert (tmp_path / LOCK_NAME).read_bytes() == b""  # nobody holds it; the file stays for the next opener
    with FolderLock(tmp_path):  # and the next one takes it without a note
        pass


def test_a_second_writer_is_told_who_holds_the_folder_since_when_and_doing_what(tmp_path):
    with FolderLock(tmp_path, "fracgen render --out x"):
        with pytest.raises(FolderBusy) as busy:
            FolderLock(tmp_path, "other").__enter__()
    record_started = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    message = str(busy.value)
    assert message.startswith(f"{tmp_path} is being written by pid {os.getpid()} on host {socket.gethostname()} "
                              f"since {record_started}")
    assert message.endswith(" (fracgen render --out x): one writer per folder; wait for it to finish or choose "
                            "another folder")


def test_a_holder_that_has_not_written_its_record_yet_and_one_without_a_command(tmp_path):
    import fcntl

    (tmp_path / LOCK_NAME).write_bytes(b"")
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(FolderBusy, match=r"being written by another process that has just started: one writer"):
            FolderLock(tmp_path).__enter__()
        os.pwrite(fd, json.dumps({"pid": 12, "host": "h"}).encode(), 0)
        with pytest.raises(FolderBusy) as busy:
            FolderLock(tmp_path).__enter__()
        assert str(busy.value).startswith(f"{tmp_path} is being written by pid 12 on host h: one writer")
        started = 86400 * 365.5  # the holder's own start, not the reader's clock
        os.pwrite(fd, json.dumps({"pid": 12, "host": "h", "started": started}).encode(), 0)
        with pytest.raises(FolderBusy) as busy:
            FolderLock(tmp_path).__enter__()
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        assert str(busy.value).startswith(f"{tmp_path} is being written by pid 12 on host h since {since}: one")
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"{not json", 0)  # a record that cannot be read still names no one it cannot
        with pytest.raises(FolderBusy, match=r"by pid \? on host \?: one writer"):
            FolderLock(tmp_path).__enter__()
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"[1, 2]", 0)
        with pytest.raises(FolderBusy, match=r"by pid \? on host \?: one writer"):
            FolderLock(tmp_path).__enter__()
    finally:
        os.close(fd)


def test_a_record_left_by_a_dead_run_on_this_host_is_taken_over_with_a_note(tmp_path):
    pid = _dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0}))
    notes = []
    with FolderLock(tmp_path, "x", note=notes.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert notes == [f"taking over the lock of {tmp_path} left by pid {pid} (no longer running)"]
    # a live process that does not hold the lock (its pid was reused): the same, said so, and the process is only
    # asked whether it lives (signal 0), never signalled
    alive = subprocess.Popen(["sleep", "30"], preexec_fn=_default_signals)
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname()}))
        with FolderLock(tmp_path, note=notes.append):
            pass
        with pytest.raises(subprocess.TimeoutExpired):  # still alive a moment later: no signal reached it
            alive.wait(timeout=0.5)
    finally:
        alive.kill()
        alive.wait()
    assert notes[1] == (f"taking over the lock of {tmp_path} left by pid {alive.pid} "
                        "(still running but not holding it)")
    # our own record (a crash of this very process's earlier lock): no note
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with FolderLock(tmp_path, note=notes.append):
        pass
    assert len(notes) == 2


def test_a_live_process_of_another_user_counts_as_running(tmp_path, monkeypatch):
    import fracgen.lock

    def not_ours(pid, sig):  # what os.kill says of another user's live process (faked: the tests may run as root)
        raise PermissionError

    monkeypatch.setattr(fracgen.lock.os, "kill", not_ours)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))
    notes = []
    with FolderLock(tmp_path, note=notes.append):
        pass
    assert notes == [f"taking over the lock of {tmp_path} left by pid 1 (still running but not holding it)"]


def test_a_record_of_another_host_is_refused_and_the_lock_left_free(tmp_path):
    record = json.dumps({"pid": 7, "host": "elsewhere", "started": 0, "command": "fracgen render"})
    (tmp_path / LOCK_NAME).write_text(record)
    with pytest.raises(FracgenError) as refused:
        FolderLock(tmp_path).__enter__()
    assert str(refused.value) == (f"{tmp_path} is locked by pid 7 on host elsewhere (fracgen render), another host, "
                                  f"whose run this host cannot see; if it has ended, delete {tmp_path / LOCK_NAME}")
    assert (tmp_path / LOCK_NAME).read_text() == record  # untouched
    import fcntl

    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR)  # released: the refusal keeps nothing held
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


def test_links_and_other_files_under_the_lock_name_are_refused_and_left_whole(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep")
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / LOCK_NAME).symlink_to(target)
    with pytest.raises(FracgenError, match="is a symbolic link, not a lock fracgen made: remove it"):
        FolderLock(folder).__enter__()
    (folder / LOCK_NAME).unlink()
    os.link(target, folder / LOCK_NAME)
    with pytest.raises(FracgenError, match=r"has 2 names \(a hard link\), so it is not a lock fracgen made"):
        FolderLock(folder).__enter__()
    assert target.read_text() == "keep"
    (folder / LOCK_NAME).unlink()
    (folder / LOCK_NAME).mkdir()
    with pytest.raises(FracgenError, match="cannot create the lock"):
        FolderLock(folder).__enter__()
    (folder / LOCK_NAME).rmdir()
    os.mkfifo(folder / LOCK_NAME)
    with pytest.raises(FracgenError, match="is not a regular file, so not a lock fracgen made: remove it"):
        FolderLock(folder).__enter__()


def test_waiting_lock_waits_for_the_holder_with_one_note_then_gives_up_past_its_wait(tmp_path):
    notes = []
    first = FolderLock(tmp_path, "first").__enter__()
    threading.Timer(0.5, first.__exit__, (None, None, None)).start()
    start = time.monotonic()
    with waiting_lock(tmp_path, "second", note=notes.append, wait=30, poll=0.05) as lock:
        assert time.monotonic() - start >= 0.4
        assert json.loads(lock.path.read_text())["command"] == "second"
    assert len(notes) == 1 and notes[0].startswith(f"waiting: {tmp_path} is being written by pid {os.getpid()}")
    assert (tmp_path / LOCK_NAME).read_bytes() == b""  # released after the block
    with FolderLock(tmp_path), pytest.raises(FolderBusy):
        with waiting_lock(tmp_path, wait=0.2, poll=0.05):
            pass


def test_writing_folder_creates_the_folder_and_a_failed_first_run_leaves_none(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError), writing_folder(out, "x"):
        assert out.is_dir() and (out / LOCK_NAME).exists()
        raise RuntimeError
    assert not out.exists()
    with pytest.raises(RuntimeError), writing_folder(out, "x"):  # something was written: it stays
        (out / "part").write_text("1")
        raise RuntimeError
    assert (out / "part").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError), writing_folder(existing):  # not ours to remove
        raise RuntimeError
    assert existing.is_dir()
    with writing_folder(tmp_path / "ok") as lock:
        assert isinstance(lock, FolderLock) and lock.fd is not None
    assert (tmp_path / "ok").is_dir()


def test_writing_folder_refusals_name_the_folder_as_the_caller_calls_it(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(FracgenError, match=r"^--out X exists and is not a directory$"):
        with writing_folder(tmp_path / "file", name="--out X"):
            pass
    with pytest.raises(FracgenError, match=rf"^{tmp_path / 'file'} exists and is not a directory$"):
        with writing_folder(tmp_path / "file"):
            pass
    with pytest.raises(FracgenError, match=r"^cannot create --out Y: Not a directory$"):
        with writing_folder(tmp_path / "file" / "sub", name="--out Y"):
            pass
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        with pytest.raises(FracgenError, match=r"^--out Z is not writable$"):
            with writing_folder(locked, name="--out Z"):
                pass


def test_a_writer_refused_by_the_lock_leaves_the_folder_it_found_missing_to_the_holder(tmp_path):
    out = tmp_path / "out"
    with writing_folder(out, "first"):
        with pytest.raises(FolderBusy), writing_folder(out, "second"):
            pass
        assert out.is_dir() and (out / LOCK_NAME).exists()


def test_the_lock_file_is_readable_by_all_and_writable_by_its_owner(tmp_path):
    mask = os.umask(0)  # the mode asked for, as it is: 0644 (a waiting writer of another user reads the record)
    try:
        with FolderLock(tmp_path):
            assert (tmp_path / LOCK_NAME).stat().st_mode & 0o7777 == 0o644
    finally:
        os.umask(mask)


def test_a_symbolic_link_is_refused_with_the_whole_reason(tmp_path):
    (tmp_path / LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FracgenError) as refused:
        FolderLock(tmp_path).__enter__()
    assert str(refused.value) == (f"{tmp_path / LOCK_NAME} is a symbolic link, not a lock fracgen made: remove it "
                                  "(fracgen writes into its lock file and will not write through a link)")
    assert not (tmp_path / "elsewhere").exists()


def test_a_full_disk_while_writing_the_record_is_one_line_and_leaves_the_lock_free(tmp_path, monkeypatch):
    import fracgen.lock

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = len(os.listdir("/proc/self/fd"))
    with monkeypatch.context() as patched:
        patched.setattr(fracgen.lock.os, "pwrite", full)
        with pytest.raises(FracgenError) as refused:
            FolderLock(tmp_path).__enter__()
    assert str(refused.value) == f"cannot write the lock {tmp_path / LOCK_NAME}: No space left on device"
    assert len(os.listdir("/proc/self/fd")) == before  # its descriptor closed
    with FolderLock(tmp_path):  # and the lock released: the next writer takes it at once
        pass


def test_a_record_is_read_up_to_64_kib_only(tmp_path):
    """A lock file is not trusted to be small: a record past 64 KiB is not read whole (so it cannot be parsed) and
    its holder is named as unknown."""
    import fcntl

    record = json.dumps({"pid": 12, "host": "h", "command": "x" * (1 << 16)}).encode()
    (tmp_path / LOCK_NAME).write_bytes(record)
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(FolderBusy, match=r"by pid \? on host \?: one writer"):
            FolderLock(tmp_path).__enter__()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": 12, "host": "h", "command": "x" * ((1 << 16) - 100)}).encode(), 0)
        with pytest.raises(FolderBusy, match=r"by pid 12 on host h \(x+\): one writer"):
            FolderLock(tmp_path).__enter__()
    finally:
        os.close(fd)
