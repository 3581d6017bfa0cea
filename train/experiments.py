"""The paper's comparisons at CPU scale, rerunnable: `make compare`, `make sweep-delta`, `make sweep-sigma`,
`make sweep-bases`, and on one GPU `make sweep-resolution` (`python -m train.experiments NAME`).

Every run is the same pipeline at the same budget: render its data with fracgen (the CPU default's 1000 images
at 128 px, 50k points, unless the run says otherwise), pre-train the CPU preset for `--steps` steps, fine-tune on
digits 10-shot with the default fine-tuning recipe over 3 seeds, and a linear probe of the frozen features over 3
splits (a readout no fine-tuning hyper-parameter can move). A run's results are kept in its folder under
`--root` and a later target reuses them (the sweeps share runs with `compare`); the tables (CSV, markdown) and
plots (PNG, with matplotlib, `pip install fracgen[plots]`) go to `--results`, and every finished run's row is kept
there too (`RESULTS/rows/`), so a sweep split over several calls, or over machines that keep only the repository,
reruns nothing that finished. `--time-box MINUTES` starts a run only when its estimated time (`RATES`) ends inside
the box.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import heapq
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
from train import model as model_lib
from train import pretrain as pretrain_lib
from train import probe as probe_lib
from train.runtime import TrainError, atomic_save, atomic_write_json, atomic_write_text, run_cli, seed_everything

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
        # a fine-tuning recipe other than the default names other runs (their fine-tunes are other results)
        recipe = "" if budget.finetune_preset == "default" else f"-ft{budget.finetune_preset}{budget.finetune_steps}"
        return root / f"{self.slug}-steps{budget.steps}{recipe}"


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


# sweep-resolution's networks: the CPU preset's depth-6 ViT-Tiny at 32 and 64 px (patch 8: 16 and 64 tokens), the
# full ViT-Tiny at 112 and 224 px (patch 16: 49 and 196 tokens, the paper's network at 224). Largest first: the
# longest runs start first, which packs runs side by side into the shortest time.
NETWORKS = {224: dict(img_size=224, patch_size=16, depth=12), 112: dict(img_size=112, patch_size=16, depth=12),
            64: dict(img_size=64, patch_size=8, depth=6), 32: dict(img_size=32, patch_size=8, depth=6)}
# The paper's rendering (512 px, 100k points) at every resolution: the CPU default's 128 px / 50k points, scaled
# down, does not give the same images (3x3 strokes are 4x wider relative to the image: mean ink 15.5 against 9.3
# of 255 at 32 px, pixel correlation 0.73; docs/results.md), so it would not measure the same.
PAPER_DATA = dict(size=512, points=100_000)


def sweep_resolution(resolutions: tuple[int, ...] = tuple(NETWORKS)) -> list[Run]:
    runs = []
    for res in resolutions:
        net = NETWORKS[res]
        runs += [Run(f"1p-frac, Delta 0.1, base seed {b}, {res} px", {**PAPER_DATA, "seed": b},
                     f"1p-frac, Delta 0.1, {res} px", res, model=net, series="1p-frac, Delta 0.1") for b in BASES]
        runs += [Run(f"1p-frac, Delta 0.001, base seed 0, {res} px", {**PAPER_DATA, "delta": 0.001, "seed": 0},
                     f"1p-frac, Delta 0.001, {res} px", res, model=net, series="1p-frac, Delta 0.001"),
                 Run(f"FractalDB-style, 1000 fractals x 1 image, {res} px",
                     {**PAPER_DATA, "system": "fractaldb", "seed": 0}, f"FractalDB-style, {res} px", res, model=net,
                     series="FractalDB-style 1000 x 1"),
                 Run(f"none (scratch), {res} px", None, f"none (scratch), {res} px", res, model=net,
                     series="none (scratch)")]
    return runs


SCORE_BASES = tuple(range(16))  # issue 23: at least 12 bases drawn by seed, none picked by hand


def score_bases() -> list[Run]:
    """Which base will learn? 16 bases drawn by seed and base A, each pre-trained at one budget; their pretext top-1
    and transfer are then set against fracgen.score's data-only measures of their data (`correlate`)."""
    return [Run("none (scratch)", None, "none (scratch)"),
            *[Run(f"1p-frac, base seed {b}", {"seed": b}, f"1p-frac, base seed {b}", b) for b in SCORE_BASES],
            Run("1p-frac, base A (DESIGN.md 9b), Delta 0.1", {"base": json.loads(BASE_A.read_text()), "seed": 0},
                "1p-frac, base A", key="base-a")]


EXPERIMENTS = {"compare": compare, "sweep-delta": sweep_delta, "sweep-sigma": sweep_sigma,
               "sweep-bases": sweep_bases, "control": control, "sweep-resolution": sweep_resolution,
               "score-bases": score_bases}


@dataclass
class Budget:
    steps: int = STEPS
    finetune_seeds: tuple[int, ...] = (0, 1, 2)
    finetune_steps: int = finetune_lib.Config.steps
    probe_seeds: tuple[int, ...] = (0, 1, 2)
    data: dict = field(default_factory=lambda: dict(DATA))
    finetune_preset: str = "default"  # train.finetune's --preset; its warm-up shrinks with finetune_steps


# Per experiment, what differs from Budget(): sweep-resolution fits one H200 in 8 minutes (docs/results.md, "the
# plan"): 1500 steps at batch 128 (192k samples, make pretrain's budget), the paper's fine-tuning recipe for 200 steps
# (200 epochs of 10-shot digits' 100 images; the official script runs 1000 epochs of CIFAR-100).
# score-bases: the GPU compare budget of docs/results.md (5000 steps), where the seeded bases learned 2 to 40%: at
# the CPU's 800 steps every base stays near chance and no measure could be told from another.
BUDGETS = {"sweep-resolution": dict(steps=1500, finetune_preset="paper", finetune_steps=200),
           "score-bases": dict(steps=5000)}
TOY = dict(steps=2, finetune_seeds=(0,), finetune_steps=2, probe_seeds=(0,), data=dict(classes=8, points=2000))


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
            cfg = pretrain_lib.Config(shards=str(shards), out=str(folder / "pretrain"), steps=budget.steps,
                                      eval_every=0, log_every=100, ckpt_every=budget.steps,
                                      resume=(folder / "pretrain" / "ckpt.pt").exists(), **(run.model or {}))
            _timed(times, "pretrain_s", lambda: pretrain_lib.pretrain(cfg))
        summary = json.loads(summary_file.read_text())
        row.update(first_loss=summary["first_loss"], last_loss=summary["last_loss"],
                   pretext_top1=summary["pretext_acc"], chance=summary["chance_acc"])
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


def finetune_config(budget: Budget, **fields) -> finetune_lib.Config:
    """train.finetune's Config for the budget's preset and steps: a preset's warm-up keeps its share of the steps
    (the paper's 650 of 65,000: 1%), so a shortened run has the official schedule's shape."""
    preset = finetune_lib.PRESETS[budget.finetune_preset]
    warmup = preset.get("warmup_steps", finetune_lib.Config.warmup_steps)
    if "steps" in preset:
        warmup = max(1, round(warmup * budget.finetune_steps / preset["steps"]))
    return finetune_lib.Config(**{**preset, "steps": budget.finetune_steps, "warmup_steps": warmup,
                                  "seeds": budget.finetune_seeds, "preset": budget.finetune_preset, **fields})


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


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def groups(rows: list[dict]) -> list[dict]:
    """Rows of one group (the 3 bases of a setting) averaged: mean and std over the runs' mean top-1."""
    out = []
    for name in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == name]
        g = {"group": name, "x": rs[0]["x"], "runs": len(rs), "series": rs[0].get("series", "")}
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


def _networks(rows: list[dict]) -> str:
    nets = {r["network"]["img_size"]: r["network"] for r in rows if r.get("network")}
    if not nets:
        return "the CPU preset"
    return "the CPU preset's recipe with ViT-Tiny at " + ", ".join(
        f"{n['img_size']} px (patch {n['patch_size']}, depth {n['depth']})" for _, n in sorted(nets.items()))


def markdown(name: str, rows: list[dict], grouped: list[dict], seconds: float, command: str) -> str:
    own = sum(r.get(k, 0) for r in rows for k in ("render_s", "pretrain_s", "finetune_s", "probe_s"))
    lines = [f"### `{command}`", "",
             f"{len(rows)} runs; their own times add up to {own / 60:.1f} minutes (each run's in the CSV; a run is "
             f"done once and reused by later calls, this call took {seconds / 60:.1f} minutes). Pre-training: "
             f"{_networks(rows)}, {rows[0]['steps']} "
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
    if any(g["series"] for g in grouped):
        lines += ["", *series_table(grouped)]
    return "\n".join(lines) + "\n"


def series_table(grouped: list[dict]) -> list[str]:
    """One line per system, one column per swept value: fine-tuned / probe / pretext top-1 (means over runs)."""
    xs = sorted({g["x"] for g in grouped})
    lines = ["Against the swept value, one line per system; each cell: digits fine-tuned / linear probe / pretext "
             "top-1 % (mean over the runs):", "",
             "| system | " + " | ".join(f"{x:g}" for x in xs) + " |", "|---|" + "---|" * len(xs)]
    for series in dict.fromkeys(g["series"] for g in grouped):
        cells = []
        for x in xs:
            g = next((g for g in grouped if g["series"] == series and g["x"] == x), None)
            cells.append("" if g is None else " / ".join(
                [_fmt(g["finetune_top1"]), _fmt(g["probe_top1"]), _fmt(g.get("pretext_top1")) or "-"]))
        lines.append(f"| {series} | " + " | ".join(cells) + " |")
    return lines


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


def plot_series(name: str, rows: list[dict], grouped: list[dict], path: Path) -> bool:
    """Pretext top-1, fine-tuned and probed transfer against the swept value, one line per system."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    panels = (("pretext_top1", "pretext_std", "pretext top-1 % (chance 0.1%)"),
              ("finetune_top1", "finetune_std", "digits 10-shot fine-tuned top-1 %"),
              ("probe_top1", "probe_std", "digits 10-shot linear probe top-1 %"))
    for ax, (key, std, title) in zip(axes, panels, strict=True):
        for series in dict.fromkeys(g["series"] for g in grouped):
            gs = sorted((g for g in grouped if g["series"] == series and key in g), key=lambda g: g["x"])
            if gs:
                ax.errorbar([g["x"] for g in gs], [g[key] for g in gs], yerr=[g.get(std, 0) for g in gs],
                            marker="o", capsize=3, label=series)
        ax.set_xscale("log", base=2)
        xs = sorted({g["x"] for g in grouped})
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel("resolution, px" if name == "sweep-resolution" else name.replace("sweep-", ""))
        ax.set_title(title, fontsize=10)
    axes[1].legend(fontsize=7)  # every system has a fine-tuned line; scratch has no pretext one
    fig.suptitle(f"{name}: {rows[0]['steps']} pre-training steps per run ({_devices(rows)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot(name: str, rows: list[dict], grouped: list[dict], path: Path) -> bool:
    """Bars (compare) or lines over the swept value (sweeps), with error bars; False without matplotlib."""
    if any(g["series"] for g in grouped):
        return plot_series(name, rows, grouped, path)
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
DIGITS = 1797  # images the probe runs through the network (all of scikit-learn's digits)
SHOTS = 100  # 10-shot digits: the fine-tuning's training images, so its batch is at most this


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
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the cpu rates are one run on the 2-core VM's two cores; side by side, runs split the cores they have
    share = 1.0 if device == "cuda" else min(1.0, available_cores() / (2 * jobs))
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
    grouped = groups(rows)
    write_csv(results / f"{name}.csv", rows)
    (results / f"{name}.md").write_text(markdown(name, rows, grouped, seconds, _command(name, budget, jobs,
                                                                                         time_box)))
    drew = plot(name, rows, grouped, results / f"{name}.png")
    if name == "score-bases":
        correlate(rows, root, budget, results)
    if budget.finetune_preset == "default":  # the scatter holds the runs of one fine-tuning recipe
        scatter(root, results / "pretext-vs-transfer.png", budget.steps)
    print(f"{name}: {len(rows)} of {len(runs)} runs in {seconds / 60:.1f} minutes; tables in {results}/{name}.csv "
          "and .md" + (f", plot {results}/{name}.png" if drew else " (no plot: pip install fracgen[plots])"))
    return rows


def correlate(rows: list[dict], root: Path, budget: Budget, results: Path) -> list[dict]:
    """fracgen.score's measures of every pre-trained run's data at the network's resolution, against its pretext
    top-1 and fine-tuned transfer: a table per run and the Spearman correlation of each measure with both
    (results/score-bases-correlation.md and .csv, and a scatter of each measure against pretext top-1)."""
    from scipy.stats import spearmanr

    from fracgen import score as score_lib

    at = pretrain_lib.Config.img_size
    scored = []
    for row in rows:
        if row.get("pretext_top1") is None:
            continue
        manifest = read_manifest(root / "data" / row["slug"])  # score-bases' runs share no network: slug = data
        scored.append({**row, **score_lib.score(manifest, (at,))[0]})
    measures = score_lib.MEASURES
    lines = [f"# score-bases: data-only measures against pre-training ({len(scored)} runs, {budget.steps} steps, "
             f"measured at {at} px)", "", "| run | pretext top-1 | fine-tuned | " + " | ".join(measures) + " |",
             "|---|---|---|" + "---|" * len(measures)]
    lines += [f"| {r['label']} | {r['pretext_top1']:.1f} | {r['finetune_top1']:.1f} | "
              + " | ".join(f"{r[m]:.3f}" for m in measures) + " |" for r in scored]
    table = []
    for m in measures:
        entry = {"measure": m}
        for target in ("pretext_top1", "finetune_top1"):
            xs, ys = [r[m] for r in scored], [r[target] for r in scored]
            # no rank correlation of fewer than 3 runs or of a constant column
            entry[target] = float(spearmanr(xs, ys).statistic) if min(len(set(xs)), len(set(ys))) > 2 else None
        table.append(entry)
    lines += ["", "| measure | Spearman with pretext top-1 | with fine-tuned top-1 |", "|---|---|---|"]
    lines += [f"| {t['measure']} | {_fmt(t['pretext_top1'], 2)} | {_fmt(t['finetune_top1'], 2)} |" for t in table]
    predicts = [t["measure"] for t in table if (t["pretext_top1"] or 0) >= 0.8]
    lines += ["", f"A measure predicts (Spearman >= 0.8 with pretext top-1 over >= 12 bases): "
              f"{', '.join(predicts) if predicts and len(scored) >= 12 else 'none'}."]
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text("\n".join(lines) + "\n", results / "score-bases-correlation.md")
    write_csv(results / "score-bases-correlation.csv", scored)
    plt = _pyplot()
    if plt is not None and scored:
        fig, axes = plt.subplots(1, len(measures), figsize=(4 * len(measures), 3.6))
        for ax, m, t in zip(axes, measures, table, strict=True):
            ax.scatter([r[m] for r in scored], [r["pretext_top1"] for r in scored])
            ax.set_xlabel(f"{m} at {at} px (Spearman {_fmt(t['pretext_top1'], 2)})")
        axes[0].set_ylabel("pretext top-1 %")
        fig.suptitle(f"which base will learn? {len(scored)} runs, {budget.steps} steps ({_devices(scored)})")
        fig.tight_layout()
        fig.savefig(results / "score-bases-correlation.png", dpi=110)
        plt.close(fig)
    return table


def _command(name: str, budget: Budget, jobs: int, time_box: float) -> str:
    """`make NAME` when the call was the make target's, else the module command that repeats it."""
    default = experiment_budget(name)
    options = RUNNER.get(name, {})
    if (budget.steps, jobs, time_box, budget.finetune_preset, budget.finetune_steps) == (
            default.steps, options.get("jobs", 1), options.get("time_box", 0.0), default.finetune_preset,
            default.finetune_steps):
        return f"make {name}"
    recipe = "" if (budget.finetune_preset, budget.finetune_steps) == (default.finetune_preset,
                                                                       default.finetune_steps) else (
        f" --finetune-preset {budget.finetune_preset} --finetune-steps {budget.finetune_steps}")
    return (f"python -m train.experiments {name} --steps {budget.steps}" + (f" --jobs {jobs}" if jobs > 1 else "")
            + (f" --time-box {time_box:g}" if time_box else "") + recipe)


def experiment_budget(name: str, toy: bool = False) -> Budget:
    return Budget(**{**BUDGETS.get(name, {}), **(TOY if toy else {})})


# What `make NAME` runs with when the options are not given: sweep-resolution's 24 runs side by side on one H200
RUNNER = {"sweep-resolution": dict(jobs=12, time_box=8.0), "score-bases": dict(jobs=9, time_box=8.0)}


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
                                                   f"{BUDGETS['sweep-resolution']['steps']})")] = None,
    finished_only: Annotated[bool, typer.Option(help="tabulate the runs already finished, run nothing new")] = False,
    jobs: Annotated[int | None, typer.Option(help="runs at a time, each in its own process (a GPU fits several; "
                                                  "default 1, sweep-resolution 12)")] = None,
    time_box: Annotated[float | None, typer.Option(help="minutes: start a run only if the rate table says it ends "
                                                        "inside them (default none; sweep-resolution 8)")] = None,
    finetune_steps: Annotated[int | None, typer.Option(help="fine-tuning steps per seed (default 300; "
                                                            "sweep-resolution 200)")] = None,
    finetune_preset: Annotated[str | None, typer.Option(help="train.finetune's --preset for every run (default "
                                                              "default; sweep-resolution paper)")] = None,
    resolutions: Annotated[str | None, typer.Option(help="sweep-resolution: a subset of 32,64,112,224")] = None,
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
                                 finetune_preset=finetune_preset or budget.finetune_preset)
    options = RUNNER.get(name, {})
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
