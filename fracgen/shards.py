"""WebDataset shards written byte-for-byte reproducibly, and read back for checking.

Tar members get a fixed mtime, owner and mode and a fixed order, so the same samples always give
the same bytes. A shard is written under a temporary name and renamed when complete, so a final
name on disk always means a finished shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fracgen.errors import FracgenError

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
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; shards are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return result


def write_shard(path: Path, samples: Iterable[Sample]) -> dict:
    """Write one shard atomically; return its manifest entry (file, samples, bytes, sha256)."""

    def write(f):
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
        return {"file": Path(path).name, "samples": n, "bytes": hw.size, "sha256": hw.sha.hexdigest()}

    return atomic_write(path, write)


def file_sha256(path: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def shard_entry(path: Path) -> dict:
    """The manifest entry of a finished shard already on disk."""
    digest, size = file_sha256(path)
    return {"file": Path(path).name, "samples": sum(1 for _ in iter_samples(path)), "bytes": size,
            "sha256": digest}


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


def check_sample(key: str, parts: dict[str, bytes], num_classes: int) -> str | None:
    """Why a sample is broken, or None."""
    missing = [e for e in EXTENSIONS if e not in parts]
    if missing:
        return f"sample {key} lacks .{', .'.join(missing)}"
    try:
        label = int(parts["cls"])
    except ValueError:
        return f"sample {key} has a non-integer .cls"
    if not 0 <= label < num_classes:
        return f"sample {key} has class {label} outside 0..{num_classes - 1}"
    try:
        json.loads(parts["json"])
        with Image.open(io.BytesIO(parts["png"])) as im:
            im.load()
    except Exception as e:  # any decoder failure is a corrupt sample
        return f"sample {key} does not decode: {e}"
    return None


def verify_shard(path: Path, entry: dict, num_classes: int) -> str | None:
    """Why a shard disagrees with its manifest entry, or None when it is intact."""
    if not path.is_file():
        return "missing"
    digest, size = file_sha256(path)
    if size != entry["bytes"]:
        return f"size {size} bytes, manifest says {entry['bytes']}"
    if digest != entry["sha256"]:
        return f"sha256 {digest[:12]}... does not match the manifest's {entry['sha256'][:12]}..."
    n = 0
    try:
        for key, parts in iter_samples(path):
            problem = check_sample(key, parts, num_classes)
            if problem:
                return problem
            n += 1
    except tarfile.TarError as e:
        return f"not a readable tar: {e}"
    if n != entry["samples"]:
        return f"{n} samples, manifest says {entry['samples']}"
    return None


def read_manifest(out: Path) -> dict:
    path = Path(out) / "manifest.json"
    if not Path(out).is_dir():
        raise FracgenError(f"{out} is not a directory")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FracgenError(f"no manifest.json in {out}: not a fracgen dataset") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FracgenError(f"{path} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "fracgen-shards":
        raise FracgenError(f"{path} is not a fracgen manifest")
    return manifest
