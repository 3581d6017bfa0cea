"""A run's checkpoints: when one is due, writing it so that a kill at any moment leaves the last complete one
loadable, keeping the last K, and finding the newest complete one to continue from (TorchTitan's checkpoint manager
has this one job too; the training loop only calls it).

Files in the run folder:
- `ckpt-00001500.pt`: one checkpoint per kept step, written as `.tmp`, fsynced, then renamed into place;
- `checkpoints.json`: the marker of completeness, the kept checkpoints (step, file, bytes, sha256), rewritten
  atomically after each checkpoint is in place; a checkpoint is loaded only if the marker lists it and its bytes
  hash to the recorded sha256;
- `ckpt.pt`: the newest complete checkpoint under the name older tools and readers use (a hard link to it, or a copy
  where the file system has no links). A run folder from before the marker holds only this file, and loads as before.

Writing costs the training loop only the copy of the state to host memory (`snapshot`); serialising, hashing and
fsyncing happen on a background thread while the next steps run, and the next checkpoint (or the end of the run)
waits for that write first.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .runtime import TrainError, load_checkpoint

LATEST, MARKER = "ckpt.pt", "checkpoints.json"
NAME = re.compile(r"ckpt-(\d{8})\.pt")


def file_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def snapshot(obj):
    """A copy of a checkpoint's state on the host that later training steps cannot change: tensors copied to the CPU
    (the model's and optimizer's are updated in place by the next step), containers rebuilt, plain values kept."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class _Hashing(io.RawIOBase):
    """A file opened for writing that hashes what goes through it (torch.save writes once, we hash as it writes)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # not every file system syncs a directory
        pass
    finally:
        os.close(fd)


class Checkpoints:
    """The checkpoints of the run folder `out`. `every_steps` and `every_minutes` (either may be 0: off) say when a
    checkpoint is due; `keep` how many stay (the newest `keep` complete ones)."""

    def __init__(self, out: Path, keep: int = 1, every_steps: int = 0, every_minutes: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.out, self.keep, self.every_steps, self.every_minutes, self.clock = Path(out), keep, every_steps, \
            every_minutes, clock
        self.last_time = clock()
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_seconds = 0.0  # how long the last write took (on its thread)

    # --- when ---------------------------------------------------------------------------------------------------

    def due_by_steps(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0

    def due_by_time(self) -> bool:
        return bool(self.every_minutes) and self.clock() - self.last_time >= 60 * self.every_minutes

    # --- writing ------------------------------------------------------------------------------------------------

    def save(self, state: dict, step: int, wait: bool = False) -> float:
        """Start writing `state` (already a `snapshot`) as the checkpoint of `step`; returns the seconds this call
        blocked (waiting for the previous write). `wait`: return only when this one is complete too."""
        t0 = time.perf_counter()
        self.wait()
        self.last_time = self.clock()
        self._writer = threading.Thread(target=self._write_guarded, args=(state, step), name="checkpoint",
                                        daemon=True)
        self._writer.start()
        if wait:
            self.wait()
        return time.perf_counter() - t0

    def wait(self) -> None:
        """Until the write in progress is complete; its error, if it failed, is raised here (one line)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise TrainError(f"writing a checkpoint in {self.out} failed: {error}") from None

    def _write_guarded(self, state: dict, step: int) -> None:
        try:
            self._write(state, step)
        except BaseException as e:  # reported by the next wait(), in the training thread
            self._error = e

    def _write(self, state: dict, step: int) -> None:
        t0 = time.perf_counter()
        name = file_name(step)
        path, tmp = self.out / name, self.out / (name + ".tmp")
        with open(tmp, "wb") as f:
            hashing = _Hashing(f)
            torch.save(state, hashing)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.out)
        entry = {"step": step, "file": name, "bytes": hashing.size, "sha256": hashing.sha.hexdigest()}
        self._link_latest(path)
        kept = [e for e in self.entries() if e["step"] != step and (self.out / e["file"]).is_file()] + [entry]
        kept.sort(key=lambda e: e["step"])
        gone, kept = kept[: -self.keep], kept[-self.keep:]
        _atomic_json(self.out / MARKER, {"format": 1, "checkpoints": kept})  # now the new one counts as complete
        for e in gone:
            (self.out / e["file"]).unlink(missing_ok=True)
        self.last_seconds = time.perf_counter() - t0

    def _link_latest(self, path: Path) -> None:
        tmp = self.out / (LATEST + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # a file system without hard links: a copy
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, self.out / LATEST)

    # --- reading ------------------------------------------------------------------------------------------------

    def entries(self) -> list[dict]:
        """The complete checkpoints the marker lists, oldest first ([] without a marker or with a damaged one)."""
        try:
            raw = json.loads((self.out / MARKER).read_bytes()[: 1 << 20])
            entries = raw["checkpoints"]
            ok = all(isinstance(e, dict) and isinstance(e.get("step"), int) and NAME.fullmatch(str(e.get("file")))
                     and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str) for e in entries)
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return []
        return sorted(entries, key=lambda e: e["step"]) if ok else []

    def exists(self) -> bool:
        """Is there anything to continue from (a listed checkpoint, or an older run's ckpt.pt)?"""
        return bool(self.entries()) or (self.out / LATEST).is_file()

    def load_latest(self, resume: bool = True, note: Callable[[str], None] = print) -> tuple[dict, Path] | None:
        """The newest complete checkpoint and its file: the newest the marker lists whose bytes match their record
        (an older one, with a note, when the newest is damaged); without a marker, `ckpt.pt` as older runs wrote it.
        None when there is none."""
        entries = self.entries()
        if not entries:
            path = self.out / LATEST
            return (load_checkpoint(path, resume=resume), path) if path.is_file() else None
        for entry in reversed(entries):
            path = self.out / entry["file"]
            try:
                with open(path, "rb") as f:
                    raw = f.read(entry["bytes"] + 1)
            except OSError:
                raw = b""
            if len(raw) == entry["bytes"] and hashlib.sha256(raw).hexdigest() == entry["sha256"]:
                return load_checkpoint(io.BytesIO(raw), resume=resume, name=path), path
            note(f"note: {path} does not match {self.out / MARKER} (damaged after it was written); trying the one "
                 "before it")
        raise TrainError(f"no checkpoint {self.out / MARKER} lists is intact: the run cannot continue from this folder")

    def remove_temporaries(self) -> None:
        """What a write killed part-way left (the caller holds the run folder's lock: nothing is being written)."""
        for tmp in list(self.out.glob("ckpt-*.pt.tmp")) + [self.out / (LATEST + ".tmp"), self.out / (MARKER + ".tmp")]:
            tmp.unlink(missing_ok=True)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
