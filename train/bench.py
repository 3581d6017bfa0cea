"""Data loader throughput for `make bench`: decoded and augmented samples/s read from real shards.

Mixup/CutMix are left out: they act on whole batches in the training loop, not in the loader workers.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from fracgen.dataset import Settings, render_dataset
from train import data

# (label, shard image size, train_transform arguments): the two presets' image pipelines.
PIPELINES = [
    ("CPU preset: 128 px shards -> 32 px, crop, flips, ink gain 2", 128,
     dict(img_size=32, crop_scale=(0.35, 1.0), ink_gain=2.0)),
    ("paper preset: 512 px shards -> 224 px, crop, flips, RandAugment m9, erasing 0.25", 512,
     dict(img_size=224, randaug="rand-m9-mstd0.5", reprob=0.25)),
]


def samples_per_second(shards: Path, transform, workers: int, seconds: float, batch: int = 64) -> float:
    """Samples/s of the training loader after its first batch (worker start-up and buffer fill excluded)."""
    manifest = data.read_manifest(shards)
    loader = data.train_loader(data.shard_urls(shards, manifest), batch, transform, batches=10**9, seed=0,
                               shuffle_buffer=200, workers=workers)
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, _ = next(it)
        n += len(x)
    rate = n / (time.perf_counter() - t0)
    del it  # stops the worker processes
    return rate


def loader_throughput(seconds: float = 10.0, cores: int | None = None) -> list[tuple[str, str, str]]:
    """Rows for bench.py: per pipeline, one loader worker (in-process) and one worker per core."""
    cores = cores or os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, size, args in PIPELINES:
            shards = Path(tmp) / f"s{size}"
            render_dataset(shards, Settings(classes=400, size=size, shard_size=100), workers=cores)
            transform = data.train_transform(**args, gray=True)
            for workers in (0, cores):
                rate = samples_per_second(shards, transform, workers, seconds)
                how = "1 worker (in the main process)" if workers == 0 else f"{workers} worker processes"
                rows.append((label, f"{rate:,.0f}", how))
    return rows
