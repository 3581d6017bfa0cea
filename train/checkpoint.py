"""A run's checkpoints: when one is due, writing it so that a kill at any moment leaves the last complete one
loadable, keeping the last K, and finding the newest complete one to continue from (TorchTitan's checkpoint manager
has this one job too; the training loop only calls it).

Files in the run folder:
- `ckpt-00001500.pt`: one checkpoint per kept step, written under a new hidden temporary name, fsynced, then
  renamed into place (nothing planted in the folder, a link included, is ever written through);
- `checkpoints.json`: the marker of completeness, the kept checkpoints (step, file, bytes, sha256), rewritten
  atomically after each checkpoint is in place. It is a record to check, not an authority: an entry counts only
  if its file is its step's name, a regular file of the run folder (no link, FIFO or device) of the recorded size
  (bounded) and sha256, and the checkpoint inside says the same step; other entries are noted and ignored;
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
import shutil
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fracgen.errors import FracgenError
from fracgen.shards import atomic_write
from fracgen.untrusted import open_regular, parse_json, printable

from .model import MAX_PARAMS
from .runtime import TrainError, atomic_write_bytes, atomic_write_json, load_checkpoint

LATEST, MARKER = "ckpt.pt", "checkpoints.json"
NAME = re.compile(r"ckpt-(\d{8})\.pt")
TEMPORARY = re.compile(r"(ckpt-\d{8}\.pt|ckpt\.pt|checkpoints\.json|model\.safetensors|model\.pth|config\.json"
                       r"|summary\.json|metrics\.jsonl)\.tmp")  # names older trainers wrote their temporaries under
FORMAT = 1  # of checkpoints.json; a marker of another format lists nothing this trainer reads
MAX_MARKER_BYTES = 1 << 20  # a few lines per kept checkpoint
MAX_LISTED = 10_000
# the model, AdamW's two moments (float32) and the rest of the state, for the largest network fracgen builds
MAX_CHECKPOINT_BYTES = 3 * 4 * MAX_PARAMS + (1 << 30)


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
        self.ignored: list[str] = []  # what the marker listed that is not a checkpoint record (entries())
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
        path = self.out / name

        def save(f):
            hashing = _Hashing(f)
            torch.save(state, hashing)
            return hashing

        try:
            hashing = atomic_write(path, save)
        except FracgenError as e:
            raise TrainError(str(e)) from None
        _fsync_dir(self.out)
        entry = {"step": step, "file": name, "bytes": hashing.size, "sha256": hashing.sha.hexdigest()}
        self._link_latest(path)
        kept = [e for e in self.entries() if e["step"] != step and (self.out / e["file"]).is_file()] + [entry]
        kept.sort(key=lambda e: e["step"])
        gone, kept = kept[: -self.keep], kept[-self.keep:]
        atomic_write_json({"format": FORMAT, "checkpoints": kept}, self.out / MARKER)  # now the new one is complete
        for e in gone:
            (self.out / e["file"]).unlink(missing_ok=True)
        self.last_seconds = time.perf_counter() - t0

    def _link_latest(self, path: Path) -> None:
        tmp = self.out / f".{LATEST}.link.tmp"  # hidden: remove_temporaries takes what a kill left
        tmp.unlink(missing_ok=True)  # a link planted there goes, its target untouched
        try:
            os.link(path, tmp)  # a new entry: fails rather than follow anything
        except FileExistsError:
            raise TrainError(f"{tmp} appeared while the checkpoint was linked: another writer in {self.out}?") \
                from None
        except OSError:  # a file system without hard links: a copy
            with open(path, "rb") as src:
                atomic_write_bytes(lambda dst: shutil.copyfileobj(src, dst, 1 << 24), self.out / LATEST)
            return
        os.replace(tmp, self.out / LATEST)

    # --- reading ------------------------------------------------------------------------------------------------

    def entries(self) -> list[dict]:
        """The checkpoints the marker lists whose records are well formed, oldest first ([] without a marker or with
        a damaged one); `self.ignored` says what else it listed."""
        self.ignored = []
        try:
            with open_regular(self.out / MARKER) as f:
                raw = parse_json(f.read(MAX_MARKER_BYTES + 1), str(self.out / MARKER), MAX_MARKER_BYTES)
            listed = raw["checkpoints"][:MAX_LISTED] if raw["format"] == FORMAT else None
        except (OSError, FracgenError, KeyError, TypeError):
            return []
        entries = []
        for e in listed if isinstance(listed, list) else []:
            if _well_formed(e):
                entries.append(e)
            else:
                self.ignored.append(printable(json.dumps(e)[:120]))
        return sorted(entries, key=lambda e: e["step"])

    def exists(self) -> bool:
        """Is there anything to continue from (a marker, or an older run's ckpt.pt)?"""
        return os.path.lexists(self.out / MARKER) or os.path.lexists(self.out / LATEST)

    def load_latest(self, resume: bool = True, note: Callable[[str], None] = print) -> tuple[dict, Path] | None:
        """The newest complete checkpoint and its file: the newest the marker lists whose file matches its record
        and holds its step (an older one, with a note, when the newest is damaged); without a marker, `ckpt.pt` as
        older runs wrote it. None when there is none; one TrainError line when a marker lists none intact."""
        if not os.path.lexists(self.out / MARKER):
            path = self.out / LATEST
            if not os.path.lexists(path):
                return None
            try:
                with open_regular(path) as f:
                    return load_checkpoint(f, resume=resume, name=path), path
            except FracgenError as e:
                raise TrainError(str(e)) from None
        entries = self.entries()
        for what in self.ignored:
            note(f"note: {self.out / MARKER} lists {what}, which is not a checkpoint record; ignored")
        for entry in reversed(entries):
            path = self.out / entry["file"]
            why = _mismatch(path, entry)
            if why is None:
                raw = _read(path, entry["bytes"])
                if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
                    why = "its sha256 is not the recorded one"
                else:
                    checkpoint = load_checkpoint(io.BytesIO(raw), resume=resume, name=path)
                    if checkpoint["step"] == entry["step"]:
                        return checkpoint, path
                    why = f"it holds step {checkpoint['step']}, not {entry['step']}"
            note(f"note: {path} does not match {self.out / MARKER} ({why}); trying the one before it")
        raise TrainError(f"no checkpoint {self.out / MARKER} lists is intact: the run cannot continue from this folder")

    def remove_temporaries(self) -> None:
        """What a write killed part-way left, and anything planted under a temporary name of ours (the caller holds
        the run folder's lock: nothing is being written). Links are removed, never followed."""
        for tmp in self.out.iterdir():
            if is_temporary(tmp.name):
                if tmp.is_symlink() or not tmp.is_dir():
                    tmp.unlink(missing_ok=True)


def is_temporary(name: str) -> bool:
    """A name a write of ours leaves behind when killed: a hidden `.NAME.*.tmp` (fracgen's writer) or an older
    trainer's `NAME.tmp`."""
    return name.endswith(".tmp") and (TEMPORARY.fullmatch(name) is not None or name.startswith("."))


def _well_formed(e: object) -> bool:
    return (isinstance(e, dict) and type(e.get("step")) is int and 0 <= e["step"] < 10**8
            and e.get("file") == file_name(e["step"]) and type(e.get("bytes")) is int
            and 0 < e["bytes"] <= MAX_CHECKPOINT_BYTES and isinstance(e.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", e["sha256"]) is not None)


def _mismatch(path: Path, entry: dict) -> str | None:
    """Why the file cannot be the entry's checkpoint without reading it (missing, a link, not a regular file, another
    size), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "it is missing"
    if not stat.S_ISREG(st.st_mode):
        return "it is a link" if stat.S_ISLNK(st.st_mode) else "it is not a regular file"
    if st.st_size != entry["bytes"]:
        return f"it has {st.st_size:,} bytes, the record {entry['bytes']:,}"
    return None


def _read(path: Path, size: int) -> bytes:
    try:
        with open_regular(path) as f:
            return f.read(size + 1)
    except (OSError, FracgenError):
        return b""
