"""fracgen data in a plain PyTorch loop: a map-style `ShardDataset` and a streaming `ShardStream`, each checked
against the folder's manifest as fracgen's own trainer checks it (every shard's size and sha256, every label below
the manifest's class count). Needs torch (`pip install 'fracgen[train]'`, or torch alone).

    from torch.utils.data import DataLoader
    from fracgen.torch import ShardDataset

    ds = ShardDataset("shards/", transform=torchvision.transforms.ToTensor())   # or https://..., s3://, hf://
    image, label = ds[0]                    # a PIL image (8-bit grey) through `transform`, and its class
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=4)

A URL, s3:// or hf:// source is pulled once into a cache folder named by its manifest's sha256 (`fracgen pull`'s
rules; `cache_dir`, default $XDG_CACHE_HOME/fracgen), then read locally. `ShardDataset` indexes every sample once
(checking each shard as it reads it) and then reads each image by its offset: random access, any sampler
(`DistributedSampler` included). `ShardStream` reads shards in order, hashing each as it goes, for sets larger than
one wants to index; it splits the shards over DataLoader workers and torch.distributed ranks itself.

What a shard may claim is checked before it costs anything: its size on disk against the manifest's before a byte of
it is read (a sparse file of terabytes is refused by its size), its bytes hashed in 1 MiB chunks as they are read,
no member read that is larger than a whole sample of the manifest's size can be, and every image's PNG header
against the manifest's size and 8-bit grey before it is inflated (a 140 KB PNG can claim 12000 x 12000 px).

Over several torch.distributed ranks the shards must deal out evenly: every (rank, DataLoader worker) the same
number of samples. A rank that finishes its epoch first leaves the others waiting at their next all-reduce forever
(3 ranks x 2 workers over 4 shards gave 50, 50 and 0 samples), so an uneven split is one FracgenError line with the
counts, raised by every rank at its first sample. `ShardStream(..., equal=True)` instead has every (rank, worker)
read ceil(samples / (ranks x workers)) of them, going round the shards again where its own run out: the same length
everywhere, a few samples seen twice an epoch, as DistributedSampler pads (fracgen's trainer resamples shards and
cuts every rank's epoch to one length). The workers of a single process may get different counts: nothing waits.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image

from fracgen import png, share
from fracgen.errors import FracgenError
from fracgen.limits import MAX_MAPS
from fracgen.manifest import read_manifest
from fracgen.shards import max_sample_bytes

MAX_CLS_BYTES = 32  # a .cls holds a class number: a few digits
COLOURS = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}  # PNG's colour types


def local_folder(source: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The local folder of `source`: a folder as it is, a published one (http(s), s3://, hf://) pulled into the
    cache first (only what is missing; every shard checked before it is kept)."""
    if not share.is_remote(str(source)):
        return Path(source)
    cache = Path(cache_dir).expanduser() if cache_dir else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fracgen"
    src = share.open_source(str(source))
    remote = share.fetch_manifest(src)
    return share.pull(src, cache / remote.sha256, remote=remote).folder


def _refused(folder: Path, shard: str, what: str) -> FracgenError:
    return FracgenError(f"shard {folder / shard} does not match its manifest ({what}): check the folder with "
                        f"`fracgen verify {folder}`")


def _label(payload: bytes, classes: int, folder: Path, shard: str, key: str) -> int:
    try:
        label = int(payload) if len(payload) <= MAX_CLS_BYTES else -1
    except ValueError:
        label = -1
    if not 0 <= label < classes:
        raise _refused(folder, shard, f"sample {key[:40]!r} has class {payload[:20]!r}, not one of {classes}")
    return label


def _largest_member(manifest: dict) -> int:
    """Bytes no member of a sample can exceed (a whole sample of the manifest's size, with the most maps): a larger
    one is refused before it is read."""
    return max_sample_bytes(manifest["image"]["size"], MAX_MAPS)


def _open_shard(folder: Path, entry: dict):
    """A shard opened once its size on disk is the manifest's: compared before a byte is read."""
    try:
        f = open(folder / entry["file"], "rb")  # noqa: SIM115 (closed by the caller)
        size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise _refused(folder, entry["file"], e.strerror or "unreadable") from None
    if size != entry["bytes"]:
        f.close()
        raise _refused(folder, entry["file"], f"size: {size:,} bytes, the manifest says {entry['bytes']:,}")
    return f


def _image(data: bytes, manifest: dict, folder: Path, shard: str, sample: str) -> Image.Image:
    """A sample's PNG as a PIL image (mode L), decoded only once its header says the manifest's size and 8-bit grey
    (`png.decode` then inflates no more than that size needs)."""
    side = manifest["image"]["size"]
    try:
        width, height, depth, colour, _ = png.header(data)
        if (width, height, depth, colour) != (side, side, 8, 0):
            raise _refused(folder, shard, f"{sample} is a {width}x{height} px {depth}-bit "
                                          f"{COLOURS.get(colour, f'colour type {colour}')} PNG, not the manifest's "
                                          f"{side}x{side} px 8-bit grey")
        return Image.fromarray(png.decode(data, side))
    except png.PNGError as e:
        raise _refused(folder, shard, f"{sample}: {e}") from None


class ShardDataset(torch.utils.data.Dataset):
    """Every sample of a fracgen folder, by index: `ds[i]` is (image, class) of sample i (instance i // C of class
    i % C); `transform` is applied to the PIL image (mode "L"), `target_transform` to the class."""

    def __init__(self, source: str | Path, transform: Callable | None = None,
                 target_transform: Callable | None = None, cache_dir: str | Path | None = None):
        self.folder = local_folder(source, cache_dir)
        self.manifest = read_manifest(self.folder)
        self.transform, self.target_transform = transform, target_transform
        self.index: list[tuple[str, int, int, int]] = []  # (shard, offset of the PNG, its size, class)
        for entry in self.manifest["shards"]:
            self.index += self._index_shard(entry)
        if len(self.index) != self.manifest["num_samples"]:
            raise FracgenError(f"{self.folder} holds {len(self.index)} samples, its manifest says "
                               f"{self.manifest['num_samples']}: check it with `fracgen verify {self.folder}`")

    def _index_shard(self, entry: dict) -> list[tuple[str, int, int, int]]:
        """The shard's samples, read once in chunks: each sample's PNG located and its class read while the bytes
        are hashed; nothing of it is used unless its size and sha256 are the manifest's."""
        with _open_shard(self.folder, entry) as f:
            reader = _Hashing(f, hashlib.sha256())
            try:
                samples, problem = self._locate(reader, entry), None
            except (FracgenError, tarfile.TarError, EOFError) as e:  # reported once the bytes are known to match
                samples, problem = {}, e
            differs = reader.finish(entry)
        if differs:
            raise _refused(self.folder, entry["file"], differs)
        if isinstance(problem, FracgenError):
            raise problem
        if problem is not None:
            raise _refused(self.folder, entry["file"], f"not a readable tar: {problem}")
        out = []
        for key, parts in samples.items():
            if "png" not in parts or "cls" not in parts:
                raise _refused(self.folder, entry["file"], f"sample {key[:40]!r} lacks its .png or .cls")
            out.append((entry["file"], *parts["png"], parts["cls"]))
        return out

    def _locate(self, reader: _Hashing, entry: dict) -> dict[str, dict]:
        """{key: {"png": (offset, size), "cls": class}} of a shard read front to back (tarfile's stream mode)."""
        samples: dict[str, dict] = {}
        largest = _largest_member(self.manifest)
        with tarfile.open(fileobj=reader, mode="r|", bufsize=1 << 20) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if not member.isfile() or ext not in ("png", "cls"):
                    continue
                if member.size > largest:
                    raise _refused(self.folder, entry["file"], f"sample {key[:40]!r} has a .{ext} of "
                                                               f"{member.size:,} bytes, more than a whole sample of "
                                                               f"{self.manifest['image']['size']} px takes")
                if ext == "png":
                    samples.setdefault(key, {})["png"] = (member.offset_data, member.size)
                else:
                    payload = tar.extractfile(member).read(MAX_CLS_BYTES + 1)
                    samples.setdefault(key, {})["cls"] = _label(payload, self.manifest["num_classes"], self.folder,
                                                                entry["file"], key)
        return samples

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        shard, offset, size, label = self.index[i]
        with open(self.folder / shard, "rb") as f:
            f.seek(offset)
            image = _image(f.read(size), self.manifest, self.folder, shard, f"sample {i}")
        return (self.transform(image) if self.transform else image,
                self.target_transform(label) if self.target_transform else label)


class ShardStream(torch.utils.data.IterableDataset):
    """The samples of a fracgen folder as a stream, shard by shard, each shard hashed as it is read and refused at
    its end if it is not the manifest's. The shards are dealt out over torch.distributed ranks and DataLoader
    workers (each reads its own; over several ranks they must deal out evenly, or `equal=True`: see the module
    docstring); `shuffle` shuffles the shard order and the samples within a buffer of `buffer` samples, from `seed`
    and the epoch (`set_epoch`, as DistributedSampler has it)."""

    def __init__(self, source: str | Path, transform: Callable | None = None,
                 target_transform: Callable | None = None, shuffle: bool = False, buffer: int = 1000, seed: int = 0,
                 cache_dir: str | Path | None = None, equal: bool = False):
        self.folder = local_folder(source, cache_dir)
        self.manifest = read_manifest(self.folder)
        self.transform, self.target_transform = transform, target_transform
        self.shuffle, self.buffer, self.seed, self.epoch = shuffle, buffer, seed, 0
        self.equal = equal

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def _place() -> tuple[int, int, int, int]:
        """(rank, ranks, worker, workers) of this reader."""
        rank, ranks = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, ranks = torch.distributed.get_rank(), torch.distributed.get_world_size()
        worker = torch.utils.data.get_worker_info()
        workers, wid = (worker.num_workers, worker.id) if worker else (1, 0)
        return rank, ranks, wid, workers

    def _stream(self) -> Iterator[tuple[str, str, bytes, int]]:
        """This rank and worker's samples, undecoded: slot s of S = ranks x workers reads shards s, s + S, ... of
        the epoch's order; with `equal`, round the list again until it has read ceil(samples / S)."""
        shards = list(self.manifest["shards"])
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(shards)
        rank, ranks, worker, workers = self._place()
        slot, slots = rank * workers + worker, ranks * workers
        if not self.equal:
            if ranks > 1:
                self._check_even(shards, ranks, workers)
            for entry in shards[slot::slots]:
                yield from self._samples(entry)
            return
        left = -(-sum(e["samples"] for e in shards) // slots)
        while left > 0:  # every shard holds its manifest's count (>= 1) or stops the stream: this ends
            for sample in self._samples(shards[slot % len(shards)]):
                if left > 0:  # the rest of the shard is read all the same, so that it is checked
                    yield sample
                    left -= 1
            slot += slots

    def _check_even(self, shards: list[dict], ranks: int, workers: int) -> None:
        """One line with the counts when the shards give some (rank, worker) fewer samples than another."""
        slots = ranks * workers
        counts = [sum(e["samples"] for e in shards[s::slots]) for s in range(slots)]
        if len(set(counts)) == 1:
            return
        per_rank = [sum(counts[r * workers:(r + 1) * workers]) for r in range(ranks)]
        total = sum(counts)
        raise FracgenError(
            f"{self.folder}: {len(shards)} shards ({total} samples) do not deal out evenly over {ranks} ranks x "
            f"{workers} DataLoader workers: the ranks would get {', '.join(map(str, per_rank[:8]))}"
            f"{', ...' if ranks > 8 else ''} samples (each worker {min(counts)} to {max(counts)}), and a DDP loop "
            "waits forever for the rank that ends first: pass equal=True (every worker then reads ceil("
            f"{total} / {slots}) = {-(-total // slots)} samples, going round the shards again)")

    def _samples(self, entry: dict) -> Iterator[tuple[str, str, bytes, int]]:
        """(shard, key, PNG, class) of each sample of a shard whose size on disk is the manifest's, read in chunks
        through its sha256; each is handed out as the next begins, the last only once the whole shard matched its
        manifest (size, sha256, sample count)."""
        largest, count, parts, key = _largest_member(self.manifest), 0, {}, None
        with _open_shard(self.folder, entry) as f:
            reader = _Hashing(f, hashlib.sha256())
            try:
                with tarfile.open(fileobj=reader, mode="r|", bufsize=1 << 20) as tar:
                    for member in tar:
                        k, _, ext = member.name.partition(".")
                        if not member.isfile():
                            continue
                        if k != key and key is not None:
                            yield self._sample(entry, key, parts)
                            count, parts = count + 1, {}
                        key = k
                        if member.size > largest:
                            raise _refused(self.folder, entry["file"], f"sample {k[:40]!r} has a .{ext[:10]} of "
                                                                       f"{member.size:,} bytes, more than a whole "
                                                                       f"sample of {self.manifest['image']['size']} "
                                                                       "px takes")
                        parts[ext] = tar.extractfile(member).read()
            except (tarfile.TarError, EOFError) as e:  # a changed shard can break the tar format before its end
                raise _refused(self.folder, entry["file"], reader.finish(entry) or f"not a readable tar: {e}") \
                    from None
            differs = reader.finish(entry)
        if differs:
            raise _refused(self.folder, entry["file"], differs)
        count += key is not None
        if count != entry["samples"]:
            raise _refused(self.folder, entry["file"], f"{count} sample{'s' * (count != 1)}, the manifest says "
                                                       f"{entry['samples']}")
        if key is not None:
            yield self._sample(entry, key, parts)

    def _sample(self, entry: dict, key: str, parts: dict) -> tuple[str, str, bytes, int]:
        if "png" not in parts or "cls" not in parts:
            raise _refused(self.folder, entry["file"], f"sample {key[:40]!r} lacks its .png or .cls")
        return (entry["file"], key, parts["png"],
                _label(parts["cls"], self.manifest["num_classes"], self.folder, entry["file"], key))

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch + 7919)
        pending: list[tuple[str, str, bytes, int]] = []
        for sample in self._stream():
            if not self.shuffle:
                yield self._decode(sample)
                continue
            pending.append(sample)
            if len(pending) >= self.buffer:
                yield self._decode(pending.pop(rng.randrange(len(pending))))
        rng.shuffle(pending)
        yield from (self._decode(s) for s in pending)

    def _decode(self, sample: tuple[str, str, bytes, int]):
        shard, key, data, label = sample
        image = _image(data, self.manifest, self.folder, shard, f"sample {key[:40]!r}")
        return (self.transform(image) if self.transform else image,
                self.target_transform(label) if self.target_transform else label)


class _Hashing(io.RawIOBase):
    """A file read through a sha256 (tarfile's stream mode reads it front to back once)."""

    def __init__(self, f, sha):
        self.f, self.sha, self.size = f, sha, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        chunk = self.f.read(n)
        self.sha.update(chunk)
        self.size += len(chunk)
        return chunk

    def readinto(self, b) -> int:
        chunk = self.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)

    def finish(self, entry: dict) -> str | None:
        """Read what the tar reader left (the end-of-archive blocks), no further than the manifest's size and 1 MiB;
        what differs from the manifest's record, or None."""
        while self.size <= entry["bytes"] and self.read(1 << 20):
            pass
        if self.size != entry["bytes"]:
            return f"size: {self.size:,} bytes read, the manifest says {entry['bytes']:,}"
        return None if self.sha.hexdigest() == entry["sha256"] else "sha256"
