"""The experiment runner: a run is one pipeline at one budget (render its data with fracgen, pre-train, fine-tune on
digits over seeds, probe the frozen features over splits); this module runs them, keeps what finished, plans them
into a time box and runs several side by side. The experiments themselves are one module each beside this one; they
state only what they run (`@experiment`), as `fracgen.systems` does for data systems.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from fracgen.dataset import Settings, available_cores, render_dataset
from fracgen.errors import FracgenError
from fracgen.manifest import read_manifest

from .. import finetune as finetune_lib
from .. import model as model_lib
from .. import pretrain as pretrain_lib
from .. import probe as probe_lib
from ..runtime import TrainError, atomic_save, atomic_write_json, seed_everything
from ..step import resolve_precision
from . import tables

DATA = dict(classes=1000, size=128, points=50_000)  # the CPU default's data (`make pretrain`)
BASELINE = Settings(**DATA)  # what a run's settings are compared with to name it
BASES = (0, 1, 2)  # base fractals drawn by --seed, not picked by hand
STEPS = 800  # pre-training budget per run: 800 x 128 = 102k samples, ~4 minutes on 2 cores


@dataclass(frozen=True)
class Run:
    label: str
    data: dict | None  # fracgen Settings fields over DATA; None: no pre-training (scratch)
    group: str = ""  # runs averaged together in a sweep (the 3 bases of one setting)
    x: float | None = None  # the swept value
    key: str = ""  # the run's folder name when its settings do not make a short one
    # pretrain Config fields over the CPU preset's network (img_size, patch_size, depth); also the scratch network
    model: dict | None = None
    series: str = ""  # the line a run belongs to in a plot over x (sweep-resolution: the data system)

    @property
    def slug(self) -> str:
        if not self.model:
            return self.data_slug
        m = self.model
        return f"{self.data_slug}-img{m['img_size']}-patch{m['patch_size']}-depth{m['depth']}"

    @property
    def data_slug(self) -> str:
        """The folder of the run's data under ROOT/data: runs that differ only in their network share it."""
        if self.key:
            return self.key
        if self.data is None:
            return "scratch"
        # a setting left at fracgen's default names the same run as leaving it out (Delta 0.1 in sweep-delta is
        # compare's run): without this, each sweep re-ran compare's 1p-frac runs under a second name
        items = {k: v for k, v in self.data.items() if k == "seed" or getattr(BASELINE, k, object()) != v}
        return "-".join(f"{k}{v}" for k, v in sorted(items.items())).replace("_", "")

    def folder(self, root: Path, budget: Budget) -> Path:
        # a fine-tuning recipe other than the default names other runs (their fine-tunes are other results), and so
        # does an arithmetic other than the device's before --precision (fp32 on a CPU, bf16 on CUDA): kept rows of
        # either stay valid, and a bf16 CPU run never reuses an fp32 one
        recipe = "" if budget.finetune_preset == "default" else f"-ft{budget.finetune_preset}{budget.finetune_steps}"
        return root / f"{self.slug}-steps{budget.steps}{recipe}{arithmetic_tag(budget)}"




def one_p_frac(group: str, x: float | None = None, **data) -> list[Run]:
    """1p-frac with these settings over the bases drawn by --seed 0, 1, 2 (one group of a sweep)."""
    return [Run(f"{group}, base seed {b}", {**data, "seed": b}, group, x) for b in BASES]


SCRATCH = Run("none (scratch)", None, "none (scratch)")


@dataclass
class Budget:
    steps: int = STEPS
    finetune_seeds: tuple[int, ...] = (0, 1, 2)
    finetune_steps: int = finetune_lib.Config.steps
    probe_seeds: tuple[int, ...] = (0, 1, 2)
    data: dict = field(default_factory=lambda: dict(DATA))
    finetune_preset: str = "default"  # train.finetune's --preset; its warm-up shrinks with finetune_steps
    precision: str = "auto"  # train.pretrain's and train.finetune's --precision (train.step.resolve_precision)
    log_every: int = 100  # pre-training's log (and metrics.jsonl) cadence: which-base reads LPCE at step 200


OLD_DEFAULT = {"cpu": "fp32", "cuda": "bf16"}  # each device's arithmetic before --precision existed


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def arithmetic_tag(budget: Budget) -> str:
    """A run folder's suffix for its arithmetic: none for the device's old default."""
    arithmetic = precision_of(budget)
    return "" if arithmetic == OLD_DEFAULT[device_kind()] else f"-{arithmetic}"


def precision_of(budget: Budget) -> str:
    """bf16 or fp32: what the budget's --precision resolves to on this machine."""
    import torch

    return resolve_precision(budget.precision, torch.device(device_kind()))[0]


# Per experiment, what differs from Budget(): sweep-resolution fits one H200 in 8 minutes (docs/results.md, "the


@dataclass
class Experiment:
    """One experiment: its runs, what its budget changes from Budget(), how `make NAME` runs it (jobs, time box),
    and what it adds after the tables (score-bases: the measures against the runs)."""

    name: str
    runs: Callable[[], list[Run]]
    budget: dict = field(default_factory=dict)
    runner: dict = field(default_factory=dict)
    after: Callable | None = None

    def __call__(self) -> list[Run]:
        return self.runs()


EXPERIMENTS: dict[str, Experiment] = {}


def experiment(name: str, budget: dict | None = None, runner: dict | None = None, after: Callable | None = None):
    """Register an experiment's `runs()` under `name` (the word `make NAME` and `fracgen-train experiments NAME`
    take)."""
    def register(runs: Callable[[], list[Run]]):
        EXPERIMENTS[name] = Experiment(name, runs, budget or {}, runner or {}, after)
        return runs
    return register


TOY = dict(steps=2, finetune_seeds=(0,), finetune_steps=2, probe_seeds=(0,), data=dict(classes=8, points=2000))


def experiment_budget(name: str, toy: bool = False) -> Budget:
    """The experiment's budget; with `toy`, TOY's over it, its data settings over the experiment's (TOY's points at
    the default 512 px could not pass --fill: only its class count and points change, not the image size)."""
    budget = dict(getattr(EXPERIMENTS.get(name), "budget", None) or {})
    if toy:
        budget.update({**TOY, "data": {**budget.get("data", DATA), **TOY["data"]}})
    return Budget(**budget)


def runner_options(name: str) -> dict:
    """What `make NAME` runs with when the options are not given (jobs, time_box)."""
    return getattr(EXPERIMENTS.get(name), "runner", None) or {}


def _timed(times: dict, key: str, fn):
    t0 = time.time()
    result = fn()
    times[key] = round(time.time() - t0, 1)
    times["device"] = _device()  # where the run's stages ran (their times mean nothing without it)
    return result


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {available_cores()} cores"


def execute(run: Run, root: Path, budget: Budget, log=print) -> dict:
    """Render, pre-train, fine-tune and probe one run, reusing whatever an earlier call finished."""
    folder = run.folder(root, budget)
    folder.mkdir(parents=True, exist_ok=True)
    times_file = folder / "times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    row = {"label": run.label, "group": run.group, "x": run.x, "slug": run.slug, "steps": budget.steps,
           "precision": precision_of(budget),
           **({"series": run.series} if run.series else {}), **({"network": run.model} if run.model else {})}
    checkpoint = "none"
    if run.data is not None:
        settings = Settings(**{**budget.data, **run.data})
        shards = root / "data" / run.data_slug
        if not (shards / "manifest.json").exists() or not read_manifest(shards)["complete"]:
            log(f"[{run.label}] render {shards}")
            _timed(times, "render_s", lambda: render_dataset(shards, settings, resume=(shards / "manifest.json")
                                                             .exists()))
        summary_file = folder / "pretrain" / "summary.json"
        if not summary_file.exists():
            log(f"[{run.label}] pre-train {budget.steps} steps")
            # the same call continues a pre-training an earlier call left unfinished (train.pretrain's contract)
            cfg = pretrain_lib.Config(shards=str(shards), out=str(folder / "pretrain"), steps=budget.steps,
                                      eval_every=0, log_every=budget.log_every, ckpt_every=budget.steps,
                                      precision=budget.precision, **(run.model or {}))
            _timed(times, "pretrain_s", lambda: pretrain_lib.pretrain(cfg))
        summary = json.loads(summary_file.read_text())
        row.update(first_loss=summary["first_loss"], last_loss=summary["last_loss"],
                   pretext_top1=summary["pretext_acc"], chance=summary["chance_acc"],
                   losses=logged_losses(folder / "pretrain" / "metrics.jsonl"))
        checkpoint = str(folder / "pretrain" / "ckpt.pt")
    finetune_file = folder / "finetune" / "results.json"
    if not finetune_file.exists():
        log(f"[{run.label}] fine-tune on digits, seeds {budget.finetune_seeds}")
        cfg = finetune_config(budget, checkpoint=checkpoint, out=str(folder / "finetune"),
                              **(run.model if run.data is None and run.model else {}))
        _timed(times, "finetune_s", lambda: finetune_lib.finetune(cfg))
    tuned = json.loads(finetune_file.read_text())
    probe_file = folder / "probe" / "probe.json"
    if not probe_file.exists():
        log(f"[{run.label}] linear probe")
        probed = checkpoint if run.data is not None or not run.model else _scratch_checkpoint(run, folder)
        _timed(times, "probe_s", lambda: probe_lib.probe(probed, seeds=budget.probe_seeds,
                                                         out=str(folder / "probe")))
    probed = json.loads(probe_file.read_text())
    atomic_write_json(times, times_file)
    row.update(finetune_top1=tuned["top1_mean"], finetune_std=tuned["top1_std"],
               finetune_seeds=list(tuned["top1"].values()), finetune_recipe=_recipe(tuned),
               probe_top1=probed["top1_mean"], probe_std=probed["top1_std"], probe_splits=list(probed["top1"].values()),
               **times)
    return row


def logged_losses(metrics: Path, up_to: int = 500) -> dict[str, float]:
    """{step: mean LPCE of its log window} for the windows up to `up_to`: the early curve a row keeps (which-base's
    trial reads step 200), without the rest of metrics.jsonl."""
    losses = {}
    for line in metrics.read_text().splitlines() if metrics.exists() else ():
        entry = json.loads(line)
        if "loss" in entry and isinstance(entry.get("step"), int) and entry["step"] <= up_to:
            losses[str(entry["step"])] = entry["loss"]
    return losses


def finetune_config(budget: Budget, **fields) -> finetune_lib.Config:
    """train.finetune's Config for the budget's preset and steps: a preset's warm-up keeps its share of the steps
    (the paper's 650 of 65,000: 1%), so a shortened run has the official schedule's shape."""
    preset = finetune_lib.PRESETS[budget.finetune_preset]
    warmup = preset.get("warmup_steps", finetune_lib.Config.warmup_steps)
    if "steps" in preset:
        warmup = max(1, round(warmup * budget.finetune_steps / preset["steps"]))
    return finetune_lib.Config(**{**preset, "steps": budget.finetune_steps, "warmup_steps": warmup,
                                  "seeds": budget.finetune_seeds, "preset": budget.finetune_preset,
                                  "precision": budget.precision, **fields})


def _scratch_checkpoint(run: Run, folder: Path) -> str:
    """The scratch network of another shape than the probe's default, initialised as train.probe initialises its
    own scratch network (seed 0, 10 classes), saved as a checkpoint the probe reads."""
    path = folder / "init" / "ckpt.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        seed_everything(0)
        args = model_lib.architecture_args(run.model["img_size"], run.model["patch_size"], run.model["depth"])
        model = model_lib.create(pretrain_lib.Config.model, 10, args)
        atomic_save({"model_name": pretrain_lib.Config.model, "model_args": args, "num_classes": 10,
                     "model": model.state_dict(), "step": 0, "config": {}}, path)
    return str(path)


def _recipe(tuned: dict) -> str:
    cfg = tuned["config"]
    preset = f"preset {cfg['preset']}: " if cfg.get("preset", "default") != "default" else ""
    batch = tuned.get("batch_used", cfg["batch"])  # the batch a small training set allows (10-shot digits: 100)
    return (f"{preset}{cfg['opt']} blr {cfg['blr']} wd {cfg['weight_decay']}, {cfg['steps']} steps at batch "
            f"{batch}, crop {cfg['crop_scale'] or 'default'}")



@dataclass(frozen=True)
class Rates:
    """What one run gets done per second while the other runs of a sweep run beside it."""

    pretrain: float  # pre-training samples/s
    finetune: float  # fine-tuning training images/s (PIL augmentation on one core, and the model's step)
    probe: float  # images/s through the frozen network (train.probe runs it on the CPU, one core with --jobs)
    fixed: float  # seconds: process start, data, the evaluations


# Planning rates by device and resolution (docs/results.md, "make sweep-resolution: the plan"). cuda: one H200 with
# ~12 runs side by side. Measured: 32 px pre-training (4,700 samples/s per run, 10 side by side); fine-tuning and
# probe per CPU core on the dev VM (the paper preset's augmentation 0.54 / 0.47 / 1.11 / 2.84 ms per image, the
# frozen forward 2.0 / 5.7 / 8.0 / 37.4 ms). Estimated, not measured: 64 px pre-training Python-bound like 32 px,
# 112 px with twice the blocks, 224 px the card's ~6,000 samples/s of ViT-Tiny at 224 px shared by 5 runs.
# cpu: the 2-core dev VM, one run at a time: 32 px measured (make compare), the others scaled by the forward cost.
RATES = {
    "cuda": {32: Rates(4700, 1850, 500, 20), 64: Rates(4000, 2100, 175, 20), 112: Rates(2500, 900, 125, 25),
             224: Rates(1200, 350, 27, 30)},
    "cpu": {32: Rates(400, 380, 900, 10), 64: Rates(140, 130, 320, 10), 112: Rates(100, 95, 225, 10),
            224: Rates(21, 20, 48, 10)},
}
# cpu-bf16: the 2-core AMD EPYC VM with bf16 autocast (AVX512-BF16). 32 px measured on make which-base's seed-4 run
# on a quiet machine (2026-12-04: pre-training 750-820 samples/s, each 300-step fine-tuning seed 27-28 s); the other
# resolutions scaled from the fp32 rates by bench.py's model-only speed-up at 32 px.
RATES["cpu-bf16"] = {32: Rates(750, 650, 900, 10),
                     **{px: Rates(r.pretrain * 1.5, r.finetune * 1.3, r.probe * 1.3, r.fixed)
                        for px, r in RATES["cpu"].items() if px != 32}}
DIGITS = 1797  # images the probe runs through the network (all of scikit-learn's digits)
SHOTS = 100  # 10-shot digits: the fine-tuning's training images, so its batch is at most this


def rate_table(budget: Budget) -> str:
    """The RATES table for this machine and the budget's arithmetic."""
    device = device_kind()
    return "cpu-bf16" if device == "cpu" and precision_of(budget) == "bf16" else device


def estimate(run: Run, budget: Budget, device: str, share: float = 1.0) -> float:
    """Seconds one run takes by the rate table, getting `share` of the rates (runs side by side on a CPU split its
    cores); a resolution not in the table gets the slowest rates listed."""
    table = RATES[device]
    rates = table.get((run.model or {}).get("img_size", pretrain_lib.Config.img_size), table[max(table)])
    batch = min(finetune_config(budget).batch, SHOTS)
    seconds = len(budget.finetune_seeds) * budget.finetune_steps * batch / rates.finetune + DIGITS / rates.probe
    if run.data is not None:
        seconds += budget.steps * pretrain_lib.Config.batch / rates.pretrain
    return rates.fixed + seconds / share


def plan(estimates: list[float], jobs: int, seconds: float) -> list[tuple[float, float] | None]:
    """(start, end) of each run in order on `jobs` slots, each run taking the next free slot; None for a run that
    would end after `seconds` (it is not started, and its slot stays free for the next)."""
    free = [0.0] * jobs
    out = []
    for est in estimates:
        start = heapq.heappop(free)
        if start + est > seconds:
            heapq.heappush(free, start)
            out.append(None)
            continue
        heapq.heappush(free, start + est)
        out.append((start, start + est))
    return out


def _kept(keep: Path | None, run: Run, root: Path, budget: Budget) -> Path | None:
    return keep / f"{run.folder(root, budget).name}.json" if keep else None


def finished_row(run: Run, root: Path, budget: Budget, keep: Path | None) -> dict | None:
    """The run's row if it finished: in its run folder, or kept in the results by an earlier call (maybe on
    another machine, whose run folders are gone)."""
    for path in (run.folder(root, budget) / "row.json", _kept(keep, run, root, budget)):
        if path is not None and path.exists():
            return json.loads(path.read_text())
    return None


def _execute_and_keep(run: Run, root: Path, budget: Budget, keep: Path | None = None, deadline: float = 0.0,
                      seconds: float = 0.0) -> dict | None:
    """A finished row, or None when the run would end after the deadline (not started)."""
    row = finished_row(run, root, budget, keep)
    if row is not None:
        return row
    if deadline and time.time() + seconds > deadline:
        print(f"[{run.label}] not started: needs ~{seconds / 60:.1f} min by the rate table, "
              f"{max(0.0, deadline - time.time()) / 60:.1f} min left of the time box", flush=True)
        return None
    row = execute(run, root, budget)
    atomic_write_json(row, run.folder(root, budget) / "row.json")
    if keep:  # as each run finishes: an interrupted or split sweep keeps it
        keep.mkdir(parents=True, exist_ok=True)
        atomic_write_json(row, _kept(keep, run, root, budget))
    return row


def _execute_in_worker(run: Run, root: Path, budget: Budget, threads: int, keep: Path | None = None,
                       deadline: float = 0.0, seconds: float = 0.0) -> dict | None:
    import torch

    torch.set_num_threads(threads)
    folder = run.folder(root, budget)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.txt", "a") as f, contextlib.redirect_stdout(f):  # runs side by side: one log each
        return _execute_and_keep(run, root, budget, keep, deadline, seconds)


def _render_first(runs: list[Run], root: Path, budget: Budget) -> None:
    """Render each data set the runs need once, before they start: runs side by side that share a data set (one
    per resolution in sweep-resolution) would otherwise race for its folder, and fracgen lets one writer in."""
    for slug, data in {r.data_slug: r.data for r in runs if r.data is not None}.items():
        shards = root / "data" / slug
        try:
            if not (shards / "manifest.json").exists() or not read_manifest(shards)["complete"]:
                print(f"render {shards}", flush=True)
                render_dataset(shards, Settings(**{**budget.data, **data}),
                               resume=(shards / "manifest.json").exists())
        except FracgenError:
            pass  # its runs meet the same error in their own process, reported once the others have finished


def execute_all(runs: list[Run], root: Path, budget: Budget, jobs: int = 1, keep: Path | None = None,
                time_box: float = 0.0) -> list[dict | None]:
    """Execute the runs in order, or `jobs` at a time, each in its own process with its own log.txt: on a GPU the
    CPU preset's small model leaves the card mostly idle, so several runs share it. Rows come back in the runs'
    order; a run that fails is reported after the others have finished (and kept what they did). With `time_box`
    (seconds from now), a run starts only if the rate table says it ends inside the box; it is None otherwise."""
    device = rate_table(budget)
    # the cpu rates are one run on the 2-core VM's two cores; side by side, runs split the cores they have
    share = 1.0 if device.startswith("cuda") else min(1.0, available_cores() / (2 * jobs))
    seconds = [0.0 if finished_row(r, root, budget, keep) else estimate(r, budget, device, share) for r in runs]
    deadline = time.time() + time_box if time_box else 0.0
    if time_box:
        print_plan(runs, seconds, jobs, time_box, device)
    if jobs <= 1:
        return [_execute_and_keep(run, root, budget, keep, deadline, est) for run, est in zip(runs, seconds,
                                                                                            strict=True)]
    if any(est and slot for est, slot in zip(seconds, plan(seconds, jobs, time_box or float("inf")), strict=True)):
        _render_first([r for r, est in zip(runs, seconds, strict=True) if est], root, budget)
    threads = max(1, available_cores() // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_execute_in_worker, run, root, budget, threads, keep, deadline, est): run
                   for run, est in zip(runs, seconds, strict=True)}
        for future in as_completed(futures):
            run = futures[future]
            state = "failed" if future.exception() else "done" if future.result() else "not started (time box)"
            print(f"[{run.label}] {state} (log: {run.folder(root, budget) / 'log.txt'})", flush=True)
        return [future.result() for future in futures]


def print_plan(runs: list[Run], seconds: list[float], jobs: int, time_box: float, device: str) -> None:
    slots = plan(seconds, jobs, time_box)
    print(f"plan: {jobs} run(s) at a time, a {time_box / 60:g}-minute time box, rates for {device} "
          "(train.experiments.RATES):")
    for run, est, slot in zip(runs, seconds, slots, strict=True):
        when = ("finished earlier" if est == 0 else f"{slot[0] / 60:4.1f} -> {slot[1] / 60:4.1f} min" if slot
                else "not started: ends past the time box")
        print(f"  {run.label}: ~{est / 60:.1f} min, {when}")
    fits = [slot for slot in slots if slot]
    print(f"plan: {len(fits)} of {len(runs)} runs end inside the box by the estimates"
          + (f", the last at {max(end for _, end in fits) / 60:.1f} min" if fits else ""), flush=True)


def run_experiment(name: str, root: Path, results: Path, budget: Budget, finished_only: bool = False,
                   jobs: int = 1, time_box: float = 0.0, runs: list[Run] | None = None) -> list[dict]:
    """Run (or, finished_only, tabulate) an experiment; `time_box` in minutes (0: none)."""
    t0 = time.time()
    if name not in EXPERIMENTS:
        raise TrainError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    runs = EXPERIMENTS[name]() if runs is None else runs
    keep = results / "rows"
    if finished_only:  # tabulate what an earlier call wrote; start nothing, not even a half-done run's rest
        rows = []
        for run in runs:
            row = finished_row(run, root, budget, keep)
            if row is not None:
                rows.append(row)
            else:
                print(f"[{run.label}] not finished: left out of the tables (--finished-only)")
    else:
        rows = [r for r in execute_all(runs, root, budget, jobs, keep, time_box * 60) if r is not None]
    if not rows:
        if time_box and not finished_only:
            raise TrainError(f"none of the {len(runs)} runs of {name} fits in the {time_box:g}-minute time box by "
                             "the rate table on this device (the plan above); raise --time-box or run it on a GPU")
        raise TrainError(f"no finished run of {name} at {budget.steps} steps under {root}")
    seconds = time.time() - t0
    results.mkdir(parents=True, exist_ok=True)
    grouped = tables.groups(rows)
    tables.write_csv(results / f"{name}.csv", rows)
    (results / f"{name}.md").write_text(tables.markdown(name, rows, grouped, seconds,
                                                        _command(name, budget, jobs, time_box)))
    drew = tables.plot(name, rows, grouped, results / f"{name}.png")
    after = getattr(EXPERIMENTS.get(name), "after", None)
    if after is not None:  # what the experiment adds to its tables (score-bases: the measures against the runs)
        after(rows, root, budget, results)
    if budget.finetune_preset == "default":  # the scatter holds the runs of one fine-tuning recipe
        # one scatter per pre-training budget: which-base's 1500-step runs never overwrite compare's 800-step plot
        plot = "pretext-vs-transfer" + ("" if budget.steps == STEPS else f"-steps{budget.steps}")
        tables.scatter(root, results / f"{plot}{arithmetic_tag(budget)}.png", budget.steps, arithmetic_tag(budget))
    print(f"{name}: {len(rows)} of {len(runs)} runs in {seconds / 60:.1f} minutes; tables in {results}/{name}.csv "
          "and .md" + (f", plot {results}/{name}.png" if drew else " (no plot: pip install fracgen[plots])"))
    return rows



def _command(name: str, budget: Budget, jobs: int, time_box: float) -> str:
    """`make NAME` when the call was the make target's, else the module command that repeats it."""
    default = experiment_budget(name)
    options = runner_options(name)
    arithmetic = "" if budget.precision == "auto" else f" --precision {budget.precision}"
    if (budget.steps, jobs, time_box, budget.finetune_preset, budget.finetune_steps) == (
            default.steps, options.get("jobs", 1), options.get("time_box", 0.0), default.finetune_preset,
            default.finetune_steps):
        return f"make {name}" + (f" PRECISION={budget.precision}" if arithmetic else "")
    recipe = "" if (budget.finetune_preset, budget.finetune_steps) == (default.finetune_preset,
                                                                       default.finetune_steps) else (
        f" --finetune-preset {budget.finetune_preset} --finetune-steps {budget.finetune_steps}")
    return (f"fracgen-train experiments {name} --steps {budget.steps}" + (f" --jobs {jobs}" if jobs > 1 else "")
            + (f" --time-box {time_box:g}" if time_box else "") + recipe + arithmetic)

