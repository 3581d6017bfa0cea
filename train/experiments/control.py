"""`make control`: base A, the base that beat scratch in the first CPU check (docs/design.md), with Delta 0.1 and
0.001: a protocol that shows no gain there shows none anywhere (the positive control)."""

import json
from pathlib import Path

from .runner import SCRATCH, Run, experiment

BASE_A = Path(__file__).with_name("base-a.json")  # package data: Anderson & Farrell's sampler, 2 maps, sigma 3.57


def base_a() -> dict:
    return json.loads(BASE_A.read_text())


@experiment("control")
def runs() -> list[Run]:
    base = base_a()
    return [SCRATCH,
            Run("1p-frac, base A (docs/design.md section 9), Delta 0.1", {"base": base, "seed": 0}, "1p-frac, base A",
                key="base-a"),
            Run("1p-frac, base A, Delta 0.001", {"base": base, "seed": 0, "delta": 0.001},
                "1p-frac, base A, Delta 0.001", key="base-a-delta0.001")]
