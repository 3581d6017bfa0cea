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
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from fracgen._jit import njit
from fracgen.errors import FracgenError
from fracgen.ifs import IFS
from fracgen.rng import GOLDEN, _mix64

INK = 127  # the reference's stroke value
PATCH = 3  # patch side: cell (r, c) is bit 3 r + c of the mask, row 0 at the top before the flip
MIN_PAD = PATCH  # a patch pasted at the far edge (size - pad) needs PATCH cells of margin
CHAINS = 64  # interleaved chaos games: independent updates that fill the SIMD lanes
BLOCK = 1024  # points per block (a multiple of CHAINS); the block buffers stay in L1

# PATCH_ROWS[3 m + r]: patch row r of mask m as the 3 bytes (little-endian) pasted at columns 0..2.
PATCH_ROWS = np.array([[sum((INK if (m >> (PATCH * r + c)) & 1 else 0) << (8 * c) for c in range(PATCH))
                        for r in range(PATCH)] for m in range(512)], dtype=np.uint32).ravel()

_LOW32 = np.uint64(0xFFFFFFFF)
_U32 = np.uint64(32)
_GOLDEN = np.uint64(GOLDEN)


def map_thresholds(probabilities: np.ndarray) -> np.ndarray:
    """Cumulative probabilities as 32-bit integer cut points: map i is chosen when u32 falls in its band."""
    cum = np.cumsum(probabilities)[:-1]
    return np.minimum(np.floor(cum * 2.0**32), 2.0**32).astype(np.uint64)


@intrinsic
def _paste_row(typingctx, flat, offset, row):
    """flat[offset:offset + 3] = the low 3 bytes of `row`, flat[offset + 3] kept: one unaligned 32-bit
    load and store instead of three byte stores. The scatter of patches bounds the kernel, and this
    halves its time (`make bench`). The caller guarantees offset + 3 is inside `flat`.
    """
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i32 = ir.IntType(32)
        word = builder.bitcast(builder.gep(data, [args[1]]), i32.as_pointer())
        kept = builder.and_(builder.load(word, align=1), ir.Constant(i32, 0xFF000000))
        builder.store(builder.or_(kept, builder.trunc(args[2], i32)), word, align=1)
        return context.get_dummy_value()

    return types.void(flat, offset, row), codegen


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
def _advance(coef, thresholds, r, xs, ys, xb, yb, m, lo_x, hi_x, lo_y, hi_y):
    """Advance the chains through draws r[:m] and store the new points in xb, yb; point k belongs
    to chain k mod CHAINS. Whole rounds of CHAINS points are computed (BLOCK is a multiple of
    CHAINS); points past m are never used and stay out of the per-chain bounds lo_*/hi_*.

    Written so that LLVM vectorises the loop over chains: maps are chosen with selects, not
    branches, and the bounds are kept per chain instead of as one running min/max (a reduction
    it will not vectorise without fast-math). Two maps (1p-frac) get their own loop.
    """
    rounds = (m + CHAINS - 1) // CHAINS
    two_maps = thresholds.shape[0] == 1
    t0 = thresholds[0] if two_maps else np.uint64(0)
    a0, b0, c0, d0, e0, f0 = coef[0, 0], coef[0, 1], coef[0, 2], coef[0, 3], coef[0, 4], coef[0, 5]
    i1 = 1 if coef.shape[0] > 1 else 0
    a1, b1, c1, d1, e1, f1 = coef[i1, 0], coef[i1, 1], coef[i1, 2], coef[i1, 3], coef[i1, 4], coef[i1, 5]
    for j in range(rounds):
        for c in range(CHAINS):
            k = j * CHAINS + c
            x, y = xs[c], ys[c]
            if two_maps:
                s = (r[k] & _LOW32) >= t0
                nx = (a1 if s else a0) * x + (b1 if s else b0) * y + (e1 if s else e0)
                ny = (c1 if s else c0) * x + (d1 if s else d0) * y + (f1 if s else f0)
            else:
                u = r[k] & _LOW32
                i = 0
                for t in range(thresholds.shape[0]):
                    i += np.int64(u >= thresholds[t])
                nx = coef[i, 0] * x + coef[i, 1] * y + coef[i, 4]
                ny = coef[i, 2] * x + coef[i, 3] * y + coef[i, 5]
            xs[c], ys[c] = nx, ny
            xb[k], yb[k] = nx, ny
            valid = k < m
            lo_x[c] = nx if valid and nx < lo_x[c] else lo_x[c]
            hi_x[c] = nx if valid and nx > hi_x[c] else hi_x[c]
            lo_y[c] = ny if valid and ny < lo_y[c] else lo_y[c]
            hi_y[c] = ny if valid and ny > hi_y[c] else hi_y[c]


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
    lo_x = np.full(CHAINS, np.inf)
    hi_x = np.full(CHAINS, -np.inf)
    lo_y = np.full(CHAINS, np.inf)
    hi_y = np.full(CHAINS, -np.inf)

    # Pass 1: the bounding box. A chain that overflows reaches inf before any NaN (finite
    # arithmetic cannot make NaN), and inf enters the bounds, so finite bounds mean bounded points.
    xs, ys = x0.copy(), y0.copy()
    for first in range(0, n_points, BLOCK):
        m = min(BLOCK, n_points - first)
        _draws(seed, first, r)  # whole blocks: points past n_points are computed, never used
        _advance(coef, thresholds, r, xs, ys, xb, yb, m, lo_x, hi_x, lo_y, hi_y)
    xmin, xmax, ymin, ymax = lo_x.min(), hi_x.max(), lo_y.min(), hi_y.max()
    if not (np.isfinite(xmin) and np.isfinite(xmax) and np.isfinite(ymin) and np.isfinite(ymax)):
        return -1

    # Pass 2: the same draws again, now drawn. x and y are scaled independently (no aspect ratio).
    span = size - 2 * pad
    sx = span / (xmax - xmin) if xmax > xmin else 0.0
    sy = span / (ymax - ymin) if ymax > ymin else 0.0
    sx = sx if np.isfinite(sx) else 0.0
    sy = sy if np.isfinite(sy) else 0.0
    hi = float(size - pad)
    offset = np.empty(BLOCK, dtype=np.int64)  # where each point's patch row 0 lands in `flat`
    table = np.empty(BLOCK, dtype=np.int64)  # where its mask's rows start in PATCH_ROWS
    flat[:] = 0
    xs, ys = x0.copy(), y0.copy()
    for first in range(0, n_points, BLOCK):
        m = min(BLOCK, n_points - first)
        _draws(seed, first, r)
        _advance(coef, thresholds, r, xs, ys, xb, yb, m, lo_x, hi_x, lo_y, hi_y)
        for k in range(m):  # vectorises; the scatter below cannot
            px = _to_pixel(xb[k], xmin, sx, pad, hi)
            py = _to_pixel(yb[k], ymin, sy, pad, hi)
            offset[k] = (size - 1 - py) * stride + col0 + px  # flipped top to bottom
            table[k] = PATCH * np.int64(1 + (((r[k] >> _U32) * np.uint64(511)) >> _U32))
        # In order, so later patches overwrite earlier ones. The kept 4th byte is at most column
        # size - pad + 3 <= size (pad >= 3): inside the row, or the next row's first byte.
        for k in range(m):
            o, p = offset[k], table[k]
            for dr in range(PATCH):
                _paste_row(flat, o - dr * stride, PATCH_ROWS[p + dr])
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
