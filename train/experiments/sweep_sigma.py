"""`make sweep-sigma`: the sigma-factor of the base, 3.5 to 5.5 (the paper's sigma ablation), three bases each."""

from .runner import SCRATCH, Run, experiment, one_p_frac

SIGMAS = (3.5, 4.5, 5.5)


@experiment("sweep-sigma")
def runs() -> list[Run]:
    return [SCRATCH] + [r for s in SIGMAS for r in one_p_frac(f"sigma {s}", s, sigma=s)]
