"""`fracgen-train experiments NAME`: run one experiment and write its tables and plots (train/experiments/)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from fracgen.errors import FracgenError

from .. import finetune as finetune_lib
from ..runtime import TrainError, run_cli
from ..step import PRECISIONS
from . import EXPERIMENTS, experiment_budget, run_experiment, runner_options
from .runner import STEPS
from .sweep_resolution import BUDGET as RESOLUTION_BUDGET
from .sweep_resolution import NETWORKS, sweep_resolution

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    name: Annotated[str, typer.Argument(help=f"one of {', '.join(EXPERIMENTS)}")],
    root: Annotated[Path | None, typer.Option(help="where runs and their data are kept (and reused); default "
                                                   "runs/experiments (--toy: runs/experiments-toy)")] = None,
    results: Annotated[Path | None, typer.Option(help="where the CSV, markdown and PNG go, and every finished run's "
                                                      "row (RESULTS/rows/, reused by later calls); default "
                                                      "docs/results (--toy: ROOT/results)")] = None,
    steps: Annotated[int | None, typer.Option(help=f"pre-training steps per run (default {STEPS}; sweep-resolution "
                                                   f"{RESOLUTION_BUDGET['steps']})")] = None,
    finished_only: Annotated[bool, typer.Option(help="tabulate the runs already finished, run nothing new")] = False,
    jobs: Annotated[int | None, typer.Option(help="runs at a time, each in its own process (a GPU fits several; "
                                                  "default 1, sweep-resolution 12)")] = None,
    time_box: Annotated[float | None, typer.Option(help="minutes: start a run only if the rate table says it ends "
                                                        "inside them (default none; sweep-resolution 8)")] = None,
    finetune_steps: Annotated[int | None, typer.Option(help="fine-tuning steps per seed (default 300; "
                                                            "sweep-resolution 200)")] = None,
    finetune_preset: Annotated[str | None, typer.Option(help="fracgen-train finetune's --preset for every run "
                                                              "(default default; sweep-resolution paper)")] = None,
    resolutions: Annotated[str | None, typer.Option(help="sweep-resolution: a subset of 32,64,112,224")] = None,
    precision: Annotated[str, typer.Option(help="pre-training's and fine-tuning's arithmetic: auto (bf16 on CUDA and "
                                                "on CPUs with bf16 units), bf16 or fp32; a run folder is named by it")]
    = "auto",
    toy: Annotated[bool, typer.Option(help="a rehearsal at toy size: 8 classes, 2 steps, 1 seed, 1 split")] = False,
):
    """Run one of the paper's comparisons and write its tables and plots (at CPU scale; sweep-resolution on a GPU)."""
    if name not in EXPERIMENTS:
        raise TrainError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    for option, value in (("steps", steps), ("jobs", jobs), ("finetune-steps", finetune_steps)):
        if value is not None and value < 1:
            raise TrainError(f"--{option} must be at least 1, got {value}")
    if finetune_preset is not None and finetune_preset not in finetune_lib.PRESETS:
        raise TrainError(f"unknown --finetune-preset {finetune_preset!r}; choose from "
                         f"{', '.join(finetune_lib.PRESETS)}")
    if precision not in PRECISIONS:
        raise TrainError(f"unknown --precision {precision!r}; choose {', '.join(PRECISIONS)}")
    if time_box is not None and time_box < 0:
        raise TrainError(f"--time-box must not be negative, got {time_box:g}")
    runs = None
    if resolutions is not None:
        if name != "sweep-resolution":
            raise TrainError("--resolutions is sweep-resolution's option")
        try:
            chosen = tuple(int(r) for r in resolutions.split(","))
        except ValueError:
            chosen = ()
        if not chosen or not set(chosen) <= set(NETWORKS):
            raise TrainError(f"--resolutions {resolutions!r}: choose from {','.join(map(str, sorted(NETWORKS)))}")
        runs = sweep_resolution(tuple(r for r in NETWORKS if r in chosen))
    budget = experiment_budget(name, toy)
    budget = dataclasses.replace(budget, steps=steps or budget.steps,
                                 finetune_steps=finetune_steps or budget.finetune_steps,
                                 finetune_preset=finetune_preset or budget.finetune_preset, precision=precision)
    options = runner_options(name)
    # a toy's 8-class data sets must never sit where a real run would find and reuse them
    root = root or Path("runs/experiments-toy" if toy else "runs/experiments")
    results = results or (root / "results" if toy else Path("docs/results"))
    for option, folder in (("--root", root), ("--results", results)):
        if folder.exists() and not folder.is_dir():
            raise TrainError(f"{option} {folder} is a file, not a folder")
    try:
        run_experiment(name, root, results, budget, finished_only, jobs or options.get("jobs", 1),
                       options.get("time_box", 0.0) if time_box is None else time_box, runs)
    except FracgenError as e:
        raise TrainError(str(e)) from None


if __name__ == "__main__":
    run_cli(app)
