"""Checks that fail when the figure they guard breaks (issue 34): fine-tuning really starts from the checkpoint's
weights, the pretext accuracy is the share of clean images classified right, the near-chance warning fires where
it should and only there. Each of these passed under a mutation that broke it before."""

from __future__ import annotations

import io
import re
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
    got = finetune(FinetuneConfig(checkpoint=str(run_dir), seeds=(0,), steps=1, blr=0.0,
                                  precision="fp32"))["top1_mean"]  # the same arithmetic as the check below
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
    # the clean cross-entropy, counted by hand: logits 10 on the answer, 0 elsewhere
    import math

    norm = math.log(math.exp(10) + classes - 1)
    expected = (right * (norm - 10) + (n - right) * norm) / n
    assert result["pretext_loss"] == pytest.approx(expected, rel=1e-5)


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
    (1000, 0.1, True), (1000, 0.49, True), (1000, 0.5, False), (1000, 7.0, False), (8, 70.0, False), (8, 56.0, True),
    # few classes: 5x chance is out of reach (2 classes: 250%), so halfway from chance to 100% (issue 39)
    (8, 56.25, False), (2, 100.0, False), (2, 75.0, False), (2, 74.9, True), (5, 60.0, False), (5, 59.9, True),
    (20, 25.0, False),
])
def test_the_near_chance_warning_fires_below_five_times_chance_only(classes, accuracy, fires):
    assert NEAR_CHANCE == 5
    warning = chance_warning(accuracy, classes)
    assert (warning is not None) == fires
    if fires:
        assert warning.startswith("warning: pretext accuracy is near chance")
        assert "`fracgen score SHARDS --at 32`" in warning and "another --seed" in warning
    assert chance_warning(0.1, 1000) == (
        "warning: pretext accuracy is near chance: the network has not learned to tell the perturbation classes "
        "apart, and such a pre-training can transfer worse than none (docs/design.md section 9). On 1p-frac data the "
        "base fractal drawn is the likeliest cause (docs/results.md, \"Which base will learn?\"): `fracgen score "
        "SHARDS --at 32` measures this one's data, and `fracgen render another --seed` draws another base.")
    named = chance_warning(0.1, 1000, "shards/cpu-seed4", 32, seed=4)
    assert "`fracgen score shards/cpu-seed4 --at 32`" in named and "`fracgen render --seed 5`" in named
    assert "`fracgen score SHARDS --at 64`" in chance_warning(0.1, 1000, "https://host/set/", 64)


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


# --- what the mutation run (docs/testing.md) found unguarded ----------------------------------------------------

def test_fine_tuning_optimizers_follow_the_recipe():
    from train.finetune import PRESETS, batch_used, build_optimizer

    model = torch.nn.Linear(4, 2)
    sgd = build_optimizer(FinetuneConfig(**PRESETS["paper"]), model, 768)
    group = sgd.param_groups[0]
    assert type(sgd).__name__ == "SGD" and group["momentum"] == 0.9 and group["nesterov"]
    assert group["lr"] == pytest.approx(0.01 * 768 / 512)
    assert {g["weight_decay"] for g in sgd.param_groups} == {0.0, 1e-4}  # biases undecayed, as timm groups them
    adamw = build_optimizer(FinetuneConfig(), model, 64)
    assert type(adamw).__name__ == "AdamW" and adamw.param_groups[0]["lr"] == pytest.approx(0.008 * 64 / 512)
    assert {g["weight_decay"] for g in adamw.param_groups} == {0.0, 0.05}
    # Mixup and CutMix pair images in a batch: an odd batch loses one image with either, none without
    assert batch_used(FinetuneConfig(batch=64), 99) == 64 and batch_used(FinetuneConfig(batch=200), 99) == 99
    assert batch_used(FinetuneConfig(batch=200, mixup=0.8), 99) == 98
    assert batch_used(FinetuneConfig(batch=200, cutmix=1.0), 99) == 98


def _ckpt(tmp_path, **changes) -> Path:
    state = {"model_name": "vit_tiny_patch16_224", "model_args": {}, "num_classes": 2, "model": {"w": torch.ones(2)},
             "step": 3, "config": {}, "optimizer": {}, "scheduler": {}, "scaler": {}, "rng": []}
    state.update(changes)
    for key in [k for k, v in changes.items() if v is _DROP]:
        del state[key]
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    return path


_DROP = object()


@pytest.mark.parametrize(("changes", "resume", "match"), [
    (dict(step=True), False, "'step' is missing or not a int"),
    (dict(num_classes="2"), False, "'num_classes' is missing or not a int"),
    (dict(model=_DROP), False, "'model' is missing"),
    (dict(model={"w": 1.0}), False, "'model' is not a dict of tensors"),
    (dict(optimizer=_DROP), True, "'optimizer' is missing"),
    (dict(rng={}), True, "'rng' is missing or not a list"),
])
def test_a_checkpoint_lacking_what_its_use_needs_is_one_line(tmp_path, changes, resume, match):
    from train.runtime import TrainError, load_checkpoint

    with pytest.raises(TrainError, match=re.escape(match)):
        load_checkpoint(_ckpt(tmp_path, **changes), resume=resume)
    if changes.get("optimizer") is _DROP or "rng" in changes:  # enough to fine-tune from, not to continue
        assert load_checkpoint(_ckpt(tmp_path, **changes))["step"] == 3
    with pytest.raises(TrainError, match="it holds a list"):
        torch.save([1, 2], tmp_path / "list.pt")
        load_checkpoint(tmp_path / "list.pt")


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['FRACGEN_PWNED'], 'w').write('ran')",))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_unrun(tmp_path, monkeypatch):
    from train.runtime import TrainError, load_checkpoint

    marker = tmp_path / "pwned"
    monkeypatch.setenv("FRACGEN_PWNED", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode()}, path)
    with pytest.raises(TrainError, match="it asks to run (builtins.)?exec on loading; refused, nothing of it was run"):
        load_checkpoint(path)
    assert not marker.exists()


def _shard(tmp_path, samples, size=16) -> tuple[Path, dict]:
    from fracgen.shards import write_shard_unfinished

    tmp, entry = write_shard_unfinished(tmp_path / "x.tar", samples)
    return tmp, {**entry, "samples": entry.get("samples", len(samples))}


def _sample(k: int, m: int = 0, size: int = 16, label: int | None = None):
    from fracgen import png
    from fracgen.shards import Sample

    return Sample(f"c{k:06d}-i{m:06d}", png.encode_rows(png.row_buffer(size), 1), k if label is None else label, {})


def _parts(sample) -> dict:
    from fracgen.shards import encode_json

    return {"cls": str(sample.label).encode(), "json": encode_json(sample.meta), "png": sample.png}


def test_sample_checks_hold_labels_sizes_and_bounds():
    from fracgen.shards import check_sample

    ok = _sample(1)
    parts = _parts(ok)
    assert check_sample(ok.key, parts, num_classes=2, size=16) is None
    assert "outside 0..1" in check_sample(ok.key, {**parts, "cls": b"2"}, num_classes=2, size=16)  # == C: refused
    assert check_sample(ok.key, parts, num_classes=2, size=32) is not None  # a 16 px PNG where 32 px are due
    huge = b'{"x": "' + b"a" * 200_000 + b'"}'
    assert "larger than" in check_sample(ok.key, {**parts, "json": huge}, num_classes=2, size=16)


def test_a_shard_with_more_samples_than_listed_is_refused(tmp_path):
    from fracgen.shards import check_shard_contents

    path, entry = _shard(tmp_path, [_sample(0), _sample(1), _sample(0, 1)])
    listed = {**entry, "samples": 2}
    assert check_shard_contents(path, listed, num_classes=2, size=16) == "at least 3 samples, manifest says 2"
    assert check_shard_contents(path, {**entry, "samples": 4}, num_classes=2, size=16) == "3 samples, manifest says 4"
    assert check_shard_contents(path, {**entry, "samples": 3}, num_classes=2, size=16, first=0) is None


def test_our_tar_bytes_are_the_ones_pythons_tarfile_writes(tmp_path):
    """fracgen writes USTAR headers itself (for speed); the bytes must be tarfile's for the same members."""
    import io
    import tarfile

    from fracgen.shards import shard_in_memory, ustar_header

    samples = [_sample(0), _sample(1)]
    ours, _ = shard_in_memory("x.tar", samples)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, payload in _parts(s).items():
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(payload), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(payload))
    assert ours == buf.getvalue()
    assert len(ustar_header("a" * 100, 1)) == 512
    from fracgen.errors import FracgenError

    with pytest.raises(FracgenError, match="longer than 100 bytes"):
        ustar_header("a" * 101, 1)


def test_file_sha256_counts_every_byte_of_a_large_file(tmp_path):
    import hashlib

    from fracgen.shards import file_sha256

    data = np.random.default_rng(0).integers(0, 256, (3 << 20) + 17, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == (hashlib.sha256(data).hexdigest(), len(data))


def test_a_member_name_with_a_second_dot_is_not_a_sample_part(tmp_path):
    import tarfile

    from fracgen.shards import iter_samples

    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        for name in ("c000000-i000000.cls", "c000000-i000000.x.png"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"0"))
    ((key, parts),) = list(iter_samples(tmp_path / "x.tar"))
    assert key == "c000000-i000000" and sorted(parts) == ["cls", "x.png"]  # no .png: check_sample refuses it


def test_the_fine_tuning_network_takes_the_recipes_shape_and_drop_path(run):
    _, run_dir, _ = run
    scratch = init_model(FinetuneConfig(img_size=48, patch_size=16, depth=3, drop_path=0.1), None, 10)
    assert len(scratch.blocks) == 3 and scratch.patch_embed.patch_size == (16, 16)
    assert scratch.patch_embed.img_size == (48, 48) and scratch.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    tuned = init_model(FinetuneConfig(drop_path=0.1), weights.load(str(run_dir)), 10)
    assert tuned.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # the paper preset fine-tunes with 0.1
    assert init_model(FinetuneConfig(), weights.load(str(run_dir)), 10).blocks[-1].drop_path1.__class__.__name__ \
        == "Identity"


@pytest.mark.parametrize(("content", "match"), [
    (b"", "unreadable: EOFError"), (b"PK\x03\x04 not a zip", "unreadable"), (b"\x80\x02}q\x00.", "Invalid magic")])
def test_an_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path, content, match):
    from train.runtime import TrainError, load_checkpoint

    (tmp_path / "ckpt.pt").write_bytes(content)
    with pytest.raises(TrainError, match=match) as refused:
        load_checkpoint(tmp_path / "ckpt.pt")
    assert str(refused.value).startswith(f"{tmp_path / 'ckpt.pt'} is not a fracgen-train pretrain checkpoint")
    assert "\n" not in str(refused.value)
    with pytest.raises(TrainError, match=f"^{re.escape(str(tmp_path / 'named.pt'))} is not"):  # a stream, named
        load_checkpoint(io.BytesIO(content), name=tmp_path / "named.pt")


# train/evaluate.py against values worked out by hand (issue 39): logits known, batches of uneven size

class Fixed(torch.nn.Module):
    """Logits are the input itself (the images are already 'logits'); records its mode at each call."""

    def __init__(self):
        super().__init__()
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return x.to(torch.float16)  # the result is made float32 before the loss


def test_pretext_accuracy_and_loss_are_exact_over_uneven_batches_in_eval_mode():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    labels = torch.tensor([0, 1, 0, 2, 2])  # rows 0, 1 and 4 right
    batches = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    scaled = []

    def clean(x):
        scaled.append(x.dtype)
        return x / 1.0

    model = Fixed().train()
    result = pretext_accuracy(model, batches, clean, "cpu")
    expected_loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item() / 5
    assert result["pretext_acc"] == pytest.approx(60.0)
    assert result["eval_samples"] == 5
    assert result["pretext_loss"] == pytest.approx(expected_loss, rel=1e-3)
    assert set(result) == {"pretext_acc", "pretext_loss", "eval_samples"}
    assert model.modes == [False, False] and model.training  # evaluated in eval mode, handed back training
    assert len(scaled) == 2  # every batch through `clean`


def test_pretext_accuracy_runs_without_gradients_and_inside_the_given_autocast():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
            return x

    batches = [(torch.eye(2), torch.tensor([0, 1]))]
    assert pretext_accuracy(Probe(), batches, lambda x: x, "cpu")["pretext_acc"] == 100.0
    pretext_accuracy(Probe(), batches, lambda x: x, "cpu", autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert seen == [(False, False), (False, True)]
