"""An experiment's tables and plots: rows averaged by group, the markdown and CSV under docs/results/, the plots
(matplotlib, the `plots` extra) and the scatter of pretext accuracy against transfer over every run."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path


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


def fmt(v, digits=1):
    return "" if v is None else f"{v:.{digits}f}"


def devices(rows: list[dict]) -> str:
    # rows from before the device was recorded all ran on the 2-core dev VM
    return ", ".join(sorted({r.get("device", "CPU, 2 cores") for r in rows}))


def precisions(rows: list[dict]) -> str:
    # rows from before --precision ran in each device's arithmetic of the time: fp32 on a CPU, bf16 on CUDA
    return ", ".join(sorted({r.get("precision") or ("fp32" if r.get("device", "CPU").startswith("CPU") else "bf16")
                             for r in rows}))


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
             f"Ran on: {devices(rows)}, {precisions(rows)}.", "",
             "| run | LPCE first -> last | pretext top-1 % | digits fine-tuned top-1 % | linear probe top-1 % |",
             "|---|---|---|---|---|"]
    for r in rows:
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if r.get("first_loss") is not None else ""
        seeds = ", ".join(fmt(v) for v in r["finetune_seeds"])
        lines.append(f"| {r['label']} | {loss} | {fmt(r.get('pretext_top1'))} | "
                     f"{fmt(r['finetune_top1'])} +- {fmt(r['finetune_std'])} ({seeds}) | "
                     f"{fmt(r['probe_top1'])} +- {fmt(r['probe_std'])} |")
    if any(g["runs"] > 1 for g in grouped):
        lines += ["", "Averaged over the runs of each setting (mean +- std over the bases' means; a setting with one "
                  "run shows its std over seeds):", "",
                  "| setting | runs | pretext top-1 % | digits fine-tuned top-1 % | linear probe top-1 % |",
                  "|---|---|---|---|---|"]
        for g in grouped:
            pre = f"{fmt(g.get('pretext_top1'))} +- {fmt(g.get('pretext_std'))}" if "pretext_top1" in g else ""
            lines.append(f"| {g['group']} | {g['runs']} | {pre} | {fmt(g['finetune_top1'])} +- "
                         f"{fmt(g['finetune_std'])} | {fmt(g['probe_top1'])} +- {fmt(g['probe_std'])} |")
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
                [fmt(g["finetune_top1"]), fmt(g["probe_top1"]), fmt(g.get("pretext_top1")) or "-"]))
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


def pyplot():
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
    plt = pyplot()
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
    fig.suptitle(f"{name}: {rows[0]['steps']} pre-training steps per run ({devices(rows)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot(name: str, rows: list[dict], grouped: list[dict], path: Path) -> bool:
    """Bars (compare) or lines over the swept value (sweeps), with error bars; False without matplotlib."""
    if any(g["series"] for g in grouped):
        return plot_series(name, rows, grouped, path)
    plt = pyplot()
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
    _finish(plt, fig, ax, f"{name}: {rows[0]['steps']} pre-training steps per run ({devices(rows)})", path)
    return True


def scatter(root: Path, path: Path, steps: int, tag: str = "") -> int:
    """Pretext top-1 against fine-tuned and probed transfer, over every run under `root` at `steps` steps (and the
    folder suffix `tag` of an arithmetic: runner.arithmetic_tag)."""
    rows = [json.loads(p.read_text()) for p in sorted(root.glob(f"*-steps{steps}{tag}/row.json"))]
    rows = [r for r in rows if r.get("pretext_top1") is not None]
    plt = pyplot()
    if plt is None:
        return 0
    scratch = [json.loads(p.read_text()) for p in root.glob(f"scratch-steps{steps}{tag}/row.json")]
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
    _finish(plt, fig, ax, f"every run at {steps} steps{tag.replace('-', ', ')}", path)
    return len(rows)

