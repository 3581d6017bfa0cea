"""The step's counter-based random numbers (train.rng): fracgen's hash, uniform, normal and Beta values with the
right distributions, independent across counters, streams and keys, and permutations that are permutations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import njit
from scipy import stats

from fracgen.rng import _lowbias32
from train import rng


@njit
def _kernel_hash(x):
    return _lowbias32(x)


def test_the_tensor_hash_is_fracgen_renderers_lowbias32():
    """The same 32-bit function as the renderer's kernel (LLVM IR on 32-bit lanes), over values that exercise the
    top bit (where the second multiply's trick matters) and the extremes."""
    drawn = map(int, np.random.default_rng(0).integers(0, 2**32, 500))
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF, *drawn]
    ours = rng.lowbias32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert ours == [int(_kernel_hash(np.uint64(v))) for v in values] == [rng.lowbias32_int(v) for v in values]
    assert all(0 <= v < 2**32 for v in ours)


def test_uniforms_are_uniform_and_independent_across_counters_streams_and_keys():
    n = 200_000
    u = rng.uniform(7, rng.CROP, torch.tensor(3), (n,), torch.float64).numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert 0 <= u.min() and u.max() < 1
    others = [rng.uniform(7, rng.CROP, torch.tensor(4), (n,), torch.float64),  # the next counter
              rng.uniform(7, rng.FLIP, torch.tensor(3), (n,), torch.float64),  # another stream
              rng.uniform(8, rng.CROP, torch.tensor(3), (n,), torch.float64),  # another key (rank)
              rng.uniform(7, rng.CROP, torch.tensor(3 + 2**32), (n,), torch.float64)]  # the counter's high word
    for other in others:
        assert abs(np.corrcoef(u, other.numpy())[0, 1]) < 4 / np.sqrt(n)
        # not the same values in another order: two independent draws share ~n^2 / 2^32 = 9 of 2^32 values
        assert len(np.intersect1d(u, other.numpy())) < 50
    lagged = np.corrcoef(u[:-1], u[1:])[0, 1]  # neighbouring elements of one draw
    assert abs(lagged) < 4 / np.sqrt(n)
    f32 = rng.uniform(7, rng.CROP, torch.tensor(3), (n,))
    assert f32.dtype == torch.float32 and f32.max().item() < 1


def test_a_counter_per_row_draws_each_row_as_its_own_counter():
    rows = rng.bits(5, rng.MIX, torch.tensor([[2], [9]]), (2, 6), index=torch.arange(6))
    assert torch.equal(rows[0], rng.bits(5, rng.MIX, torch.tensor(2), (6,)))
    assert torch.equal(rows[1], rng.bits(5, rng.MIX, torch.tensor(9), (6,)))


def test_normals_are_standard_normal():
    z = rng.normal(1, rng.ERASE_NOISE, torch.tensor(0), (100_001,)).double().numpy()
    assert z.shape == (100_001,) and stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(np.corrcoef(z[:50_000], z[50_000:100_000])[0, 1]) < 0.02  # cosine and sine halves


@pytest.mark.parametrize("alpha", [0.8, 1.0, 0.2, 2.5])
def test_beta_draws_follow_numpys_beta(alpha):
    """What timm's Mixup draws with numpy: Beta(alpha, alpha) (the paper: Mixup 0.8, CutMix 1.0)."""
    ours = rng.beta(3, rng.MIX, torch.tensor(1), (20_000,), alpha).numpy()
    assert ((ours >= 0) & (ours <= 1)).all()  # at alpha 0.2 some round to 0 or 1 in float64, as numpy's do
    assert stats.kstest(ours, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    theirs = np.random.default_rng(0).beta(alpha, alpha, 20_000)
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3


def test_permutations_are_permutations_and_new_each_epoch():
    perms = rng.permutation(9, torch.arange(5), 1000)
    assert all(sorted(p.tolist()) == list(range(1000)) for p in perms)
    assert len({tuple(p.tolist()) for p in perms}) == 5
    assert torch.equal(perms[3], rng.permutation(9, torch.tensor([3]), 1000)[0])  # row = its epoch alone
    first = torch.stack([rng.permutation(9, torch.tensor([e]), 10)[0] for e in range(4000)])[:, 0]
    counts = torch.bincount(first, minlength=10).double()  # each item leads an epoch 1 time in 10
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3


def test_the_step_rng_state_is_its_key_and_micro_step():
    a, b = rng.StepRNG(3, 0, torch.device("cpu")), rng.StepRNG(3, 1, torch.device("cpu"))
    assert a.key != b.key and a.key == rng.StepRNG(3, 0, torch.device("cpu")).key
    a.seek(40)
    assert a.state() == {"seed": 3, "rank": 0, "micro": 40} and a.counter.item() == 40
