"""The settings that determine a dataset's bytes (all systems), and the checks every system shares."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from fracgen import png
from fracgen.errors import FracgenError
from fracgen.limits import MAX_CLASSES, MAX_MAPS, MAX_NAME, MAX_SAMPLES
from fracgen.render import check_canvas, check_points
from fracgen.rng import TAG_RENDER, derive_seed


@dataclass(frozen=True)
class Settings:
    """Everything that determines the bytes of the dataset (`workers` does not). Fields a system does not use
    are kept at their defaults; `fracgen.systems` says which each system reads."""

    system: str = "1p-frac"
    sigma: float = 3.5
    delta: float = 0.1
    perturb: str = "scale"
    classes: int = 1000
    per_class: int = 1
    maps: int = 2
    points: int = 100_000
    size: int = 512
    pad: int = 6
    fill: float = 0.05
    seed: int = 0
    max_retries: int = 100
    shard_size: int = 100
    name: str = ""  # "" names the shards after the system
    png_level: int = 1  # ISA-L deflate level, 0..3
    base: dict | None = None  # 1p-frac: an IFS in JSON form; None samples one from `seed` and `sigma`
    bases: int = 1  # 1p-frac: base fractals, each with classes / bases of the classes (the paper's scaling axis)
    search: str = "sigma"  # fractaldb: how class systems are found (sigma-factor, or FractalDB's filling-rate search)
    image: str | None = None  # real: the image's path; None is scikit-learn's bundled china.jpg
    image_mode: str = "gray"  # real: gray or edges
    noise: str = "gaussian"  # noise: gaussian or uniform

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.system)

    @property
    def num_samples(self) -> int:
        return self.classes * self.per_class

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_name(self, index: int) -> str:
        return f"{self.name}-{index:06d}.tar"


def render_seed(s: Settings, k: int, m: int, attempt: int) -> int:
    """The seed of instance m of class k (its chaos game's points and patch masks)."""
    return derive_seed(s.seed, TAG_RENDER, k, m, attempt)


def validate_common(s: Settings) -> None:
    """The checks every system shares; each system adds its own (`System.validate`)."""
    if not (np.isfinite(s.delta) and s.delta >= 0):
        raise FracgenError(f"--delta must be >= 0, got {s.delta}")
    for label, value in (("--classes", s.classes), ("--per-class", s.per_class),
                         ("--shard-size", s.shard_size), ("--max-retries", s.max_retries)):
        if value < 1:
            raise FracgenError(f"{label} must be at least 1, got {value}")
    if not 0 <= s.fill < 1:
        raise FracgenError(f"--fill must be in [0, 1), got {s.fill}")
    if s.png_level not in png.LEVELS:
        raise FracgenError(f"--png-level must be one of {', '.join(map(str, png.LEVELS))}, got {s.png_level}")
    if not 0 <= s.seed < 2**64:
        raise FracgenError(f"--seed must be in [0, 2^64) (seeds are 64-bit), got {s.seed}")
    if s.classes > MAX_CLASSES:
        raise FracgenError(f"--classes must be at most {MAX_CLASSES:,} (the manifest holds every class's system; "
                           f"FractalDB-10k has 10,000), got {s.classes:,}")
    if s.num_samples > MAX_SAMPLES:
        raise FracgenError(f"--classes x --per-class must be at most {MAX_SAMPLES:,}, got {s.num_samples:,}")
    if not 1 <= s.maps <= MAX_MAPS:
        raise FracgenError(f"--maps must be in 1..{MAX_MAPS}, got {s.maps}")
    if not (re.fullmatch(r"[A-Za-z0-9_-]+", s.name) and len(s.name) <= MAX_NAME):
        raise FracgenError(f"--name must be 1 to {MAX_NAME} letters, digits, '-' and '_', got {s.name[:40]!r}"
                           + ("..." if len(s.name) > 40 else ""))
    check_canvas(s.size, s.pad)
    check_points(s.points)
