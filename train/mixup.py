"""Mixup and CutMix on the device, one mixing draw per group of samples, as the official run applied them.

timm's `Mixup` in its default 'batch' mode draws one choice (Mixup or CutMix, `switch_prob`), one ratio lambda
(Beta(alpha, alpha)) and one CutMix box per call, with numpy on the host, and pairs sample i with sample B - 1 - i
of the batch. The 1p-frac reference trained on 8 GPUs x 32 images, each GPU calling it on its own 32: a global
step of 256 held 8 independent mixing draws. `GroupMix` does that for any batch: the micro-batch is cut into groups
of `group` samples (0: the whole micro-batch, timm's behaviour on one process), each group gets its own choice,
lambda and box, drawn on the device from the step's counter (`train.rng`), and pairs within itself as timm pairs
within a batch. The arithmetic is timm's: x lambda + flipped x (1 - lambda) in float32, the CutMix box from
`rand_bbox` (a cut of sqrt(1 - lambda) of each side, centred uniformly, clipped) with lambda corrected to the
area actually pasted, and the soft targets of `mixup_target` (label smoothing included). Both mixings are
computed for every group and the draw selects one, so the graph is fixed.
"""

from __future__ import annotations

import torch

from . import rng


def smoothed_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """timm's one_hot with label smoothing: 1 - smoothing + smoothing / C on the label, smoothing / C elsewhere."""
    off = smoothing / num_classes
    on = 1 - smoothing + off
    return torch.full((len(y), num_classes), off, device=y.device).scatter_(1, y.long().view(-1, 1), on)


class GroupMix:
    """Call with a model-ready (B, C, H, W) batch, its labels, the rank's key and the micro-step counter; returns
    the mixed batch and its soft targets (B, num_classes)."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 0.0,
                 switch_prob: float = 0.5, smoothing: float = 0.1, group: int = 0):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("GroupMix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.switch_prob, self.smoothing, self.group = switch_prob, smoothing, group

    def draw(self, key: int, counter: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per group: CutMix or not (bool), lambda (float64) and the box centre as uniforms (groups, 2)."""
        u = rng.uniform(key, rng.MIX, counter, (groups, 3), torch.float64)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = u[:, 0] < self.switch_prob
        else:
            use_cutmix = torch.full((groups,), self.cutmix_alpha > 0, device=counter.device)
        ones = torch.ones(groups, dtype=torch.float64, device=counter.device)
        lam_mix = rng.beta(key, rng.MIX + 1, counter, (groups,), self.mixup_alpha) if self.mixup_alpha > 0 else ones
        lam_cut = rng.beta(key, rng.MIX + 2, counter, (groups,), self.cutmix_alpha) if self.cutmix_alpha > 0 else ones
        return use_cutmix, torch.where(use_cutmix, lam_cut, lam_mix), u[:, 1:]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, key: int,
                 counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[0]
        size = self.group or batch
        if batch % size or size % 2:
            raise ValueError(f"a batch of {batch} does not split into even mixing groups of {size}")
        use_cutmix, lam, centre = self.draw(key, counter, batch // size)
        x, lam = self.mix(x, use_cutmix, lam, centre)
        return x, self.targets(y, lam)

    def mix(self, x: torch.Tensor, use_cutmix: torch.Tensor, lam: torch.Tensor,
            centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed batch for given draws, and each group's lambda (CutMix's corrected to its pasted area)."""
        batch, channels, height, width = x.shape
        groups = len(lam)
        xg = x.reshape(groups, batch // groups, channels, height, width)
        flipped = xg.flip(1)
        # timm's rand_bbox: int() of a non-negative float is its floor; randint(0, n) = floor(u n)
        ratio = torch.sqrt(1 - lam)
        cut_h, cut_w = torch.floor(height * ratio), torch.floor(width * ratio)
        cy, cx = torch.floor(centre[:, 0] * height), torch.floor(centre[:, 1] * width)
        yl, yh = (cy - torch.floor(cut_h / 2)).clamp(0, height), (cy + torch.floor((cut_h + 1) / 2)).clamp(0, height)
        xl, xh = (cx - torch.floor(cut_w / 2)).clamp(0, width), (cx + torch.floor((cut_w + 1) / 2)).clamp(0, width)
        lam = rng.keep(torch.where(use_cutmix, 1 - (yh - yl) * (xh - xl) / (height * width), lam))  # correct_lam
        yl, yh, xl, xh = rng.keep(torch.stack([yl, yh, xl, xh])).unbind(0)  # stored, not recomputed per pixel
        rows = torch.arange(height, device=x.device, dtype=lam.dtype)[None, :, None]
        cols = torch.arange(width, device=x.device, dtype=lam.dtype)[None, None, :]
        box = ((rows >= yl[:, None, None]) & (rows < yh[:, None, None]) & (cols >= xl[:, None, None])
               & (cols < xh[:, None, None]))
        cut = torch.where(box[:, None, None], flipped, xg)
        # timm: x.mul_(lam).add_(x.flip(0).mul_(1 - lam)) with lam a Python float: float32 factors
        weight = lam.to(x.dtype)[:, None, None, None, None]
        mixed = xg * weight + flipped * (1 - lam).to(x.dtype)[:, None, None, None, None]
        out = torch.where(use_cutmix[:, None, None, None, None], cut, mixed)
        return out.reshape(batch, channels, height, width), lam

    def targets(self, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """timm's mixup_target per group: lambda on the sample's label, 1 - lambda on its partner's, smoothed."""
        groups = len(lam)
        y1 = smoothed_targets(y, self.num_classes, self.smoothing)
        y1 = y1.reshape(groups, -1, self.num_classes)
        y2 = y1.flip(1)
        out = y1 * lam.to(y1.dtype)[:, None, None] + y2 * (1 - lam).to(y1.dtype)[:, None, None]
        return out.reshape(-1, self.num_classes)
