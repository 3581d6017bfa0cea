"""`make compare`: 1p-frac over three bases drawn by seed, its Delta 0.001 collapse control, FractalDB-style data,
one real image and noise, against scratch, at one budget (the paper's Table of systems, at CPU scale)."""

from .runner import SCRATCH, Run, experiment, one_p_frac


@experiment("compare")
def runs() -> list[Run]:
    return [
        SCRATCH,
        *one_p_frac("1p-frac, sigma 3.5, Delta 0.1"),
        Run("1p-frac, Delta 0.001 (collapse control), base seed 0", {"delta": 0.001, "seed": 0},
            "1p-frac, Delta 0.001"),
        Run("fractaldb, 1000 fractals x 1 image", {"system": "fractaldb", "seed": 0}, "fractaldb"),
        Run("real image (scikit-learn china.jpg, gray), Delta 0.1", {"system": "real", "seed": 0}, "real"),
        Run("Gaussian noise", {"system": "noise", "seed": 0}, "noise"),
    ]
