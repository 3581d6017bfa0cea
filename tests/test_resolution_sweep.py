"""`make sweep-resolution` (issue 21): its runs, the plan and time box, rows kept in the results. The GPU run itself
is not part of the tests; the device script is rehearsed at toy size in the slow test at the end."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from train import experiments as E
from train.experiments import runner
from train.experiments.__main__ import app as experiments_app
from train.experiments.sweep_resolution import sweep_resolution
from train.runtime import TrainError

REPO = Path(__file__).parents[1]


def test_sweep_resolution_holds_the_runs_the_issue_asks_for(monkeypatch):
    runs = E.EXPERIMENTS["sweep-resolution"]()
    assert [r.x for r in runs] == [res for res in (224, 112, 64, 32) for _ in range(6)]  # largest first
    for res in (32, 64, 112, 224):
        at = [r for r in runs if r.x == res]
        assert {r.series for r in at} == {"1p-frac, Delta 0.1", "1p-frac, Delta 0.001", "FractalDB-style 1000 x 1",
                                          "none (scratch)"}
        assert sorted(r.data["seed"] for r in at if r.series == "1p-frac, Delta 0.1") == [0, 1, 2]
        assert all(r.model["img_size"] == res for r in at)
        assert all(r.model["depth"] == 12 for r in at) == (res >= 112)  # the full ViT-Tiny at 112 and 224 px
        # the paper's rendering for every resolution: one data set per system, shared by the four resolutions
        assert all(r.data is None or (r.data["size"], r.data["points"]) == (512, 100_000) for r in at)
    data = {r.data_slug for r in runs if r.data}
    assert len(data) == 5 and len({r.slug for r in runs}) == len(runs)
    # never the CPU default's 128 px data under the same name
    assert not data & {r.slug for r in E.EXPERIMENTS["compare"]()}
    budget = dataclasses.replace(E.experiment_budget("sweep-resolution"), precision="bf16")  # the GPU's arithmetic
    monkeypatch.setattr(runner, "device_kind", lambda: "cuda")
    folders = {r.folder(Path("R"), budget).name for r in runs}
    assert len(folders) == 24 and all(f.endswith("-steps1500-ftpaper200") for f in folders)
    cfg = E.finetune_config(budget)
    assert (cfg.preset, cfg.steps, cfg.warmup_steps, cfg.opt) == ("paper", 200, 2, "sgd")  # warm-up keeps its 1%


def test_the_planner_packs_runs_into_slots_and_leaves_out_what_would_end_late():
    assert E.plan([5, 3, 3, 3], jobs=2, seconds=7) == [(0, 5), (0, 3), (3, 6), None]
    # a run left out keeps its slot free for the next one
    assert E.plan([10, 2, 2], jobs=1, seconds=5) == [None, (0, 2), (2, 4)]


def test_the_default_sweep_fits_its_time_box_on_one_h200_by_the_rate_table():
    # the plan in docs/results.md: 24 runs, 12 side by side, all inside 8 minutes by the estimates
    runs, budget = E.EXPERIMENTS["sweep-resolution"](), E.experiment_budget("sweep-resolution")
    seconds = [E.estimate(r, budget, "cuda") for r in runs]
    options = E.runner_options("sweep-resolution")
    slots = E.plan(seconds, options["jobs"], options["time_box"] * 60)
    assert all(slots) and 360 < max(end for _, end in slots) < 480
    by_label = dict(zip((r.label for r in runs), seconds, strict=True))
    assert by_label["none (scratch), 224 px"] < by_label["FractalDB-style, 1000 fractals x 1 image, 224 px"]
    # on the 2-core VM, 12 side by side, nothing of it fits in 8 minutes: make sweep-resolution there starts nothing
    assert min(E.estimate(r, budget, "cpu", share=2 / 24) for r in runs) > 8 * 60


def test_score_bases_fits_its_time_box_on_one_h200_by_the_rate_table():
    runs, budget = E.EXPERIMENTS["score-bases"](), E.experiment_budget("score-bases")
    slots = E.plan([E.estimate(r, budget, "cuda") for r in runs], E.runner_options("score-bases")["jobs"],
                   E.runner_options("score-bases")["time_box"] * 60)
    assert len(runs) == 18 and all(slots) and max(end for _, end in slots) < 8 * 60


def test_a_time_box_nothing_fits_in_is_one_line_and_starts_nothing(tmp_path):
    with pytest.raises(TrainError, match="none of the 24 runs of sweep-resolution fits in the 0.01-minute time box"):
        E.run_experiment("sweep-resolution", tmp_path / "runs", tmp_path / "results",
                         E.experiment_budget("sweep-resolution"), time_box=0.01)
    assert not (tmp_path / "runs").exists()


def test_a_row_kept_in_the_results_is_reused_without_its_run_folder(tmp_path, capsys):
    budget = E.experiment_budget("sweep-resolution")
    scratch = sweep_resolution((32,))[-1]
    row = {"label": scratch.label, "group": scratch.group, "x": 32, "series": scratch.series, "slug": scratch.slug,
           "steps": budget.steps, "network": scratch.model, "finetune_top1": 50.0, "finetune_std": 1.0,
           "finetune_seeds": [50.0], "finetune_recipe": "preset paper", "probe_top1": 40.0, "probe_std": 0.0,
           "probe_splits": [40.0]}
    rows_dir = tmp_path / "results" / "rows"
    rows_dir.mkdir(parents=True)
    (rows_dir / f"{scratch.folder(tmp_path, budget).name}.json").write_text(json.dumps(row))
    # another machine's call: no run folders, only the repository's results; it is finished, nothing runs
    rows = E.run_experiment("sweep-resolution", tmp_path / "runs", tmp_path / "results", budget, time_box=8,
                            runs=[scratch])
    assert rows == [row] and not (tmp_path / "runs").exists()
    assert "finished earlier" in capsys.readouterr().out
    md = (tmp_path / "results" / "sweep-resolution.md").read_text()
    assert "| none (scratch) | 50.0 / 40.0 / - |" in md and "ViT-Tiny at 32 px (patch 8, depth 6)" in md


def test_resolutions_are_sweep_resolutions_option_and_checked():
    for args, message in ((["compare", "--resolutions", "32"], "--resolutions is sweep-resolution's option"),
                          (["sweep-resolution", "--resolutions", "48"],
                           "--resolutions '48': choose from 32,64,112,224"),
                          (["sweep-resolution", "--finetune-preset", "deit"],
                           "unknown --finetune-preset 'deit'; choose from default, paper")):
        r = CliRunner().invoke(experiments_app, args)
        assert isinstance(r.exception, TrainError) and str(r.exception) == message


@pytest.mark.slow  # minutes on 2 cores: six toy runs at 32 px, two side by side, through the device script
def test_the_device_script_runs_the_sweep_at_toy_size(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "TOY": "1", "ROOT": str(tmp_path / "runs"),
           "RESULTS": str(tmp_path / "results"), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "docs/results/gpu/sweep_resolution.sh"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr
    log = (out / "sweep.log").read_text()
    assert "plan: 6 of 6 runs end inside the box" in log and "runner exit status 0" in log
    assert {p.name for p in out.iterdir()} == {"sweep.log", "sweep-resolution.md", "results.tgz", "logs.tgz"}
    assert len(list((tmp_path / "results" / "rows").glob("*.json"))) == 6
    md = (out / "sweep-resolution.md").read_text()
    assert "| FractalDB-style 1000 x 1 |" in md and "preset paper" in md
