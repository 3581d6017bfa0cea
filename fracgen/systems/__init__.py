"""Data systems: what a dataset's classes are and how one sample of a class is drawn.

Each system is one module that registers a `System` subclass; the shard writer, manifest, resume, verify and
determinism rules (`fracgen.dataset`) are written once and serve them all. A new system is one new file here
plus its import below. The rules a system must keep: every draw comes from `Settings.seed` through
`fracgen.rng.derive_seed` keyed by class / instance / attempt (never from process state), so any sample can be
drawn alone, on any worker, with the same bytes; and everything needed to redraw a sample goes into its class
record (the manifest) or its `.json`.
"""

from __future__ import annotations

import dataclasses

from fracgen.errors import FracgenError
from fracgen.settings import Settings, validate_common
from fracgen.systems import fractaldb, noise, onepfrac, real  # noqa: F401  (each registers its system)
from fracgen.systems.base import COMMON, SYSTEMS, Progress, System, find_classes, get_system, image_of, register

__all__ = ["COMMON", "SYSTEMS", "Progress", "System", "find_classes", "get_system", "image_of", "register",
           "used_settings", "validate"]


def validate(s: Settings) -> None:
    """Settings `render` accepts: the checks every system shares, then the system's own."""
    system = get_system(s.system)
    validate_common(s)
    if s.base is not None and "base" not in system.uses:
        raise FracgenError(f"--base applies to 1p-frac, not to --system {s.system}")
    system.validate(s)


def used_settings(s: Settings) -> dict:
    """The settings that change this system's bytes (what the regenerating command spells out)."""
    system = get_system(s.system)
    return {k: v for k, v in dataclasses.asdict(s).items() if k in COMMON or k in system.uses}
