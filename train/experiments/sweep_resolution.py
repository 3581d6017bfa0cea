"""`make sweep-resolution` (issue 21): does resolution decide whether one fractal is enough? 1p-frac over three bases,
its Delta 0.001 control, FractalDB-style data and scratch at 32, 64, 112 and 224 px, equal samples per run, fine-tuned
with the paper's recipe; 12 runs side by side on one GPU inside an 8-minute box (docs/results.md, the plan)."""

from .runner import BASES, Run, experiment

# The networks: the CPU preset's depth-6 ViT-Tiny at 32 and 64 px (patch 8: 16 and 64 tokens), the full ViT-Tiny at
# 112 and 224 px (patch 16: 49 and 196 tokens, the paper's network at 224). Largest first: the longest runs start
# first, which packs runs side by side into the shortest time.
NETWORKS = {224: dict(img_size=224, patch_size=16, depth=12), 112: dict(img_size=112, patch_size=16, depth=12),
            64: dict(img_size=64, patch_size=8, depth=6), 32: dict(img_size=32, patch_size=8, depth=6)}
# The paper's rendering (512 px, 100k points) at every resolution: the CPU default's 128 px / 50k points, scaled
# down, does not give the same images (3x3 strokes are 4x wider relative to the image: mean ink 15.5 against 9.3
# of 255 at 32 px, pixel correlation 0.73; docs/results.md), so it would not measure the same.
PAPER_DATA = dict(size=512, points=100_000)
# 1500 steps at batch 128 (192k samples, make pretrain's budget), the paper's fine-tuning recipe for 200 steps (200
# epochs of 10-shot digits' 100 images; the official script runs 1000 epochs of CIFAR-100); 12 runs at a time.
BUDGET = dict(steps=1500, finetune_preset="paper", finetune_steps=200)
RUNNER = dict(jobs=12, time_box=8.0)


def sweep_resolution(resolutions: tuple[int, ...] = tuple(NETWORKS)) -> list[Run]:
    """The runs at the given resolutions (--resolutions: a part of the sweep)."""
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


experiment("sweep-resolution", budget=BUDGET, runner=RUNNER)(sweep_resolution)
