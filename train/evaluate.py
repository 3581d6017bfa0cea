"""What a pre-training run reports of itself: the pretext accuracy (top-1 over the C perturbation classes on clean,
un-mixed images) and the warning a run ends with when that is near chance (docs/design.md section 9: a pre-training that
has not learned its task can transfer worse than none)."""

from __future__ import annotations

import contextlib

import torch


def pretext_accuracy(model: torch.nn.Module, eval_batches, clean, device, autocast=None) -> dict:
    """Pretext top-1 on clean, un-mixed images: has the network learned to tell the C classes apart? `eval_batches`
    yields (uint8 images, labels); `clean` turns images into the model's input (resize, normalise)."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad(), autocast or contextlib.nullcontext():
        for x, y in eval_batches:
            x, y = clean(x.to(device)), y.to(device)
            logits = model(x).float()
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
    model.train()
    return {"pretext_acc": 100 * correct / total, "pretext_loss": loss_sum / total, "eval_samples": total}


NEAR_CHANCE = 5  # a pretext top-1 under 5x chance: the network has not learned its task


def near_chance(num_classes: int) -> float:
    """The pretext top-1 (%) under which a run has not learned its task: 5x chance or, where lower, halfway from
    chance to 100% (with few classes 5x chance is out of reach: 2 classes, 250%, where every run was warned)."""
    chance = 100 / num_classes
    return min(NEAR_CHANCE * chance, (chance + 100) / 2)


def chance_warning(pretext_acc: float, num_classes: int, shards: str = "", at: int = 32, seed: int | None = None
                   ) -> str | None:
    """The warning a run ends with when its pretext accuracy is near chance (docs/design.md section 9: such a
    pre-training can transfer worse than none), else None. It names the likeliest cause on 1p-frac data, the base
    fractal drawn (docs/results.md, "Which base will learn?"), and the commands that check it."""
    if pretext_acc >= near_chance(num_classes):
        return None
    folder = shards if shards and "://" not in shards else "SHARDS"
    other = f"--seed {seed + 1}" if seed is not None else "another --seed"
    return ("warning: pretext accuracy is near chance: the network has not learned to tell the perturbation classes "
            "apart, and such a pre-training can transfer worse than none (docs/design.md section 9). On 1p-frac "
            "data the base fractal drawn is the likeliest cause (docs/results.md, \"Which base will learn?\"): "
            f"`fracgen score {folder} --at {at}` measures this one's data, and `fracgen render {other}` draws "
            "another base.")
