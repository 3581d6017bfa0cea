"""1p-frac (the paper's system): one base fractal, C classes each a small perturbation of it (LIEP).

Order of work: (1) the base system, sampled from the seed with the sigma-factor (or read from `--base`) and
itself checked for fill; (2) every class's perturbation, redrawn until its image covers more than `fill` of the
canvas, with bounded retries; (3) instance m of class k: the class system's chaos game from its own seed.

`--bases B` (the paper's "scaling backwards" axis, from FractalDB's many fractals to one): B base fractals, class
k perturbing base k // (C / B). Base 0 is drawn exactly as with one base; base j > 0 from its own stream.
"""

from __future__ import annotations

import numpy as np

from fracgen.errors import FracgenError
from fracgen.ifs import IFS, PERTURB_MODES, check_sigma, class_seed, perturb, sample_sigma_system
from fracgen.render import render
from fracgen.rng import TAG_BASE, derive_seed
from fracgen.settings import Settings, render_seed
from fracgen.systems.base import Progress, System, fill_hint, find_classes, register


@register
class OnePFrac(System):
    name = "1p-frac"
    summary = "one base fractal, C perturbed copies of it (the paper's 1p-frac)"
    uses = ("sigma", "delta", "perturb", "maps", "points", "pad", "fill", "max_retries", "base", "bases")
    class_keys = ("ifs", "noise", "attempt")

    def validate(self, s: Settings) -> None:
        if s.base is None:
            check_sigma(s.sigma, s.maps)
        if s.perturb not in PERTURB_MODES:
            raise FracgenError(f"--perturb must be one of {', '.join(PERTURB_MODES)}, got {s.perturb!r}")
        if s.bases < 1 or s.classes % s.bases:
            raise FracgenError(f"--bases must be at least 1 and divide --classes {s.classes}, got {s.bases}")
        if s.bases > 1 and s.base is not None:
            raise FracgenError("--base gives one base fractal; it cannot be combined with --bases > 1")

    def resolve(self, s: Settings, pool, progress: Progress | None) -> tuple[dict, list[dict], dict]:
        header = resolve_base(s)
        if s.bases > 1:  # base 0's fields stay at the top, as for one base; all of them in "bases"
            header = {**header, "bases": [header] + [resolve_base(s, j) for j in range(1, s.bases)]}

        def failure(k: int) -> str:
            where = (f"sampled from seed {s.seed} (attempt {header['attempt']})" if header["source"] == "sampled"
                     else "read from --base")
            return (f"class {k}: no perturbation (delta {s.delta}) of the base {where} covered more than --fill "
                    f"{s.fill} in {s.max_retries} tries; the base is degenerate: pick another --seed, a smaller "
                    f"--delta or a lower --fill{fill_hint(s)}")

        classes, pngs = find_classes(s, self, header, pool, progress, failure)
        return header, classes, pngs

    def find(self, s: Settings, header: dict, k: int, rows: np.ndarray) -> dict | None:
        j = k // (s.classes // s.bases)
        base = IFS.from_json(header["bases"][j]["ifs"] if s.bases > 1 else header["ifs"])
        for attempt in range(s.max_retries):
            system, noise = perturb(base, s.delta, s.perturb, class_seed(s.seed, k, attempt))
            _, fill = render(system, render_seed(s, k, 0, attempt), points=s.points, size=s.size, pad=s.pad,
                             out=rows)
            if fill > s.fill:
                record = {"class": k, "attempt": attempt, "noise": noise.tolist(), "fill": fill,
                          "ifs": system.to_json()}
                return {**record, "base": j} if s.bases > 1 else record
        return None

    def draw(self, s: Settings, header: dict, state: object, c: dict, k: int, m: int, rows: np.ndarray | None) -> dict:
        seed = render_seed(s, k, m, c["attempt"])
        if rows is None:
            fill = c["fill"]
        else:
            _, fill = render(IFS.from_json(c["ifs"]), seed, points=s.points, size=s.size, pad=s.pad, out=rows)
        return {"class": k, "instance": m, "attempt": c["attempt"], "seed": seed, "fill": fill,
                "perturb": s.perturb, "delta": s.delta, "noise": c["noise"], "ifs": c["ifs"]}


def _base_seed(s: Settings, attempt: int, j: int) -> int:
    return derive_seed(s.seed, TAG_BASE, attempt) if j == 0 else derive_seed(s.seed, TAG_BASE, attempt, j)


def resolve_base(s: Settings, j: int = 0) -> dict:
    """Base j and how it was obtained; it must itself pass the fill check."""
    if s.base is not None:
        base = IFS.from_json(s.base)
        _, fill = render(base, derive_seed(s.seed, TAG_BASE, 0), points=s.points, size=s.size, pad=s.pad)
        if fill <= s.fill:
            raise FracgenError(f"the --base system covers only {fill:.3f} of the canvas, not more than "
                               f"--fill {s.fill}; it is degenerate at these settings{fill_hint(s)}")
        return {"source": "file", "ifs": base.to_json(), "sigma_drawn": None, "attempt": 0, "fill": fill}
    for attempt in range(s.max_retries):
        base, a = sample_sigma_system(s.sigma, s.maps, _base_seed(s, attempt, j))
        _, fill = render(base, _base_seed(s, attempt, j), points=s.points, size=s.size, pad=s.pad)
        if fill > s.fill:
            return {"source": "sampled", "ifs": base.to_json(), "sigma_drawn": a, "attempt": attempt,
                    "fill": fill}
    which = f"base system {j}" if j else "base system"
    raise FracgenError(f"no {which} with sigma {s.sigma} covered more than --fill {s.fill} in "
                       f"{s.max_retries} draws from seed {s.seed}; try another --seed or a lower --fill"
                       f"{fill_hint(s)}")
