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
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fracgen import png
from fracgen.errors import FracgenError
from fracgen.untrusted import parse_json, read_json

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


def _write_unfinished(path: Path, write) -> tuple[Path, object]:
    """Every file fracgen writes goes through here, so a full disk or a lost permission names the file (the
    OSError of a write or fsync names none)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise FracgenError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; shards are for sharing
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise FracgenError(f"cannot write {path}: {e.strerror or e}") from None
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
        return f"{'more than ' if n > entry['samples'] else ''}{n} samples, manifest says {entry['samples']}"
    return None


FORMAT_VERSION = 1  # of the shard folder: manifest.json + tar shards, as the README documents it
SHARD_FILE = re.compile(r"[A-Za-z0-9_-]+\.tar")  # a plain name in the folder: no path, not hidden
SETTINGS_USED = ("classes", "per_class", "size", "seed", "shard_size", "name", "png_level")
# settings older manifests lack (they had the defaults)
SETTINGS_SINCE_0_3 = ("system", "bases", "search", "image", "image_mode", "noise")


MAX_MAPS = 256  # the most --maps (validate_common): FractalDB draws 2..8; a sample's .json grows with the maps
MAX_META_BYTES = 1024  # a sample's .json without its maps; each map adds at most META_BYTES_PER_MAP (measured: ~300)
META_BYTES_PER_MAP = 512
VERSION = re.compile(r"[0-9A-Za-z.+-]{1,40}")


def max_sample_bytes(size: int, maps: int) -> int:
    """The most one sample can take in a shard: three tar headers padded to blocks, a class number, the .json, and
    a PNG of `size` rows that deflate stored uncompressed (5 bytes per 64 KiB block) plus its 57 bytes of chunks."""
    raw = size * (size + 1)
    png_bytes = raw + 5 * (raw // 65535 + 1) + 6 + 57
    return 3 * 2 * BLOCK + 24 + MAX_META_BYTES + META_BYTES_PER_MAP * maps + png_bytes


def max_shard_bytes(samples: int, size: int, maps: int) -> int:
    """The most a shard of `samples` samples can take (tar's end blocks and record padding included): a manifest
    listing more is not fracgen's, and `pull` never writes more."""
    return samples * max_sample_bytes(size, maps) + 2 * BLOCK + RECORD


def check_manifest(manifest: object, path: Path) -> dict:
    """The manifest if every reader can rely on it; else one FracgenError line saying what is wrong. The one place
    a manifest is checked (render --resume, verify, info, preview, publish, pull, and the trainer read it through
    here): its shape and types, settings a render accepts (the render's own checks), and totals that agree with
    those settings (counts, every shard's name and sample count, sizes no shard can exceed)."""

    def fail(what: str):
        raise FracgenError(f"{path} is not a usable fracgen manifest: {what}")

    def need(obj: dict, key: str, kind, where: str = ""):
        value = obj.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            fail(f"{where}'{key}' is {'missing' if key not in obj else type(value).__name__}, not "
                 f"{getattr(kind, '__name__', 'a number')}")
        return value

    def number(obj: dict, key: str, where: str):
        if key in obj and obj[key] is not None and (isinstance(obj[key], bool) or not isinstance(obj[key],
                                                                                                  (int, float))):
            fail(f"{where}'{key}' is {type(obj[key]).__name__}, not a number")

    if not isinstance(manifest, dict) or manifest.get("format") != "fracgen-shards":
        fail("its 'format' is not fracgen-shards")
    if need(manifest, "format_version", int) > FORMAT_VERSION:
        fail(f"format_version {manifest['format_version']} is newer than this fracgen reads ({FORMAT_VERSION})")
    need(manifest, "complete", bool)
    if not VERSION.fullmatch(str(manifest.get("fracgen_version", "0"))):
        fail("'fracgen_version' is not a version number")
    if not isinstance(manifest.get("renderer", 1), int) or isinstance(manifest.get("renderer"), bool):
        fail("'renderer' is not an integer")
    if not isinstance(manifest.get("command"), (str, type(None))):
        fail("'command' is not a string")
    settings = need(manifest, "settings", dict)
    for key in SETTINGS_USED:
        if key not in settings:
            fail(f"settings lack '{key}'")
    num_classes, num_samples = need(manifest, "num_classes", int), need(manifest, "num_samples", int)
    if num_classes < 1 or num_samples < 0:
        fail("num_classes must be >= 1 and num_samples >= 0")
    if need(need(manifest, "image", dict), "size", int, "image.") < 1:
        fail("image.size must be >= 1")
    from fracgen.dataset import validate  # the render's own checks; the systems import this module: import late
    from fracgen.settings import Settings
    from fracgen.systems import SYSTEMS

    name = settings.get("system", "1p-frac")  # manifests before fracgen 0.3 are all 1p-frac
    if name not in SYSTEMS:
        fail(f"its system {str(name)[:40]!r} is not one this fracgen knows ({', '.join(SYSTEMS)})")
    for key in SYSTEMS[name].uses:
        if key not in settings and key not in SETTINGS_SINCE_0_3:
            fail(f"settings lack '{key}'")
    fields = Settings.__dataclass_fields__
    known = {}
    for key, value in settings.items():
        if key not in fields:
            continue  # a newer fracgen's setting: the renderer check below refuses what this one cannot draw
        kind = {"int": int, "float": (int, float), "str": str, "dict | None": (dict, type(None)),
                "str | None": (str, type(None))}[fields[key].type]
        if not isinstance(value, kind) or (value is not None and isinstance(value, bool)):
            fail(f"setting '{key}' is {type(value).__name__}, not {fields[key].type}")
        known[key] = value
    try:
        s = Settings(**known)
        validate(s)
    except FracgenError as e:
        fail(f"its settings are not ones fracgen renders ({e})")
    if (num_classes, num_samples, manifest["image"]["size"]) != (s.classes, s.num_samples, s.size):
        fail(f"num_classes {num_classes}, num_samples {num_samples} and image.size {manifest['image']['size']} "
             f"contradict its settings (classes {s.classes} x per_class {s.per_class}, size {s.size})")
    base = need(manifest, "base", dict)
    if name == "1p-frac" and not isinstance(need(base, "ifs", dict, "base.").get("maps"), list):
        fail("base.ifs has no 'maps' list")
    for key in ("fill", "sigma_drawn", "attempt"):
        number(base, key, "base.")
    keys = SYSTEMS[name].class_keys
    classes = need(manifest, "classes", list)
    if len(classes) != num_classes:
        fail(f"it holds {len(classes)} classes, num_classes says {num_classes}")
    for c in classes:
        if not isinstance(c, dict) or any(key not in c for key in keys):
            fail(f"every class must be an object with {', '.join(repr(k) for k in keys)}")
        for key in ("fill", "attempt"):
            number(c, key, "a class's ")
    shards = need(manifest, "shards", list)
    if len(shards) > s.num_shards or (manifest["complete"] and len(shards) != s.num_shards):
        fail(f"it lists {len(shards)} shards; its settings make {s.num_shards}")
    for index, entry in enumerate(shards):
        if not isinstance(entry, dict):
            fail("every shard must be an object with file, samples, bytes, sha256")
        file = need(entry, "file", str, "a shard's ")
        if not SHARD_FILE.fullmatch(file):
            fail(f"shard file {file[:60]!r} is not a plain file name in the folder")
        if file != s.shard_name(index):
            fail(f"shard {index} is {file[:60]!r}, not {s.shard_name(index)!r}")
        samples, size = need(entry, "samples", int, "a shard's "), need(entry, "bytes", int, "a shard's ")
        expected = min(s.shard_size, s.num_samples - index * s.shard_size)
        if samples != expected:
            fail(f"shard {file} lists {samples} samples; its settings put {expected} in it")
        if not 0 <= size <= max_shard_bytes(samples, s.size, s.maps):
            fail(f"shard {file} lists {size:,} bytes; {samples} samples of {s.size} px take at most "
                 f"{max_shard_bytes(samples, s.size, s.maps):,}")
        if not re.fullmatch(r"[0-9a-f]{64}", need(entry, "sha256", str, "a shard's ")):
            fail(f"shard {file}: sha256 is not 64 hex digits")
    return manifest


def load_manifest(path: Path) -> dict:
    """A manifest file parsed (bounded in size and nesting) and checked (`check_manifest`)."""
    try:
        manifest = read_json(path)
    except FileNotFoundError:
        raise FracgenError(f"no {Path(path).name} at {Path(path).parent}: not a fracgen dataset") from None
    except FracgenError as e:
        raise FracgenError(f"{path} is unreadable: {e}") from None
    return check_manifest(manifest, path)


def read_manifest(out: Path) -> dict:
    if not Path(out).is_dir():
        raise FracgenError(f"{out} is not a directory")
    if not (Path(out) / "manifest.json").exists():
        raise FracgenError(f"no manifest.json in {out}: not a fracgen dataset")
    return load_manifest(Path(out) / "manifest.json")
