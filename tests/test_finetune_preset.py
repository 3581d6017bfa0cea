"""train.finetune's `--preset paper`: the official fine-tuning script (finetuning.sh, docs/design.md section 7) as a
preset."""

import json

import pytest
import torch
from timm.optim import create_optimizer_v2
from typer.testing import CliRunner

from train import finetune as F
from train.downstream import Digits


def _lrs(cfg: F.Config, batch: int, steps: list[int]) -> list[float]:
    optimizer = create_optimizer_v2(torch.nn.Linear(2, 2), cfg.opt, lr=F.learning_rates(cfg, batch)[0], momentum=0.9)
    scheduler = F.build_scheduler(cfg, optimizer, batch)
    out = []
    for step in steps:
        scheduler.step_update(step)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_the_paper_preset_follows_the_official_schedule():
    # finetuning.sh at 8 x 96 = 768: lr 0.01 x 768 / 512 = 0.015, warm-up from 1.5e-6 over 650 steps, cosine to 1.5e-5
    cfg = F.Config(**F.PRESETS["paper"])
    assert (cfg.steps, cfg.batch, cfg.opt, cfg.weight_decay, cfg.drop_path) == (65_000, 768, "sgd", 1e-4, 0.1)
    start, peak, mid, end = _lrs(cfg, 768, [0, 650, 650 + (65_000 - 650) // 2, 65_000])
    assert start == pytest.approx(1.5e-6) and peak == pytest.approx(0.015) and end == pytest.approx(1.5e-5)
    assert mid == pytest.approx((0.015 + 1.5e-5) / 2, rel=1e-3)  # half way down the cosine
    # timm's "sgd" is Nesterov's, as the official script's
    assert create_optimizer_v2(torch.nn.Linear(2, 2), "sgd", lr=0.1, momentum=0.9).param_groups[0]["nesterov"]
    # on 10-shot digits the batch is the 100 training images, and every lr follows it
    assert F.learning_rates(cfg, 100) == pytest.approx((0.01 * 100 / 512, 1e-6 * 100 / 512, 1e-5 * 100 / 512))


def test_the_default_schedule_is_unchanged():
    # what every CPU result in docs/results.md was fine-tuned with: warm-up from lr / 100, cosine to 0
    assert _lrs(F.Config(), 64, [0, 30, 300]) == pytest.approx([1e-5, 1e-3, 0.0])


def test_the_paper_preset_evaluates_on_a_centre_crop_that_scales_with_the_resolution():
    cfg = F.Config(**F.PRESETS["paper"])
    for img, resize in ((224, 256), (112, 128), (32, 36)):
        tf = F.test_transform(cfg, img)
        assert (tf.transforms[0].size, tf.transforms[1].size) == (resize, (img, img))
    image = Digits()[0][0]
    cropped, whole = F.test_transform(cfg, 32)(image), F.test_transform(F.Config(), 32)(image)
    assert cropped.shape == whole.shape == (3, 32, 32) and not torch.equal(cropped, whole)


def test_the_paper_preset_on_the_command_line_and_an_option_given_wins(tmp_path):
    r = CliRunner().invoke(F.app, ["--checkpoint", "none", "--preset", "paper", "--steps", "2", "--seeds", "0",
                                   "--depth", "1", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.exception
    assert "2 steps at batch 100, sgd lr 1.95e-03 (blr 0.01 x 100 / 512), preset paper" in r.output
    result = json.loads((tmp_path / "results.json").read_text())
    cfg = result["config"]
    assert (cfg["steps"], cfg["batch"], cfg["drop_path"], cfg["randaug"], cfg["cutmix"]) == (
        2, 768, 0.1, "rand-m9-mstd0.5-inc1", 1.0)
    assert result["batch_used"] == 100 and cfg["crop_pct"] == pytest.approx(0.875)


def test_an_unknown_preset_is_a_user_error():
    r = CliRunner().invoke(F.app, ["--checkpoint", "none", "--preset", "deit"])
    assert isinstance(r.exception, F.TrainError) and str(r.exception) == "unknown --preset 'deit'; choose from " \
        "default, paper"


# --- train/finetune.py's decisions in this process, values worked out by hand (issue 39) --------------------------

def test_learning_rates_scale_with_the_batch_used_per_512_images():
    cfg = F.Config(blr=0.01, warmup_blr=1e-6, min_blr=1e-5)
    assert F.learning_rates(cfg, 768) == pytest.approx((0.015, 1.5e-6, 1.5e-5))
    assert F.learning_rates(F.Config(blr=0.008), 64) == pytest.approx((0.001, 0.00001, 0.0))  # lr / 100, floor 0


def test_the_schedule_warms_up_linearly_reaches_the_peak_and_ends_at_the_floor():
    cfg = F.Config(blr=0.512, warmup_blr=0.0512, min_blr=0.00512, warmup_steps=10, steps=110)
    lr, warm, floor = F.learning_rates(cfg, 512)
    got = _lrs(cfg, 512, [0, 5, 10, 60, 110])
    assert got[0] == pytest.approx(warm) and got[1] == pytest.approx(warm + (lr - warm) / 2)
    assert got[2] == pytest.approx(lr) and got[3] == pytest.approx((lr + floor) / 2) and got[4] == pytest.approx(floor)
    short = F.Config(blr=0.512, warmup_steps=30, steps=10)  # warm-up capped at half the run: a cosine phase remains
    assert _lrs(short, 512, [5])[0] == pytest.approx(0.512)


def test_the_batch_is_every_training_image_when_fewer_and_even_under_mixing():
    assert F.batch_used(F.Config(batch=64), 100) == 64
    assert F.batch_used(F.Config(batch=768), 101) == 101
    assert F.batch_used(F.Config(batch=768, mixup=0.8), 101) == 100
    assert F.batch_used(F.Config(batch=768, cutmix=1.0), 101) == 100
    assert F.batch_used(F.Config(batch=63, mixup=0.8), 100) == 62


def test_the_optimizers_are_adamw_or_the_papers_nesterov_sgd_at_the_scaled_lr():
    model = torch.nn.Linear(2, 2)
    adamw = F.build_optimizer(F.Config(blr=0.008, weight_decay=0.05), model, 128)
    assert type(adamw).__name__ == "AdamW" and adamw.param_groups[0]["lr"] == pytest.approx(0.002)
    sgd = F.build_optimizer(F.Config(opt="sgd", blr=0.01, weight_decay=1e-4), model, 512)
    group = sgd.param_groups[0]
    assert type(sgd).__name__ == "SGD" and group["momentum"] == 0.9 and group["nesterov"]
    assert group["lr"] == pytest.approx(0.01) and max(g["weight_decay"] for g in sgd.param_groups) == 1e-4


def test_fine_tuning_starts_from_the_checkpoints_body_with_a_new_head():
    from train.model import create

    args = {"img_size": 32, "patch_size": 8, "depth": 1}
    torch.manual_seed(0)
    source = create("vit_tiny_patch16_224", 7, args)
    pretrained = ("vit_tiny_patch16_224", args, 7, source.state_dict())
    model = F.init_model(F.Config(drop_path=0.1), pretrained, 10)
    assert model.head.out_features == 10
    assert torch.equal(model.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    scratch = F.init_model(F.Config(img_size=32, patch_size=8, depth=2), None, 10)
    assert scratch.head.out_features == 10 and len(scratch.blocks) == 2 and scratch.patch_embed.img_size == (32, 32)


def test_evaluation_resizes_whole_or_crops_the_centre_as_timm_does():
    from PIL import Image

    image = Image.new("L", (64, 48), 0).convert("RGB")
    whole = F.test_transform(F.Config(crop_pct=1.0), 32)(image)
    cropped = F.test_transform(F.Config(crop_pct=224 / 256), 224)
    assert whole.shape == (3, 32, 32) and cropped(image).shape == (3, 224, 224)
    assert cropped.transforms[0].size == 256  # resize to img_size / crop_pct, then the centre img_size


def test_digits_are_cropped_less_and_never_mirrored_unless_asked():
    assert F.crop_and_flip(F.Config(dataset="digits")) == ((0.35, 1.0), False)
    assert F.crop_and_flip(F.Config(dataset="cifar10")) == ((0.08, 1.0), True)
    assert F.crop_and_flip(F.Config(dataset="digits", crop_scale=(0.5, 0.9), flip=True)) == ((0.5, 0.9), True)
    assert F.crop_and_flip(F.Config(dataset="cifar100", flip=False)) == ((0.08, 1.0), False)


def test_label_smoothing_spreads_its_share_over_every_class_and_rows_sum_to_one():
    import torch
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    y = torch.tensor([0, 3, 2])
    target = F.smoothed(y, 4, 0.1)
    assert torch.allclose(target[1], torch.tensor([0.025, 0.025, 0.025, 0.925]))
    assert torch.allclose(target.sum(1), torch.ones(3))
    assert torch.equal(F.smoothed(y, 4, 0.0), torch.nn.functional.one_hot(y, 4).float())
    logits = torch.randn(3, 4)  # the same loss as timm's own label-smoothing cross-entropy
    assert torch.allclose(SoftTargetCrossEntropy()(logits, target), LabelSmoothingCrossEntropy(0.1)(logits, y))
