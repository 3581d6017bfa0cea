"""Pre-training data rendered on the fly (`train.pretrain --render MANIFEST`): no shards, no disk.

Every sample comes from `fracgen.render_sample(manifest, k, m)`, fracgen's one public way to its renderer: instance
m of class k drawn from the manifest's class systems and per-sample seeds. Instance m < per_class is, bit for bit,
the image in the shards; every instance beyond is a fresh, seeded draw of the same class system (new chaos-game
points and patch masks), so a run stays reproducible however many it draws.

Which samples a run sees (`--instances N`):
- N > 0: N instances per class, sample i = instance i // C of class i % C (the shards' order). Epochs are
  permutations of those C x N samples dealt out by `data.EpochSampler`, exactly as the in-memory cache deals out a
  shard folder's samples, so with N = per_class a run trains on the very batches the shards would give it.
- N = 0 (unbounded): epoch e shows every class once, in an order drawn from (seed, e), as instance e: a fresh
  instance of every class every epoch, none ever twice.
Either way micro-batch t of rank r is a pure function of (seed, t, rank): the same for any number of loader workers,
and a resumed run continues the sequence where its checkpoint stopped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from fracgen import manifest as fracgen_manifest
from fracgen import render_sample
from fracgen.errors import FracgenError

from . import data, rng
from .runtime import TrainError

CHUNK = 256  # samples per job when the in-memory cache is rendered
# Bounds on --instances N > 0: an epoch's order is one permutation of C x N positions (8 bytes each) on every rank.
MAX_EPOCH = 2**26  # images an epoch: a 512 MiB permutation
MAX_INSTANCES = MAX_EPOCH  # per class, checked before the manifest is read (one class)


def read_manifest(path: Path) -> dict:
    """The manifest of `fracgen render --out DIR` (DIR or DIR/manifest.json); its shards need not exist, nor even
    have finished: the class systems are in the manifest from the start of a render."""
    path = Path(path)
    file = path / "manifest.json" if path.is_dir() else path
    if not file.is_file():
        raise TrainError(f"--render {path}: no manifest there (give a `fracgen render` output folder or its "
                         "manifest.json)")
    try:
        manifest = fracgen_manifest.load_manifest(file)
    except FracgenError as e:
        raise TrainError(str(e)) from None
    if len(manifest["classes"]) != manifest["num_classes"]:
        raise TrainError(f"{file} holds {len(manifest['classes'])} class systems, num_classes says "
                         f"{manifest['num_classes']}")
    try:
        render_sample(manifest, 0, 0)  # this fracgen can draw it (same renderer); the kernels compile once, here
    except FracgenError as e:
        raise TrainError(f"--render {path}: {e}") from None
    return manifest


def render_images(manifest: dict, samples: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, instance) pairs drawn: (n, 1, size, size) uint8 images and (n,) int64 labels."""
    size = data.image_size(manifest)
    images = torch.empty(len(samples), 1, size, size, dtype=torch.uint8)
    for j, (k, m) in enumerate(samples):
        image, _ = render_sample(manifest, k, m)
        images[j, 0] = torch.from_numpy(image)
    return images, torch.tensor([k for k, _ in samples], dtype=torch.int64)


class Draws:
    """The (class, instance) pairs of micro-batch t on this rank (see the module's docstring)."""

    def __init__(self, num_classes: int, instances: int, batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_classes * instances > MAX_EPOCH:
            raise TrainError(f"--instances {instances:,} x {num_classes:,} classes is {num_classes * instances:,} "
                             f"images an epoch, more than the {MAX_EPOCH:,} a run can deal out (each epoch's order "
                             "is held in memory); give fewer, or --instances 0 for a fresh instance every epoch")
        self.num_classes, self.instances = num_classes, instances
        self.sampler = data.EpochSampler(num_classes * (instances or 1), batch, seed, rank, world_size)

    def crop_key(self) -> int:
        """This rank's key for what else is drawn for its micro-batches (their crops; the counter: the micro-step)."""
        return rng.derive_key(self.sampler.seed, 0xC209, self.sampler.rank)

    def __call__(self, micro_step: int) -> list[tuple[int, int]]:
        items, epochs = self.sampler.indices(micro_step)
        if self.instances:
            return [(i % self.num_classes, i // self.num_classes) for i in items.tolist()]
        return list(zip(items.tolist(), epochs.tolist(), strict=True))


class _Batches(IterableDataset):
    """Micro-batches [first, last) rendered in loader workers: worker w of W renders first + w, first + w + W, ...,
    and the DataLoader takes one batch from each worker in turn, so they arrive in order."""

    def __init__(self, manifest: dict, draws: Draws, first: int, last: int, crop=None):
        self.manifest, self.draws, self.first, self.last, self.crop = manifest, draws, first, last, crop

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for t in range(self.first + worker, self.last, workers):
            images, labels = render_images(self.manifest, self.draws(t))
            if self.crop is not None:  # from (seed, rank, t): the same crops for any number of workers
                images = self.crop(images, self.draws.crop_key(), t)
            yield images, labels


def loader(manifest: dict, draws: Draws, first: int, last: int, workers: int, pin_memory: bool = False,
           crop=None) -> DataLoader:
    """Micro-batches `first` to `last - 1` as (B, 1, H, W) uint8 images and labels, rendered by `workers` loader
    processes (0: in this one), for augmentation on the device. `crop` (a `train.augment.HostCrop`): the workers
    also cut each sample to its crop at the model's size."""
    return DataLoader(_Batches(manifest, draws, first, last, crop), batch_size=None, num_workers=workers,
                      pin_memory=pin_memory)


class _Chunks(Dataset):
    def __init__(self, manifest: dict, n: int):
        self.manifest, self.n = manifest, n

    def __len__(self) -> int:
        return -(-self.n // CHUNK)

    def __getitem__(self, j: int):
        c = self.manifest["num_classes"]
        return render_images(self.manifest, [(i % c, i // c) for i in range(j * CHUNK, min((j + 1) * CHUNK, self.n))])


def render_all(manifest: dict, instances: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All C x `instances` samples in the shards' order (sample i = instance i // C of class i % C), rendered by
    `workers` loader processes: the in-memory cache, as `data.load_images` decodes it from the shards."""
    parts = list(DataLoader(_Chunks(manifest, manifest["num_classes"] * instances), batch_size=None,
                            num_workers=workers))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def eval_batches(manifest: dict, samples: int, batch: int = 256):
    """The first `samples` samples in the shards' order, as (uint8 images, labels) batches: the same clean images
    the shard paths measure the pretext accuracy on."""
    c = manifest["num_classes"]
    for start in range(0, samples, batch):
        yield render_images(manifest, [(i % c, i // c) for i in range(start, min(start + batch, samples))])
