"""The device-side augmentation (train.augment, train.randaugment) against the CPU recipe it replaces: timm's
RandomResizedCrop box sampling, PIL's resize and RandAugment ops, flip and erasing rates, and antialiasing."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import ks_2samp
from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP
from timm.data.transforms import RandomResizedCropAndInterpolation

from fracgen.ifs import perturb, sample_sigma_system
from fracgen.render import render
from fracgen.rng import derive_seed
from train import data, rng
from train.augment import (
    CROP_ATTEMPTS,
    DeviceAugment,
    HostCrop,
    erase_boxes,
    pil_vertical_first,
    random_erase,
    resized_crop,
    sample_crop_boxes,
)
from train.randaugment import GEOMETRIC, RAND_INCREASING_TRANSFORMS, RAND_TRANSFORMS, RandAugment, parse

CPU = torch.device("cpu")


def counter(t: int = 0) -> torch.Tensor:
    return torch.tensor(t)


def fractal(size: int, seed: int = 3, points: int = 20_000) -> np.ndarray:
    """A real fracgen image (strokes 127 on 0)."""
    base, _ = sample_sigma_system(3.5, 2, derive_seed(0, 1, 0))
    system, _ = perturb(base, 0.1, "scale", seed)
    return np.array(render(system, seed, points=points, size=size)[0])


def gradient_fractal() -> np.ndarray:
    """A fractal over a gradient: every grey level path (edges, flat areas, histogram spread) gets exercised."""
    ramp = np.add.outer(np.arange(64), np.arange(64)).astype(np.int64) * 2 // 3
    return np.clip(fractal(64, points=5000).astype(np.int64) * 2 // 3 + ramp, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("height", "width", "scale"), [(128, 128, (0.08, 1.0)), (128, 128, (0.35, 1.0)),
                                                        (96, 160, (0.08, 1.0)), (64, 64, (0.9, 1.0))])
def test_crop_boxes_follow_timms_random_resized_crop(height, width, scale):
    """Area and aspect of our boxes against timm's get_params on the same image size: two-sample KS tests, plus the
    same fallback rate (no attempt fits) and positions inside the image."""
    ratio = (3 / 4, 4 / 3)
    n = 8000
    u = rng.uniform(0, rng.CROP, counter(), (n, CROP_ATTEMPTS, 4), torch.float64)
    ours = sample_crop_boxes(u, height, width, scale, ratio).double().numpy()
    random.seed(0)
    image = Image.new("L", (width, height))
    theirs = np.array([RandomResizedCropAndInterpolation.get_params(image, scale, ratio) for _ in range(n)], float)
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = lambda b: b[:, 2] * b[:, 3] / (height * width)  # noqa: E731
    aspect = lambda b: np.log(b[:, 3] / b[:, 2])  # noqa: E731
    assert ks_2samp(area(ours), area(theirs)).pvalue > 1e-3
    assert ks_2samp(aspect(ours), aspect(theirs)).pvalue > 1e-3
    full = lambda b: np.mean((b[:, 2] == height) & (b[:, 3] == width))  # noqa: E731 (mostly the fallback)
    assert abs(full(ours) - full(theirs)) < 4 * math.sqrt(max(full(theirs), 1 / n) / n) + 1e-3


@pytest.mark.parametrize(("size", "out"), [(128, 32), (512, 224), (64, 96)])
def test_resized_crop_equals_pils_crop_then_bicubic_resize(size, out):
    """Our batched matmul resampling against PIL's crop().resize(BICUBIC) (what timm's RandomResizedCrop does),
    flips included: PIL computes in fixed point, so a pixel may differ by one grey level, rarely. Tall boxes take
    PIL's vertical-first order of passes (the transposed image through the same matmuls); the batch has both."""
    image = fractal(size) * 2
    draw = np.random.default_rng(0)
    boxes, refs = [], []
    for k in range(6):
        h, w = draw.integers(size // 4, size + 1, 2)
        if k == 4:  # tall and narrow: vertical first
            h, w = size, max(2, out // 2)
        top, left = draw.integers(0, size - h + 1), draw.integers(0, size - w + 1)
        ref = Image.fromarray(image).crop((left, top, left + w, top + h)).resize((out, out), Image.BICUBIC)
        if k % 2:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
        if k % 3 == 0:
            ref = ref.transpose(Image.FLIP_TOP_BOTTOM)
        boxes.append([top, left, h, w])
        refs.append(np.asarray(ref, float))
    batch = torch.tensor(image, dtype=torch.float32).expand(6, size, size)
    boxes = torch.tensor(boxes, dtype=torch.float32)
    assert pil_vertical_first(boxes[:, 2], boxes[:, 3], out)[4] or out > size
    ours = resized_crop(batch, boxes, out, hflip=torch.tensor([k % 2 == 1 for k in range(6)]),
                        vflip=torch.tensor([k % 3 == 0 for k in range(6)])).numpy()
    diff = np.abs(ours - np.stack(refs))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_downscaled_stroke_keeps_its_mass():
    """One-pixel strokes of a 512 px image brought down to 224 px keep their ink (antialiasing: each output pixel
    averages the ~2.3 x 2.3 input pixels it covers), where plain bilinear sampling loses a stroke that falls
    between its sample points. A grey background keeps the bicubic kernel's negative lobes from being clipped at 0,
    so the mass is exact up to rounding."""
    image = np.full((512, 512), 64.0, np.float32)
    image[100, 40:470] = 191  # a horizontal stroke, one pixel wide, 127 above the background as fracgen's ink
    image[40:470, 300] = 191  # a vertical one
    diagonal = np.arange(40, 470)
    image[diagonal, diagonal] = 191
    x = torch.tensor(image)[None]
    out = resized_crop(x, torch.tensor([[0.0, 0.0, 512, 512]]), 224)[0]
    scale = (512 / 224) ** 2
    ink = (out - 64).sum().item() * scale / (image - 64).sum()
    assert abs(ink - 1) < 0.01
    row = out[42:47, 50:125] - 64  # the output rows around input row 100, along the stroke (no crossings)
    assert (row.max(0).values > 20).all()  # continuous: no gap anywhere along it
    aliased = F.interpolate(x[None], size=(224, 224), mode="bilinear", antialias=False, align_corners=False)[0, 0]
    assert (aliased[42:47, 50:125] - 64).max().item() < 1  # bilinear samples rows 98.9 and 101.1: the stroke is gone


def pil_op(name: str, image: np.ndarray, magnitude: float, sign: float) -> np.ndarray:
    """timm's PIL op with its level argument at a fixed magnitude and sign (timm draws the sign at random)."""
    level = magnitude / 10
    if name == "Rotate":
        args = (30 * level * sign,)
    elif name.startswith("Shear"):
        args = (0.3 * level * sign,)
    elif name.startswith("Translate"):
        args = (0.45 * level * sign,)
    elif name.endswith("Increasing") and name.startswith(("Color", "Contrast", "Brightness", "Sharpness")):
        args = (max(0.1, 1 + 0.9 * level * sign),)
    else:
        args = LEVEL_TO_ARG[name](magnitude, {}) if LEVEL_TO_ARG[name] else ()
    kwargs = dict(fillcolor=128, resample=Image.BICUBIC) if name in GEOMETRIC else {}  # timm's training transform
    try:
        return np.asarray(NAME_TO_OP[name](Image.fromarray(image), *args, **kwargs), float)
    except ValueError:  # Pillow 13 refuses posterize to 0 bits; older Pillow (and the paper's runs) gave black
        assert name.startswith("Posterize") and args == (0,)
        return np.zeros(image.shape)


@pytest.mark.parametrize("spec", ["rand-m9", "rand-m9-inc1"])
def test_every_randaugment_op_equals_timms_pil_op(spec):
    """Each op at magnitudes 0, 3, 9, 10 and both signs. Point ops are exact lookup tables; the 2-D bicubic of the
    geometric ops accumulates in float32 where PIL uses double, so a pixel may be one grey level off (at most 1 in
    200 pixels is allowed; shears measured 1 in 1000, rotations and translations 0)."""
    image = gradient_fractal()
    x = torch.tensor(image, dtype=torch.float32)[None]
    ra = RandAugment(spec, fill=128)
    for k, name in enumerate(ra.ops):
        for magnitude in (0.0, 3.0, 9.0, 10.0):
            for sign in (1.0, -1.0):
                ours = ra.layer(x, torch.tensor([k]), torch.tensor([magnitude / 10], dtype=torch.float64),
                                torch.tensor([sign], dtype=torch.float64))[0].numpy()
                diff = np.abs(ours - pil_op(name, image, magnitude, sign))
                assert diff.max() <= 1 and (diff > 0).mean() <= 5e-3, (name, magnitude, sign)


def test_randaugment_layer_applies_each_samples_own_op():
    """A batch with a different op per sample (and some with none) gives each sample what that op alone gives."""
    image = gradient_fractal()
    ra = RandAugment("rand-m9-mstd0.5-inc1")
    n = len(ra.ops)
    x = torch.tensor(image, dtype=torch.float32).expand(n + 2, 64, 64).clone()
    op = torch.tensor([*range(n), -1, 3])
    level = torch.linspace(0.2, 1.0, n + 2, dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0] * (n // 2 + 2), dtype=torch.float64)[: n + 2]
    batch = ra.layer(x, op, level, sign)
    for i in range(n + 2):
        alone = ra.layer(x[i : i + 1], op[i : i + 1], level[i : i + 1], sign[i : i + 1])
        assert torch.equal(batch[i], alone[0])
    assert torch.equal(batch[n], x[n])  # op -1: untouched


def test_randaugment_draws_like_timm():
    """Per layer: uniform op choice, applied with p, magnitude N(m, mstd) clipped to [0, 10], sign +-1 evenly."""
    ra = RandAugment("rand-m9-mstd0.5-inc1")
    op, level, sign = ra.draw(0, counter(), 60_000)
    applied = op >= 0
    assert abs(applied.double().mean().item() - 0.5) < 0.01
    counts = torch.bincount(op[applied], minlength=len(ra.ops)).double() / applied.sum()
    assert (counts - 1 / len(ra.ops)).abs().max() < 0.01
    assert abs(level.mean().item() - 0.9) < 0.005 and abs(level.std().item() - 0.05) < 0.005
    assert level.max().item() <= 1.0 and abs(sign.mean().item()) < 0.02


def test_randaugment_config_strings():
    assert parse("rand-m9-mstd0.5-inc1")["ops"] == RAND_INCREASING_TRANSFORMS
    cfg = parse("rand-m7-n3-p0.7-mstd101")
    assert (cfg["magnitude"], cfg["num_layers"], cfg["prob"], cfg["magnitude_std"]) == (7, 3, 0.7, math.inf)
    assert cfg["ops"] == RAND_TRANSFORMS
    for bad in ("augmix-m5", "rand-q3", "rand-mfoo"):
        with pytest.raises(ValueError):
            parse(bad)


def rates(augment: DeviceAugment, images: torch.Tensor, batches: int):
    return torch.cat([augment(images, 0, counter(t)) for t in range(batches)])


def test_flips_hit_their_rates_independently():
    """A marker in one corner, no crop: where it lands gives each sample's flips. Each flip p 0.5, independent."""
    images = torch.zeros(256, 1, 16, 16, dtype=torch.uint8)
    images[:, 0, 0, 0] = 255
    out = rates(DeviceAugment(16, crop=False, mean=0.0, std=1.0), images, 8)[:, 0]
    corners = torch.stack([out[:, 0, 0], out[:, 0, -1], out[:, -1, 0], out[:, -1, -1]], 1).argmax(1)
    hflip, vflip = corners % 2 == 1, corners >= 2
    n = len(corners)
    assert abs(hflip.double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
    assert abs(vflip.double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
    assert abs((hflip & vflip).double().mean().item() - 0.25) < 4 * math.sqrt(0.1875 / n)
    none = DeviceAugment(16, crop=False, hflip=0.0, vflip=0.0, mean=0.0, std=1.0)(images, 0, counter())
    assert (none[:, 0, 0, 0] > 0).all()


def test_erasing_hits_its_rate_and_area():
    """timm's defaults: a sample is erased with the asked probability, the box covers U(2%, 33%) of the image
    (mean ~17.7%), and it is filled with N(0, 1) per pixel and channel."""
    n, size = 4000, 32
    u = rng.uniform(0, rng.ERASE, counter(), (n, CROP_ATTEMPTS + 1, 4), torch.float64)
    boxes = erase_boxes(u[:, :CROP_ATTEMPTS], u[:, CROP_ATTEMPTS, 0], size, size, 0.25)
    erased = boxes[:, 2] > 0
    assert abs(erased.double().mean().item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    area = (boxes[erased, 2] * boxes[erased, 3] / size**2).mean().item()
    assert abs(area - (0.02 + 1 / 3) / 2) < 0.015
    x = torch.full((64, 3, size, size), 7.0)
    out = random_erase(x, boxes[:64], rng.normal(0, rng.ERASE_NOISE, counter(), tuple(x.shape)))
    changed = out != 7.0
    assert torch.equal(changed.flatten(1).any(1), erased[:64])
    noise = out[changed]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
    assert not torch.equal(out[erased[:64]][:, 0], out[erased[:64]][:, 1])  # per channel


def test_device_augment_without_randomness_equals_the_pil_path():
    """Switch the random steps off and the two paths must give the same tensors: ink gain, resize, normalise,
    three channels (to a grey level: PIL resizes in fixed point)."""
    image = fractal(128)
    images = torch.tensor(image)[None, None]
    device = DeviceAugment(32, crop=False, hflip=0.0, vflip=0.0, ink_gain=2.0)(images, 0, counter())[0]
    pil = data.train_transform(32, crop=False, flip=False, vflip=False, gray=True, ink_gain=2.0)(Image.fromarray(image))
    assert device.shape == pil.shape == (3, 32, 32)
    assert (device - pil).abs().max().item() <= 2 / 255 / 0.5 + 1e-6
    evaluated = DeviceAugment(32, ink_gain=2.0).evaluate(images)[0]
    pil_eval = data.eval_transform(32, gray=True, ink_gain=2.0)(Image.fromarray(image))
    assert (evaluated - pil_eval).abs().max().item() <= 2 / 255 / 0.5 + 1e-6


def test_same_key_and_counter_same_augmentations_and_different_per_sample():
    images = torch.tensor(fractal(64))[None, None].expand(8, 1, 64, 64).contiguous()
    augment = DeviceAugment(32, randaug="rand-m9-mstd0.5-inc1", reprob=0.5)
    first = augment(images, 5, counter(3))
    assert torch.equal(first, augment(images, 5, counter(3)))
    flat = first.flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == 8  # every sample got its own parameters
    assert not torch.equal(first, augment(images, 5, counter(4)))  # the next micro-step: new draws
    assert not torch.equal(first, augment(images, 6, counter(3)))  # another rank's key: new draws


def test_crops_cut_in_the_workers_are_the_devices_crops():
    """`HostCrop` (in a loader worker) draws the boxes the device's crop draws from the same key and counter and
    cuts them with PIL, after the ink gain; the device then resizes nothing: to a grey level, the same images."""
    images = torch.tensor(fractal(128))[None, None].expand(6, 1, 128, 128).contiguous()
    device = DeviceAugment(32, crop_scale=(0.35, 1.0), hflip=0.0, vflip=0.0, ink_gain=2.0)
    rest = DeviceAugment(32, crop=False, hflip=0.0, vflip=0.0, ink_gain=1.0)
    cut = HostCrop(32, scale=(0.35, 1.0), ink_gain=2.0)(images, 4, 2)
    assert cut.shape == (6, 1, 32, 32) and cut.dtype == torch.uint8
    ours = rest(cut, 9, counter())
    theirs = device(images, 4, counter(2))
    assert (ours - theirs).abs().max().item() <= 2 / 255 / 0.5 + 1e-6
    assert len({tuple(row.tolist()) for row in cut.flatten(1)}) == 6  # every sample its own box
