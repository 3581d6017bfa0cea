"""Second GPU call: compare's three seeded 1p-frac bases and the Delta 0.001 control at a longer budget."""
import json
import sys
import time
from pathlib import Path

from train import experiments as E

if __name__ == "__main__":
    steps = int(sys.argv[1])
    t0 = time.time()
    runs = [r for r in E.EXPERIMENTS["compare"]() if r.data and r.data.get("system") is None]  # bases 0-2, Delta 0.001
    budget = E.Budget(steps=steps)
    try:
        E.execute_all(runs, Path("/tmp/exp"), budget, jobs=len(runs))
    except Exception as e:
        print(f"a run failed: {type(e).__name__}: {e}", flush=True)
    for r in runs:
        f = r.folder(Path("/tmp/exp"), budget) / "row.json"
        if f.exists():
            row = json.loads(f.read_text())
            print(f"{r.label} | LPCE {row['first_loss']:.3f} -> {row['last_loss']:.3f} | pretext "
                  f"{row['pretext_top1']:.1f} | fine-tuned {row['finetune_top1']:.1f} +- {row['finetune_std']:.1f} "
                  f"{row['finetune_seeds']} | probe {row['probe_top1']:.1f} +- {row['probe_std']:.1f} | pretrain "
                  f"{row.get('pretrain_s')} s", flush=True)
    print(f"total {(time.time() - t0) / 60:.1f} min")
