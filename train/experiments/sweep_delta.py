"""`make sweep-delta`: the perturbation size Delta, 0.001 to 0.2 (the paper's Delta ablation), three bases each."""

from .runner import SCRATCH, Run, experiment, one_p_frac

DELTAS = (0.001, 0.01, 0.05, 0.1, 0.2)


@experiment("sweep-delta")
def runs() -> list[Run]:
    return [SCRATCH] + [r for d in DELTAS for r in one_p_frac(f"Delta {d}", d, delta=d)]
