"""Iterated function systems: sigma-factor sampling (Anderson & Farrell 2022) and the 1p-frac perturbation.

A system is N affine maps w_i(v) = A_i v + t_i stored as rows (a, b, c, d, e, f) with
A_i = [[a, b], [c, d]] and t_i = (e, f), the naming of FractalDB and 1p-frac. Probabilities are
p_i = |det A_i| / sum_j |det A_j| of the *base* system and are kept for every perturbed class.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fracgen.errors import FracgenError
from fracgen.rng import TAG_PERTURB, derive_seed, uniforms
from fracgen.untrusted import read_json

COEFFICIENTS = ("a", "b", "c", "d", "e", "f")
PERTURB_MODES = ("scale", "shift")
MAX_COEFFICIENT = 1e3  # a contraction's coefficients are near 1; beyond this it is a typo (1e308 overflows)
SIGMA_HALF_WIDTH = 0.1  # the sigma-factor actually used is drawn from U(sigma - 0.1, sigma + 0.1)


@dataclass(frozen=True)
class IFS:
    coef: np.ndarray  # (N, 6) float64 rows (a, b, c, d, e, f)
    probabilities: np.ndarray  # (N,) float64, sums to 1

    @property
    def n_maps(self) -> int:
        return self.coef.shape[0]

    def to_json(self) -> dict:
        return {
            "maps": [dict(zip(COEFFICIENTS, map(float, row), strict=True)) for row in self.coef],
            "probabilities": [float(p) for p in self.probabilities],
        }

    @classmethod
    def from_json(cls, obj: dict) -> IFS:
        try:
            coef = np.array([[float(m[k]) for k in COEFFICIENTS] for m in obj["maps"]], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise FracgenError(f"malformed IFS: expected 'maps' of objects with keys a..f ({e})") from None
        probs = obj.get("probabilities")
        if probs is not None:
            if not isinstance(probs, list) or not all(
                    isinstance(p, (int, float)) and not isinstance(p, bool) for p in probs):
                raise FracgenError(f"malformed IFS: 'probabilities' must be a list of numbers, one per map, "
                                   f"not {json.dumps(probs)[:60]}")
            probs = np.asarray(probs, dtype=np.float64)
        return make_ifs(coef, probs)


def determinant_probabilities(coef: np.ndarray) -> np.ndarray:
    """p_i proportional to |det A_i|: the chaos game then visits each map's image evenly."""
    det = np.abs(coef[:, 0] * coef[:, 3] - coef[:, 1] * coef[:, 2])
    total = det.sum()
    if not np.isfinite(total) or total <= 0:
        raise FracgenError("degenerate IFS: every map has determinant 0, so no probabilities can be set")
    return det / total


def make_ifs(coef: np.ndarray, probabilities: np.ndarray | None = None) -> IFS:
    """Validate and build a system; probabilities default to the determinant rule."""
    coef = np.ascontiguousarray(coef, dtype=np.float64)
    if coef.ndim != 2 or coef.shape[1] != 6 or coef.shape[0] < 1:
        raise FracgenError(f"an IFS needs N >= 1 maps of 6 coefficients, got shape {coef.shape}")
    if not np.all(np.isfinite(coef)) or np.abs(coef).max() > MAX_COEFFICIENT:
        worst = np.unravel_index(np.argmax(np.where(np.isfinite(coef), np.abs(coef), np.inf)), coef.shape)
        raise FracgenError(f"IFS coefficients must be finite and within +-{MAX_COEFFICIENT:g} (a contraction's are "
                           f"near 1): map {worst[0]} has {COEFFICIENTS[worst[1]]} = {coef[worst]:g}")
    if probabilities is None:
        probabilities = determinant_probabilities(coef)
    probabilities = np.ascontiguousarray(probabilities, dtype=np.float64)
    if (
        probabilities.shape != (coef.shape[0],)
        or not np.all(np.isfinite(probabilities))
        or np.any(probabilities < 0)
        or not math.isclose(float(probabilities.sum()), 1.0, rel_tol=1e-9, abs_tol=1e-9)
    ):
        raise FracgenError("IFS probabilities must be one non-negative number per map, summing to 1")
    return IFS(coef, probabilities)


def check_sigma(sigma: float, n_maps: int) -> None:
    """Refuse a sigma whose draw range leaves the feasible set 0 < a < 3N."""
    if n_maps < 1:
        raise FracgenError(f"--maps must be at least 1, got {n_maps}")
    lo, hi = sigma - SIGMA_HALF_WIDTH, sigma + SIGMA_HALF_WIDTH
    if not (lo > 0 and hi < 3 * n_maps):
        raise FracgenError(
            f"sigma {sigma} is infeasible for {n_maps} maps: sigma +- {SIGMA_HALF_WIDTH} must lie inside "
            f"(0, {3 * n_maps}) (at 3N every singular value is 1 and the maps stop contracting); "
            f"use {SIGMA_HALF_WIDTH} < sigma < {3 * n_maps - SIGMA_HALF_WIDTH} or more --maps"
        )


def sample_singular_values(a: float, n_maps: int, u: np.ndarray) -> np.ndarray:
    """Singular values (s1, s2) per map with 0 <= s2 <= s1 <= 1 and sum_i (s1 + 2 s2) = a exactly.

    Maps are drawn one at a time. With budget b left and r maps still to come, this map's share
    f = s1 + 2 s2 must leave b - f in [0, 3r]; since f lies in [s1, 3 s1], that bounds
    s1 in [max(0, (b - 3r) / 3), min(1, b)], and then s2 in [max(0, (b - 3r - s1) / 2),
    min(s1, (b - s1) / 2)]. The last map takes the rest: s1 in [b / 3, min(1, b)], s2 = (b - s1) / 2.
    `u` supplies 2 * n_maps uniforms in [0, 1).
    """
    sv = np.empty((n_maps, 2))
    b = a
    for i in range(n_maps):
        r = n_maps - 1 - i
        if r > 0:
            s1 = _lerp(max(0.0, (b - 3 * r) / 3), min(1.0, b), u[2 * i])
            s2 = _lerp(max(0.0, (b - 3 * r - s1) / 2), min(s1, (b - s1) / 2), u[2 * i + 1])
        else:
            s1 = _lerp(b / 3, min(1.0, b), u[2 * i])
            s2 = (b - s1) / 2
        sv[i] = s1, s2
        b -= s1 + 2 * s2
    return sv


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


def _rotation(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def sample_sigma_system(sigma: float, n_maps: int, seed: int) -> tuple[IFS, float]:
    """A random contractive system with sigma-factor a ~ U(sigma - 0.1, sigma + 0.1).

    A_i = U_i diag(s_i1, s_i2) V_i with U, V random rotations (angle in (-pi, pi)) times random
    sign flips; translations uniform in [-1, 1]. Returns the system and the a actually drawn.
    The order of the maps is shuffled so no position is favoured by the sequential draw.
    """
    check_sigma(sigma, n_maps)
    u = uniforms(seed, 1 + 2 * n_maps + 8 * n_maps + n_maps)
    a = _lerp(sigma - SIGMA_HALF_WIDTH, sigma + SIGMA_HALF_WIDTH, u[0])
    sv = sample_singular_values(a, n_maps, u[1 : 1 + 2 * n_maps])
    rest = u[1 + 2 * n_maps :]
    coef = np.empty((n_maps, 6))
    for i in range(n_maps):
        ru = rest[8 * i : 8 * i + 8]
        left = _rotation(_lerp(-math.pi, math.pi, ru[0])) @ np.diag(np.where(ru[1:3] < 0.5, -1.0, 1.0))
        right = _rotation(_lerp(-math.pi, math.pi, ru[3])) @ np.diag(np.where(ru[4:6] < 0.5, -1.0, 1.0))
        A = left @ np.diag(sv[i]) @ right
        coef[i] = A[0, 0], A[0, 1], A[1, 0], A[1, 1], _lerp(-1, 1, ru[6]), _lerp(-1, 1, ru[7])
    order = np.argsort(rest[8 * n_maps :], kind="stable")
    return make_ifs(coef[order]), a


def perturb(base: IFS, delta: float, mode: str, seed: int) -> tuple[IFS, np.ndarray]:
    """One LIEP class: every coefficient of every map jittered on its own.

    `scale` (the reference generator): coefficient x U(1 - delta, 1 + delta).
    `shift` (the paper's text): coefficient + U(-delta / 2, delta / 2).
    Probabilities stay those of the base. Returns the class system and the (N, 6) factors/offsets.
    """
    u = uniforms(seed, base.coef.size).reshape(base.coef.shape)
    if mode == "scale":
        noise = 1.0 + delta * (2.0 * u - 1.0)
        coef = base.coef * noise
    elif mode == "shift":
        noise = delta * (u - 0.5)
        coef = base.coef + noise
    else:
        raise FracgenError(f"unknown perturbation {mode!r}; choose one of {', '.join(PERTURB_MODES)}")
    return IFS(coef, base.probabilities), noise


def class_seed(seed: int, k: int, attempt: int) -> int:
    return derive_seed(seed, TAG_PERTURB, k, attempt)


def load_base(path: Path) -> IFS:
    """A base system from JSON: an IFS object ({"maps": [...]}) or a fracgen manifest (its "base")."""
    try:
        obj = read_json(path, f"--base file {path}")
    except FileNotFoundError:
        raise FracgenError(f"--base file not found: {path}") from None
    if isinstance(obj, dict) and isinstance(obj.get("base"), dict):
        obj = obj["base"].get("ifs", obj["base"])
    if not isinstance(obj, dict) or "maps" not in obj:
        raise FracgenError(f"--base file {path} has no 'maps' list (expected an IFS or a fracgen manifest)")
    return IFS.from_json(obj)
