"""Counter-based random numbers: every value is a pure function of (seed, counter).

All randomness in fracgen is a hash of a counter, so any sample can be rendered alone, in any
process, in any order, and come out bit-identical. This is what makes the shards independent of
`--workers`. Seeds for sub-streams (a class's perturbation, one image's chaos game) are derived by
hashing (seed, tag, indices) with SplitMix64's output function, which also gives the uniforms.

The chaos game's per-point draws use a 32-bit hash instead (`lowbias32`, two rounds keyed by the
two halves of the image seed): it runs on 32-bit SIMD lanes, twice as many per instruction as
SplitMix64's 64-bit multiplies, and the renderer draws 100k of them per image.
"""

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from fracgen._jit import njit

GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64 increment: 2**64 / golden ratio
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
# lowbias32 (C. Wellons' hash-prospector): xor-shift, multiply, xor-shift, multiply, xor-shift.
_LOWBIAS32 = ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None))

# Stream tags keep the sub-streams of one seed apart.
TAG_BASE = 1
TAG_PERTURB = 2
TAG_RENDER = 3
TAG_CLASS_SYSTEM = 4  # fractaldb: each class's own IFS
TAG_AFFINE = 5  # real: each class's affine perturbation
TAG_NOISE = 6  # noise: each class's noise image


def mix64(z: int) -> int:
    """SplitMix64's finaliser on a Python int (the same function as the kernel's `_mix64`)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed for the sub-stream named by `keys` (small non-negative ints)."""
    h = mix64(int(seed) + GOLDEN)
    for k in keys:
        h = mix64(h ^ mix64(int(k) + GOLDEN))
    return h


@intrinsic
def _lowbias32(typingctx, x):
    """lowbias32 of the low 32 bits of x, zero-extended. Written as 32-bit IR because Numba widens
    integer arithmetic to 64 bits, and 64-bit lanes would halve the vectorised loop's throughput."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        v, width = args[0], args[0].type.width
        v = builder.trunc(v, i32) if width > 32 else builder.zext(v, i32) if width < 32 else v
        for shift, mul in _LOWBIAS32:
            v = builder.xor(v, builder.lshr(v, ir.Constant(i32, shift)))
            if mul is not None:
                v = builder.mul(v, ir.Constant(i32, mul))
        return builder.zext(v, ir.IntType(64))

    return types.uint64(x), codegen


@njit
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


@njit
def _uniforms(seed, out):
    for n in range(out.shape[0]):
        z = _mix64(np.uint64(seed) + np.uint64(n + 1) * np.uint64(GOLDEN))
        out[n] = np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)  # 53 bits -> [0, 1)


def uniforms(seed: int, n: int) -> np.ndarray:
    """`n` floats in [0, 1): the counters 1..n of the stream `seed`."""
    out = np.empty(n, dtype=np.float64)
    _uniforms(np.uint64(seed), out)
    return out
