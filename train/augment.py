"""Augmentation on the training device: docs/design.md section 6's recipe on whole batches, every sample its own draw,
as one fixed graph.

The loader hands over uint8 pixels (B, 1, H, W) (fracgen's images are grayscale) and everything else happens here,
where the model runs, on CUDA or on the CPU by the same code: timm's RandomResizedCrop (box sampling, PIL's
antialiased bicubic resampling), horizontal and vertical flips, timm's RandAugment (`train.randaugment`),
normalisation, and timm's random erasing; Mixup/CutMix follow in `train.mixup`. Images stay one channel until the
model's input.

A fixed graph: every random number is drawn on the device from the step's counter (`train.rng`), every sample passes
through the same kernels whatever was drawn for it (the draw selects by masks and by identity parameters: a flip
that is not taken, RandAugment's ops that were not drawn), and no shape or branch depends on a drawn value. So the
host never waits for the device, `torch.compile(fullgraph=True)` takes the whole augmentation as one graph, and on
CUDA the step around it can be captured and replayed (`train.step`).

Why written here rather than taken from a library (docs/speed.md, "Why these means"): torchvision's v2 transforms
draw one parameter set per call (a batch shares one crop); kornia resamples bilinearly without PIL's antialiasing
and picks RandAugment's ops once per batch; DALI is a ~0.5 GB dependency whose RandAugment is not timm's. Here the
crop and resize of a whole batch are two batched matrix products: each sample's rows and columns are resampled by
a weight matrix that holds PIL's bicubic filter, widened by the downscale factor (PIL's antialiasing: a 1-pixel
fractal stroke keeps its mass instead of aliasing into dots), cut to the crop window and mirrored where the sample
is flipped.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import rng
from .randaugment import RandAugment

CROP_ATTEMPTS = 10  # timm's RandomResizedCrop tries 10 boxes before falling back to the centre crop


def _uniform(low, high, u: torch.Tensor) -> torch.Tensor:
    return low + (high - low) * u


def sample_crop_boxes(u: torch.Tensor, height: int, width: int, scale=(0.08, 1.0),
                      ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """(n, 4) float32 boxes (top, left, h, w) from (n, 10, 4) float64 uniforms, as timm's
    RandomResizedCrop.get_params draws them.

    10 attempts of area ~ U(scale) x image area and log aspect ~ U(log ratio); the first attempt that fits wins,
    placed uniformly (randint over the whole range); none fits: the centre crop of timm's fallback. Fixed shapes:
    every attempt is computed and the first fitting one picked by mask.
    """
    target_area = _uniform(scale[0], scale[1], u[..., 0]) * (height * width)
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), u[..., 1]))
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w <= width) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first of equal maxima
    pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
    w, h = pick(w), pick(h)
    top = torch.floor(pick(u[..., 2]) * (height - h + 1))
    left = torch.floor(pick(u[..., 3]) * (width - w + 1))
    # timm's fallback: the largest centred box whose aspect lies within `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    fits = fits.any(1)
    fallback = ((height - fh) // 2, (width - fw) // 2, fh, fw)  # Python numbers: no copy to the device
    boxes = torch.stack([torch.where(fits, v, f) for v, f in zip((top, left, h, w), fallback, strict=True)], 1)
    return rng.keep(boxes.float())


def whole_boxes(batch: int, height: int, width: int, device) -> torch.Tensor:
    """(B, 4) boxes (top, left, h, w) of the whole image, made on the device (no copy from the host)."""
    columns = torch.arange(4, device=device)
    return torch.where(columns == 2, float(height), torch.where(columns == 3, float(width), 0.0)).expand(batch, 4)


def _bicubic(t: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5; torch's grid_sample uses -0.75)."""
    a = -0.5
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, 0.0))


def resample_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int,
                     flip: torch.Tensor | None = None) -> torch.Tensor:
    """(B, out_size, in_size): row o holds the weights with which output pixel o averages the input pixels, for a
    window [start, start + length) of each sample resized to out_size, the way PIL's `resize(BICUBIC)` computes
    them after a crop: the kernel widened by the downscale factor (antialiasing), cut to the window, normalised.
    `flip`: (B,) bool, mirror the output order of those samples.

    The kernel is evaluated only on the taps it can reach (at most 4 x in_size / out_size + 2 per output pixel, a
    number fixed by the sizes, not by the box) and scattered into the dense matrix the batched matmul wants.
    """
    device = start.device
    scale = (length / out_size)[:, None, None]
    stretch = scale.clamp(min=1.0)
    out = torch.arange(out_size, device=device, dtype=start.dtype)[None, :, None]
    if flip is not None:
        out = torch.where(flip[:, None, None], out_size - 1 - out, out)
    centres = start[:, None, None] + (out + 0.5) * scale
    reach = math.ceil(4 * max(1.0, in_size / out_size)) + 2
    taps = torch.floor(centres - 0.5 - 2 * stretch) + torch.arange(reach, device=device)  # (B, out, reach)
    weights = _bicubic((taps + 0.5 - centres) / stretch)
    inside = (taps >= start[:, None, None]) & (taps < (start + length)[:, None, None])
    weights = torch.where(inside, weights, 0.0)
    # The taps summed one by one, in order: a reduction's order is the compiler's choice, and a last-bit change of
    # a weight can move a resampled value across .5 (one grey level), so compiled and eager weights would differ.
    total = weights[..., 0]
    for k in range(1, reach):
        total = total + weights[..., k]
    weights = weights / total[..., None]
    dense = torch.zeros(len(start), out_size, in_size, device=device, dtype=weights.dtype)
    return dense.scatter_add(2, taps.clamp(0, in_size - 1).long(), weights)


def pil_vertical_first(h: torch.Tensor, w: torch.Tensor, out_size: int) -> torch.Tensor:
    """Pillow (13) resizes vertically first when the height shrinks by more than twice what the width does;
    the order matters because the intermediate image is rounded and clipped to 8 bits."""
    return (h - out_size > 0) & (h - out_size > 2 * (w - out_size))


def vertical_first_possible(height: int, width: int, out_size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> bool:
    """Whether any box `sample_crop_boxes` can draw (or its fallback) takes PIL's vertical-first order: from the
    sizes and the ranges alone, a fixed property of the run (the CPU preset's crops never do, the paper's do). A
    pixel of slack on each side covers the rounding of the drawn sizes."""
    area = height * width
    for h in range(1, height + 1):
        w_min = max(1.0, ratio[0] * h - 1, scale[0] * area / h - 1)
        w_max = min(float(width), ratio[1] * h + 1, scale[1] * area / h + 1)
        if w_min <= w_max and h - out_size > 0 and h - out_size > 2 * (w_min - out_size):
            return True
    fh = height if width / height >= min(ratio) else round(width / min(ratio))  # timm's fallback box
    fw = width if width / height <= max(ratio) else round(height * max(ratio))
    return bool(fh - out_size > 0 and fh - out_size > 2 * (fw - out_size))


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, out_size: int, hflip: torch.Tensor | None = None,
                 vflip: torch.Tensor | None = None, pixels=None, vertical: bool = True) -> torch.Tensor:
    """Crop every (H, W) image of a (B, H, W) batch to its own box (top, left, h, w), resize it to out_size x
    out_size with PIL's antialiased bicubic filter, and flip it where asked: two batched matmuls. Gives 8-bit
    values (integers in 0..255) as float32, as PIL does. `boxes` (B, 4) and the (B,) bool flips are on the images'
    device; `pixels` maps the images (uint8, say) to the float values to resample (default: `.float()`).

    PIL resizes in two passes and rounds and clips the intermediate 8-bit image: clipping cuts the kernel's
    negative lobes beside thin strokes, which changes the result by up to ~25 grey levels there, so each sample
    takes PIL's order of passes (`pil_vertical_first`). On square images the vertical-first order is the
    horizontal-first order of the transposed image with the two weight matrices swapped, so every sample runs the
    same two matmuls, on its image or on its transpose (chosen before `pixels`, on the narrower type); on others
    both orders are computed and one kept. `vertical=False`: no box can take the vertical-first order
    (`vertical_first_possible`), so none of that is needed.
    """
    pixels = pixels or (lambda t: t.float())
    batch, height, width = images.shape
    boxes = boxes.float()
    rows = resample_weights(boxes[:, 0], boxes[:, 2], out_size, height, vflip)  # (B, out, H)
    cols = resample_weights(boxes[:, 1], boxes[:, 3], out_size, width, hflip).transpose(1, 2)  # (B, W, out)
    if not vertical:
        return _round8(rows @ _round8(pixels(images) @ cols))
    vertical = rng.keep(pil_vertical_first(boxes[:, 2], boxes[:, 3], out_size))[:, None, None]
    if height != width:
        x = pixels(images)
        return torch.where(vertical, _round8(_round8(rows @ x) @ cols), _round8(rows @ _round8(x @ cols)))
    x = pixels(torch.where(vertical, images.transpose(1, 2), images))
    r = torch.where(vertical, cols.transpose(1, 2), rows)
    c = torch.where(vertical, rows.transpose(1, 2), cols)
    out = _round8(r @ _round8(x @ c))
    return torch.where(vertical, out.transpose(1, 2), out)


def _round8(x: torch.Tensor) -> torch.Tensor:
    """To the 8-bit value PIL stores: round half up, clip to 0..255."""
    return torch.floor(x + 0.5).clamp(0, 255)


def erase_boxes(u: torch.Tensor, chance: torch.Tensor, height: int, width: int, probability: float,
                min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3) -> torch.Tensor:
    """(B, 4) float64 boxes (top, left, h, w) of timm's RandomErasing (one box), h = 0 where a sample is not erased,
    from (B, 10, 4) float64 uniforms `u` and (B,) uniforms `chance`.

    With `probability` a sample gets up to 10 attempts at a box of area U(min_area, max_area) and log aspect
    U(log min_aspect, -log min_aspect) that fits strictly inside, placed uniformly."""
    target_area = _uniform(min_area, max_area, u[..., 0]) * (height * width)
    aspect = torch.exp(_uniform(math.log(min_aspect), -math.log(min_aspect), u[..., 1]))
    h = torch.round(torch.sqrt(target_area * aspect))
    w = torch.round(torch.sqrt(target_area / aspect))
    fits = (w < width) & (h < height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
    h, w = pick(h), pick(w)
    top = torch.floor(pick(u[..., 2]) * (height - h + 1))
    left = torch.floor(pick(u[..., 3]) * (width - w + 1))
    erase = (chance < probability) & fits.any(1)
    return rng.keep(torch.stack([top, left, torch.where(erase, h, 0.0), w], 1))


def random_erase(x: torch.Tensor, boxes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Fill each sample's box (from `erase_boxes`) of a normalised (B, C, H, W) batch with `noise` (per-pixel,
    per-channel N(0, 1): timm's mode 'pixel')."""
    _, _, height, width = x.shape
    rows = torch.arange(height, device=x.device, dtype=boxes.dtype)[None, :, None]
    cols = torch.arange(width, device=x.device, dtype=boxes.dtype)[None, None, :]
    top, left, h, w = (boxes[:, i, None, None] for i in range(4))
    box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return torch.where(box[:, None], noise, x)


class DeviceAugment:
    """The training transform of a pre-training run, applied to a batch of uint8 grayscale images.

    Same steps, order and parameters as `train.data.train_transform` (the PIL path, `--augment cpu`): ink gain,
    RandomResizedCrop (bicubic), flips, RandAugment, to [0, 1] and normalise, copy to 3 channels, random erasing.
    Call with the images, the rank's key and the micro-step counter (`train.rng.StepRNG`): a pure function of them.
    """

    def __init__(self, img_size: int, *, crop: bool = True, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5, vflip: float = 0.5, randaug: str | None = None, reprob: float = 0.0,
                 mean: float = 0.5, std: float = 0.5, ink_gain: float = 1.0, channels: int = 3):
        self.img_size, self.crop, self.crop_scale, self.crop_ratio = img_size, crop, crop_scale, crop_ratio
        self.hflip, self.vflip, self.reprob = hflip, vflip, reprob
        self.mean, self.std, self.ink_gain, self.channels = mean, std, ink_gain, channels
        # timm's training transform gives RandAugment the mean as fill and the resize interpolation (bicubic).
        self.randaug = RandAugment(randaug, fill=round(255 * mean)) if randaug else None

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) uint8 -> float pixel values, after the ink gain."""
        x = images.float()
        if self.ink_gain != 1:  # `_Ink`'s lookup table: round(v x gain), clipped at 255
            x = x * self.ink_gain
            if not float(self.ink_gain).is_integer():
                x = torch.round(x)
            x = x.clamp(max=255)
        return x

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        x = (x / 255 - self.mean) / self.std
        return x[:, None].expand(-1, self.channels, -1, -1)

    def __call__(self, images: torch.Tensor, key: int, counter: torch.Tensor) -> torch.Tensor:
        x = images[:, 0]
        batch, height, width = x.shape
        if self.crop:
            u = rng.uniform(key, rng.CROP, counter, (batch, CROP_ATTEMPTS, 4), torch.float64)
            boxes = sample_crop_boxes(u, height, width, self.crop_scale, self.crop_ratio)
        else:
            boxes = whole_boxes(batch, height, width, x.device)
        u = rng.uniform(key, rng.FLIP, counter, (2, batch))
        hflip, vflip = rng.keep(u[0] < self.hflip), rng.keep(u[1] < self.vflip)
        if self.crop or height != self.img_size or width != self.img_size:
            vertical = vertical_first_possible(height, width, self.img_size, *(
                (self.crop_scale, self.crop_ratio) if self.crop else ((1.0, 1.0), (width / height, width / height))))
            x = resized_crop(x, boxes, self.img_size, hflip=hflip, vflip=vflip, pixels=self._pixels,
                             vertical=vertical)
        else:  # crops already cut at the model's size (HostCrop): resampling at scale 1 is the identity
            x = self._pixels(x)
            x = torch.where(hflip[:, None, None], x.flip(2), x)
            x = torch.where(vflip[:, None, None], x.flip(1), x)
        if self.randaug is not None:
            x = self.randaug(x, key, counter)
        x = self._to_model(x)
        if self.reprob > 0:
            u = rng.uniform(key, rng.ERASE, counter, (batch, CROP_ATTEMPTS + 1, 4), torch.float64)
            boxes = erase_boxes(u[:, :CROP_ATTEMPTS], u[:, CROP_ATTEMPTS, 0], self.img_size, self.img_size,
                                self.reprob)
            noise = rng.normal(key, rng.ERASE_NOISE, counter, tuple(x.shape), stored=False)  # per pixel
            return random_erase(x, boxes, noise)
        return x.contiguous()

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        """The clean view pretext accuracy is measured on: the whole image resized (as `eval_transform`)."""
        batch, _, height, width = images.shape
        boxes = whole_boxes(batch, height, width, images.device)
        vertical = height - self.img_size > 0 and height - self.img_size > 2 * (width - self.img_size)
        return self._to_model(resized_crop(images[:, 0], boxes, self.img_size, pixels=self._pixels,
                                           vertical=vertical)).contiguous()


class HostCrop:
    """RandomResizedCrop where the pixels are decoded or rendered (a loader worker), the rest on the device.

    A (B, 1, H, W) uint8 batch becomes (B, 1, size, size) uint8: ink gain, then for every sample its own box (drawn
    as `DeviceAugment` draws it, from the worker's key and batch counter) cut out and resized with PIL's
    antialiased bicubic filter, as the PIL path (`train.data.train_transform`) does. The streamed paths then hand
    the training process crops at the model's size instead of whole images (at the paper preset 224 px instead of
    512 px: a fifth of the bytes to move, pin and copy to the device); flips, RandAugment, normalisation and erasing
    stay on the device (`DeviceAugment` with `crop=False`, `ink_gain=1`).
    """

    def __init__(self, size: int, crop: bool = True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), ink_gain: float = 1.0):
        self.size, self.crop, self.scale, self.ratio = size, crop, scale, ratio
        self.lut = None if ink_gain == 1 else [min(255, round(v * ink_gain)) for v in range(256)]

    def __call__(self, images: torch.Tensor, key: int, counter: int) -> torch.Tensor:
        from PIL import Image

        batch, _, height, width = images.shape
        if self.crop:
            u = rng.uniform(key, rng.CROP, torch.tensor(counter), (batch, CROP_ATTEMPTS, 4), torch.float64)
            boxes = sample_crop_boxes(u, height, width, self.scale, self.ratio)
        else:
            boxes = torch.tensor([[0.0, 0.0, height, width]]).expand(batch, 4)
        out = torch.empty(batch, 1, self.size, self.size, dtype=torch.uint8)
        for i, (top, left, h, w) in enumerate(boxes.int().tolist()):
            image = Image.fromarray(images[i, 0].numpy())
            if self.lut is not None:
                image = image.point(self.lut)
            image = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BICUBIC)
            out[i, 0] = torch.from_numpy(np.array(image))
        return out
