"""The chaos-game renderer: a pure Numba kernel and the plain-Python function that guards it.

Drawing rules follow the 1p-frac reference generator (DESIGN.md section 4): the attractor's x and y
are rescaled independently onto [pad, size - pad] and truncated; every point pastes a whole 3x3
patch whose cells are 127 where a random non-zero 9-bit mask is set and 0 where it is not (so
mask zeros erase earlier ink); the image is flipped top to bottom at the end.

Where we differ, on purpose: the points come from CHAINS interleaved chaos games of n/CHAINS
points each, every chain starting at the fixed point of map (chain mod N), which lies on the
attractor (no stray early points, no burn-in), and the chains hide the latency of the serial
update. Points are processed in blocks of BLOCK so that the random draws vectorise. Random
numbers are counter-based (see rng.py), so an image is a pure function of (system, seed,
settings). The kernel runs the game twice with the same numbers, once for the bounding box and
once to draw, instead of storing 100k points.
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
CHAINS = 8  # interleaved chaos games: independent updates the CPU can overlap
BLOCK = 1024  # points per block (a multiple of CHAINS); the block buffers stay in L1

# PATCHES[9 m + 3 r + c]: the value pasted at patch cell (r, c) for mask m. A table lookup is
# cheaper than extracting the bit, and the scatter of these bytes is the kernel's bottleneck.
PATCHES = np.array([[INK if (m >> b) & 1 else 0 for b in range(PATCH * PATCH)] for m in range(512)],
                   dtype=np.uint8).ravel()

_LOW32 = np.uint64(0xFFFFFFFF)
_U32 = np.uint64(32)
_GOLDEN = np.uint64(GOLDEN)


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
def _draws(seed, first, r):
    """r[k] = the 64-bit draw of point first + k (vectorises: no dependency between k)."""
    for k in range(r.shape[0]):
        r[k] = _mix64(seed + np.uint64(first + k + 1) * _GOLDEN)


@njit
def _advance(coef, thresholds, r, xs, ys, xb, yb, m):
    """Advance the chains through draws r[:m] (rounded up to whole rounds of CHAINS points;
    point k belongs to chain k mod CHAINS) and store the new points in xb, yb.

    Maps are chosen with selects, not branches: a branch on a random bit mispredicts often.
    Two maps (1p-frac) get a loop of their own; the general select loop is three times slower.
    """
    rounds = (m + CHAINS - 1) // CHAINS
    if thresholds.shape[0] == 1:
        t0 = thresholds[0]
        a0, b0, c0, d0, e0, f0 = coef[0, 0], coef[0, 1], coef[0, 2], coef[0, 3], coef[0, 4], coef[0, 5]
        a1, b1, c1, d1, e1, f1 = coef[1, 0], coef[1, 1], coef[1, 2], coef[1, 3], coef[1, 4], coef[1, 5]
        for j in range(rounds):
            for c in range(CHAINS):
                k = j * CHAINS + c
                s = (r[k] & _LOW32) >= t0
                x, y = xs[c], ys[c]
                nx = (a1 if s else a0) * x + (b1 if s else b0) * y + (e1 if s else e0)
                ny = (c1 if s else c0) * x + (d1 if s else d0) * y + (f1 if s else f0)
                xs[c], ys[c] = nx, ny
                xb[k], yb[k] = nx, ny
        return
    for j in range(rounds):
        for c in range(CHAINS):
            k = j * CHAINS + c
            u = r[k] & _LOW32
            i = 0
            for t in range(thresholds.shape[0]):
                i += np.int64(u >= thresholds[t])
            x, y = xs[c], ys[c]
            nx = coef[i, 0] * x + coef[i, 1] * y + coef[i, 4]
            ny = coef[i, 2] * x + coef[i, 3] * y + coef[i, 5]
            xs[c], ys[c] = nx, ny
            xb[k], yb[k] = nx, ny


@njit
def _to_pixel(v, lo, scale, pad, hi):
    p = (v - lo) * scale + pad
    if not p >= pad:  # also catches NaN
        p = pad
    if p > hi:
        p = hi
    return int(p)


@njit
def chaos_game_kernel(coef, thresholds, seed, n_points, pad, canvas, col0):
    """Render into canvas[:, col0:col0 + size] (overwritten, the rest zeroed); return the count of
    inked pixels, or -1 if the system is unbounded. `col0` lets the caller keep a PNG filter-byte
    column in front of every row, so the canvas can go to the compressor as it is.
    """
    size = canvas.shape[0]
    stride = canvas.shape[1]
    flat = canvas.ravel()
    seed = np.uint64(seed)
    x0 = np.empty(CHAINS)
    y0 = np.empty(CHAINS)
    for c in range(CHAINS):
        x0[c], y0[c] = _fixed_point(coef, c % coef.shape[0])
    r = np.empty(BLOCK, dtype=np.uint64)
    xb = np.empty(BLOCK)
    yb = np.empty(BLOCK)

    # Pass 1: the bounding box. A chain that overflows reaches inf before any NaN (finite
    # arithmetic cannot make NaN), and inf enters the bounds, so finite bounds mean bounded points.
    xs, ys = x0.copy(), y0.copy()
    xmin, xmax, ymin, ymax = np.inf, -np.inf, np.inf, -np.inf
    for first in range(0, n_points, BLOCK):
        m = min(BLOCK, n_points - first)
        _draws(seed, first, r)  # whole blocks: points past n_points are computed, never used
        _advance(coef, thresholds, r, xs, ys, xb, yb, m)
        for k in range(m):
            x, y = xb[k], yb[k]
            xmin = x if x < xmin else xmin
            xmax = x if x > xmax else xmax
            ymin = y if y < ymin else ymin
            ymax = y if y > ymax else ymax
    if not (np.isfinite(xmin) and np.isfinite(xmax) and np.isfinite(ymin) and np.isfinite(ymax)):
        return -1

    # Pass 2: the same draws again, now drawn. x and y are scaled independently (no aspect ratio).
    span = size - 2 * pad
    sx = span / (xmax - xmin) if xmax > xmin else 0.0
    sy = span / (ymax - ymin) if ymax > ymin else 0.0
    sx = sx if np.isfinite(sx) else 0.0
    sy = sy if np.isfinite(sy) else 0.0
    hi = float(size - pad)
    flat[:] = 0
    xs, ys = x0.copy(), y0.copy()
    for first in range(0, n_points, BLOCK):
        m = min(BLOCK, n_points - first)
        _draws(seed, first, r)
        _advance(coef, thresholds, r, xs, ys, xb, yb, m)
        for k in range(m):
            px = _to_pixel(xb[k], xmin, sx, pad, hi)
            py = _to_pixel(yb[k], ymin, sy, pad, hi)
            mask = np.int64(1 + (((r[k] >> _U32) * np.uint64(511)) >> _U32))
            p = PATCH * PATCH * mask
            o = (size - 1 - py) * stride + col0 + px  # patch row 0, flipped top to bottom
            for dr in range(PATCH):
                for dc in range(PATCH):
                    flat[o + dc] = PATCHES[p + PATCH * dr + dc]
                o -= stride
    inked = 0
    for k in range(flat.shape[0]):
        inked += np.int64(flat[k] != 0)
    return inked


def check_canvas(size: int, pad: int) -> None:
    if pad < MIN_PAD:
        raise FracgenError(f"pad must be at least {MIN_PAD} (a {PATCH}x{PATCH} patch at the far edge needs it)")
    if size < 2 * pad + 8:
        raise FracgenError(f"size {size} is too small for padding {pad}: need size >= 2 * pad + 8 = {2 * pad + 8}")


def render(system: IFS, seed: int, *, points: int = 100_000, size: int = 512, pad: int = 6,
           out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Render one grayscale image of `system`; return (image, fill), fill = fraction of non-zero pixels.

    A system whose chaos game diverges gives an empty image and fill 0. `out`, if given, may be
    wider than `size`: the image goes in its last `size` columns (see `png.py`).
    """
    check_canvas(size, pad)
    if points < 1:
        raise FracgenError(f"points must be at least 1, got {points}")
    if out is None:
        out = np.empty((size, size), dtype=np.uint8)
    elif out.shape[0] != size or out.shape[1] < size or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous uint8 array of shape (size, >= size)")
    col0 = out.shape[1] - size  # extra leading columns stay zero (PNG filter bytes)
    inked = chaos_game_kernel(system.coef, map_thresholds(system.probabilities), np.uint64(seed),
                              points, pad, out, col0)
    if inked < 0:
        out[:] = 0
    image = out[:, col0:]
    return image, max(inked, 0) / (size * size)
