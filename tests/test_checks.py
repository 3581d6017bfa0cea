"""Checks that fail when the figure they guard breaks (issue 34): fine-tuning really starts from the checkpoint's
weights, the pretext accuracy is the share of clean images classified right, the near-chance warning fires where
it should and only there. Each of these passed under a mutation that broke it before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from fracgen.dataset import render_dataset
from train import data, downstream, weights
from train.evaluate import NEAR_CHANCE, chance_warning, pretext_accuracy
from train.finetune import Config as FinetuneConfig
from train.finetune import finetune, init_model
from train.pretrain import Config as PretrainConfig
from train.pretrain import device_augment, pretrain
from train.runtime import seed_everything

TINY = dict(img_size=32, patch_size=8, depth=2, batch=16, log_every=5, eval_every=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A run that learns a little (40 steps on 8 classes), so its pretext accuracy is not a constant."""
    root = tmp_path_factory.mktemp("checks")
    render_dataset(root / "shards", classes=8, size=32, points=3000, shard_size=8, seed=0, workers=1)
    summary = pretrain(PretrainConfig(shards=str(root / "shards"), out=str(root / "run"), steps=40, mixup=0.0,
                                      blr=2e-2, eval_samples=8, **TINY))
    return root / "shards", root / "run", summary


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.forward_features(x)


def test_fine_tuning_starts_from_the_checkpoint_weights_with_a_new_head(run):
    _, run_dir, _ = run
    pretrained = weights.load(str(run_dir))
    model = init_model(FinetuneConfig(), pretrained, 10)
    saved = safetensors.torch.load_file(run_dir / "model.safetensors")
    state = model.state_dict()
    backbone = [k for k in saved if not k.startswith("head.")]
    assert backbone and all(torch.equal(state[k], saved[k]) for k in backbone)
    assert state["head.weight"].shape == (10, 192)  # the pretext head (8 classes) is gone
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=8, img_size=32, patch_size=8, depth=2)
    reference.load_state_dict(saved)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(_features(model, x), _features(reference, x))  # the features before the first step
    scratch = init_model(FinetuneConfig(), None, 10)
    assert not torch.equal(_features(scratch, x), _features(reference, x))


def test_finetune_itself_starts_from_the_checkpoint(run, tmp_path):
    """Through finetune(): at lr 0 nothing moves, so its top-1 is the starting network's, which an independent
    model (timm, the checkpoint loaded, a new head drawn from the same seed) reproduces exactly."""
    _, run_dir, _ = run
    got = finetune(FinetuneConfig(checkpoint=str(run_dir), seeds=(0,), steps=1, blr=0.0))["top1_mean"]
    seed_everything(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=8, img_size=32, patch_size=8, depth=2)
    model.load_state_dict(safetensors.torch.load_file(run_dir / "model.safetensors"))
    model.reset_classifier(10)
    base, _, _ = downstream.load("digits", Path("data"))
    _, rest = downstream.split(downstream.targets_of(base), 10, 0.0, 0, has_test=False)
    test_set = downstream.Transformed(base, rest, data.eval_transform(32, mean=data.IMAGENET_MEAN,
                                                                      std=data.IMAGENET_STD))
    model.eval()
    with torch.no_grad():
        right = sum((model(x).argmax(1) == y).sum().item() for x, y in torch.utils.data.DataLoader(test_set, 256))
    assert got == pytest.approx(100 * right / len(test_set))


class _Oracle(torch.nn.Module):
    """Reads the label hidden in pixel (0, 0) and answers it, or the next class where pixel (0, 1) is set."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        label = x[:, 0, 0, 0].round().long()
        answer = (label + (x[:, 0, 0, 1] > 0).long()) % self.classes
        return torch.nn.functional.one_hot(answer, self.classes).float() * 10


def test_pretext_accuracy_is_the_share_answered_right():
    classes, n, right = 7, 50, 31
    labels = torch.arange(n) % classes
    images = torch.zeros(n, 1, 4, 4)
    images[:, 0, 0, 0] = labels.float()
    images[right:, 0, 0, 1] = 1  # the oracle misses these
    batches = [(images[i:i + 16], labels[i:i + 16]) for i in range(0, n, 16)]
    result = pretext_accuracy(_Oracle(classes), batches, lambda x: x, torch.device("cpu"))
    assert result["eval_samples"] == n and result["pretext_acc"] == pytest.approx(100 * right / n)


def test_a_runs_pretext_accuracy_equals_an_independent_count(run):
    shards, run_dir, summary = run
    manifest = data.read_manifest(shards)
    images, labels = data.load_images(shards, manifest)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=8, img_size=32, patch_size=8, depth=2)
    model.load_state_dict(safetensors.torch.load_file(run_dir / "model.safetensors"))
    model.eval()
    clean = device_augment(PretrainConfig(**TINY)).evaluate
    with torch.no_grad():
        predicted = model(clean(images[:8])).argmax(1).numpy()
    count = int(np.sum(predicted == labels[:8].numpy()))
    assert summary["eval_samples"] == 8 and summary["pretext_acc"] == pytest.approx(100 * count / 8)
    assert 0 < count  # the run learned something: a mislabelled count would differ


@pytest.mark.parametrize(("classes", "accuracy", "fires"), [
    (1000, 0.1, True), (1000, 0.49, True), (1000, 0.5, False), (1000, 7.0, False), (8, 70.0, False), (8, 60.0, True),
])
def test_the_near_chance_warning_fires_below_five_times_chance_only(classes, accuracy, fires):
    assert NEAR_CHANCE == 5
    warning = chance_warning(accuracy, classes)
    assert (warning is not None) == fires
    if fires:
        assert warning.startswith("warning: pretext accuracy is near chance")


def test_options_a_checkpoint_overrides_are_named_in_one_note(run, capsys):
    from helpers import train_cli

    from train import finetune as finetune_cli

    _, run_dir, _ = run
    code, out, err = train_cli(finetune_cli.app, ["--checkpoint", run_dir, "--img-size", "64", "--depth", "4",
                                                  "--steps", "1", "--seeds", "0"], capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes == ["note: --img-size, --depth ignored: --checkpoint brings its own network (its config says the "
                     "architecture and input size)"]
    assert ", 32 px," in out  # what really ran
