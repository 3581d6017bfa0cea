"""timm's RandAugment on a batch of 8-bit grayscale images, every sample its own ops, magnitudes and signs.

Same configuration strings as `timm.data.rand_augment_transform` ("rand-m9-mstd0.5-inc1": magnitude 9, magnitude
noise 0.5, the "increasing" op set; n layers, default 2; each applied with probability p, default 0.5), the same op
sets and the same magnitude-to-argument rules (timm's `LEVEL_TO_ARG`). Images are (B, H, W) float tensors holding
integers 0..255, as PIL's 8-bit images hold them; every op gives integers again.

Each layer is three batched steps, whatever ops were drawn, so nothing waits on data-dependent control flow:
- the point ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd, Contrast, Brightness, Color) as
  one 256-entry lookup table per sample, built with PIL's own arithmetic;
- Sharpness: PIL's SMOOTH 3x3 filter (borders kept) blended by the sample's factor;
- the geometric ops (Rotate, ShearX/Y, TranslateX/YRel) as one affine resampling with each sample's matrix, in
  PIL's pixel convention and with PIL's own bicubic (a = -1 in its transforms; torch's grid_sample uses -0.75,
  which differs from PIL by up to 21 grey levels on sharp edges), filled with the mean grey as timm fills.
Every op equals timm's PIL op on the same image, but for rare off-by-one float rounding (tests check each op).
On grayscale images Color changes nothing (PIL's degenerate image of an L image is the image itself).
"""

from __future__ import annotations

import math
import re

import torch

from . import rng

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is "full strength"

RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def parse(spec: str) -> dict:
    """timm's RandAugment config string -> {magnitude, num_layers, prob, magnitude_std, magnitude_max, ops}.

    Raises ValueError for what timm would not accept or what is not implemented here (weighted op sets 't...').
    """
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config {spec!r} must start with 'rand' (e.g. rand-m9-mstd0.5-inc1)")
    cfg = {"magnitude": LEVEL_DENOM, "num_layers": 2, "prob": 0.5, "magnitude_std": 0.0, "magnitude_max": LEVEL_DENOM,
           "increasing": False}
    for part in parts[1:]:
        key, value = (re.split(r"(\d.*)", part) + [""])[:2]
        try:
            if key == "m":
                cfg["magnitude"] = float(int(value))
            elif key == "n":
                cfg["num_layers"] = int(value)
            elif key == "p":
                cfg["prob"] = float(value)
            elif key == "mstd":
                std = float(value)
                cfg["magnitude_std"] = math.inf if std > 100 else std  # timm: > 100 means uniform in [0, m]
            elif key == "mmax":
                cfg["magnitude_max"] = float(int(value))
            elif key == "inc":
                cfg["increasing"] = bool(int(value))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"RandAugment config {spec!r}: cannot read section {part!r} (known: m, n, p, mstd, "
                             "mmax, inc)") from None
    cfg["ops"] = RAND_INCREASING_TRANSFORMS if cfg.pop("increasing") else RAND_TRANSFORMS
    return cfg


POINT = ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize", "SolarizeIncreasing",
         "SolarizeAdd", "Contrast", "ContrastIncreasing", "Brightness", "BrightnessIncreasing")
SHARPNESS = ("Sharpness", "SharpnessIncreasing")


class RandAugment:
    """Call with a (B, H, W) batch on the device, the rank's key and the micro-step counter (`train.rng`): the ops,
    magnitudes and signs are drawn on the device, and every sample passes through every layer's three steps
    (point-op table, Sharpness, affine resampling) with the identity where its op is another one (an identity
    table, a blend factor of 1, the identity matrix: each gives back the exact 8-bit image), so the layer is one
    fixed graph whatever was drawn."""

    def __init__(self, spec: str, fill: int = 128, translate_pct: float = 0.45):
        self.spec = spec
        self.__dict__.update(parse(spec))
        self.fill, self.translate_pct = float(fill), translate_pct
        self.groups = {group: any(name in group for name in self.ops) for group in (POINT, SHARPNESS, GEOMETRIC)}

    def __repr__(self):
        return f"RandAugment({self.spec!r})"

    def draw(self, key: int, counter: torch.Tensor, batch: int,
             layer: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer's draws as timm's AugmentOp makes them, per sample: the op (uniform, with replacement across
        layers), whether it applies (prob), its level (magnitude + N(0, mstd), clipped, / 10) and its sign (timm's
        _randomly_negate). Returns (op index or -1 where not applied, level, sign) on the counter's device."""
        stream = rng.RANDAUG + layer
        u = rng.uniform(key, stream, counter, (3, batch), torch.float64)
        op = torch.clamp(torch.floor(u[0] * len(self.ops)), max=len(self.ops) - 1).long()
        applied = u[1] <= self.prob
        if self.magnitude_std == math.inf:
            magnitude = self.magnitude * rng.uniform(key, stream + 100, counter, (batch,), torch.float64)
        elif self.magnitude_std > 0:
            magnitude = self.magnitude + self.magnitude_std * rng.normal(key, stream + 100, counter, (batch,),
                                                                         torch.float64)
        else:
            magnitude = torch.full((batch,), self.magnitude, dtype=torch.float64, device=counter.device)
        level = magnitude.clamp(0, self.magnitude_max) / LEVEL_DENOM
        sign = torch.where(u[2] > 0.5, -1.0, 1.0).to(torch.float64)
        return rng.keep(torch.where(applied, op, -1)), rng.keep(level), rng.keep(sign)

    def __call__(self, x: torch.Tensor, key: int, counter: torch.Tensor) -> torch.Tensor:
        for layer in range(self.num_layers):
            x = self.layer(x, *self.draw(key, counter, x.shape[0], layer))
        return x

    def layer(self, x: torch.Tensor, op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        """Apply op[i] at level[i], sign[i] to sample i (tensors on x's device; op -1: nothing)."""
        chosen = {name: op == i for i, name in enumerate(self.ops)}

        def drawn(group) -> torch.Tensor:
            hits = [chosen[name] for name in self.ops if name in group]
            return torch.stack(hits).any(0)

        # rng.keep: each sample's table, factor and map are stored once, not recomputed for every pixel they touch
        if self.groups[POINT]:
            x = _apply_lut(x, rng.keep(self._lut(x, chosen, level, sign)))
        if self.groups[SHARPNESS]:
            factor = _enhance_factor(level, sign, "SharpnessIncreasing" in self.ops)
            x = _sharpness(x, rng.keep(torch.where(drawn(SHARPNESS), factor, 1.0)))
        if self.groups[GEOMETRIC]:
            a, t = self._affine_params(chosen, level, sign, x.shape[2], x.shape[1])
            x = _pil_affine_bicubic(x, rng.keep(a), rng.keep(t), self.fill)
        return x

    def _lut(self, x, chosen, level, sign) -> torch.Tensor:
        """(B, 256) lookup tables: each sample's point op, the identity for the others. float64 and PIL's integer
        rules (truncation, clipping), so the tables equal PIL's."""
        batch, device = x.shape[0], x.device
        v = torch.arange(256, device=device, dtype=torch.float64).expand(batch, 256)
        hist = torch.zeros(batch, 256, device=device, dtype=torch.float64)
        hist.scatter_add_(1, x.reshape(batch, -1).long(), torch.ones_like(x, dtype=torch.float64).reshape(batch, -1))
        lut = v
        col = lambda t: t[:, None]  # noqa: E731

        def use(name, table):
            nonlocal lut
            if name in chosen:
                lut = torch.where(col(chosen[name]), table, lut)

        present = hist > 0
        idx = torch.arange(256, device=device)
        lo = torch.where(present, idx, 256).amin(1)
        hi = torch.where(present, idx, -1).amax(1)
        scale = 255.0 / (hi - lo).clamp(min=1).double()
        stretched = torch.trunc(v * col(scale) + col(-lo.double() * scale)).clamp(0, 255)
        use("AutoContrast", torch.where(col(hi > lo), stretched, v))

        total = hist.sum(1)
        last = hist.gather(1, col(hi.clamp(min=0))).squeeze(1)
        step = torch.floor((total - last) / 255)
        before = torch.cumsum(hist, 1) - hist
        equalised = torch.floor((col(torch.floor(step / 2)) + before) / col(step.clamp(min=1))).clamp(max=255)
        use("Equalize", torch.where(col((present.sum(1) > 1) & (step > 0)), equalised, v))

        use("Invert", 255 - v)
        # Posterize keeps the `bits` high bits; Increasing counts the other way (timm's level rules).
        bits = torch.trunc(level * 4)
        for name, keep in (("Posterize", bits), ("PosterizeIncreasing", 4 - bits)):
            quantum = torch.pow(2.0, 8 - keep)
            use(name, torch.floor(v / col(quantum)) * col(quantum))
        threshold = torch.trunc(level * 256).clamp(max=256.0)
        for name, t in (("Solarize", threshold), ("SolarizeIncreasing", 256 - threshold)):
            use(name, torch.where(v < col(t), v, 255 - v))
        add = torch.trunc(level * 110).clamp(max=128.0)
        use("SolarizeAdd", torch.where(v < 128, (v + col(add)).clamp(max=255), v))

        mean = torch.trunc((hist * v).sum(1) / total + 0.5)  # ImageStat's mean, rounded as Contrast rounds it
        for kind in ("Contrast", "Brightness"):
            factor = _enhance_factor(level, sign, kind + "Increasing" in chosen)
            degenerate = col(mean) if kind == "Contrast" else 0.0
            for name in (kind, kind + "Increasing"):
                use(name, _blend(degenerate, v, col(factor)))
        return lut

    def _affine_params(self, chosen: dict, level, sign, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's geometric op as PIL's affine map from an output pixel centre p (pixel-edge coordinates)
        to the input point a p + t: (B, 2, 2) and (B, 2) float64, timm's arguments from the level; the identity
        where the sample's op is not geometric."""
        v = sign * level
        none = torch.zeros_like(v, dtype=torch.bool)
        pick = lambda name, value: torch.where(chosen.get(name, none), value, 0.0)  # noqa: E731
        shear_x, shear_y = pick("ShearX", v * 0.3), pick("ShearY", v * 0.3)
        # PIL's rotate(degrees) turns counter-clockwise about the centre (w / 2, h / 2); it rounds cos and sin to
        # 15 decimals
        angle = pick("Rotate", -torch.deg2rad(v * 30))
        cos, sin = torch.round(torch.cos(angle), decimals=15), torch.round(torch.sin(angle), decimals=15)
        rotate = chosen.get("Rotate", none)
        a = torch.stack([torch.where(rotate, cos, 1.0), torch.where(rotate, sin, shear_x),
                         torch.where(rotate, -sin, shear_y), torch.where(rotate, cos, 1.0)], 1).reshape(-1, 2, 2)
        cx, cy = width / 2, height / 2
        turned_x, turned_y = cx - (a[:, 0, 0] * cx + a[:, 0, 1] * cy), cy - (a[:, 1, 0] * cx + a[:, 1, 1] * cy)
        t = torch.stack([torch.where(rotate, turned_x, pick("TranslateXRel", v * self.translate_pct * width)),
                         torch.where(rotate, turned_y, pick("TranslateYRel", v * self.translate_pct * height))], 1)
        return a, t


def _cubic_weights(d: torch.Tensor) -> list[torch.Tensor]:
    """Weights of the taps at -1, 0, 1, 2 for a sample d in [0, 1) past tap 0: the cubic PIL's transforms use
    (Geometry.c's BICUBIC, a = -1; its resize uses a = -0.5)."""
    d2, d3 = d * d, d * d * d
    return [-d + 2 * d2 - d3, 1 - 2 * d2 + d3, d + d2 - d3, d3 - d2]


def _pil_affine_bicubic(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor, fill: float) -> torch.Tensor:
    """PIL's `Image.transform(size, AFFINE, data, BICUBIC, fillcolor=fill)` on a (B, H, W) batch of 8-bit values,
    each sample with its own map: output pixel centre p -> input point a p + t (pixel-edge coordinates, float64
    as PIL computes them); points outside the image take `fill`, taps beyond the border repeat the edge, the
    result is truncated to 8 bits. Equal to PIL's output but for rare float rounding (a test bounds it)."""
    batch, height, width = x.shape
    device = x.device
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float64) + 0.5,
                            torch.arange(width, device=device, dtype=torch.float64) + 0.5, indexing="ij")
    a = a[:, :, :, None, None]
    xin = a[:, 0, 0] * xs + a[:, 0, 1] * ys + t[:, 0, None, None]
    yin = a[:, 1, 0] * xs + a[:, 1, 1] * ys + t[:, 1, None, None]
    outside = (xin < 0) | (xin >= width) | (yin < 0) | (yin >= height)
    x0, y0 = torch.floor(xin - 0.5), torch.floor(yin - 0.5)
    wx = _cubic_weights((xin - 0.5 - x0).to(x.dtype))
    wy = _cubic_weights((yin - 0.5 - y0).to(x.dtype))
    x0, y0 = x0.long(), y0.long()
    flat = x.reshape(batch, -1)
    cols = [(x0 + (i - 1)).clamp_(0, width - 1) for i in range(4)]
    out = torch.zeros_like(x)
    for j in range(4):
        row = (y0 + (j - 1)).clamp_(0, height - 1) * width
        across = sum(flat.gather(1, (row + cols[i]).reshape(batch, -1)).reshape(x.shape) * wx[i] for i in range(4))
        out += across * wy[j]
    out = torch.where(outside, fill, out)
    return torch.trunc(out).clamp_(0, 255)


def _enhance_factor(level, sign, increasing: bool) -> torch.Tensor:
    """timm's enhance arguments: [0.1, 1.9] from the level, or 1 +- 0.9 level for the Increasing variant."""
    if increasing:
        return torch.clamp(1.0 + sign * level * 0.9, min=0.1)
    return level * 1.8 + 0.1


def _blend(degenerate, image, factor):
    """PIL's Image.blend on 8-bit images: degenerate + factor (image - degenerate) in float32 (as Blend.c computes
    it: float64 here changes some results by one), truncated and clipped."""
    f32 = torch.float32
    degenerate = degenerate.to(f32) if torch.is_tensor(degenerate) else degenerate
    out = torch.trunc(degenerate + factor.to(f32) * (image.to(f32) - degenerate)).clamp(0, 255)
    return out.to(image.dtype)


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    batch = x.shape[0]
    return lut.to(x.dtype).gather(1, x.reshape(batch, -1).long()).reshape(x.shape)


def _sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (kernel 1 1 1 / 1 5 1 / 1 1 1, over 13;
    border pixels are the input's). The 3x3 sum is taken from shifted views: no filter weights to copy to the
    device."""
    height, width = x.shape[1:]
    inner = sum(x[:, i:height - 2 + i, j:width - 2 + j] for i in range(3) for j in range(3))
    smooth = torch.round((inner + 4 * x[:, 1:-1, 1:-1]) / 13)  # PIL rounds the filtered 8-bit values
    degenerate = torch.cat([x[:, :1], torch.cat([x[:, 1:-1, :1], smooth, x[:, 1:-1, -1:]], 2), x[:, -1:]], 1)
    return _blend(degenerate, x, factor.to(x.dtype)[:, None, None])
