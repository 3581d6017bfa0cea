"""The chaos-game renderer: a pure Numba kernel and the plain-Python function that guards it.

Drawing rules follow the 1p-frac reference generator (docs/design.md section 4): the attractor's x and y
are rescaled independently onto [pad, size - pad] and truncated; every point (x, y) pastes a whole 3x3
patch with its top-left cell at (x + 1, y + 1) (the reference's `image.paste(patch, (x + 1, y + 1))`), whose
cells are 127 where a random non-zero 9-bit mask is set and 0 where it is not (so mask zeros erase earlier
ink); the image is flipped top to bottom at the end.

Where we differ, on purpose: the points come from CHAINS interleaved chaos games of n/CHAINS
points each, every chain starting at the fixed point of map (chain mod N), which lies on the
attractor (no stray early points, no burn-in), and the chains hide the latency of the serial
update. The game runs in float32 (the maps contract, so rounding does not accumulate, and a
pixel is 1/500 of the attractor, far above float32's 1e-7). Random numbers are counter-based
(see rng.py), so an image is a pure function of (system, seed, settings).

How it is fast (`make bench`; README "Speed" has the stage-by-stage figures): points go in
blocks of BLOCK through small loops that LLVM vectorises on 16 float32 / uint32 lanes (draws,
map updates, bounds, pixel offsets and patch rows); pass 1 keeps every point (1.2 MB for 100k),
pass 2 maps them to pixels once the bounding box is known; only the in-order scatter of patches,
which cannot be vectorised, runs one point at a time, as two stores per patch row.
"""

from __future__ import annotations

import threading

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from fracgen._jit import njit
from fracgen.errors import FracgenError
from fracgen.ifs import IFS
from fracgen.rng import _lowbias32

RENDERER = 3  # bumped whenever the same settings give other pixels (2: float32 game, lowbias32; 3: patch at +1, +1)
INK = 127  # the reference's stroke value
PATCH = 3  # patch side: cell (r, c) is bit 3 r + c of the mask, row 0 at the top before the flip
MIN_PAD = PATCH + 1  # a patch pasted at (x + 1, y + 1) from the far edge (size - pad) stays inside the canvas
MAX_SIZE = 16384  # pixel offsets are 32-bit in the kernel: size * (size + 1) must stay below 2**31
MAX_POINTS = 100_000_000  # the point buffers take 12 bytes per point
CHAINS = 64  # interleaved chaos games: independent updates that fill the SIMD lanes
BLOCK = 1024  # points per block (a multiple of CHAINS); the block buffers stay in L1


@njit
def _thresholds(probabilities):
    """Cumulative probabilities as 32-bit integer cut points: map i is chosen when the draw falls in
    its band. (In the kernel: NumPy would spend longer on this than the kernel on 1,000 points.)"""
    n = probabilities.shape[0] - 1
    cut = np.empty(n, dtype=np.uint64)
    cum = 0.0
    for i in range(n):
        cum += probabilities[i]
        cut[i] = np.uint64(min(np.floor(cum * 2.0**32), 2.0**32))
    return cut


@intrinsic
def _paste_row(typingctx, flat, offset, row):
    """flat[offset:offset + 3] = the low 3 bytes of `row`, as one 16-bit and one 8-bit store.
    Stores only: a 32-bit read-modify-write that keeps the 4th byte measured 10% slower, and
    nine byte stores twice as slow (`make bench`). The caller keeps offset + 2 inside `flat`.
    """
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8, i16 = ir.IntType(8), ir.IntType(16)
        first = builder.bitcast(builder.gep(data, [args[1]]), i16.as_pointer())
        builder.store(builder.trunc(args[2], i16), first, align=1)
        third = builder.gep(data, [builder.add(args[1], ir.Constant(args[1].type, 2))])
        builder.store(builder.trunc(builder.lshr(args[2], ir.Constant(args[2].type, 16)), i8), third)
        return context.get_dummy_value()

    return types.void(flat, offset, row), codegen


@intrinsic
def _popcount(typingctx, word):
    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fn = builder.module.declare_intrinsic("llvm.ctpop", [i64])
        return builder.call(fn, [builder.zext(args[0], i64) if args[0].type.width < 64 else args[0]])

    return types.uint64(word), codegen


@intrinsic
def _mul32(typingctx, a, b):
    """a * b on 32 bits, sign-extended: Numba widens integer products to 64 bits, and a 64-bit
    vector multiply is several times slower than a 32-bit one. The caller keeps |a * b| < 2**31."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        x, y = (builder.trunc(v, i32) if v.type.width > 32 else v for v in args)
        return builder.sext(builder.mul(x, y), ir.IntType(64))

    return types.int64(a, b), codegen


@njit
def _fixed_point(coef, i):
    a, b, c, d, e, f = coef[i, 0], coef[i, 1], coef[i, 2], coef[i, 3], coef[i, 4], coef[i, 5]
    det = (1.0 - a) * (1.0 - d) - b * c
    if abs(det) < 1e-12:
        return 0.0, 0.0
    return ((1.0 - d) * e + b * f) / det, (c * e + (1.0 - a) * f) / det


@njit
def _draws(k1, k2, first, h1, h):
    """The two 32-bit draws of points first .. first + BLOCK - 1 (counters from 1): h1 picks the
    patch mask, h = a second round on h1 picks the map. Vectorises: no dependency between k."""
    for k in range(h.shape[0]):
        a = _lowbias32(np.uint64(first + k + 1) ^ k1)
        h1[k] = a
        h[k] = _lowbias32(a ^ k2)


@njit
def _advance2(cf, t0, h, xs, ys, xb, yb):
    """Advance the chains of a two-map system through one block (point k belongs to chain k mod
    CHAINS) and keep the points in xb, yb. Maps are chosen with selects, not branches, so LLVM
    vectorises the loop over chains."""
    a0, b0, c0, d0, e0, f0 = cf[0, 0], cf[0, 1], cf[0, 2], cf[0, 3], cf[0, 4], cf[0, 5]
    a1, b1, c1, d1, e1, f1 = cf[1, 0], cf[1, 1], cf[1, 2], cf[1, 3], cf[1, 4], cf[1, 5]
    for j in range(BLOCK // CHAINS):
        for c in range(CHAINS):
            k = j * CHAINS + c
            s = h[k] >= t0
            x, y = xs[c], ys[c]
            nx = (a1 if s else a0) * x + (b1 if s else b0) * y + (e1 if s else e0)
            ny = (c1 if s else c0) * x + (d1 if s else d0) * y + (f1 if s else f0)
            xs[c], ys[c] = nx, ny
            xb[k], yb[k] = nx, ny


@njit
def _advance(cf, thresholds, h, xs, ys, xb, yb):
    """`_advance2` for any number of maps: the map index counts the cut points at or below the draw."""
    for j in range(BLOCK // CHAINS):
        for c in range(CHAINS):
            k = j * CHAINS + c
            u = np.uint64(h[k])
            i = 0
            for t in range(thresholds.shape[0]):
                i += np.int64(u >= thresholds[t])
            x, y = xs[c], ys[c]
            nx = cf[i, 0] * x + cf[i, 1] * y + cf[i, 4]
            ny = cf[i, 2] * x + cf[i, 3] * y + cf[i, 5]
            xs[c], ys[c] = nx, ny
            xb[k], yb[k] = nx, ny


@njit
def _bounds(xb, yb, m, lo_x, hi_x, lo_y, hi_y):
    """Fold points xb[:m], yb[:m] into per-chain bounds (a running min/max over one variable is a
    reduction LLVM will not vectorise without fast-math; 64 lanes of bounds are not). Full blocks
    take the loop without a mask, which runs twice as fast."""
    if m == BLOCK:
        for j in range(BLOCK // CHAINS):
            for c in range(CHAINS):
                x, y = xb[j * CHAINS + c], yb[j * CHAINS + c]
                lo_x[c] = x if x < lo_x[c] else lo_x[c]
                hi_x[c] = x if x > hi_x[c] else hi_x[c]
                lo_y[c] = y if y < lo_y[c] else lo_y[c]
                hi_y[c] = y if y > hi_y[c] else hi_y[c]
    else:
        for k in range(m):
            c = k % CHAINS
            x, y = xb[k], yb[k]
            lo_x[c] = x if x < lo_x[c] else lo_x[c]
            hi_x[c] = x if x > hi_x[c] else hi_x[c]
            lo_y[c] = y if y < lo_y[c] else lo_y[c]
            hi_y[c] = y if y > hi_y[c] else hi_y[c]


@njit
def _row(bits):
    """Three mask bits as the patch row's 3 bytes (little-endian), 127 where a bit is set."""
    one = np.uint32(1)
    return ((bits & one) | ((bits & np.uint32(2)) << np.uint32(7)) | ((bits & np.uint32(4)) << np.uint32(14))) \
        * np.uint32(INK)


@njit
def _pixels(xb, yb, h1, xmin, sx, ymin, sy, pad, hi, base, stride, off, w0, w1, w2):
    """Where each point's patch row 0 lands in the flat canvas (flipped top to bottom), and its
    three patch rows. x and y are scaled independently (no aspect ratio), all in float32."""
    for k in range(xb.shape[0]):
        # Clamped as x86's max/min instructions compare (one instruction each); NaN, only in the
        # unused tail of the last block, becomes pad.
        px = (xb[k] - xmin) * sx + pad
        px = px if px > pad else pad
        px = px if px < hi else hi
        py = (yb[k] - ymin) * sy + pad
        py = py if py > pad else pad
        py = py if py < hi else hi
        off[k] = base - _mul32(np.int32(py), stride) + np.int32(px)
        mask = np.uint32(1) + np.uint32(((h1[k] >> np.uint32(9)) * np.uint32(511)) >> np.uint32(23))  # 1..511
        w0[k] = _row(mask & np.uint32(7))
        w1[k] = _row((mask >> np.uint32(3)) & np.uint32(7))
        w2[k] = _row(mask >> np.uint32(6))


@njit
def _scatter(flat, off, w0, w1, w2, m, stride):
    """Paste the patches of one block in order, so later patches overwrite earlier ones."""
    for k in range(m):
        o = off[k]
        _paste_row(flat, o, w0[k])
        _paste_row(flat, o - stride, w1[k])
        _paste_row(flat, o - 2 * stride, w2[k])


@njit
def _count_ink(flat):
    """Non-zero bytes of a canvas holding only 0 and 127 (seven set bits each): popcount / 7."""
    n8 = flat.shape[0] // 8
    bits = np.uint64(0)
    words = flat[: n8 * 8].view(np.uint64)
    for k in range(n8):
        bits += _popcount(words[k])
    inked = np.int64(bits // np.uint64(7))
    for k in range(n8 * 8, flat.shape[0]):
        inked += np.int64(flat[k] != 0)
    return inked


@njit
def chaos_game_kernel(coef, probabilities, seed, n_points, pad, canvas, col0, xbuf, ybuf, h1buf):
    """Render into canvas[:, col0:col0 + size] (overwritten, the rest zeroed); return the count of
    inked pixels, or -1 if the system is unbounded. `col0` lets the caller keep a PNG filter-byte
    column in front of every row, so the canvas can go to the compressor as it is. The three
    buffers hold the points and mask draws, at least n_points rounded up to BLOCK each.
    """
    size = canvas.shape[0]
    stride = canvas.shape[1]
    flat = canvas.ravel()
    seed = np.uint64(seed)
    k1, k2 = seed & np.uint64(0xFFFFFFFF), seed >> np.uint64(32)
    cf = coef.astype(np.float32)
    thresholds = _thresholds(probabilities)
    two_maps = thresholds.shape[0] == 1 and thresholds[0] < np.uint64(1 << 32)
    t0 = np.uint32(thresholds[0]) if two_maps else np.uint32(0)
    xs = np.empty(CHAINS, dtype=np.float32)
    ys = np.empty(CHAINS, dtype=np.float32)
    for c in range(CHAINS):
        x, y = _fixed_point(coef, c % coef.shape[0])
        xs[c], ys[c] = np.float32(x), np.float32(y)
    h = np.empty(BLOCK, dtype=np.uint32)
    lo_x = np.full(CHAINS, np.inf, dtype=np.float32)
    hi_x = np.full(CHAINS, -np.inf, dtype=np.float32)
    lo_y = np.full(CHAINS, np.inf, dtype=np.float32)
    hi_y = np.full(CHAINS, -np.inf, dtype=np.float32)

    # Pass 1: the points and their bounding box. A chain that overflows reaches inf before any NaN
    # (finite arithmetic cannot make NaN), and inf enters the bounds, so finite bounds mean
    # bounded points. Whole blocks: points past n_points are computed, never used.
    for first in range(0, n_points, BLOCK):
        last = first + BLOCK
        xb, yb = xbuf[first:last], ybuf[first:last]
        _draws(k1, k2, first, h1buf[first:last], h)
        if two_maps:
            _advance2(cf, t0, h, xs, ys, xb, yb)
        else:
            _advance(cf, thresholds, h, xs, ys, xb, yb)
        _bounds(xb, yb, min(BLOCK, n_points - first), lo_x, hi_x, lo_y, hi_y)
    xmin, xmax, ymin, ymax = lo_x.min(), hi_x.max(), lo_y.min(), hi_y.max()
    if not (np.isfinite(xmin) and np.isfinite(xmax) and np.isfinite(ymin) and np.isfinite(ymax)):
        return -1

    # Pass 2: pixels and patches, block by block.
    span = np.float32(size - 2 * pad)
    sx = span / (xmax - xmin) if xmax > xmin else np.float32(0)
    sy = span / (ymax - ymin) if ymax > ymin else np.float32(0)
    sx = sx if np.isfinite(sx) else np.float32(0)
    sy = sy if np.isfinite(sy) else np.float32(0)
    padf, hi = np.float32(pad), np.float32(size - pad)
    base = (size - 2) * stride + col0 + 1  # patch row 0 of a point at (0, 0): row 1, column 1, flipped
    off = np.empty(BLOCK, dtype=np.int32)
    w0 = np.empty(BLOCK, dtype=np.uint32)
    w1 = np.empty(BLOCK, dtype=np.uint32)
    w2 = np.empty(BLOCK, dtype=np.uint32)
    flat[:] = 0
    for first in range(0, n_points, BLOCK):
        last = first + BLOCK
        _pixels(xbuf[first:last], ybuf[first:last], h1buf[first:last], xmin, sx, ymin, sy, padf, hi,
                base, stride, off, w0, w1, w2)
        _scatter(flat, off, w0, w1, w2, min(BLOCK, n_points - first), stride)
    return _count_ink(flat)


_workspace = threading.local()


def _buffers(points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-thread point buffers, kept between calls: 1.2 MB freshly allocated per image would cost
    more in page faults than the kernel's first pass."""
    n = -(-points // BLOCK) * BLOCK
    bufs = getattr(_workspace, "bufs", None)
    if bufs is None or bufs[0].shape[0] < n:
        bufs = (np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.uint32))
        _workspace.bufs = bufs
    return bufs


def check_canvas(size: int, pad: int) -> None:
    if size > MAX_SIZE:
        raise FracgenError(f"size must be at most {MAX_SIZE}, got {size}")
    if pad < MIN_PAD:
        raise FracgenError(f"pad must be at least {MIN_PAD} (a {PATCH}x{PATCH} patch pasted one pixel past the far "
                           "edge needs it)")
    if size < 2 * pad + 8:
        raise FracgenError(f"size {size} is too small for padding {pad}: need size >= 2 * pad + 8 = {2 * pad + 8}")


def check_points(points: int) -> None:
    if not 1 <= points <= MAX_POINTS:
        raise FracgenError(f"points must be in 1..{MAX_POINTS:,}, got {points}")


def render(system: IFS, seed: int, *, points: int = 100_000, size: int = 512, pad: int = 6,
           out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Render one grayscale image of `system`; return (image, fill), fill = fraction of non-zero pixels.

    A system whose chaos game diverges gives an empty image and fill 0. `out`, if given, may be
    wider than `size`: the image goes in its last `size` columns (see `png.py`).
    """
    check_canvas(size, pad)
    check_points(points)
    if out is None:
        out = np.empty((size, size), dtype=np.uint8)
    elif out.shape[0] != size or out.shape[1] < size or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous uint8 array of shape (size, >= size)")
    col0 = out.shape[1] - size  # extra leading columns stay zero (PNG filter bytes)
    inked = chaos_game_kernel(system.coef, system.probabilities, np.uint64(seed),
                              points, pad, out, col0, *_buffers(points))
    if inked < 0:
        out[:] = 0
    image = out[:, col0:]
    return image, max(inked, 0) / (size * size)
