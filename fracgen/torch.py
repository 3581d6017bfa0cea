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

from fracgen import share
from fracgen.errors import FracgenError
from fracgen.manifest import read_manifest


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
        label = int(payload)
    except ValueError:
        label = -1
    if not 0 <= label < classes:
        raise _refused(folder, shard, f"sample {key[:40]!r} has class {payload[:20]!r}, not one of {classes}")
    return label


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
        """The shard's samples, read once: its bytes checked against the manifest (size, sha256), then each
        sample's PNG located and its class read."""
        path = self.folder / entry["file"]
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise _refused(self.folder, entry["file"], e.strerror or "unreadable") from None
        if len(raw) != entry["bytes"] or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise _refused(self.folder, entry["file"], "size" if len(raw) != entry["bytes"] else "sha256")
        samples: dict[str, dict] = {}
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "png":
                    samples.setdefault(key, {})["png"] = (member.offset_data, member.size)
                elif ext == "cls":
                    payload = raw[member.offset_data:member.offset_data + member.size]
                    samples.setdefault(key, {})["cls"] = _label(payload, self.manifest["num_classes"], self.folder,
                                                                entry["file"], key)
        out = []
        for key, parts in samples.items():
            if "png" not in parts or "cls" not in parts:
                raise _refused(self.folder, entry["file"], f"sample {key[:40]!r} lacks its .png or .cls")
            out.append((entry["file"], *parts["png"], parts["cls"]))
        return out

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        shard, offset, size, label = self.index[i]
        with open(self.folder / shard, "rb") as f:
            f.seek(offset)
            image = Image.open(io.BytesIO(f.read(size)))
            image.load()
        return (self.transform(image) if self.transform else image,
                self.target_transform(label) if self.target_transform else label)


class ShardStream(torch.utils.data.IterableDataset):
    """The samples of a fracgen folder as a stream, shard by shard, each shard hashed as it is read and refused at
    its end if it is not the manifest's. The shards are dealt out over torch.distributed ranks and DataLoader
    workers (each reads its own); `shuffle` shuffles the shard order and the samples within a buffer of
    `buffer` samples, from `seed` and the epoch (`set_epoch`, as DistributedSampler has it)."""

    def __init__(self, source: str | Path, transform: Callable | None = None,
                 target_transform: Callable | None = None, shuffle: bool = False, buffer: int = 1000, seed: int = 0,
                 cache_dir: str | Path | None = None):
        self.folder = local_folder(source, cache_dir)
        self.manifest = read_manifest(self.folder)
        self.transform, self.target_transform = transform, target_transform
        self.shuffle, self.buffer, self.seed, self.epoch = shuffle, buffer, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_shards(self) -> list[dict]:
        shards = list(self.manifest["shards"])
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(shards)
        rank, ranks = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, ranks = torch.distributed.get_rank(), torch.distributed.get_world_size()
        worker = torch.utils.data.get_worker_info()
        workers, wid = (worker.num_workers, worker.id) if worker else (1, 0)
        return shards[rank * workers + wid::ranks * workers]

    def _samples(self, entry: dict) -> Iterator[tuple[bytes, int]]:
        path = self.folder / entry["file"]
        sha, size, parts, key = hashlib.sha256(), 0, {}, None
        with open(path, "rb") as f:
            reader = _Hashing(f, sha)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    k, _, ext = member.name.partition(".")
                    if k != key and key is not None:
                        yield self._sample(entry, key, parts)
                        parts = {}
                    key = k
                    parts[ext] = tar.extractfile(member).read()
            while reader.read(1 << 20):  # the end-of-archive blocks count too
                pass
            size = reader.size
        if key is not None and (size != entry["bytes"] or sha.hexdigest() != entry["sha256"]):
            raise _refused(self.folder, entry["file"], "size" if size != entry["bytes"] else "sha256")
        if key is not None:
            yield self._sample(entry, key, parts)

    def _sample(self, entry: dict, key: str, parts: dict) -> tuple[bytes, int]:
        if "png" not in parts or "cls" not in parts:
            raise _refused(self.folder, entry["file"], f"sample {key[:40]!r} lacks its .png or .cls")
        return parts["png"], _label(parts["cls"], self.manifest["num_classes"], self.folder, entry["file"], key)

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch + 7919)
        pending: list[tuple[bytes, int]] = []
        for entry in self._my_shards():
            for sample in self._samples(entry):
                if not self.shuffle:
                    yield self._decode(sample)
                    continue
                pending.append(sample)
                if len(pending) >= self.buffer:
                    yield self._decode(pending.pop(rng.randrange(len(pending))))
        rng.shuffle(pending)
        yield from (self._decode(s) for s in pending)

    def _decode(self, sample: tuple[bytes, int]):
        image = Image.open(io.BytesIO(sample[0]))
        image.load()
        label = sample[1]
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
