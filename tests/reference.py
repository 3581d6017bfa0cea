"""Slow, obvious reference implementations the Numba kernels are checked against.

Written from the rules in docs/design.md section 4 and the render.py docstring, with plain Python
integers for the random numbers and NumPy for the arithmetic, sharing no code with the kernel.
"""

import numpy as np

M64 = (1 << 64) - 1


def splitmix(seed: int, n: int) -> int:
    z = (seed + n * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def lowbias32(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def draws(seed: int, n: int) -> tuple[int, int]:
    """Point n's draws (n from 1): h1 picks the patch mask, h (a second round) picks the map."""
    h1 = lowbias32(n ^ (seed & 0xFFFFFFFF))
    return h1, lowbias32(h1 ^ (seed >> 32))


def fixed_point(row):
    a, b, c, d, e, f = (float(v) for v in row)
    det = (1 - a) * (1 - d) - b * c
    if abs(det) < 1e-12:
        return 0.0, 0.0
    return ((1 - d) * e + b * f) / det, (c * e + (1 - a) * f) / det


def chaos_points(coef, probabilities, seed, n_points, chains=64):
    """float32 points of `chains` interleaved chaos games; also the mask draw behind each point."""
    cum = np.floor(np.cumsum(probabilities)[:-1] * 2.0**32)
    maps = np.asarray(coef, dtype=np.float32)
    state = [np.array(fixed_point(coef[c % len(coef)]), dtype=np.float32) for c in range(chains)]
    pts, masks = np.empty((n_points, 2), dtype=np.float32), []
    for n in range(n_points):
        h1, h = draws(seed, n + 1)
        a, b, cc, d, e, f = maps[int(np.sum(h >= cum))]
        x, y = state[n % chains]
        state[n % chains] = np.array([a * x + b * y + e, cc * x + d * y + f], dtype=np.float32)
        pts[n] = state[n % chains]
        masks.append(1 + (((h1 >> 9) * 511) >> 23))
    return pts, masks


def render_reference(coef, probabilities, seed, n_points, size, pad):
    pts, masks = chaos_points(np.asarray(coef), np.asarray(probabilities), seed, n_points)
    image = np.zeros((size, size), dtype=np.uint8)
    if not np.all(np.isfinite(pts)):
        return image
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = np.float32(size - 2 * pad)
    with np.errstate(divide="ignore", over="ignore"):
        scale = np.where(hi > lo, span / (hi - lo), np.float32(0)).astype(np.float32)
    scale[~np.isfinite(scale)] = 0
    pix = np.clip((pts - lo) * scale + np.float32(pad), pad, size - pad).astype(int)
    for (px, py), mask in zip(pix, masks, strict=True):
        patch = np.array([(mask >> b) & 1 for b in range(9)]).reshape(3, 3) * 127
        image[py + 1 : py + 4, px + 1 : px + 4] = patch  # the reference pastes at (x + 1, y + 1)
    return image[::-1].copy()
