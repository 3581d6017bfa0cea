"""Slow, obvious reference implementations the Numba kernels are checked against.

Written from the rules in DESIGN.md section 4 and the render.py docstring, with plain Python
integers for the random numbers and NumPy for the arithmetic, sharing no code with the kernel.
"""

import numpy as np

M64 = (1 << 64) - 1


def splitmix(seed: int, n: int) -> int:
    z = (seed + n * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def chaos_points(coef, probabilities, seed, n_points, chains=64):
    """Points of `chains` interleaved chaos games; also the random draw behind each point."""
    n_maps = len(coef)
    cum = np.floor(np.cumsum(probabilities)[:-1] * 2.0**32)
    state = []
    for c in range(chains):
        a, b, cc, d, e, f = coef[c % n_maps]
        M = np.array([[1 - a, -b], [-cc, 1 - d]])
        det = (1 - a) * (1 - d) - b * cc
        state.append(np.zeros(2) if abs(det) < 1e-12 else np.linalg.solve(M, [e, f]))
    pts, draws = np.empty((n_points, 2)), []
    for n in range(n_points):
        r = splitmix(seed, n + 1)
        i = int(np.sum((r & 0xFFFFFFFF) >= cum))
        a, b, cc, d, e, f = coef[i]
        x, y = state[n % chains]
        state[n % chains] = np.array([a * x + b * y + e, cc * x + d * y + f])
        pts[n] = state[n % chains]
        draws.append(r)
    return pts, draws


def render_reference(coef, probabilities, seed, n_points, size, pad):
    pts, draws = chaos_points(np.asarray(coef), np.asarray(probabilities), seed, n_points)
    image = np.zeros((size, size), dtype=np.uint8)
    if not np.all(np.isfinite(pts)):
        return image
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = size - 2 * pad
    with np.errstate(divide="ignore"):
        scale = np.where(hi > lo, span / (hi - lo), 0.0)
    pix = np.clip((pts - lo) * scale + pad, pad, size - pad).astype(int)
    for (px, py), r in zip(pix, draws, strict=True):
        mask = 1 + (((r >> 32) * 511) >> 32)
        patch = np.array([(mask >> b) & 1 for b in range(9)]).reshape(3, 3) * 127
        image[py : py + 3, px : px + 3] = patch
    return image[::-1].copy()
