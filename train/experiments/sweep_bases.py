"""`make sweep-bases`: 1000 images as 1000 bases x 1 class up to 1 base x 1000 classes (the paper's scaling axis
between FractalDB and 1p-frac), seed 0."""

from .runner import SCRATCH, Run, experiment

BASES = (1000, 100, 10, 1)


@experiment("sweep-bases")
def runs() -> list[Run]:
    return [SCRATCH] + [
        Run(f"{k} base fractal(s) x {1000 // k} classes, seed 0", {"bases": k, "seed": 0} if k > 1 else {"seed": 0},
            f"{k} base(s)", k) for k in BASES]
