"""FractalDB (Kataoka et al., ACCV 2020): C classes, each its own IFS, many images per class (docs/design.md section 5).

A class's system is drawn with the sigma-factor (Anderson & Farrell's sampler, the default, `--search sigma`) or
by FractalDB's own search (`--search filling`: N ~ U{2..8} maps, every coefficient U(-1, 1), kept when the image
inks at least 20% of the canvas); either way redrawn until instance 0 inks more than `--fill`. Instance m of a
class: flip m % 4 (none, left-right, up-down, both), weight variant (m // 4) % 25 (none, or one of the six
coefficients of every map times 0.2, 0.6, 1.4 or 1.8: FractalDB's 25 variants, probabilities again by
determinant), and its own chaos-game seed (new points and patch masks): FractalDB's 25 x 10 x 4 = 1000 per class
is `--per-class 1000`.
"""

from __future__ import annotations

import numpy as np

from fracgen.errors import FracgenError
from fracgen.ifs import COEFFICIENTS, IFS, check_sigma, make_ifs, sample_sigma_system
from fracgen.render import render
from fracgen.rng import TAG_CLASS_SYSTEM, derive_seed, uniforms
from fracgen.settings import Settings, render_seed
from fracgen.systems.base import Progress, System, fill_hint, find_classes, image_of, register

SEARCHES = ("sigma", "filling")
FILLING_RATE = 0.2  # FractalDB's acceptance threshold for its uniform-coefficient search
FILLING_MAPS = (2, 8)  # FractalDB draws N in 2..8
WEIGHTS = (0.2, 0.6, 1.4, 1.8)
VARIANTS = 1 + len(COEFFICIENTS) * len(WEIGHTS)  # 25: none, or one coefficient x one weight
FLIPS = ("none", "lr", "ud", "both")


def variant(system: IFS, v: int) -> tuple[IFS, dict | None]:
    """FractalDB's weight variant v of a class system (0: the system itself)."""
    if v == 0:
        return system, None
    j, w = divmod(v - 1, len(WEIGHTS))
    coef = system.coef.copy()
    coef[:, j] *= WEIGHTS[w]
    return make_ifs(coef), {"coefficient": COEFFICIENTS[j], "weight": WEIGHTS[w]}


def filling_search_system(seed: int) -> IFS:
    u = uniforms(seed, 1 + 6 * FILLING_MAPS[1])
    n = FILLING_MAPS[0] + min(int(u[0] * (FILLING_MAPS[1] - FILLING_MAPS[0] + 1)), FILLING_MAPS[1] - FILLING_MAPS[0])
    coef = 2.0 * u[1:1 + 6 * n].reshape(n, 6) - 1.0
    return make_ifs(coef)


@register
class FractalDB(System):
    name = "fractaldb"
    summary = "C classes, each its own fractal; weight variants, patch masks and flips per class (FractalDB)"
    uses = ("sigma", "maps", "points", "pad", "fill", "max_retries", "search")
    class_keys = ("ifs", "attempt")

    def validate(self, s: Settings) -> None:
        if s.search not in SEARCHES:
            raise FracgenError(f"--search must be one of {', '.join(SEARCHES)}, got {s.search!r}")
        if s.search == "sigma":
            check_sigma(s.sigma, s.maps)

    def resolve(self, s: Settings, pool, progress: Progress | None) -> tuple[dict, list[dict], dict]:
        header = {"search": s.search, "sigma": s.sigma if s.search == "sigma" else None,
                  "fill_needed": max(s.fill, FILLING_RATE) if s.search == "filling" else s.fill}

        def failure(k: int) -> str:
            return (f"class {k}: no system found by the {s.search} search inked more than {header['fill_needed']} "
                    f"of the canvas in {s.max_retries} draws; raise --max-retries or lower --fill{fill_hint(s)}")

        classes, pngs = find_classes(s, self, header, pool, progress, failure)
        return header, classes, pngs

    def class_system(self, s: Settings, k: int, attempt: int) -> IFS:
        seed = derive_seed(s.seed, TAG_CLASS_SYSTEM, k, attempt)
        if s.search == "filling":
            return filling_search_system(seed)
        return sample_sigma_system(s.sigma, s.maps, seed)[0]

    def find(self, s: Settings, header: dict, k: int, rows: np.ndarray) -> dict | None:
        for attempt in range(s.max_retries):
            system = self.class_system(s, k, attempt)
            _, fill = render(system, render_seed(s, k, 0, attempt), points=s.points, size=s.size, pad=s.pad,
                             out=rows)
            if fill > header["fill_needed"]:
                return {"class": k, "attempt": attempt, "fill": fill, "ifs": system.to_json()}
        return None

    def draw(self, s: Settings, header: dict, state: object, c: dict, k: int, m: int, rows: np.ndarray | None) -> dict:
        flip, v = m % len(FLIPS), (m // len(FLIPS)) % VARIANTS
        system, weight = variant(IFS.from_json(c["ifs"]), v)
        seed = render_seed(s, k, m, c["attempt"])
        if rows is None:  # instance 0: no flip, no variant, the image the search drew
            fill = c["fill"]
        else:
            _, fill = render(system, seed, points=s.points, size=s.size, pad=s.pad, out=rows)
            image = image_of(rows)
            if FLIPS[flip] in ("lr", "both"):
                image[:] = image[:, ::-1].copy()
            if FLIPS[flip] in ("ud", "both"):
                image[:] = image[::-1].copy()
        return {"class": k, "instance": m, "attempt": c["attempt"], "seed": seed, "fill": fill,
                "variant": weight, "flip": FLIPS[flip], "ifs": system.to_json()}
