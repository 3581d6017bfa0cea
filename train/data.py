"""Pre-training data: read a `fracgen render` shard folder and hand its LIEP images to the training loop.

Shard format (written by fracgen, documented in the README): DIR/manifest.json with `num_classes`,
`num_samples`, `image` (`size`), `shards` (file, samples, bytes, sha256) and `settings`; each tar sample has
`__key__`, `.png` (8-bit grayscale), `.cls` (class index as ASCII) and `.json` (that class's IFS parameters).

Three ways in, one per pre-training data path (`train.pretrain --cache / --augment`):
- `load_images` + `MemorySource`: the whole set decoded once into one uint8 tensor on the device, batches drawn by
  index; augmentation on the device (`train.augment`). No loader processes.
- `uint8_loader`: shards streamed by webdataset workers that only decode and collate uint8 pixels; augmentation
  on the device. For sets too large to hold.
- `train_loader` with `train_transform`: the PIL path (`--augment cpu`): workers decode and augment each image.
No shards at all (`--render`): `train.onthefly` renders the samples into the same cache or in loader workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import torch
import torchvision.transforms as T
import webdataset as wds
from timm.data import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import InterpolationMode

from fracgen import manifest as fracgen_manifest
from fracgen import png
from fracgen.errors import FracgenError

from . import rng
from .runtime import TrainError

PRETRAIN_MEAN = PRETRAIN_STD = (0.5, 0.5, 0.5)  # the 1p-frac reference scripts normalise with 0.5 / 0.5
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def read_manifest(shards_dir: Path) -> dict:
    """Load manifest.json (checked by fracgen's one manifest check) and make sure the folder holds what it lists,
    at the sizes it lists; every problem becomes one TrainError line naming the file."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise TrainError(f"shards folder {shards_dir} does not exist (make one with `fracgen render --out DIR`)")
    path = shards_dir / "manifest.json"
    if not path.is_file():
        raise TrainError(f"{path} is missing: {shards_dir} is not a `fracgen render` output folder")
    try:
        manifest = fracgen_manifest.read_manifest(shards_dir)
    except FracgenError as e:
        raise TrainError(str(e)) from None
    if manifest["complete"] is False:
        raise TrainError(f"{path} says the render is incomplete: finish it with `fracgen render ... --resume`")
    if not manifest["shards"]:
        raise TrainError(f"{path} lists no shards")
    for entry in manifest["shards"]:
        shard = shards_dir / entry["file"]
        if not shard.is_file():
            raise TrainError(f"shard {shard} listed in {path} is missing")
        if shard.stat().st_size != entry["bytes"]:
            raise TrainError(f"shard {shard} has {shard.stat().st_size} bytes, its manifest says {entry['bytes']}: "
                             "damaged or replaced (`fracgen verify`, `fracgen render ... --resume` repairs it)")
    return manifest


class ShardURL(str):
    """A shard's path that carries what the manifest says of it (bytes, sha256, samples), so that every reader
    checks what it reads without being handed the manifest (a str subclass: webdataset and loader workers pass it
    along as a path)."""

    def __new__(cls, path: str, entry: dict, classes: int | None = None):
        url = super().__new__(cls, path)
        url.bytes, url.sha256, url.samples = entry["bytes"], entry["sha256"], entry.get("samples")
        url.classes = classes  # the manifest's num_classes: every label must be below it
        return url

    def __reduce__(self):  # loader workers started by spawn get it pickled: keep the record
        return ShardURL, (str(self), {"bytes": self.bytes, "sha256": self.sha256, "samples": self.samples},
                          self.classes)


def shard_urls(shards_dir: Path, manifest: dict) -> list[ShardURL]:
    return [ShardURL(str(Path(shards_dir) / s["file"]), s, manifest["num_classes"]) for s in manifest["shards"]]


def _bad_label(where, key: str, payload: bytes, classes: int | None) -> TrainError:
    shown = payload[:20].decode("ascii", "replace")
    return TrainError(f"{where}: sample {key[:40]!r} has class {shown!r}, not one of the manifest's "
                      f"{classes if classes is not None else '?'} classes: the shards contradict their manifest "
                      f"(`fracgen verify {Path(where).parent}`)")


def label(payload: bytes, classes: int | None, where, key: str) -> int:
    """A sample's .cls as a class index below `classes` (a manifest can list the sha256 of any shard: a folder can be
    self-consistent and still hold labels its model has no output for)."""
    try:
        value = int(payload)
    except ValueError:
        raise _bad_label(where, key, payload, classes) from None
    if value < 0 or (classes is not None and value >= classes):
        raise _bad_label(where, key, payload, classes)
    return value


def _sample_label(sample: dict) -> int:
    url = sample.get("__url__")
    return label(sample["cls"], getattr(url, "classes", None), url, sample.get("__key__", "?"))


def _mismatch(path, what: str) -> TrainError:
    return TrainError(f"shard {path} does not match its manifest ({what} differs): re-render it with "
                      "`fracgen render ... --resume` or check it with `fracgen verify`")


class _HashingReader:
    """A shard opened for webdataset's tar reader, hashed as it is read: `finish()` reads what the tar reader
    left (the end-of-archive padding) and compares size and sha256 with the manifest's, so a streamed shard is
    checked without a second pass over it."""

    def __init__(self, url: ShardURL):
        if not isinstance(url, ShardURL):
            raise TypeError(f"{url!r}: shard readers take data.shard_urls(), which carry the manifest's record")
        self.url, self.file, self.sha, self.size = url, open(url, "rb"), hashlib.sha256(), 0  # noqa: SIM115

    def read(self, n: int = -1) -> bytes:
        chunk = self.file.read(n)
        self.sha.update(chunk)
        self.size += len(chunk)
        return chunk

    def matches(self) -> str | None:
        """None when the whole file is the manifest's bytes, else what differs ("size" or "sha256")."""
        while self.size <= self.url.bytes and self.read(1 << 20):
            pass
        if self.size != self.url.bytes:
            return "size"
        return None if self.sha.hexdigest() == self.url.sha256 else "sha256"

    def close(self) -> None:
        self.file.close()


def checked_tar_files(src):
    """webdataset's tar expansion (url -> one dict per file, {} at each shard's end), over shards read through
    `_HashingReader`: a shard that differs from its manifest stops the stream with one TrainError line at its end,
    before its last sample is grouped. Samples before that point may already be in a shuffle buffer or a batch;
    the run stops all the same, so nothing it writes rests on them."""
    for item in src:
        reader = _HashingReader(item["url"])
        try:
            files = wds.tariterators.tar_file_expander([{"url": item["url"], "stream": reader}],
                                                       handler=wds.reraise_exception)
            try:
                for f in files:
                    if f == {} and (what := reader.matches()):
                        raise _mismatch(item["url"], what)
                    yield f
            except (tarfile.TarError, OSError, EOFError, ValueError):
                if what := reader.matches():  # a changed shard can break the tar format before its end
                    raise _mismatch(item["url"], what) from None
                raise
        finally:
            reader.close()


def checked_samples(src):
    """The samples of the shards (`wds.tarfile_to_samples`), each shard checked against its manifest record."""
    return wds.tariterators.group_by_keys(checked_tar_files(src), handler=wds.reraise_exception)


def _first_then_drain(n: int | None):
    """The first n items, then the rest read and dropped, so the last shard is read to its end and checked."""
    def stage(src):
        for i, item in enumerate(src):
            if n is None or i < n:
                yield item
    return stage


def _covering(urls: list[ShardURL], samples: int | None) -> list[ShardURL]:
    """The first shards that together hold `samples` samples (all of them for None)."""
    if not samples:
        return list(urls)
    out, held = [], 0
    for url in urls:
        if held >= samples:
            break
        out.append(url)
        held += url.samples or 0
    return out


def data_sha256(shards_dir: Path | None, manifest: dict) -> str:
    """What a run records of its data, to resume on nothing else. A shard folder: its manifest.json's sha256 (the
    name `fracgen pull` and the training cache give a published folder). Rendering on the fly (no folder): the
    sha256 of what the images are a function of (renderer, settings, base, class systems), which stays the same
    while the render that wrote the manifest goes on and lists its shards."""
    if shards_dir is not None:
        return hashlib.sha256((Path(shards_dir) / "manifest.json").read_bytes()).hexdigest()
    drawn = {k: manifest.get(k) for k in ("renderer", "settings", "base", "classes")}
    return hashlib.sha256(json.dumps(drawn, sort_keys=True).encode()).hexdigest()


def check_resume_data(checkpoint: dict, sha256: str, source: str, log) -> None:
    """--resume continues on the data the checkpoint was trained on: the same class count is not enough."""
    recorded = checkpoint.get("data_sha256")
    if recorded is None:
        log(f"note: the checkpoint does not record its data (written before it did): {source} is not checked")
    elif recorded != sha256:
        raise TrainError(f"{source} is not the data the checkpoint was trained on (data sha256 {sha256[:12]}..., "
                         f"the checkpoint's {recorded[:12]}...): resume with that data, or pass --allow-other-data")


def train_transform(
    img_size: int,
    crop: bool = True,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    vflip: bool = True,
    randaug: str | None = None,
    reprob: float = 0.0,
    mean=PRETRAIN_MEAN,
    std=PRETRAIN_STD,
    gray: bool = False,
    ink_gain: float = 1.0,
) -> T.Compose:
    """The image half of the docs/design.md section 6 augmentation (Mixup/CutMix act on batches, in the loop).

    Order as in timm's training transform: crop, flips, RandAugment on PIL, tensor + normalise, erasing.
    `gray`: the images are grayscale, as fracgen's are. Every step up to the tensor then runs on one (L)
    channel and the result is copied to three: the same images as converting to RGB first (a test checks
    it), for about half the CPU time (`make bench`). `ink_gain`: see `_Ink`.
    """
    steps = [_Ink(gray, ink_gain)]
    if crop:
        steps.append(T.RandomResizedCrop(img_size, scale=crop_scale, ratio=crop_ratio,
                                         interpolation=InterpolationMode.BICUBIC))
    else:
        steps.append(T.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC))
    if flip:
        steps.append(T.RandomHorizontalFlip())
    if vflip:
        steps.append(T.RandomVerticalFlip())
    if randaug:
        fill = tuple(round(255 * m) for m in mean)
        hparams = {"translate_const": int(img_size * 0.45), "img_mean": fill[0] if gray else fill}
        steps.append(_zero_bit_posterize(rand_augment_transform(randaug, hparams)))
    steps += _to_tensor(mean, std, gray)
    if reprob > 0:
        # 'pixel' mode fills the erased box with per-pixel normal noise, as timm's training default does.
        steps.append(RandomErasing(reprob, mode="pixel", device="cpu"))
    return T.Compose(steps)


def eval_transform(img_size: int, mean=PRETRAIN_MEAN, std=PRETRAIN_STD, gray: bool = False,
                   ink_gain: float = 1.0) -> T.Compose:
    """The whole image, resized: what "pretext accuracy" is measured on (no crop, no flip, no mixing)."""
    return T.Compose([_Ink(gray, ink_gain), T.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC),
                      *_to_tensor(mean, std, gray)])


def _posterize(image, bits_to_keep, **_):
    """timm's posterize, but 0 bits gives the black image older Pillow gave (and the paper's runs got): Pillow
    13 (ours) refuses 0 bits, which "rand-...-inc1" asks for whenever the noisy magnitude reaches 10."""
    if bits_to_keep >= 8:
        return image
    mask = ~(2 ** (8 - bits_to_keep) - 1) & 0xFF
    return image.point([v & mask for v in range(256)] * len(image.getbands()))


def _zero_bit_posterize(randaug):
    for op in randaug.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return randaug


class _Ink:
    """First step of every transform here: the image in the mode the rest expects (L with gray, else RGB),
    with its values x ink_gain, clipped at 255 (fracgen's strokes are 127; see pretrain's `ink_gain`).

    A class, not a lambda, so DataLoader workers can pickle it under any start method.
    """

    def __init__(self, gray: bool, ink_gain: float = 1.0):
        self.mode = "L" if gray else "RGB"
        self.lut = None if ink_gain == 1 else [min(255, round(v * ink_gain)) for v in range(256)]

    def __call__(self, image):
        image = image.convert(self.mode)
        return image if self.lut is None else image.point(self.lut * len(self.mode))


class _GrayToRGB:
    """1xHxW -> 3xHxW. A class, not a lambda, so DataLoader workers can pickle it under any start method."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(3, -1, -1).contiguous()


def _to_tensor(mean, std, gray: bool) -> list:
    if not gray:
        return [T.ToTensor(), T.Normalize(mean, std)]
    if len(set(mean)) != 1 or len(set(std)) != 1:
        raise ValueError("gray=True needs the same mean and std on every channel")
    return [T.ToTensor(), T.Normalize(mean[:1], std[:1]), _GrayToRGB()]


def _stream_seed(seed: int) -> int:
    """A seed distinct for every (run seed, rank, loader worker): no two workers replay the same stream."""
    rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
    return (seed * 1_000_003 + rank * 1009 + worker) % 2**31


def _per_worker_shuffle(bufsize: int, seed: int):
    # The rng must be made inside the worker (after the fork), otherwise every worker copies the same one.
    def stage(src):
        return wds.shuffle(bufsize, initial=bufsize, rng=random.Random(_stream_seed(seed)))(src)
    return stage


def train_loader(urls: list[ShardURL], batch_size: int, transform, batches: int, seed: int,
                 shuffle_buffer: int = 1000, workers: int = 2) -> wds.WebLoader:
    """An endless, resampled stream cut to exactly `batches` batches on every rank.

    `ResampledShards` draws shards with replacement, so every rank and worker always has data, even with fewer
    shards than ranks x workers (the known webdataset hang), and `.with_epoch(batches)` on the *loader* makes
    every rank run the same number of steps, so DDP never waits at an all-reduce for a rank that stopped.
    `seed` should change on resume so a resumed run does not replay the first samples again.
    handler=reraise: a corrupt shard stops the run loudly instead of silently training on less data.
    """
    dataset = wds.DataPipeline(
        # deterministic=True: the shard order follows (seed, epoch, rank, worker) instead of pid and time.
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        checked_samples,
        _per_worker_shuffle(shuffle_buffer, seed),
        wds.map(_with_label, handler=wds.reraise_exception),
        wds.decode("pill", handler=wds.reraise_exception),
        wds.to_tuple("png", "__label__"),
        wds.map_tuple(transform, None),
        wds.batched(batch_size, partial=False, collation_fn=torch.utils.data.default_collate),
    )
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    return loader.with_epoch(batches)


def eval_loader(urls: list[ShardURL], transform, batch_size: int, max_samples: int | None = None):
    """Every sample of the shards once, in order (no resampling, no node split: only rank 0 evaluates)."""
    dataset = wds.DataPipeline(
        wds.SimpleShardList(_covering(urls, max_samples)),
        checked_samples,
        _first_then_drain(max_samples),
        wds.map(_with_label, handler=wds.reraise_exception),
        wds.decode("pill", handler=wds.reraise_exception),
        wds.to_tuple("png", "__label__"),
        wds.map_tuple(transform, None),
    )
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)


def image_size(manifest: dict) -> int:
    """The side of the (square) images of a shard folder."""
    size = manifest.get("image", {}).get("size") or manifest.get("settings", {}).get("size")
    if not isinstance(size, int) or size < 1:
        raise TrainError("the manifest gives no image size (image.size): not a fracgen shard folder")
    return size


def decoded_bytes(manifest: dict) -> int:
    """Bytes the decoded set takes as one uint8 tensor (1 channel): what the in-memory cache needs."""
    return manifest["num_samples"] * image_size(manifest) ** 2


def _shard_bytes(path: Path, entry: dict) -> bytes:
    """A shard's bytes, trusted only when their size and sha256 equal the manifest's."""
    data = path.read_bytes()
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise _mismatch(path, "size" if len(data) != entry["bytes"] else "sha256")
    return data


def load_images(shards_dir: Path, manifest: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of a shard folder decoded: (N, 1, size, size) uint8 images and (N,) int64 labels, in shard
    order. Each shard is read once, checked against the manifest's size and sha256, and decoded from memory."""
    size = image_size(manifest)
    images = torch.empty(manifest["num_samples"], 1, size, size, dtype=torch.uint8)
    labels = torch.empty(manifest["num_samples"], dtype=torch.int64)
    n = 0
    for entry in manifest["shards"]:
        path = Path(shards_dir) / entry["file"]
        with tarfile.open(fileobj=io.BytesIO(_shard_bytes(path, entry)), mode="r:") as tar:
            for member in tar:
                if not member.name.endswith((".png", ".cls")):
                    continue
                payload = tar.extractfile(member).read()
                if member.name.endswith(".cls"):
                    labels[n] = label(payload, manifest["num_classes"], path, member.name)
                    continue
                pixels = png.decode(payload)
                if pixels.shape != (size, size):
                    raise TrainError(f"{path}: {member.name} is {pixels.shape[1]}x{pixels.shape[0]} px, the manifest "
                                     f"says {size}")
                images[n, 0] = torch.from_numpy(pixels)
                n += 1  # .cls precedes .png in a fracgen sample, so its label is already in place
    if n != manifest["num_samples"]:
        raise TrainError(f"{shards_dir} holds {n} images, its manifest says {manifest['num_samples']}")
    return images, labels


class EpochSampler:
    """Positions of an endless sequence of epochs, dealt out like a DistributedSampler over epochs.

    Epoch e is one permutation of n items, drawn from (seed, e) by `train.rng.permutation` and the same on every
    rank; micro-batch t of rank r holds positions [(t * ranks + r) * batch, ... + batch) of the sequence.
    `indices(t)` gives (item, epoch) for each of them: a pure function of (seed, t, rank), so a resumed run continues
    exactly where the checkpoint stopped. `t` is a host int (loader workers: each epoch's permutation is computed
    once) or an int64 tensor on the device (the in-memory path, inside the step's graph: the permutations of the
    epochs a batch touches are computed every step, a sort of n keys each, with no host involved).
    """

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch, self.seed, self.rank, self.world_size = n, batch, seed, rank, world_size
        self.key = rng.derive_key(seed, 0xE90C)  # not the rank's: every rank deals from the same permutation
        self.spans = (batch - 1) // n + 2  # most epochs one micro-batch can touch
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = rng.permutation(self.key, torch.tensor([epoch]), self.n)[0]
        return self._perms[epoch]

    def indices(self, micro_step: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(micro_step, torch.Tensor):
            positions = (micro_step * self.world_size + self.rank) * self.batch + torch.arange(
                self.batch, device=micro_step.device)
            epochs = positions // self.n
            first = epochs[:1]
            perms = rng.permutation(self.key, first + torch.arange(self.spans, device=first.device), self.n)
            return perms[epochs - first, positions % self.n], epochs
        start = (micro_step * self.world_size + self.rank) * self.batch
        positions = torch.arange(start, start + self.batch)
        epochs = positions // self.n
        out = torch.empty(self.batch, dtype=torch.int64)
        for epoch in epochs.unique().tolist():
            where = epochs == epoch
            out[where] = self._perm(epoch)[positions[where] % self.n]
        return out, epochs


class MemorySource:
    """Batches by index from images held on the device: micro-batch t of rank r is `EpochSampler`'s, over all N
    images, drawn on the device from the micro-step counter (a tensor there)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.images, self.labels = images, labels
        self.sampler = EpochSampler(len(labels), batch, seed, rank, world_size)

    def indices(self, micro_step: int | torch.Tensor) -> torch.Tensor:
        return self.sampler.indices(micro_step)[0]

    def __call__(self, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = rng.keep(self.indices(counter.to(self.images.device)))  # stored: not recomputed for every pixel
        return self.images[idx], self.labels[idx]


def _decode_uint8(sample: dict) -> tuple[torch.Tensor, int]:
    return torch.from_numpy(png.decode(sample["png"]))[None], _sample_label(sample)


def _with_label(sample: dict) -> dict:
    """The sample with its .cls checked, as an int under `__label__` (which webdataset's decoders pass through)."""
    checked = {k: v for k, v in sample.items() if k != "cls"}
    checked["__label__"] = _sample_label(sample)
    return checked


def _collate_uint8(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*samples, strict=True)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class _CollateCrop:
    """Collate, then cut every sample to its own crop (`train.augment.HostCrop`) with this worker's key, made after
    the fork from (seed, rank, worker) as the shuffle's is, and its count of batches as the counter."""

    def __init__(self, crop, seed: int):
        self.crop, self.seed, self.key, self.batches = crop, seed, None, 0

    def __call__(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key is None:
            self.key = rng.derive_key(_stream_seed(self.seed), 1)
        images, labels = _collate_uint8(samples)
        self.batches += 1
        return self.crop(images, self.key, self.batches - 1), labels


def uint8_loader(urls: list[ShardURL], batch_size: int, batches: int, seed: int, shuffle_buffer: int = 1000,
                 workers: int = 2, pin_memory: bool = False, crop=None) -> wds.WebLoader:
    """`train_loader`'s endless, resampled stream, but the workers only decode: (B, 1, H, W) uint8 batches for
    augmentation on the device. Pinned memory (on CUDA) lets the copy to the device run beside the model.
    `crop` (a `train.augment.HostCrop`): the workers also cut each sample to its crop at the model's size."""
    collate = _collate_uint8 if crop is None else _CollateCrop(crop, seed)
    dataset = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        checked_samples,
        _per_worker_shuffle(shuffle_buffer, seed),  # shuffles compressed samples: the buffer stays small
        wds.map(_decode_uint8, handler=wds.reraise_exception),
        wds.batched(batch_size, partial=False, collation_fn=collate),
    )
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                           pin_memory=pin_memory)
    return loader.with_epoch(batches)


def eval_images(urls: list[ShardURL], batch_size: int, max_samples: int | None = None):
    """The first `max_samples` samples of the shards in order, as (uint8 images, labels) batches."""
    dataset = wds.DataPipeline(
        wds.SimpleShardList(_covering(urls, max_samples)),
        checked_samples,
        _first_then_drain(max_samples),
        wds.map(_decode_uint8, handler=wds.reraise_exception),
    )
    dataset.append(wds.batched(batch_size, partial=True, collation_fn=_collate_uint8))
    return dataset
