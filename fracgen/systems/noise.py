"""Noise instead of a fractal: the paper's "is it the shape?" control (docs/design.md section 7).

Class k is one fixed noise image drawn from its own seed: Gaussian (mean 63.5, std 32, clipped) or uniform over
0..127, the fractals' ink range. The pretext task (tell C fixed patterns apart) is learnable, but there is no
shape in it; every instance of a class is the same image, varied only by augmentation.
"""

from __future__ import annotations

import numpy as np

from fracgen.errors import FracgenError
from fracgen.rng import TAG_NOISE, derive_seed, uniforms
from fracgen.settings import Settings
from fracgen.systems.base import Progress, System, image_of, register

KINDS = ("gaussian", "uniform")
INK = 127


def noise_image(kind: str, seed: int, size: int) -> np.ndarray:
    """From fracgen's counter-based uniforms (numpy's Generator keeps its bit streams but not its distributions
    stable across versions), Gaussian by Box-Muller."""
    n = size * size
    if kind == "gaussian":
        u = uniforms(seed, 2 * n)
        z = np.sqrt(-2.0 * np.log1p(-u[:n])) * np.cos(2.0 * np.pi * u[n:])
        return np.clip(np.rint(INK / 2 + 32.0 * z), 0, INK).astype(np.uint8).reshape(size, size)
    return np.floor(uniforms(seed, n) * (INK + 1)).astype(np.uint8).reshape(size, size)


@register
class Noise(System):
    name = "noise"
    summary = "C classes, each one fixed Gaussian or uniform noise image (the shape-free control)"
    uses = ("noise",)
    class_keys = ("seed",)

    def validate(self, s: Settings) -> None:
        if s.noise not in KINDS:
            raise FracgenError(f"--noise must be one of {', '.join(KINDS)}, got {s.noise!r}")

    def resolve(self, s: Settings, pool, progress: Progress | None) -> tuple[dict, list[dict], dict]:
        classes = [{"class": k, "seed": derive_seed(s.seed, TAG_NOISE, k)} for k in range(s.classes)]
        if progress:
            progress("classes", s.classes, s.classes)
        return {"noise": s.noise}, classes, {}

    def draw(self, s: Settings, header: dict, state: object, c: dict, k: int, m: int, rows: np.ndarray) -> dict:
        image_of(rows)[:] = noise_image(s.noise, c["seed"], s.size)
        return {"class": k, "instance": m, "noise": s.noise, "seed": c["seed"]}
