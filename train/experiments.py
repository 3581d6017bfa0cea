"""The paper's comparisons at CPU scale, rerunnable: `make compare`, `make sweep-delta`, `make sweep-sigma`,
`make sweep-bases` (`python -m train.experiments NAME`).

Every run is the same pipeline at the same budget: render its data with fracgen (the CPU default's 1000 images
at 128 px, 50k points, unless the run says otherwise), pre-train the CPU preset for `--steps` steps, fine-tune on
digits 10-shot with the default fine-tuning recipe over 3 seeds, and a linear probe of the frozen features over 3
splits (a readout no fine-tuning hyper-parameter can move). A run's results are kept in its folder under
`--root` and a later target reuses them (the sweeps share runs with `compare`); the tables (CSV, markdown) and
plots (PNG, with matplotlib, `pip install fracgen[plots]`) go to `--results`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from fracgen.dataset import Settings, available_cores, render_dataset
from fracgen.errors import FracgenError
from fracgen.shards import read_manifest
from train import finetune as finetune_lib
from train import pretrain as pretrain_lib
from train import probe as probe_lib
from train.runtime import TrainError, atomic_write_json, run_cli

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

    @property
    def slug(self) -> str:
        if self.key:
            return self.key
        if self.data is None:
            return "scratch"
        # a setting left at fracgen's default names the same run as leaving it out (Delta 0.1 in sweep-delta is
        # compare's run): without this, each sweep re-ran compare's 1p-frac runs under a second name
        items = {k: v for k, v in self.data.items() if k == "seed" or getattr(BASELINE, k, object()) != v}
        return "-".join(f"{k}{v}" for k, v in sorted(items.items())).replace("_", "")

    def folder(self, root: Path, budget: Budget) -> Path:
        return root / f"{self.slug}-steps{budget.steps}"


def _one_p_frac(group: str, x: float | None = None, **data) -> list[Run]:
    return [Run(f"{group}, base seed {b}", {**data, "seed": b}, group, x) for b in BASES]


def compare() -> list[Run]:
    return [
        Run("none (scratch)", None, "none (scratch)"),
        *_one_p_frac("1p-frac, sigma 3.5, Delta 0.1"),
        Run("1p-frac, Delta 0.001 (collapse control), base seed 0", {"delta": 0.001, "seed": 0},
            "1p-frac, Delta 0.001"),
        Run("fractaldb, 1000 fractals x 1 image", {"system": "fractaldb", "seed": 0}, "fractaldb"),
        Run("real image (scikit-learn china.jpg, gray), Delta 0.1", {"system": "real", "seed": 0}, "real"),
        Run("Gaussian noise", {"system": "noise", "seed": 0}, "noise"),
    ]


def sweep_delta() -> list[Run]:
    return [Run("none (scratch)", None, "none (scratch)")] + [
        r for d in (0.001, 0.01, 0.05, 0.1, 0.2) for r in _one_p_frac(f"Delta {d}", d, delta=d)]


def sweep_sigma() -> list[Run]:
    return [Run("none (scratch)", None, "none (scratch)")] + [
        r for s in (3.5, 4.5, 5.5) for r in _one_p_frac(f"sigma {s}", s, sigma=s)]


def sweep_bases() -> list[Run]:
    return [Run("none (scratch)", None, "none (scratch)")] + [
        Run(f"{k} base fractal(s) x {1000 // k} classes, seed 0", {"bases": k, "seed": 0} if k > 1 else {"seed": 0},
            f"{k} base(s)", k) for k in (1000, 100, 10, 1)]


BASE_A = Path(__file__).parents[1] / "docs" / "results" / "base-a.json"  # DESIGN.md 9b's positive control


def control() -> list[Run]:
    """Base A, the base that beat scratch in DESIGN.md 9b: a protocol that shows no gain there shows none anywhere."""
    base = json.loads(BASE_A.read_text())
    return [Run("none (scratch)", None, "none (scratch)"),
            Run("1p-frac, base A (DESIGN.md 9b), Delta 0.1", {"base": base, "seed": 0}, "1p-frac, base A",
                key="base-a"),
            Run("1p-frac, base A, Delta 0.001", {"base": base, "seed": 0, "delta": 0.001},
                "1p-frac, base A, Delta 0.001", key="base-a-delta0.001")]


EXPERIMENTS = {"compare": compare, "sweep-delta": sweep_delta, "sweep-sigma": sweep_sigma,
               "sweep-bases": sweep_bases, "control": control}


@dataclass
class Budget:
    steps: int = STEPS
    finetune_seeds: tuple[int, ...] = (0, 1, 2)
    finetune_steps: int = finetune_lib.Config.steps
    probe_seeds: tuple[int, ...] = (0, 1, 2)
    data: dict = field(default_factory=lambda: dict(DATA))


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
    row = {"label": run.label, "group": run.group, "x": run.x, "slug": run.slug, "steps": budget.steps}
    checkpoint = "none"
    if run.data is not None:
        settings = Settings(**{**budget.data, **run.data})
        shards = root / "data" / run.slug
        if not (shards / "manifest.json").exists() or not read_manifest(shards)["complete"]:
            log(f"[{run.label}] render {shards}")
            _timed(times, "render_s", lambda: render_dataset(shards, settings, resume=(shards / "manifest.json")
                                                             .exists()))
        summary_file = folder / "pretrain" / "summary.json"
        if not summary_file.exists():
            log(f"[{run.label}] pre-train {budget.steps} steps")
            cfg = pretrain_lib.Config(shards=str(shards), out=str(folder / "pretrain"), steps=budget.steps,
                                      eval_every=0, log_every=100, ckpt_every=budget.steps,
                                      resume=(folder / "pretrain" / "ckpt.pt").exists())
            _timed(times, "pretrain_s", lambda: pretrain_lib.pretrain(cfg))
        summary = json.loads(summary_file.read_text())
        row.update(first_loss=summary["first_loss"], last_loss=summary["last_loss"],
                   pretext_top1=summary["pretext_acc"], chance=summary["chance_acc"])
        checkpoint = str(folder / "pretrain" / "ckpt.pt")
    finetune_file = folder / "finetune" / "results.json"
    if not finetune_file.exists():
        log(f"[{run.label}] fine-tune on digits, seeds {budget.finetune_seeds}")
        cfg = finetune_lib.Config(checkpoint=checkpoint, out=str(folder / "finetune"), seeds=budget.finetune_seeds,
                                  steps=budget.finetune_steps)
        _timed(times, "finetune_s", lambda: finetune_lib.finetune(cfg))
    tuned = json.loads(finetune_file.read_text())
    probe_file = folder / "probe" / "probe.json"
    if not probe_file.exists():
        log(f"[{run.label}] linear probe")
        _timed(times, "probe_s", lambda: probe_lib.probe(checkpoint, seeds=budget.probe_seeds,
                                                         out=str(folder / "probe")))
    probed = json.loads(probe_file.read_text())
    atomic_write_json(times, times_file)
    row.update(finetune_top1=tuned["top1_mean"], finetune_std=tuned["top1_std"],
               finetune_seeds=list(tuned["top1"].values()), finetune_recipe=_recipe(tuned["config"]),
               probe_top1=probed["top1_mean"], probe_std=probed["top1_std"], probe_splits=list(probed["top1"].values()),
               **times)
    return row


def _recipe(cfg: dict) -> str:
    return (f"{cfg['opt']} blr {cfg['blr']} wd {cfg['weight_decay']}, {cfg['steps']} steps at batch {cfg['batch']}, "
            f"crop {cfg['crop_scale'] or 'default'}")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def groups(rows: list[dict]) -> list[dict]:
    """Rows of one group (the 3 bases of a setting) averaged: mean and std over the runs' mean top-1."""
    out = []
    for name in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == name]
        g = {"group": name, "x": rs[0]["x"], "runs": len(rs)}
        for key in ("finetune_top1", "probe_top1", "pretext_top1", "last_loss"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                g[key], g[key.replace("top1", "std").replace("last_loss", "loss_std")] = _mean_std(vals)
        if len(rs) == 1:  # one run: its spread over fine-tuning seeds / probe splits
            g["finetune_std"], g["probe_std"] = rs[0]["finetune_std"], rs[0]["probe_std"]
        out.append(g)
    return out


def _fmt(v, digits=1):
    return "" if v is None else f"{v:.{digits}f}"


def _devices(rows: list[dict]) -> str:
    # rows from before the device was recorded all ran on the 2-core dev VM
    return ", ".join(sorted({r.get("device", "CPU, 2 cores") for r in rows}))


def markdown(name: str, rows: list[dict], grouped: list[dict], seconds: float, command: str) -> str:
    own = sum(r.get(k, 0) for r in rows for k in ("render_s", "pretrain_s", "finetune_s", "probe_s"))
    lines = [f"### `{command}`", "",
             f"{len(rows)} runs; their own times add up to {own / 60:.1f} minutes (each run's in the CSV; a run is "
             f"done once and reused by later calls, this call took {seconds / 60:.1f} minutes). Pre-training: the CPU "
             f"preset, {rows[0]['steps']} "
             f"steps at batch 128. Fine-tuning: {next((r['finetune_recipe'] for r in rows), '')}, digits 10-shot, "
             f"{len(rows[0]['finetune_seeds'])} seed(s). Probe: logistic regression on frozen class + mean tokens, "
             f"10-shot, {len(rows[0]['probe_splits'])} split(s). "
             f"Ran on: {_devices(rows)}.", "",
             "| run | LPCE first -> last | pretext top-1 % | digits fine-tuned top-1 % | linear probe top-1 % |",
             "|---|---|---|---|---|"]
    for r in rows:
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if r.get("first_loss") is not None else ""
        seeds = ", ".join(_fmt(v) for v in r["finetune_seeds"])
        lines.append(f"| {r['label']} | {loss} | {_fmt(r.get('pretext_top1'))} | "
                     f"{_fmt(r['finetune_top1'])} +- {_fmt(r['finetune_std'])} ({seeds}) | "
                     f"{_fmt(r['probe_top1'])} +- {_fmt(r['probe_std'])} |")
    if any(g["runs"] > 1 for g in grouped):
        lines += ["", "Averaged over the runs of each setting (mean +- std over the bases' means; a setting with one "
                  "run shows its std over seeds):", "",
                  "| setting | runs | pretext top-1 % | digits fine-tuned top-1 % | linear probe top-1 % |",
                  "|---|---|---|---|---|"]
        for g in grouped:
            pre = f"{_fmt(g.get('pretext_top1'))} +- {_fmt(g.get('pretext_std'))}" if "pretext_top1" in g else ""
            lines.append(f"| {g['group']} | {g['runs']} | {pre} | {_fmt(g['finetune_top1'])} +- "
                         f"{_fmt(g['finetune_std'])} | {_fmt(g['probe_top1'])} +- {_fmt(g['probe_std'])} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    tmp.replace(path)


def _pyplot():
    """matplotlib's pyplot on a file backend, or None when the `plots` extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _finish(plt, fig, ax, title: str, path: Path) -> None:
    ax.set_ylabel("digits 10-shot top-1 %")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(name: str, rows: list[dict], grouped: list[dict], path: Path) -> bool:
    """Bars (compare) or lines over the swept value (sweeps), with error bars; False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    scratch = next((g for g in grouped if g["x"] is None and g["group"].startswith("none")), None)
    swept = [g for g in grouped if g["x"] is not None]
    if swept:
        xs = [g["x"] for g in swept]
        for key, std, label in (("finetune_top1", "finetune_std", "fine-tuned"), ("probe_top1", "probe_std",
                                                                                   "linear probe")):
            ax.errorbar(xs, [g[key] for g in swept], yerr=[g[std] for g in swept], marker="o", capsize=4,
                        label=f"{label} (mean +- std over runs)")
            if scratch:
                ax.axhline(scratch[key], linestyle="--", color=ax.lines[-1].get_color(), alpha=0.6,
                           label=f"{label}, scratch")
        ax.set_xscale("log")
        ax.set_xlabel(name.replace("sweep-", ""))
    else:
        import numpy as np

        x = np.arange(len(grouped))
        for i, (key, std, label) in enumerate((("finetune_top1", "finetune_std", "fine-tuned"),
                                                ("probe_top1", "probe_std", "linear probe"))):
            ax.bar(x + (i - 0.5) * 0.38, [g[key] for g in grouped], 0.38, yerr=[g[std] for g in grouped],
                   capsize=4, label=label)
        ax.set_xticks(x, [g["group"] for g in grouped], rotation=20, ha="right", fontsize=8)
    _finish(plt, fig, ax, f"{name}: {rows[0]['steps']} pre-training steps per run ({_devices(rows)})", path)
    return True


def scatter(root: Path, path: Path, steps: int) -> int:
    """Pretext top-1 against fine-tuned and probed transfer, over every run under `root`."""
    rows = [json.loads(p.read_text()) for p in sorted(root.glob(f"*-steps{steps}/row.json"))]
    rows = [r for r in rows if r.get("pretext_top1") is not None]
    plt = _pyplot()
    if plt is None:
        return 0
    scratch = [json.loads(p.read_text()) for p in root.glob(f"scratch-steps{steps}/row.json")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r["pretext_top1"] for r in rows], [r["finetune_top1"] for r in rows], label="fine-tuned")
    ax.scatter([r["pretext_top1"] for r in rows], [r["probe_top1"] for r in rows], marker="x", label="linear probe")
    for r in rows:
        ax.annotate(r["label"].split(" (")[0].replace("1p-frac, sigma 3.5, ", ""), (r["pretext_top1"],
                    r["finetune_top1"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for s in scratch:
        ax.axhline(s["finetune_top1"], linestyle="--", alpha=0.6, label="scratch, fine-tuned")
        ax.axhline(s["probe_top1"], linestyle=":", alpha=0.6, label="scratch (random init), probe")
    ax.set_xlabel("pretext top-1 % after pre-training (chance 0.1%)")
    _finish(plt, fig, ax, f"every run at {steps} steps", path)
    return len(rows)


def _execute_and_keep(run: Run, root: Path, budget: Budget) -> dict:
    row = execute(run, root, budget)
    atomic_write_json(row, run.folder(root, budget) / "row.json")
    return row


def _execute_in_worker(run: Run, root: Path, budget: Budget, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    folder = run.folder(root, budget)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.txt", "a") as f, contextlib.redirect_stdout(f):  # runs side by side: one log each
        return _execute_and_keep(run, root, budget)


def execute_all(runs: list[Run], root: Path, budget: Budget, jobs: int = 1) -> list[dict]:
    """Execute the runs in order, or `jobs` at a time, each in its own process with its own log.txt: on a GPU the
    CPU preset's small model leaves the card mostly idle, so several runs share it. Rows come back in the runs'
    order; a run that fails is reported after the others have finished (and kept what they did)."""
    if jobs <= 1:
        return [_execute_and_keep(run, root, budget) for run in runs]
    threads = max(1, available_cores() // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_execute_in_worker, run, root, budget, threads): run for run in runs}
        for future in as_completed(futures):
            run = futures[future]
            state = "failed" if future.exception() else "done"
            print(f"[{run.label}] {state} (log: {run.folder(root, budget) / 'log.txt'})", flush=True)
        return [future.result() for future in futures]


def run_experiment(name: str, root: Path, results: Path, budget: Budget, finished_only: bool = False,
                   jobs: int = 1) -> list[dict]:
    t0 = time.time()
    runs = EXPERIMENTS[name]()
    if finished_only:  # tabulate what an earlier call wrote; start nothing, not even a half-done run's rest
        rows = []
        for run in runs:
            done = run.folder(root, budget) / "row.json"
            if done.exists():
                rows.append(json.loads(done.read_text()))
            else:
                print(f"[{run.label}] not finished: left out of the tables (--finished-only)")
    else:
        rows = execute_all(runs, root, budget, jobs)
    if not rows:
        raise TrainError(f"no finished run of {name} at {budget.steps} steps under {root}")
    seconds = time.time() - t0
    results.mkdir(parents=True, exist_ok=True)
    grouped = groups(rows)
    write_csv(results / f"{name}.csv", rows)
    command = (f"make {name}" if budget.steps == STEPS and jobs == 1 else
               f"python -m train.experiments {name} --steps {budget.steps}" + (f" --jobs {jobs}" if jobs > 1 else ""))
    (results / f"{name}.md").write_text(markdown(name, rows, grouped, seconds, command))
    drew = plot(name, rows, grouped, results / f"{name}.png")
    scatter(root, results / "pretext-vs-transfer.png", budget.steps)
    print(f"{name}: {len(rows)} runs in {seconds / 60:.1f} minutes; tables in {results}/{name}.csv and .md"
          + (f", plot {results}/{name}.png" if drew else " (no plot: pip install fracgen[plots])"))
    return rows


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    name: Annotated[str, typer.Argument(help=f"one of {', '.join(EXPERIMENTS)}")],
    root: Annotated[Path, typer.Option(help="where runs and their data are kept (and reused)")] = Path(
        "runs/experiments"),
    results: Annotated[Path, typer.Option(help="where the CSV, markdown and PNG go")] = Path("docs/results"),
    steps: Annotated[int, typer.Option(help="pre-training steps per run")] = STEPS,
    finished_only: Annotated[bool, typer.Option(help="tabulate the runs already finished, run nothing new")] = False,
    jobs: Annotated[int, typer.Option(help="runs at a time, each in its own process (a GPU fits several)")] = 1,
):
    """Run one of the paper's comparisons at CPU scale and write its tables and plots."""
    if name not in EXPERIMENTS:
        raise TrainError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    if steps < 1:
        raise TrainError(f"--steps must be at least 1, got {steps}")
    if jobs < 1:
        raise TrainError(f"--jobs must be at least 1, got {jobs}")
    for option, folder in (("--root", root), ("--results", results)):
        if folder.exists() and not folder.is_dir():
            raise TrainError(f"{option} {folder} is a file, not a folder")
    try:
        run_experiment(name, root, results, dataclasses.replace(Budget(), steps=steps), finished_only, jobs)
    except FracgenError as e:
        raise TrainError(str(e)) from None


if __name__ == "__main__":
    run_cli(app)
