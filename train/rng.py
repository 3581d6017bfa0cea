"""Counter-based random numbers on the training device: every draw of a step is a hash of (key, stream, counter,
element), computed where the pixels are.

Why not torch.Generator: a generator's draws cannot live inside one compiled graph or a captured CUDA graph on
every device alike (dynamo breaks the graph at `generator=`, inductor swaps in its own RNG, so compiled and eager
draws differ), and a host generator makes the host take part in every step. A hash of a counter is plain integer
arithmetic: the same values on the CPU and on CUDA, eager or compiled, with no state but the counter. The key is
the run's seed and the rank (`StepRNG`), the counter the micro-step; a checkpoint holds both, and a continued run
draws what the uninterrupted one would have drawn.

The mixer is lowbias32 (C. Wellons' hash-prospector), as in fracgen's renderer (`fracgen.rng`), here on int64
tensors holding 32-bit values, with no product past 2**63 (torch, C++ and Triton do not agree on signed overflow).
Two rounds per element, each keyed by its own word of the counter's hash.
"""

from __future__ import annotations

import math

import torch

from fracgen.rng import derive_seed

MASK32 = 0xFFFFFFFF

# Streams: one per kind of draw, so that no two draws of a step share values.
PERMUTATION = 1  # sample order of an epoch (the same on every rank)
CROP = 2  # RandomResizedCrop's 10 attempts
FLIP = 3
RANDAUG = 4  # + layer: op, applied, magnitude, sign
ERASE = 20
ERASE_NOISE = 21
MIX = 22  # Mixup/CutMix: choice, lambda, box
HOST_CROP = 23  # crops cut in loader workers


@torch.library.custom_op("fracgen::keep", mutates_args=())
def keep(x: torch.Tensor) -> torch.Tensor:
    """`x`, stored: in a compiled graph an opaque op, so inductor writes `x` to a buffer instead of inlining the
    ops that make it into every consumer. A per-sample draw read by a per-pixel kernel would otherwise be
    recomputed (hash chain and all) for every pixel: 4 ms of the CPU preset's 9 ms batch. A copy of a few numbers
    per sample in eager mode."""
    return x.clone()


@keep.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)



def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of 32-bit values held in an int64 tensor (the same function as fracgen.rng's kernel hash). Each
    product stays below 2**63: the second multiplier is over 2**31, so x * c is taken as -(x * (2**32 - c))
    modulo 2**32. Each op uses its input once but for the xor-shifts, which keeps compiled graphs small."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (-(x * 0x7B935975)) & MASK32  # 0x7B935975 = 2**32 - 0x846CA68B
    return x ^ (x >> 16)


def lowbias32_int(x: int) -> int:
    """The same on a Python int (for keys, and as the tests' reference)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def bits(key: int, stream: int, counter: torch.Tensor, shape: tuple[int, ...],
         index: torch.Tensor | None = None) -> torch.Tensor:
    """32-bit random values (int64) of `shape`, element i of the draw (`stream`, `counter`) under `key`.

    `counter`: an int64 tensor on the device, a scalar, or broadcasting against `shape` (one counter per row, with
    `index`, each element's number within its row). Keys are Python ints: they do not change within a run, so a
    compiled graph keeps them as constants and the counter is its only input."""
    k = derive_seed(key, stream)
    k0, k1, k2, k3 = k & MASK32, k >> 32, lowbias32_int(k ^ 0x9E3779B9), lowbias32_int(k ^ 0x7F4A7C15)
    counter = counter.to(torch.int64)
    low, high = counter & MASK32, (counter >> 32) & MASK32
    p = lowbias32(lowbias32(low ^ k0) ^ high ^ k1)  # two words from the counter, one per round below
    q = lowbias32(lowbias32(low ^ k2) ^ high ^ k3)
    if index is None:
        index = torch.arange(math.prod(shape), device=counter.device, dtype=torch.int64).reshape(shape)
    return lowbias32(lowbias32(index ^ p) ^ q)


def uniform(key: int, stream: int, counter: torch.Tensor, shape: tuple[int, ...],
            dtype: torch.dtype = torch.float32, stored: bool = True) -> torch.Tensor:
    """Uniform in [0, 1): the top 24 bits (float32) or all 32 bits (float64) of each hash. `stored`: kept in a
    buffer (`keep`), as a draw of a few numbers per sample should be; False for a per-pixel draw, which the
    compiled graph computes where it is used."""
    h = bits(key, stream, counter, shape)
    u = h.to(torch.float64) * 2.0**-32 if dtype == torch.float64 else (h >> 8).to(dtype) * 2.0**-24
    return keep(u) if stored else u


def normal(key: int, stream: int, counter: torch.Tensor, shape: tuple[int, ...],
           dtype: torch.dtype = torch.float32, stored: bool = True) -> torch.Tensor:
    """N(0, 1) by Box-Muller, two values from each pair of hashes (cosine half, sine half)."""
    n = math.prod(shape)
    half = (n + 1) // 2
    u = uniform(key, stream, counter, (2, half), torch.float64 if dtype == torch.float64 else torch.float32, stored)
    radius = torch.sqrt(-2 * torch.log1p(-u[0]))  # 1 - u in (0, 1]: no log(0)
    angle = 2 * math.pi * u[1]
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
    return z.reshape(shape).to(dtype)


GAMMA_ATTEMPTS = 8  # Marsaglia-Tsang accepts >= 95% of candidates at shape >= 1: all 8 fail about once in 10^10


def _gamma(key: int, stream: int, counter: torch.Tensor, shape: tuple[int, ...], alpha: float) -> torch.Tensor:
    """Gamma(alpha, 1) in float64 by Marsaglia and Tsang's method with a fixed number of candidates (the first one
    accepted is kept, as a loop would keep it; none: the mode), boosted by U^(1/alpha) below alpha 1."""
    shape_up = alpha + 1 if alpha < 1 else alpha
    d = shape_up - 1 / 3
    c = 1 / math.sqrt(9 * d)
    z = normal(key, stream, counter, (*shape, GAMMA_ATTEMPTS), torch.float64)
    u = uniform(key, stream + 1000, counter, (*shape, GAMMA_ATTEMPTS + 1), torch.float64)
    v = (1 + c * z) ** 3
    bound = 0.5 * z * z + d - d * v + d * torch.log(v.clamp(min=1e-300))
    ok = (v > 0) & (torch.log1p(-u[..., :GAMMA_ATTEMPTS]) < bound)
    first = ok.to(torch.uint8).argmax(-1, keepdim=True)
    x = torch.where(ok.any(-1), (d * v).gather(-1, first).squeeze(-1), d)
    if alpha < 1:
        x = x * (1 - u[..., GAMMA_ATTEMPTS]) ** (1 / alpha)
    return x


def beta(key: int, stream: int, counter: torch.Tensor, shape: tuple[int, ...], alpha: float) -> torch.Tensor:
    """Beta(alpha, alpha) in float64 (what numpy's beta(alpha, alpha) gives timm's Mixup), as X / (X + Y) of two
    Gamma(alpha) draws."""
    x = _gamma(key, stream, counter, shape, alpha)
    y = _gamma(key, stream + 2000, counter, shape, alpha)
    return x / (x + y)


def permutation(key: int, epochs: torch.Tensor, n: int) -> torch.Tensor:
    """(len(epochs), n): a random permutation of range(n) for each epoch, by sorting hashed keys (made unique by the
    position in the low 31 bits, so no ties)."""
    position = torch.arange(n, device=epochs.device)
    h = bits(key, PERMUTATION, epochs.reshape(-1, 1), (len(epochs), n), index=position)
    return torch.argsort((h << 31) | position, dim=1)


def derive_key(seed: int, *keys: int) -> int:
    """A run's key for one rank (or loader worker): fracgen's SplitMix64 derivation of (seed, keys)."""
    return derive_seed(seed & (2**64 - 1), *keys)


class StepRNG:
    """The random state of one rank's steps: a key (the run's seed and the rank) and the counter of micro-steps, an
    int64 tensor on the device that the step advances itself (a captured graph included). The host keeps its own
    count (`micro`), so a checkpoint reads nothing from the device."""

    def __init__(self, seed: int, rank: int, device, micro: int = 0):
        self.seed, self.rank = seed, rank
        self.key = derive_key(seed, 0x5EED, rank)
        self.counter = torch.tensor(micro, dtype=torch.int64, device=device)
        self.micro = micro

    def state(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "micro": self.micro}

    def seek(self, micro: int) -> None:
        """Continue from micro-step `micro` (a resumed run)."""
        self.micro = micro
        self.counter.fill_(micro)
