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
