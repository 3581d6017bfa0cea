"""Pre-training data: read a `fracgen render` shard folder and stream augmented LIEP images from it.

Shard format (written by fracgen, documented in the README): DIR/manifest.json with `num_classes`,
`num_samples`, `shards` (file, samples, bytes, sha256) and `settings`; each tar sample has `__key__`,
`.png` (8-bit grayscale), `.cls` (class index as ASCII) and `.json` (that class's IFS parameters).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torchvision.transforms as T
import webdataset as wds
from timm.data import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import InterpolationMode

from train.runtime import TrainError

PRETRAIN_MEAN = PRETRAIN_STD = (0.5, 0.5, 0.5)  # the 1p-frac reference scripts normalise with 0.5 / 0.5
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def read_manifest(shards_dir: Path) -> dict:
    """Load and check manifest.json; every problem becomes one TrainError line."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise TrainError(f"shards folder {shards_dir} does not exist (make one with `fracgen render --out DIR`)")
    path = shards_dir / "manifest.json"
    if not path.is_file():
        raise TrainError(f"{path} is missing: {shards_dir} is not a `fracgen render` output folder")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainError(f"{path} is not valid JSON: {e}") from None
    for key in ("num_classes", "num_samples", "shards"):
        if key not in manifest:
            raise TrainError(f"{path} has no {key!r} entry")
    if manifest.get("format_version", 1) != 1:
        raise TrainError(f"{path} has format_version {manifest['format_version']}; this trainer reads version 1")
    if manifest.get("complete") is False:
        raise TrainError(f"{path} says the render is incomplete: finish it with `fracgen render ... --resume`")
    if not manifest["shards"]:
        raise TrainError(f"{path} lists no shards")
    missing = [s["file"] for s in manifest["shards"] if not (shards_dir / s["file"]).is_file()]
    if missing:
        raise TrainError(f"{len(missing)} shard(s) listed in {path} are missing, first: {missing[0]}")
    return manifest


def shard_urls(shards_dir: Path, manifest: dict) -> list[str]:
    return [str(Path(shards_dir) / s["file"]) for s in manifest["shards"]]


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
    """The image half of the DESIGN.md section 6 augmentation (Mixup/CutMix act on batches, in the loop).

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
        steps.append(rand_augment_transform(randaug, hparams))
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


def train_loader(urls: list[str], batch_size: int, transform, batches: int, seed: int,
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
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        _per_worker_shuffle(shuffle_buffer, seed),
        wds.decode("pill", handler=wds.reraise_exception),
        wds.to_tuple("png", "cls"),
        wds.map_tuple(transform, int),
        wds.batched(batch_size, partial=False, collation_fn=torch.utils.data.default_collate),
    )
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    return loader.with_epoch(batches)


def eval_loader(urls: list[str], transform, batch_size: int, max_samples: int | None = None):
    """Every sample of the shards once, in order (no resampling, no node split: only rank 0 evaluates)."""
    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        wds.decode("pill", handler=wds.reraise_exception),
        wds.to_tuple("png", "cls"),
        wds.map_tuple(transform, int),
    )
    if max_samples:
        dataset.append(wds.slice(max_samples))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
