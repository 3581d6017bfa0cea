"""`make which-base` (issue 32): its runs are make pretrain's recipe on bases drawn by seed, and its measures are
what they say they are (each checked on an input whose answer is known)."""

import csv
import json

import numpy as np
import pytest

from fracgen.dataset import Settings, render_dataset
from fracgen.manifest import read_manifest
from train import experiments as E
from train import pretrain as pretrain_lib
from train.experiments import which_base as W


def test_the_runs_are_make_pretrains_recipe_on_twelve_bases_drawn_by_seed_and_four_held_out():
    runs = E.EXPERIMENTS["which-base"]()
    assert runs[0].data == {"seed": 4}  # make pretrain's base first: its row is make pretrain + make finetune
    assert sorted(r.data["seed"] for r in runs if r.data) == list(range(12)) and sum(r.data is None for r in runs) == 1
    assert sorted(r.data["seed"] for r in E.EXPERIMENTS["which-base-held-out"]()) == [12, 13, 14, 15]
    budget = E.experiment_budget("which-base")
    cfg = pretrain_lib.Config()
    assert (budget.steps, budget.log_every, budget.data) == (cfg.steps, cfg.log_every, E.DATA)
    assert all(r.model is None for r in runs)  # the CPU preset's network, as make pretrain trains it


def test_box_dimension_of_a_filled_square_a_line_and_a_point():
    square, line, point = np.zeros((32, 32)), np.zeros((32, 32)), np.zeros((32, 32))
    square[:, :] = 1
    line[16, :] = 1
    point[3, 3] = 1
    assert W.box_dimension(square) == pytest.approx(2.0)
    assert W.box_dimension(line) == pytest.approx(1.0)
    assert W.box_dimension(point) == pytest.approx(0.0, abs=1e-9)


def test_spearman_and_its_permutation_p():
    xs = list(range(12))
    rho, p = W.spearman(xs, [x * x for x in xs])  # monotone: rank correlation 1 whatever the shape
    assert rho == pytest.approx(1.0) and p < 0.001
    rho, p = W.spearman(xs, [-x for x in xs])
    assert rho == pytest.approx(-1.0) and p < 0.001
    rng = np.random.default_rng(1)
    rho, p = W.spearman(xs, list(rng.permutation(12)))
    assert abs(rho) < 0.8 and p > 0.01
    assert W.spearman([1, 2], [3, 4]) == (None, None) and W.spearman([1, 1, 1], [1, 2, 3]) == (None, None)


def test_the_trial_is_the_drop_from_the_first_window_to_step_200():
    assert W.trial({"first_loss": 6.9, "losses": {"50": 6.9, "200": 6.4}}) == pytest.approx(0.5)
    assert W.trial({"first_loss": 6.9, "losses": {"50": 6.9}}) is None  # a run logged without step 200


def test_a_crop_box_lies_inside_the_image_at_the_pretrainings_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, x1, y1 = W._crop_box(128, rng)
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        assert W.SCALE[0] * 128 * 128 * 0.999 <= (x1 - x0) * (y1 - y0) <= 128 * 128 * 1.001


def test_the_report_measures_each_runs_own_data_and_checks_the_held_out_sign(tmp_path):
    """With each run's pretext top-1 set to its own box dimension, that measure's rho is exactly 1: the report reads
    every run's own data. The held-out report says whether each measure keeps the twelve's sign."""
    budget = E.Budget(steps=2, data=dict(classes=12, size=64, points=5000), precision="fp32")
    rows = [{"label": "none (scratch)", "slug": "scratch", "finetune_top1": 70.0}]
    for seed in (0, 1, 2, 3):
        slug = f"seed{seed}"
        render_dataset(tmp_path / "data" / slug, Settings(**{**budget.data, "seed": seed}))
        measured = W.data_measures(read_manifest(tmp_path / "data" / slug))
        rows.append({"label": f"1p-frac, base seed {seed}", "slug": slug, "x": seed, "first_loss": 7.0,
                     "losses": {"200": 7.0 - seed / 10}, "pretext_top1": measured["box_dimension"],
                     "finetune_top1": 50.0 - seed, "device": "CPU, 2 cores", "precision": "fp32"})
    table = {t["measure"]: t for t in W.report("which-base", rows, tmp_path, budget, tmp_path / "results")}
    assert table["box_dimension"]["pretext_top1"] == pytest.approx(1.0)
    assert table["lpce_drop_200"]["finetune_top1"] == pytest.approx(-1.0)  # the drop grows as fine-tuned falls
    text = (tmp_path / "results" / "which-base-measures.md").read_text()
    assert "| box_dimension | 1.00 (p " in text and "too few bases" in text
    assert len(list(csv.DictReader(open(tmp_path / "results" / "which-base-measures.csv")))) == 4
    reference = json.loads((tmp_path / "results" / "which-base-correlations.json").read_text())
    flipped = [{**t, "pretext_top1": -t["pretext_top1"]} if t["measure"] == "box_dimension" else t for t in reference]
    W.report("which-base-held-out", rows, tmp_path, budget, tmp_path / "results", flipped)
    held = (tmp_path / "results" / "which-base-held-out-measures.md").read_text()
    assert "keeps the twelve's sign" in held
    line = next(x for x in held.splitlines() if x.startswith("| box_dimension |"))
    assert line.rstrip(" |").endswith("no, yes")  # the reference's pretext sign was flipped, its fine-tuned one kept
