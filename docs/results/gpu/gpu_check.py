"""One GPU session: the CPU experiments at a GPU budget (compare + control, all runs side by side on one card).

1. probe: K pre-trainings of the CPU preset side by side for 300 steps -> samples/s per run under K-way sharing;
2. STEPS chosen so that the K runs pre-train in about TARGET seconds (rounded down to 500, 800..20000);
3. compare's 8 runs + control's 2 base-A runs, K = 10 processes; then both tables with --finished-only.
"""
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

from fracgen.dataset import Settings, render_dataset
from train import experiments as E
from train import pretrain as P

TARGET = float(sys.argv[1]) if len(sys.argv) > 1 else 120.0
DRY = os.environ.get("DRY") == "1"  # a CPU rehearsal of this script at a toy budget
ROOT, RES = Path(os.environ.get("EXP_ROOT", "/tmp/exp")), Path(os.environ.get("EXP_RES", "/tmp/res"))
PROBE_STEPS = 4 if DRY else 300


def probe_one(i):
    import torch
    torch.set_num_threads(1)
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        P.pretrain(P.Config(shards="/tmp/probe", out=f"/tmp/probe-run{i}", steps=PROBE_STEPS, log_every=2 if DRY
                            else 50, eval_every=0, ckpt_every=0, seed=i))
    rates = [json.loads(x)["samples_per_s"] for x in Path(f"/tmp/probe-run{i}/metrics.jsonl").read_text().splitlines()
             if "samples_per_s" in x]
    return rates


if __name__ == "__main__":
    import shutil
    for d in Path("/tmp").glob("probe-run*"):
        shutil.rmtree(d)
    t0 = time.time()
    runs = E.EXPERIMENTS["compare"]() + E.EXPERIMENTS["control"]()[1:]
    data = dict(classes=8, size=32, points=2000) if DRY else E.DATA
    if DRY:
        runs = [runs[0], runs[-2]]
    k = len(runs)
    render_dataset(Path("/tmp/probe"), Settings(**data), overwrite=True)
    with mp.get_context("spawn").Pool(k) as pool:
        rates = pool.map(probe_one, range(k))
    per_run = statistics.median(r[-1] for r in rates)
    steps = int(max(800, min(20000, per_run * TARGET / 128 // 500 * 500)))
    steps = 3 if DRY else steps
    print(f"probe: {k} runs side by side, last-window samples/s per run {[round(r[-1]) for r in rates]}, "
          f"median {per_run:.0f}; steps chosen {steps} ({time.time() - t0:.0f} s)",
          flush=True)
    t1 = time.time()
    budget = E.Budget(steps=steps)
    if DRY:
        budget = E.Budget(steps=steps, finetune_seeds=(0,), probe_seeds=(0,), finetune_steps=2, data=data)
    try:
        E.execute_all(runs, ROOT, budget, jobs=k)
    except Exception as e:  # tabulate what finished
        print(f"a run failed: {type(e).__name__}: {e}", flush=True)
    print(f"all runs: {(time.time() - t1) / 60:.1f} min", flush=True)
    for name in ("compare", "control"):
        E.run_experiment(name, ROOT, RES, budget, finished_only=True)
        print((RES / f"{name}.md").read_text(), flush=True)
    print(f"total {(time.time() - t0) / 60:.1f} min")
