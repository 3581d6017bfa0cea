"""WebDataset shards written byte-for-byte reproducibly, and read back for checking.

Tar members get a fixed mtime, owner and mode and a fixed order, so the same samples always give
the same bytes. A shard is written under a temporary name and renamed when complete, so a final
name on disk always means a finished shard.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fracgen import png
from fracgen.errors import FracgenError
from fracgen.limits import MAX_MAPS
from fracgen.untrusted import parse_json

EXTENSIONS = ("cls", "json", "png")  # members of a sample, in tar order


@dataclass(frozen=True)
class Sample:
    key: str  # no dots: webdataset splits the member name at the first dot
    png: bytes
    label: int
    meta: dict


def encode_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self):
        return True

    def tell(self):
        return self.size

    def write(self, b):
        self.f.write(b)
        self.sha.update(b)
        self.size += len(b)
        return len(b)


BLOCK = 512  # tar's block size
RECORD = 20 * BLOCK  # tar pads the archive to whole records, as Python's tarfile does


def ustar_header(name: str, size: int) -> bytes:
    """The USTAR header of a regular file with mode 644, owner 0:0, no owner names and mtime 0: the
    bytes Python 3.11's tarfile writes for such a member (a test checks), built without its per-member
    overhead (80 us, a quarter of a sample's end-to-end time once the renderer got fast)."""
    raw = name.encode()
    if len(raw) > 100:
        raise FracgenError(f"tar member name longer than 100 bytes: {name}")
    h = bytearray(BLOCK)
    h[0 : len(raw)] = raw
    h[100:157] = b"0000644\x000000000\x000000000\x00%011o\x0000000000000\x00        0" % size
    h[257:265] = b"ustar\x0000"
    h[148:155] = b"%06o\x00" % sum(h)  # the checksum counts its own field as 8 spaces
    return bytes(h)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> object:
    """Call write(fileobj) on a temporary file beside `path`, fsync, then rename it into place."""
    tmp, result = _write_unfinished(Path(path), write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def _write_samples(f, samples: Iterable[Sample], name: str) -> dict:
    hw = _HashingWriter(f)
    n = 0
    for s in samples:
        payload = {"cls": str(s.label).encode(), "json": encode_json(s.meta), "png": s.png}
        for ext in EXTENSIONS:
            data = payload[ext]
            hw.write(ustar_header(f"{s.key}.{ext}", len(data)) + data + bytes(-len(data) % BLOCK))
        n += 1
    hw.write(bytes(2 * BLOCK))  # end of archive
    hw.write(bytes(-hw.size % RECORD))
    return {"file": name, "samples": n, "bytes": hw.size, "sha256": hw.sha.hexdigest()}


def write_shard_unfinished(path: Path, samples: Iterable[Sample]) -> tuple[Path, dict]:
    """Write one shard under a temporary name beside `path` and return (that name, its manifest entry). The caller
    renames it into place once it has recorded it, so only the process that keeps the records ever makes a file
    under a final name (a render's worker that outlives its parent cannot)."""
    path = Path(path)
    return _write_unfinished(path, lambda f: _write_samples(f, samples, path.name))


def shard_in_memory(name: str, samples: Iterable[Sample]) -> tuple[bytes, dict]:
    """A shard's bytes and its manifest entry, for a worker that does not see the output folder."""
    buf = io.BytesIO()
    entry = _write_samples(buf, samples, name)
    return buf.getvalue(), entry


def write_bytes_unfinished(path: Path, data: bytes, entry: dict) -> Path:
    """`write_shard_unfinished` for a shard a worker sent as bytes; they must be the bytes its entry describes."""
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise FracgenError(f"shard {entry['file']} arrived from a worker with other bytes than the worker recorded")
    return _write_unfinished(Path(path), lambda f: f.write(data))[0]


def why_not_written(error: OSError, folder: Path) -> str:
    """An OSError of a write as a person needs it: a full disk (or quota) says so, with what is free where (the
    temporary file is already gone)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free"
        except OSError:
            free = "free space unknown"
        return (f"{error.strerror or 'no space left'} (the disk is full: {free} in {folder}): make room, then run "
                "the same command again")
    return error.strerror or str(error)


def _write_unfinished(path: Path, write) -> tuple[Path, object]:
    """Every file fracgen writes goes through here, so a full disk or a lost permission names the file (the
    OSError of a write or fsync names none)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise FracgenError(f"cannot write {path}: {why_not_written(e, path.parent)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; shards are for sharing
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise FracgenError(f"cannot write {path}: {why_not_written(e, path.parent)}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), result


def matches(path: Path, entry: dict) -> bool:
    """A shard on disk is what a record says only when its size and sha256 are the recorded ones."""
    try:
        if path.stat().st_size != entry["bytes"]:
            return False
    except OSError:
        return False
    return file_sha256(path) == (entry["sha256"], entry["bytes"])


def file_sha256(path: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of a shard, in order, read with the plain tarfile module."""
    key, parts = None, {}
    with tarfile.open(path, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, _, ext = m.name.partition(".")
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            parts[ext] = tar.extractfile(m).read()
    if key is not None:
        yield key, parts


def check_sample(key: str, parts: dict[str, bytes], num_classes: int, size: int | None = None) -> str | None:
    """Why a sample is broken, or None. With `size`, its image must be size x size (checked before it is
    inflated: see `png.decode`)."""
    missing = [e for e in EXTENSIONS if e not in parts]
    if missing:
        return f"sample {key} lacks .{', .'.join(missing)}"
    try:
        label = int(parts["cls"])
    except ValueError:
        return f"sample {key} has a non-integer .cls"
    if not 0 <= label < num_classes:
        return f"sample {key} has class {label} outside 0..{num_classes - 1}"
    if not key.startswith(f"c{label:06d}-"):
        return f"sample {key} has class {label} in its .cls"
    try:
        parse_json(parts["json"], f"sample {key}'s .json", MAX_META_BYTES + META_BYTES_PER_MAP * MAX_MAPS)
        png.decode(parts["png"], size)
    except FracgenError as e:
        return f"sample {key}: {e}"
    return None


def verify_shard(path: Path, entry: dict, num_classes: int, size: int | None = None, first: int | None = None
                 ) -> str | None:
    """Why a shard disagrees with its manifest entry, or None when it is intact. With `first` (the shard's first
    sample index), its samples must be those the writer puts there, in order: sample i is instance i // C of
    class i % C."""
    if not path.is_file():
        return "missing"
    digest, size_on_disk = file_sha256(path)
    if size_on_disk != entry["bytes"]:
        return f"size {size_on_disk} bytes, manifest says {entry['bytes']}"
    if digest != entry["sha256"]:
        return f"sha256 {digest[:12]}... does not match the manifest's {entry['sha256'][:12]}..."
    return check_shard_contents(path, entry, num_classes, size, first)


def check_shard_contents(path: Path, entry: dict, num_classes: int, size: int | None = None,
                         first: int | None = None) -> str | None:
    """The sample-by-sample half of `verify_shard`: what `pull` checks in a shard before it keeps it."""
    n = 0
    try:
        for key, parts in iter_samples(path):
            if first is not None and key != f"c{(first + n) % num_classes:06d}-i{(first + n) // num_classes:06d}":
                return f"sample {n} is {key[:40]!r}, not the sample the manifest puts there"
            problem = check_sample(key, parts, num_classes, size)
            if problem:
                return problem
            n += 1
            if n > entry["samples"]:
                break
    except tarfile.TarError as e:
        return f"not a readable tar: {e}"
    if n != entry["samples"]:
        return f"{'at least ' if n > entry['samples'] else ''}{n} samples, manifest says {entry['samples']}"
    return None


MAX_META_BYTES = 1024  # a sample's .json without its maps; each map adds at most META_BYTES_PER_MAP (measured: ~300)
META_BYTES_PER_MAP = 512


def max_sample_bytes(size: int, maps: int) -> int:
    """The most one sample can take in a shard: three tar headers padded to blocks, a class number, the .json, and
    a PNG of `size` rows that deflate stored uncompressed (5 bytes per 64 KiB block) plus its 57 bytes of chunks."""
    png_bytes = png.stored_bytes(size * (size + 1)) + 57
    return 3 * 2 * BLOCK + 24 + MAX_META_BYTES + META_BYTES_PER_MAP * maps + png_bytes


def max_shard_bytes(samples: int, size: int, maps: int) -> int:
    """The most a shard of `samples` samples can take (tar's end blocks and record padding included): a manifest
    listing more is not fracgen's, and `pull` never writes more."""
    return samples * max_sample_bytes(size, maps) + 2 * BLOCK + RECORD
