"""The experiment runner (`make compare`, `make sweep-*`) at a toy budget: the real runs take most of an hour."""

import csv
import json
from pathlib import Path

import pytest

from fracgen.dataset import Settings, render_dataset
from fracgen.errors import FracgenError
from fracgen.manifest import read_manifest
from train import experiments as E
from train.experiments import tables
from train.experiments.score_bases import correlate
from train.runtime import TrainError

TINY = E.Budget(steps=2, finetune_seeds=(0,), probe_seeds=(0,), finetune_steps=2,
                data=dict(classes=8, size=32, points=2000), precision="fp32")  # run folders named as on any CPU


def test_the_experiments_hold_the_runs_the_issue_asks_for():
    compare = E.EXPERIMENTS["compare"]()
    systems = [(r.data or {}).get("system", "1p-frac" if r.data else None) for r in compare]
    assert systems.count(None) == 1 and {"fractaldb", "real", "noise"} <= set(systems)
    assert sorted(r.data["seed"] for r in compare if r.group == "1p-frac, sigma 3.5, Delta 0.1") == [0, 1, 2]
    assert any(r.data and r.data.get("delta") == 0.001 for r in compare)
    deltas = (0.001, 0.01, 0.05, 0.1, 0.2)
    assert [r.x for r in E.EXPERIMENTS["sweep-delta"]() if r.data] == [d for d in deltas for _ in E.BASES]
    assert [r.x for r in E.EXPERIMENTS["sweep-sigma"]() if r.data] == [s for s in (3.5, 4.5, 5.5) for _ in E.BASES]
    bases = [r for r in E.EXPERIMENTS["sweep-bases"]() if r.data]
    assert [r.x for r in bases] == [1000, 100, 10, 1] and all(E.DATA["classes"] % r.x == 0 for r in bases)
    slugs = [r.slug for name in E.EXPERIMENTS for r in E.EXPERIMENTS[name]()]
    # a run shared by two experiments has one slug (one folder, run once); different runs never share one
    by_slug = {}
    for name in E.EXPERIMENTS:
        for r in E.EXPERIMENTS[name]():
            settings = None if r.data is None else vars(Settings(**{**E.DATA, **r.data}))
            by_slug.setdefault(r.slug, set()).add(json.dumps(settings, sort_keys=True, default=str))
    assert all(len(v) == 1 for v in by_slug.values()) and len(set(slugs)) < len(slugs)


@pytest.mark.slow  # ~30 s: three fine-tunings and probes over all 1797 digits
def test_runs_write_rows_tables_and_reuse_what_is_done(tmp_path):
    runs = [E.EXPERIMENTS["compare"]()[0], E.Run("noise", {"system": "noise", "seed": 0}, "noise")]
    rows = [E.execute(r, tmp_path, TINY, log=lambda _: None) for r in runs]
    scratch, noise = rows
    assert "pretext_top1" not in scratch and len(scratch["finetune_seeds"]) == 1
    assert noise["first_loss"] > 0 and 0 <= noise["pretext_top1"] <= 100 and noise["chance"] == pytest.approx(12.5)
    assert 0 <= noise["finetune_top1"] <= 100 and 0 <= noise["probe_top1"] <= 100 and noise["pretrain_s"] > 0
    ckpt = tmp_path / f"{runs[1].slug}-steps2" / "pretrain" / "ckpt.pt"
    before = ckpt.stat().st_mtime_ns
    again = E.execute(runs[1], tmp_path, TINY, log=lambda _: None)
    assert again == noise and ckpt.stat().st_mtime_ns == before  # nothing was trained again

    grouped = tables.groups(rows)
    assert [g["group"] for g in grouped] == ["none (scratch)", "noise"]
    tables.write_csv(tmp_path / "t.csv", rows)
    with open(tmp_path / "t.csv") as f:
        read = list(csv.DictReader(f))
    assert [r["label"] for r in read] == [r["label"] for r in rows]
    text = tables.markdown("compare", rows, grouped, 60.0, "make compare")
    assert text.count("\n| ") == 1 + len(rows) and "1.0 minutes" in text
    pytest.importorskip("matplotlib")
    assert tables.plot("compare", rows, grouped, tmp_path / "t.png") and (tmp_path / "t.png").stat().st_size > 1000


def test_an_unknown_experiment_is_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "train.experiments", "sweep-everything"], capture_output=True,
                       text=True, cwd=tmp_path, env={"PYTHONPATH": str(Path(E.__file__).parents[2])})
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: unknown experiment 'sweep-everything'; choose one of compare, control, score-bases, sweep-bases, "
        "sweep-delta, sweep-resolution, sweep-sigma, which-base, which-base-held-out"]


def test_a_setting_at_its_default_names_the_same_run():
    # sweep-delta's Delta 0.1 and sweep-sigma's sigma 3.5 are compare's runs, reused, not run again
    compare_slugs = {r.slug for r in E.EXPERIMENTS["compare"]()}
    delta = {r.x: r.slug for r in E.EXPERIMENTS["sweep-delta"]() if r.x is not None}
    sigma = {r.x: r.slug for r in E.EXPERIMENTS["sweep-sigma"]() if r.x is not None}
    assert {r.slug for r in E.EXPERIMENTS["sweep-delta"]() if r.x == 0.1} <= compare_slugs
    assert {r.slug for r in E.EXPERIMENTS["sweep-sigma"]() if r.x == 3.5} <= compare_slugs
    assert delta[0.2] not in compare_slugs and sigma[5.5] not in compare_slugs


def _row(run: E.Run, top1: float) -> dict:
    return {"label": run.label, "group": run.group, "x": run.x, "slug": run.slug, "steps": 2, "finetune_top1": top1,
            "finetune_std": 1.0, "finetune_seeds": [top1], "finetune_recipe": "adamw", "probe_top1": 50.0,
            "probe_std": 0.0, "probe_splits": [50.0]} | ({} if run.data is None else {
        "first_loss": 6.9, "last_loss": 6.5, "pretext_top1": 0.5, "chance": 0.1, "pretrain_s": 60.0})


def test_finished_only_tabulates_finished_runs_and_starts_nothing(tmp_path, capsys):
    budget = E.Budget(steps=2)
    runs = E.EXPERIMENTS["sweep-delta"]()
    scratch, first = runs[0], runs[1]
    for run, top1 in ((scratch, 78.0), (first, 70.0)):
        run.folder(tmp_path, budget).mkdir(parents=True)
        (run.folder(tmp_path, budget) / "row.json").write_text(json.dumps(_row(run, top1)))
    half_done = runs[2].folder(tmp_path, budget) / "pretrain"  # a run that died: --finished-only must not resume it
    half_done.mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rows = E.run_experiment("sweep-delta", tmp_path, tmp_path / "results", budget, finished_only=True)
    assert [r["finetune_top1"] for r in rows] == [78.0, 70.0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "results" not in p.parts) == before
    assert capsys.readouterr().out.count("not finished: left out") == len(runs) - 2
    with open(tmp_path / "results" / "sweep-delta.csv") as f:
        assert [r["label"] for r in csv.DictReader(f)] == [scratch.label, first.label]
    assert "digits 10-shot, 1 seed(s)." in (tmp_path / "results" / "sweep-delta.md").read_text()


def test_finished_only_with_nothing_finished_is_one_line(tmp_path):
    with pytest.raises(TrainError, match="no finished run of compare at 2 steps under"):
        E.run_experiment("compare", tmp_path, tmp_path / "results", E.Budget(steps=2), finished_only=True)


@pytest.mark.slow  # ~40 s: two toy runs in spawned processes
def test_jobs_run_side_by_side_and_a_failed_run_does_not_lose_the_others(tmp_path, monkeypatch):
    noise = E.Run("noise", {"system": "noise", "seed": 0}, "noise")
    bad = E.Run("bad", {"system": "no-such-system", "seed": 0}, "bad")
    runs = [E.EXPERIMENTS["compare"]()[0], noise]
    monkeypatch.setitem(E.EXPERIMENTS, "tiny", lambda: runs)
    rows = E.run_experiment("tiny", tmp_path, tmp_path / "results", TINY, jobs=2)
    assert [r["label"] for r in rows] == ["none (scratch)", "noise"] and rows[1]["device"].startswith("CPU")
    for run, row in zip(runs, rows, strict=True):
        folder = run.folder(tmp_path, TINY)
        assert "finetune: digits" in (folder / "log.txt").read_text()  # each run its own log
        assert json.loads((folder / "row.json").read_text()) == row
    monkeypatch.setitem(E.EXPERIMENTS, "tiny", lambda: [bad, E.Run("noise 1", {"system": "noise", "seed": 1})])
    with pytest.raises(FracgenError, match="unknown --system 'no-such-system'"):
        E.run_experiment("tiny", tmp_path, tmp_path / "results", TINY, jobs=2)
    assert (E.Run("noise 1", {"system": "noise", "seed": 1}).folder(tmp_path, TINY) / "row.json").exists()


def test_jobs_below_one_is_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "train.experiments", "compare", "--jobs", "0"], capture_output=True,
                       text=True, cwd=tmp_path, env={"PYTHONPATH": str(Path(E.__file__).parents[2])})
    assert r.returncode == 1 and r.stderr.strip() == "error: --jobs must be at least 1, got 0"


def test_score_bases_draws_its_bases_by_seed_and_correlates_each_runs_own_data(tmp_path):
    """score-bases holds >= 12 bases drawn by seed (and base A); `correlate` scores every pre-trained run's own data:
    with each run's pretext top-1 set to its own separation, that measure's Spearman correlation must be exactly 1."""
    runs = E.EXPERIMENTS["score-bases"]()
    assert sorted(r.data["seed"] for r in runs if r.data and "base" not in r.data) == list(range(16))
    assert sum(r.data is None for r in runs) == 1 and any(r.key == "base-a" for r in runs)
    from fracgen import score

    rows = [{"label": "none (scratch)", "slug": "scratch", "finetune_top1": 70.0}]
    for run in [r for r in runs if r.data and "base" not in r.data][:4]:
        render_dataset(tmp_path / "data" / run.data_slug, Settings(**{**TINY.data, "classes": 12, **run.data}))
        manifest = read_manifest(tmp_path / "data" / run.data_slug)
        separation = score.score(manifest, (32,))[0]["separation"]
        rows.append({"label": run.label, "slug": run.slug, "pretext_top1": separation, "finetune_top1": 50.0})
    table = {t["measure"]: t for t in correlate(rows, tmp_path, TINY, tmp_path / "results")}
    assert table["separation"]["pretext_top1"] == pytest.approx(1.0)
    assert table["separation"]["finetune_top1"] is None  # a constant column has no rank correlation
    text = (tmp_path / "results" / "score-bases-correlation.md").read_text()
    assert "| separation | 1.00 |" in text and "predicts" in text and "none." in text  # 4 runs are not 12
    assert len(list(csv.DictReader(open(tmp_path / "results" / "score-bases-correlation.csv")))) == 4


def test_a_run_folder_names_its_arithmetic_when_it_is_not_the_devices_old_default(monkeypatch):
    """Rows kept from before --precision (fp32 on a CPU, bf16 on CUDA) keep their folders; the other arithmetic is
    another run, never reused for this one."""
    import dataclasses

    from train.experiments import runner

    run = E.Run("noise", {"system": "noise", "seed": 0}, "noise")
    fp32, bf16 = (dataclasses.replace(TINY, precision=p) for p in ("fp32", "bf16"))
    monkeypatch.setattr(runner, "device_kind", lambda: "cpu")
    assert run.folder(Path("R"), fp32).name == "seed0-systemnoise-steps2"
    assert run.folder(Path("R"), bf16).name == "seed0-systemnoise-steps2-bf16"
    assert runner.rate_table(bf16) == "cpu-bf16" and runner.rate_table(fp32) == "cpu"
    assert E.RATES["cpu-bf16"][32].pretrain > E.RATES["cpu"][32].pretrain
    monkeypatch.setattr(runner, "device_kind", lambda: "cuda")
    assert run.folder(Path("R"), bf16).name == "seed0-systemnoise-steps2"
    assert run.folder(Path("R"), fp32).name == "seed0-systemnoise-steps2-fp32"
    assert runner._command("compare", dataclasses.replace(E.experiment_budget("compare"), precision="fp32"), 1,
                           0.0) == "make compare PRECISION=fp32"
    rows = [{"device": "CPU, 2 cores"}, {"device": "NVIDIA H200"}, {"device": "CPU, 2 cores", "precision": "bf16"}]
    assert tables.precisions(rows[:1]) == "fp32" and tables.precisions(rows) == "bf16, fp32"


def test_a_toy_budget_changes_the_data_sets_size_in_classes_and_points_only(tmp_path):
    """`--toy` once replaced an experiment's data settings whole: 2,000 points at the default 512 px, which no base
    passes --fill with. Its class count and points go over the experiment's data now, and every toy data set
    renders."""
    from fracgen.dataset import Settings, render_dataset

    for name in E.EXPERIMENTS:
        budget = E.experiment_budget(name, toy=True)
        assert budget.data == {**E.experiment_budget(name).data, "classes": 8, "points": 2000}, name
        assert (budget.steps, budget.finetune_seeds) == (2, (0,))
    budget = E.experiment_budget("compare", toy=True)
    run = next(r for r in E.EXPERIMENTS["compare"]() if r.data is not None)
    manifest = render_dataset(tmp_path / "toy", Settings(**{**budget.data, **run.data}), workers=1)
    assert manifest["complete"] and manifest["image"]["size"] == 128
