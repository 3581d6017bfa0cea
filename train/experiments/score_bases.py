"""`make score-bases` (issue 23): which base will learn? 16 bases drawn by seed and base A, pre-trained at the GPU
compare budget (5000 steps, where the seeded bases learned 2 to 40%: at the CPU's 800 steps every base stays near
chance and no measure could be told from another); then fracgen.score's data-only measures of each run's data
against its pretext top-1 and transfer (`correlate`)."""

from __future__ import annotations

from pathlib import Path

from fracgen.manifest import read_manifest

from .. import pretrain as pretrain_lib
from ..runtime import atomic_write_text
from . import tables
from .control import base_a
from .runner import SCRATCH, Budget, Run, experiment

SEEDS = tuple(range(16))  # at least 12 bases drawn by seed, none picked by hand


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
    lines += [f"| {t['measure']} | {tables.fmt(t['pretext_top1'], 2)} | {tables.fmt(t['finetune_top1'], 2)} |"
              for t in table]
    predicts = [t["measure"] for t in table if (t["pretext_top1"] or 0) >= 0.8]
    lines += ["", f"A measure predicts (Spearman >= 0.8 with pretext top-1 over >= 12 bases): "
              f"{', '.join(predicts) if predicts and len(scored) >= 12 else 'none'}."]
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text("\n".join(lines) + "\n", results / "score-bases-correlation.md")
    tables.write_csv(results / "score-bases-correlation.csv", scored)
    plt = tables.pyplot()
    if plt is not None and scored:
        fig, axes = plt.subplots(1, len(measures), figsize=(4 * len(measures), 3.6))
        for ax, m, t in zip(axes, measures, table, strict=True):
            ax.scatter([r[m] for r in scored], [r["pretext_top1"] for r in scored])
            ax.set_xlabel(f"{m} at {at} px (Spearman {tables.fmt(t['pretext_top1'], 2)})")
        axes[0].set_ylabel("pretext top-1 %")
        fig.suptitle(f"which base will learn? {len(scored)} runs, {budget.steps} steps ({tables.devices(scored)})")
        fig.tight_layout()
        fig.savefig(results / "score-bases-correlation.png", dpi=110)
        plt.close(fig)
    return table




@experiment("score-bases", budget=dict(steps=5000), runner=dict(jobs=9, time_box=8.0), after=correlate)
def score_bases() -> list[Run]:
    return [SCRATCH,
            *[Run(f"1p-frac, base seed {b}", {"seed": b}, f"1p-frac, base seed {b}", b) for b in SEEDS],
            Run("1p-frac, base A (docs/design.md section 9), Delta 0.1", {"base": base_a(), "seed": 0},
                "1p-frac, base A", key="base-a")]
