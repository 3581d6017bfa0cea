"""The chaos-game renderer: a pure Numba kernel and the plain-Python function that guards it.

Drawing rules follow the 1p-frac reference generator (DESIGN.md section 4): the attractor's x and y
are rescaled independently onto [pad, size - pad] and truncated; every point pastes a whole 3x3
patch whose cells are 127 where a random non-zero 9-bit mask is set and 0 where it is not (so
mask zeros erase earlier ink); the image is flipped top to bottom at the end.

Where we differ, on purpose: the points come from CHAINS interleaved chaos games of n/CHAINS
points each, every chain starting at the fixed point of map (chain mod N), which lies on the
attractor (no stray early points, no burn-in), and the chains hide the latency of the serial
update. Random numbers are counter-based (see rng.py), so an image is a pure function of
(system, seed, settings). The kernel runs the game twice with the same numbers, once for the
bounding box and once to draw, instead of storing 100k points.
"""

from __future__ import annotations

import numpy as np

from fracgen._jit import njit
from fracgen.errors import FracgenError
from fracgen.ifs import IFS
from fracgen.rng import GOLDEN, _mix64

INK = 127  # the reference's stroke value
PATCH = 3  # patch side: cell (r, c) is bit 3 r + c of the mask, row 0 at the top before the flip
MIN_PAD = PATCH  # a patch pasted at the far edge (size - pad) needs PATCH cells of margin
CHAINS = 8


def map_thresholds(probabilities: np.ndarray) -> np.ndarray:
    """Cumulative probabilities as 32-bit integer cut points: map i is chosen when u32 falls in its band."""
    cum = np.cumsum(probabilities)[:-1]
    return np.minimum(np.floor(cum * 2.0**32), 2.0**32).astype(np.uint64)


@njit
def _fixed_point(coef, i):
    a, b, c, d, e, f = coef[i, 0], coef[i, 1], coef[i, 2], coef[i, 3], coef[i, 4], coef[i, 5]
    det = (1.0 - a) * (1.0 - d) - b * c
    if abs(det) < 1e-12:
        return 0.0, 0.0
    return ((1.0 - d) * e + b * f) / det, (c * e + (1.0 - a) * f) / det


@njit
def _pick(r, thresholds):
    u = r & np.uint64(0xFFFFFFFF)
    i = 0
    for t in thresholds:
        if u >= t:
            i += 1
    return i


@njit
def _to_pixel(v, lo, scale, pad, hi):
    p = (v - lo) * scale + pad
    if not p >= pad:  # also catches NaN
        p = pad
    if p > hi:
        p = hi
    return int(p)


@njit
def chaos_game_kernel(coef, thresholds, seed, n_points, pad, canvas):
    """Render into `canvas` (size x size uint8, overwritten); return the count of inked pixels, -1 if unbounded."""
    size = canvas.shape[0]
    n_maps = coef.shape[0]
    seed = np.uint64(seed)
    xs = np.empty(CHAINS)
    ys = np.empty(CHAINS)
    for c in range(CHAINS):
        xs[c], ys[c] = _fixed_point(coef, c % n_maps)
    x0 = xs.copy()
    y0 = ys.copy()

    # Pass 1: the bounding box. A chain that overflows stays inf/NaN from then on, so checking
    # the bounds and the final states at the end is enough to catch a diverging system.
    xmin, xmax, ymin, ymax = np.inf, -np.inf, np.inf, -np.inf
    for n in range(n_points):
        c = n % CHAINS
        r = _mix64(seed + np.uint64(n + 1) * np.uint64(GOLDEN))
        i = _pick(r, thresholds)
        x = coef[i, 0] * xs[c] + coef[i, 1] * ys[c] + coef[i, 4]
        y = coef[i, 2] * xs[c] + coef[i, 3] * ys[c] + coef[i, 5]
        xs[c] = x
        ys[c] = y
        xmin = min(xmin, x)
        xmax = max(xmax, x)
        ymin = min(ymin, y)
        ymax = max(ymax, y)
    for c in range(CHAINS):
        if not (np.isfinite(xs[c]) and np.isfinite(ys[c])):
            return -1
    if not (np.isfinite(xmin) and np.isfinite(xmax) and np.isfinite(ymin) and np.isfinite(ymax)):
        return -1

    # Pass 2: the same numbers again, now drawn. x and y are scaled independently (no aspect ratio).
    span = size - 2 * pad
    sx = span / (xmax - xmin) if xmax > xmin else 0.0
    sy = span / (ymax - ymin) if ymax > ymin else 0.0
    if not np.isfinite(sx):
        sx = 0.0
    if not np.isfinite(sy):
        sy = 0.0
    hi = float(size - pad)
    canvas[:, :] = 0
    xs[:] = x0
    ys[:] = y0
    for n in range(n_points):
        c = n % CHAINS
        r = _mix64(seed + np.uint64(n + 1) * np.uint64(GOLDEN))
        i = _pick(r, thresholds)
        x = coef[i, 0] * xs[c] + coef[i, 1] * ys[c] + coef[i, 4]
        y = coef[i, 2] * xs[c] + coef[i, 3] * ys[c] + coef[i, 5]
        xs[c] = x
        ys[c] = y
        px = _to_pixel(x, xmin, sx, pad, hi)
        py = _to_pixel(y, ymin, sy, pad, hi)
        mask = np.uint64(1) + (((r >> np.uint64(32)) * np.uint64(511)) >> np.uint64(32))
        for dr in range(PATCH):
            row = size - 1 - (py + dr)  # the final top-to-bottom flip, applied while drawing
            for dc in range(PATCH):
                bit = (mask >> np.uint64(PATCH * dr + dc)) & np.uint64(1)
                canvas[row, px + dc] = INK if bit else 0
    inked = 0
    for v in canvas.ravel():
        inked += v != 0
    return inked


def check_canvas(size: int, pad: int) -> None:
    if pad < MIN_PAD:
        raise FracgenError(f"pad must be at least {MIN_PAD} (a {PATCH}x{PATCH} patch at the far edge needs it)")
    if size < 2 * pad + 8:
        raise FracgenError(f"size {size} is too small for padding {pad}: need size >= 2 * pad + 8 = {2 * pad + 8}")


def render(system: IFS, seed: int, *, points: int = 100_000, size: int = 512, pad: int = 6,
           out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Render one grayscale image of `system`; return (image, fill), fill = fraction of non-zero pixels.

    A system whose chaos game diverges gives an empty image and fill 0.
    """
    check_canvas(size, pad)
    if points < 1:
        raise FracgenError(f"points must be at least 1, got {points}")
    if out is None:
        out = np.empty((size, size), dtype=np.uint8)
    elif out.shape != (size, size) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous (size, size) uint8 array")
    inked = chaos_game_kernel(system.coef, map_thresholds(system.probabilities), np.uint64(seed),
                              points, pad, out)
    if inked < 0:
        out[:] = 0
        return out, 0.0
    return out, inked / (size * size)
