"""Mixup/CutMix by groups on the device (train.mixup) against timm's Mixup in 'batch' mode: the same images and
targets for the same draws, the draws distributed as timm draws them, one draw per group."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from timm.data import Mixup

from train.mixup import GroupMix, smoothed_targets


def _timm_mix(x, y, use_cutmix: bool, lam: float, centre, num_classes: int, smoothing: float, monkeypatch):
    """timm's Mixup on one group, its random draws replaced by the given ones (the box centre as uniforms)."""
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=smoothing, num_classes=num_classes)
    monkeypatch.setattr(mixup, "_params_per_batch", lambda: (lam, use_cutmix))
    h, w = x.shape[-2:]
    centres = iter([math.floor(centre[0] * h), math.floor(centre[1] * w)])
    monkeypatch.setattr(np.random, "randint", lambda low, high, size=None: next(centres))
    return mixup(x.clone(), y)


@pytest.mark.parametrize("use_cutmix", [False, True])
def test_a_groups_mixing_is_timms_for_the_same_draw(use_cutmix, monkeypatch):
    """Two groups of 4 with their own choice, lambda and box: each equals timm's Mixup on that group alone, images
    and soft targets (float32 to rounding)."""
    torch.manual_seed(0)
    x, y, classes = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)), 10
    mix = GroupMix(classes, 0.8, 1.0, smoothing=0.1, group=4)
    choice = torch.tensor([use_cutmix, not use_cutmix])
    lam = torch.tensor([0.3, 0.85], dtype=torch.float64)
    centre = torch.tensor([[0.2, 0.9], [0.6, 0.4]], dtype=torch.float64)
    ours, corrected = mix.mix(x, choice, lam, centre)
    targets = mix.targets(y, corrected)
    for g in range(2):
        part = slice(4 * g, 4 * g + 4)
        theirs, their_targets = _timm_mix(x[part], y[part], bool(choice[g]), float(lam[g]), centre[g].tolist(),
                                          classes, 0.1, monkeypatch)
        assert torch.allclose(ours[part], theirs, atol=1e-6), g
        assert torch.allclose(targets[part], their_targets, atol=1e-6), g
    assert torch.allclose(targets.sum(1), torch.ones(8, dtype=targets.dtype))


def test_target_values_exactly():
    """A sample's row: lambda (1 - s + s/C) on its label, (1 - lambda) (1 - s + s/C) on its partner's, s/C elsewhere;
    with no mixing, label smoothing alone."""
    y, classes, s = torch.tensor([2, 5, 5, 7]), 10, 0.1
    plain = smoothed_targets(y, classes, s)
    assert plain[0, 2].item() == pytest.approx(1 - s + s / classes) and plain[0, 3].item() == pytest.approx(s / classes)
    assert torch.allclose(plain.sum(1), torch.ones(4))
    mixed = GroupMix(classes, 0.8, smoothing=s, group=4).targets(y, torch.tensor([0.75], dtype=torch.float64))
    on, off = 1 - s + s / classes, s / classes
    assert mixed[0, 2].item() == pytest.approx(0.75 * on + 0.25 * off)  # its label
    assert mixed[0, 7].item() == pytest.approx(0.25 * on + 0.75 * off)  # its partner's (the group reversed)
    assert mixed[1, 5].item() == pytest.approx(on)  # partners with the same label
    assert mixed[0, 0].item() == pytest.approx(off)


def test_draws_are_timms_distributions_one_per_group():
    """Per group: CutMix with switch_prob, lambda ~ Beta(0.8) under Mixup and ~ Beta(1.0) under CutMix; 8 groups of
    32 in a batch of 256 get 8 draws, the whole batch (group 0) one."""
    mix = GroupMix(1000, 0.8, 1.0, switch_prob=0.5, group=32)
    use_cutmix, lam, centre = mix.draw(4, torch.tensor(11), 20_000)
    assert abs(use_cutmix.double().mean().item() - 0.5) < 0.02
    assert stats.kstest(lam[~use_cutmix].numpy(), stats.beta(0.8, 0.8).cdf).pvalue > 1e-3
    assert stats.kstest(lam[use_cutmix].numpy(), stats.beta(1.0, 1.0).cdf).pvalue > 1e-3
    assert stats.kstest(centre.flatten().numpy(), "uniform").pvalue > 1e-3
    x, y = torch.randn(256, 3, 8, 8), torch.arange(256)
    _, targets = GroupMix(1000, 0.8, group=32)(x, y, 4, torch.tensor(0))  # Mixup: lambdas that never repeat
    own = targets[torch.arange(256), y].reshape(8, 32)  # each sample's weight on its own label: its group's lambda
    assert (own == own[:, :1]).all() and len(torch.unique(own[:, 0])) == 8
    _, whole = GroupMix(1000, 0.8, 1.0)(x, y, 4, torch.tensor(0))
    assert len(torch.unique(whole[torch.arange(256), y])) == 1


def test_groups_must_split_the_batch_evenly():
    with pytest.raises(ValueError, match="even mixing groups"):
        GroupMix(10, 0.8, group=3)(torch.zeros(6, 3, 4, 4), torch.zeros(6, dtype=torch.int64), 0, torch.tensor(0))
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        GroupMix(10, 0.0, 0.0)
