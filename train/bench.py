"""Trainer speed for `make bench`: data paths against the model alone, and the loaders and augmentations apart.

- training rows: real `train.pretrain` runs of a preset on real shards, one per data path (in-memory cache
  with augmentation on the device, streaming with augmentation on the device, the PIL path of loader workers, on
  the fly), beside the same model, batch, optimizer and step trained on random tensors (the model-only rate),
  eager and (on CUDA) with the fast step of `train.step`, with MFU and peak device memory;
- augmentation rows: one batch of the paper preset's recipe (512 px -> 224 px, RandAugment, erasing), PIL per
  sample against `train.augment` on the whole batch, on this machine's device;
- loader rows: decoded + PIL-augmented samples/s of the old loader alone (Mixup/CutMix act in the loop);
- on-the-fly rows: uint8 samples/s of one loader process rendering them (`train.onthefly`) against one reading and
  decoding the same data from shards (`data.uint8_loader`), at the shard sizes of the two presets.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fracgen.dataset import Settings, render_dataset

from . import data, onthefly
from .pretrain import (
    PRESETS,
    Config,
    build_model,
    build_optimizer,
    build_scheduler,
    device_augment,
    pretrain,
)
from .rng import StepRNG
from .runtime import rng_states
from .step import (
    BATCH_COMPILE_OPTIONS,
    TrainStep,
    autocast_for,
    bf16_units,
    compile_model,
    fast_options,
    flops_per_sample,
    mfu,
    model_compile_mode,
    peak_flops,
)

# (label, shard image size, train_transform arguments): the two presets' image pipelines.
PIPELINES = [
    ("CPU preset: 128 px shards -> 32 px, crop, flips, ink gain 2", 128,
     dict(img_size=32, crop_scale=(0.35, 1.0), ink_gain=2.0)),
    ("paper preset: 512 px shards -> 224 px, crop, flips, RandAugment m9 inc1, erasing 0.5", 512,
     dict(img_size=224, randaug="rand-m9-mstd0.5-inc1", reprob=0.5)),
]
CPU_SHARDS = Settings(classes=1000, size=128, points=50_000, seed=4)  # what `make pretrain` renders
# (label, the data the trainer's loader hands over): the CPU preset's shards (128 px, 50k points, cut to 32 px on the
# device) and the paper preset's, the 1p-frac set (512 px, 100k points, cut to 224 px on the device).
ON_THE_FLY = [("CPU preset, 32 px", CPU_SHARDS), ("paper preset, 224 px", Settings())]
PAPER = dict(img_size=224, patch_size=16, depth=0, crop_scale=(0.08, 1.0), randaug="rand-m9-mstd0.5-inc1",
             reprob=0.5, ink_gain=1.0, cutmix=1.0, drop_path=0.1)


def samples_per_second(shards: Path, transform, workers: int, seconds: float, batch: int = 64) -> float:
    """Samples/s of the PIL training loader after its first batch (worker start-up and buffer fill excluded)."""
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


def _batches_per_second(batches, seconds: float) -> float:
    """Samples/s of an iterator of (images, labels) batches after its first batch (start-up excluded)."""
    it = iter(batches)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, _ = next(it)
        n += len(x)
    return n / (time.perf_counter() - t0)


def onthefly_rows(seconds: float = 10.0, batch: int = 128) -> list[tuple[str, str, str, str, str]]:
    """Per loader worker: uint8 samples/s rendered on the fly against read from shards, for each preset's data.

    Both run in this one process, which is what one loader worker does: on the fly, `train.onthefly`'s batches with
    unbounded instances (every sample a new render: `fracgen.render_sample`, tensor, collate); from shards,
    `data.uint8_loader` over the same set rendered to disk (tar read, PNG decode, shuffle buffer, collate), with
    the page cache warm. Neither includes the augmentation on the device that makes the model's 32 or 224 px input.
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, settings in ON_THE_FLY:
            shards = Path(tmp) / f"s{settings.size}"
            render_dataset(shards, settings, workers=os.cpu_count() or 1)
            manifest = data.read_manifest(shards)
            stream = data.uint8_loader(data.shard_urls(shards, manifest), batch, batches=10**9, seed=0,
                                       shuffle_buffer=1000, workers=0)
            from_shards = _batches_per_second(stream, seconds)
            draws = onthefly.Draws(manifest["num_classes"], 0, batch, seed=0)
            rendered = _batches_per_second(onthefly.loader(manifest, draws, 0, 10**9, workers=0), seconds)
            rows.append((label, f"{settings.size} px, {settings.points:,} points", f"{rendered:,.0f}",
                         f"{from_shards:,.0f}", f"{rendered / from_shards:.2f}x"))
    return rows


def model_only_rate(cfg: Config, num_classes: int, steps: int, window: int = 20) -> list[float]:
    """Samples/s per window of `window` steps of the model alone: pretrain's model, optimizer, schedule, batch,
    loss and step (`train.step`, with the run's --fast and --graph options: on CUDA the captured step too) on a
    fixed random batch (no data, no augmentation, no Mixup), the loss read once per window as pretrain reads it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fast = fast_options(cfg.fast, cfg.compile, cfg.compile_mode, device, graph=cfg.graph)
    torch.manual_seed(0)
    model, _ = build_model(cfg, num_classes, device)
    optimizer = build_optimizer(cfg, model, 1e-3, fused=fast.fused)
    scheduler = build_scheduler(cfg, optimizer, 1e-3, min(cfg.warmup_steps, cfg.steps // 2))
    batch = cfg.global_batch or cfg.batch  # one process
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    target = torch.softmax(torch.randn(batch, num_classes, device=device), 1)
    autocast = autocast_for(device, cfg.precision)
    if fast.compile:
        model, _ = compile_model(model, model_compile_mode(fast.compile_mode, fast.graph), (x, target), autocast)
    step = TrainStep(model, optimizer, scheduler, lambda counter, raw: (x, target), StepRNG(0, 0, device),
                     autocast=autocast, graph=fast.graph)
    rates, t0 = [], time.perf_counter()
    for i in range(steps):
        step(i)
        if (i + 1) % window == 0:
            step.take_mean_loss()
            rates.append(window * batch / (time.perf_counter() - t0))
            t0 = time.perf_counter()
    return rates


def run_rates(cfg: Config) -> tuple[list[float], str]:
    """Samples/s per logged window of a real pretrain run, and its 'data:' line."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(cfg)
    lines = out.getvalue().splitlines()
    rates = [json.loads(line)["samples_per_s"] for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
             if "samples_per_s" in line]
    return rates, next((line for line in lines if line.startswith("data:")), "")


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device) -> str:
    """The device's peak allocation since `_reset_peak` (CUDA); on the CPU no per-row figure exists."""
    if device.type != "cuda":
        return "-"
    torch.cuda.synchronize()
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f}"


def _path_rows(cuda: bool, workers: int, shards: Path, big: Path, paths: tuple[str, ...] | None,
               cpu_precisions: tuple[str, ...]) -> list[tuple[str, dict]]:
    """training_rows' data-path rows: (label, the Config fields that differ from the preset), old beside new,
    kept to `paths`; on the CPU once per precision."""
    rows = [("in-memory cache, eager step (`--fast off`, the old way)", dict(cache="on", fast="off")),
             ("in-memory cache, the default" + (": the step as one CUDA graph" if cuda else
                                                " of a long run: augmentation compiled (`--fast on`)"),
              dict(cache="on", fast="on")),
             (f"streaming, {workers} worker(s) decoding" + (" and cutting crops" if cuda else "") +
              ", augmentation on the device", dict(cache="off", workers=workers, shards=str(big), fast="on")),
             (f"PIL path (`--augment cpu`), {workers} worker(s) decoding and augmenting (old default)",
              dict(augment="cpu", workers=workers, shards=str(big))),
             (f"on the fly (`--render --instances 0`), {workers} worker(s) rendering, augmentation on the "
              "device", dict(shards="", render=str(shards), instances=0, workers=workers, fast="on"))]
    if cuda:  # the compiled step without the capture, and whole images to the card, beside the defaults
        rows.insert(1, ("in-memory cache, compiled step, not captured (`--graph off`)",
                        dict(cache="on", fast="on", graph="off")))
        rows.insert(4, (f"streaming, {workers} worker(s) decoding, whole images to the device (`--crop-in "
                        "device`)", dict(cache="off", workers=workers, shards=str(big), fast="on",
                                         crop_in="device")))
        rows.append((f"on the fly, {workers} worker(s) rendering, whole images to the device (`--crop-in "
                     "device`)", dict(shards="", render=str(shards), instances=0, workers=workers, fast="on",
                                      crop_in="device")))
    kind = lambda args: ("pil" if args.get("augment") == "cpu" else "fly" if args.get("render") else  # noqa: E731
                         "stream" if args.get("cache") == "off" else "memory")
    rows = [(label, args) for label, args in rows if paths is None or kind(args) in paths]
    if not cuda:
        rows = [(f"{label}, {p}", {**args, "precision": p}) for label, args in rows for p in cpu_precisions]
    return rows


def training_rows(preset: str = "cpu", steps: int = 100, window: int = 20, stream_images: int = 0,
                  compile_modes: tuple[str, ...] = ("default",), repeats: int = 1,
                  precisions: tuple[str, ...] | None = None,
                  paths: tuple[str, ...] | None = None) -> Iterator[tuple[str, str, str, str, str, str]]:
    """A preset trained through each data path and on random tensors, in this one process: (what, samples/s, % of
    the fast model-only rate, MFU, peak device MiB, note), each row as soon as it is measured (a time-boxed device
    call keeps what finished). Each figure is the median samples/s of the windows after the first (start-up,
    compilation, worker spawn and buffer fill excluded).

    Model only: eager, and on CUDA the fast step once per torch.compile mode in `compile_modes` (uncaptured) and the
    step captured as one CUDA graph; the in-memory path eager (the old step), compiled (and on CUDA compiled but
    uncaptured), old beside new; the other paths with --fast on.
    cpu: the CPU preset on `make pretrain`'s shards, 1 loader worker where there are workers (its default).
    paper: the paper preset on the 1p-frac set (1000 x 512 px) and, streamed, on `stream_images` images (a
    FractalDB-sized set streams the same way; the rate does not depend on its length); loader workers: all
    cores but one; then the CPU preset on the same device, eager and fast. Meant for a GPU machine.
    repeats > 1: every row is measured that many times, round-robin over the rows, and reports the median of its
    rounds; a machine whose speed drifts over minutes (a shared VM) then moves every row alike and the ratios hold.
    Rows are yielded in the last round. `precisions` (CPU) and `paths` (memory, stream, pil, fly) keep only those
    rows.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    cores = os.cpu_count() or 1
    cpu_precisions = precisions or (("fp32", "bf16") if bf16_units() else ("fp32",))
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        if preset == "cpu":
            render_dataset(shards, CPU_SHARDS)
            base = dict(shards=str(shards), steps=steps, log_every=window, eval_every=0, ckpt_every=0)
            workers, big = 1, shards
        else:
            render_dataset(shards, Settings(), workers=cores)  # the 1p-frac set
            big = Path(tmp) / "big"
            n = stream_images or 20_000
            render_dataset(big, Settings(classes=1000, per_class=-(-n // 1000), shard_size=1000), workers=cores)
            base = dict(PRESETS["paper"], shards=str(shards), steps=steps, warmup_epochs=0.0, warmup_steps=10,
                        log_every=window, eval_every=0, ckpt_every=0)
            workers = max(1, cores - 1)
        base["compile_mode"] = compile_modes[0]
        num_classes = data.read_manifest(shards)["num_classes"]
        cfg = Config(**base)
        model, _ = build_model(cfg, num_classes, device)
        flops, peak = flops_per_sample(model, cfg.img_size, device), peak_flops(device)
        del model
        runs = itertools.count()  # every pretrain run gets its own folder

        def model_only(**args):
            rates = model_only_rate(Config(**{**base, **args}), num_classes, steps, window)
            return rates, f"{torch.get_num_threads()} threads" if not cuda else torch.cuda.get_device_name(device)

        def run(**args):
            rates, line = run_rates(Config(**{**base, **args}, out=str(Path(tmp) / f"run{next(runs)}")))
            return rates, line.removeprefix("data: ").split(";")[0].split(" (")[0]

        # (label, measurement, is a model-only row, MFU applies)
        probes = [("model only, eager (random tensors, same model, batch, optimizer)",
                   lambda: model_only(fast="off"), True, True)]
        if not cuda:  # fp32 and bf16 side by side where the CPU has bf16 units (--precision auto picks bf16 there)
            probes = [(f"model only, eager, {p} (random tensors, same model, batch, optimizer)",
                       lambda p=p: model_only(fast="off", precision=p), True, True) for p in cpu_precisions]
        probes += [(f"model only, fast step (torch.compile {mode}, fused AdamW)",
                    lambda mode=mode: model_only(fast="on", compile_mode=mode, graph="off"), True, True)
                   for mode in (compile_modes if cuda else ())]
        if cuda:
            probes.append(("model only, the step as one CUDA graph (torch.compile default, fused AdamW, captured)",
                           lambda: model_only(fast="on", compile_mode="default"), True, True))
        rows = _path_rows(cuda, workers, shards, big, paths, cpu_precisions)
        probes += [(label, lambda args=args: run(**args), False, True) for label, args in rows]
        if preset == "paper":
            small = dict(PRESETS["cpu"], steps=steps, log_every=window, eval_every=0, ckpt_every=0, cache="on",
                         compile_mode=compile_modes[0])
            probes += [(f"CPU preset (32 px, depth 6, batch 128), in-memory, --fast {fast}",
                        lambda fast=fast: (run_rates(Config(shards=str(shards), **small, fast=fast,
                                                            out=str(Path(tmp) / f"run{next(runs)}")))[0],
                                           "one process; not the paper model, so no MFU"), False, False)
                       for fast in (("off", "on") if cuda else ("off",))]

        rounds = {label: [] for label, *_ in probes}
        alone = []  # the model-only rows of the last round, held until the reference (fast if any) is known
        for r in range(repeats):
            for label, measure, model_only_row, mfu_applies in probes:
                _reset_peak(device)
                rates, note = measure()
                rounds[label].append(statistics.median(rates[1:]))
                if r < repeats - 1:
                    continue
                rate = statistics.median(rounds[label])
                used = mfu(rate, flops, peak) if mfu_applies else None
                row = [label, rate, f"{used:.1f}%" if used is not None else "-", _peak_mib(device),
                       note + (f"; median of {repeats} rounds" if repeats > 1 else "")]
                if model_only_row:
                    alone.append(row)
                    continue
                if alone:
                    fast = [a[1] for a in alone[1:]]
                    reference = max(fast, default=alone[0][1])
                    # on a CPU each precision has its model-only row: a data path's share is of its own
                    by_precision = {_precision(a[0]): a[1] for a in alone if not cuda}
                    yield from (_row(a, by_precision.get(_precision(a[0]), reference)) for a in alone)
                    alone = []
                yield _row(row, by_precision.get(_precision(row[0]), reference))


def _precision(label: str) -> str:
    """fp32 or bf16 where the row's label names it ("..., fp32" / "model only, eager, bf16 (...)")."""
    words = label.replace("(", ",").split(", ")
    return next((w.split(" ")[0] for w in words if w.split(" ")[0] in ("fp32", "bf16")), "")


def _row(row: list, reference: float) -> tuple[str, str, str, str, str, str]:
    label, rate, used, mib, note = row
    return label, f"{rate:,.0f}", f"{100 * rate / reference:.0f}%", used, mib, note


def augmentation_rows(batch: int = 256, repeats: int = 3, compiled: bool = True) -> list[tuple[str, str, str]]:
    """ms per batch of the paper preset's image augmentation: timm/PIL one sample at a time (one process) against
    `train.augment` on the whole batch, eager and compiled as one graph, on this machine's device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        render_dataset(Path(tmp), Settings(classes=batch, size=512, shard_size=batch), workers=1)
        images, _ = data.load_images(Path(tmp), data.read_manifest(Path(tmp)))
    pil = [Image.fromarray(im[0].numpy()) for im in images]
    transform = data.train_transform(**PIPELINES[1][2], gray=True)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.stack([transform(im) for im in pil])
        times.append(time.perf_counter() - t0)
    rows = [("timm/PIL transform, one sample at a time, 1 process", f"{1e3 * min(times):,.0f}", "cpu")]
    augment = device_augment(Config(**PAPER))
    images = images.to(device)
    counter = torch.zeros((), dtype=torch.int64, device=device)
    ways = [("eager", augment)]
    if compiled:
        ways.append(("compiled whole (torch.compile fullgraph)", torch.compile(augment, fullgraph=True, dynamic=False,
                                                                              options=BATCH_COMPILE_OPTIONS)))
    for how, run in ways:
        run(images, 0, counter)  # warm-up (and the compilation)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(images, 0, counter)
            counter += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows.append((f"train.augment, whole batch, {how}, {torch.get_num_threads()} threads",
                     f"{1e3 * min(times):,.1f}", device.type))
    return rows


def _peak_bytes(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:  # the process's resident high-water mark (Linux)
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def augmentation_memory(batch: int = 256) -> dict:
    """Device memory of the paper preset's in-memory path: the cached 1p-frac set (1000 x 512 px, uint8) and the
    peak that augmenting one batch of `batch` at 224 px adds (CUDA: max_memory_allocated; CPU: the growth of the
    process's resident high-water mark, run in a fresh process so nothing earlier hides it)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        render_dataset(Path(tmp), Settings(), workers=os.cpu_count() or 1)
        images, _ = data.load_images(Path(tmp), data.read_manifest(Path(tmp)))
    images = images.to(device)
    augment = device_augment(Config(**PAPER))
    index = torch.arange(batch, device=device)
    before = _peak_bytes(device)
    for i in range(3):
        augment(images[index], 0, torch.tensor(i, device=device))
    return {"device": device.type, "cache_mib": images.numel() / 2**20,
            "augment_peak_mib": (_peak_bytes(device) - before) / 2**20}


def memory_rows() -> list[tuple[str, str, str]]:
    import subprocess
    import sys

    code = "import json; from train.bench import augmentation_memory; print(json.dumps(augmentation_memory()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    m = json.loads(out.strip().splitlines()[-1])
    how = "max_memory_allocated" if m["device"] == "cuda" else "growth of the resident high-water mark"
    return [("cached 1p-frac set (1000 x 512 x 512, uint8)", f"{m['cache_mib']:,.0f}", m["device"]),
            ("augmenting one batch of 256 at 224 px (paper preset), peak", f"{m['augment_peak_mib']:,.0f}",
             f"{m['device']}, {how}")]


def checkpoint_rows(preset: str = "paper", repeats: int = 3) -> list[tuple[str, str, str, str]]:
    """What a checkpoint costs the training loop, for a preset's full state (model, AdamW moments after one step,
    scheduler, RNG): the copy to host memory the step waits for (`train.checkpoint.snapshot`), and the write that
    runs on its thread meanwhile (serialise, hash, fsync, rename, link, marker). Medians of `repeats`."""
    from .checkpoint import Checkpoints, snapshot

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = Config(**PRESETS[preset]) if preset != "cpu" else Config()
    model, _ = build_model(cfg, 1000, device)
    optimizer = build_optimizer(cfg, model, 1e-3)
    scheduler = build_scheduler(cfg, optimizer, 1e-3, 10)
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size, device=device)
    model(x).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "step": 1, "config": {}, "rng": [rng_states()]}
    copies, writes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = Checkpoints(Path(tmp))
        for step in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            copy = snapshot(state)
            copies.append(time.perf_counter() - t0)
            ckpts.save(copy, step + 1, wait=True)
            writes.append(ckpts.last_seconds)
        size = (Path(tmp) / "ckpt.pt").stat().st_size
    return [(f"{preset} preset ({cfg.model}, {cfg.img_size} px, AdamW)", f"{size / 2**20:,.0f}",
             f"{statistics.median(copies) * 1e3:,.0f}", f"{statistics.median(writes) * 1e3:,.0f}")]


def _busy_share(events, wall_us: float) -> float:
    """The share of a window of `wall_us` microseconds in which the device ran at least one kernel or copy (the
    union of their intervals)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    busy, end = 0.0, -1.0
    for start, stop in spans:
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy / wall_us if wall_us else 0.0


def step_checks(preset: str = "paper", sync_steps: int = 20, profile_steps: int = 20, graph: str = "auto",
                images: int = 0) -> list[str]:
    """Lines of a report on one in-memory run of the preset with the default --fast: after its first step
    (compilation and, on one GPU, the capture), `sync_steps` steps under `torch.cuda.set_sync_debug_mode("error")`
    (any step that makes the host wait for the device raises, naming the call), then `profile_steps` steps under
    torch.profiler: the top device kernels, and the share of the window's wall time the device was busy. `graph`:
    --graph for the run. On a CPU the sync check does not apply and the profile lists CPU operators."""
    from torch.profiler import ProfilerActivity, profile

    from . import step as step_module

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    lines, calls, window = [], [0], {}
    original = step_module.TrainStep.__call__

    def hooked(self, step_index, raws=None):
        calls[0] += 1
        n = calls[0]
        if n == 2 and cuda and sync_steps:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        if n == 2 + sync_steps:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
            if sync_steps and cuda:
                lines.append(f"sync check: {sync_steps} steps under set_sync_debug_mode('error'), no host "
                             "synchronisation")
            window["profiler"] = profile(activities=[ProfilerActivity.CPU] +
                                         ([ProfilerActivity.CUDA] if cuda else []))
            window["profiler"].__enter__()
            window["t0"] = time.perf_counter()
        original(self, step_index, raws)
        if n == 1 + sync_steps + profile_steps:
            if cuda:
                torch.cuda.synchronize()
            window["wall"] = time.perf_counter() - window["t0"]
            window["profiler"].__exit__(None, None, None)

    steps = 2 + sync_steps + profile_steps
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        if preset == "cpu":
            render_dataset(shards, Settings(**{**CPU_SHARDS.__dict__, "classes": images or CPU_SHARDS.classes}))
            base = dict(PRESETS["cpu"])
        else:
            render_dataset(shards, Settings(classes=images or 1000), workers=os.cpu_count() or 1)
            base = dict(PRESETS["paper"], warmup_epochs=0.0, warmup_steps=10)
        cfg = Config(**{**base, "shards": str(shards), "out": str(Path(tmp) / "run"), "steps": steps,
                        "log_every": steps, "eval_every": 0, "ckpt_every": 0, "cache": "on", "fast": "on",
                        "graph": graph})
        out = io.StringIO()
        step_module.TrainStep.__call__ = hooked
        try:
            with contextlib.redirect_stdout(out):
                pretrain(cfg)
        except RuntimeError as e:  # the sync check: the call that synchronised
            lines.append(f"sync check FAILED at step {calls[0]}: {str(e).splitlines()[0][:300]}")
            return lines + [line for line in out.getvalue().splitlines() if line.startswith(("step:", "note:"))]
        finally:
            step_module.TrainStep.__call__ = original
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    lines += [line for line in out.getvalue().splitlines() if line.startswith(("step:", "note:", "data:"))]
    prof, wall = window["profiler"], window["wall"]
    per_step = wall / profile_steps * 1e3
    lines.append(f"profile: {profile_steps} steps in {wall * 1e3:.1f} ms, {per_step:.2f} ms a step, "
                 f"{cfg.global_batch or cfg.batch} samples a step")
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = _busy_share(kernels, wall * 1e6)
        lines.append(f"profile: the device was busy {100 * busy:.1f}% of the window, idle {100 * (1 - busy):.1f}% "
                     f"({len(kernels) / profile_steps:.0f} device events a step)")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines += prof.key_averages().table(sort_by=sort, row_limit=15).splitlines()
    return lines


@contextlib.contextmanager
def _timed_steps():
    """Times, in every TrainStep built inside, each batch made and each step's device work (host clocks: meaningful
    on the CPU, where the work is synchronous): yields {"batch": [s...], "work": [s...]}."""
    from . import step as step_module

    times = {"batch": [], "work": []}
    init, work = step_module.TrainStep.__init__, step_module.TrainStep.work

    def timed_init(self, model, optimizer, scheduler, make_batch, *args, **kwargs):
        def timed_batch(*batch_args):
            t0 = time.perf_counter()
            made = make_batch(*batch_args)
            times["batch"].append(time.perf_counter() - t0)
            return made
        init(self, model, optimizer, scheduler, timed_batch, *args, **kwargs)

    def timed_work(self, raws):
        t0 = time.perf_counter()
        work(self, raws)
        times["work"].append(time.perf_counter() - t0)

    step_module.TrainStep.__init__, step_module.TrainStep.work = timed_init, timed_work
    try:
        yield times
    finally:
        step_module.TrainStep.__init__, step_module.TrainStep.work = init, work


def batch_share_rows(steps: int = 150, precisions: tuple[str, ...] | None = None,
                     repeats: int = 1) -> list[tuple[str, str, str, str]]:
    """Where the CPU preset's in-memory step goes, measured inside each run (so a VM whose speed drifts between runs
    cannot move it): the median time of making a batch (the draws, augmentation and mixing) against the median
    time of the whole step's work, eager (--fast off) and compiled (--fast on), after the first 20 steps. The
    share left for the model is what the in-memory path can reach of the model-only rate."""
    precisions = precisions or (("fp32", "bf16") if bf16_units() else ("fp32",))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        render_dataset(shards, CPU_SHARDS)
        for precision in precisions:
            for fast in ("off", "on"):
                batch, work = [], []
                for r in range(repeats):
                    cfg = Config(shards=str(shards), steps=steps, log_every=steps, eval_every=0, ckpt_every=0,
                                 fast=fast, precision=precision, out=str(Path(tmp) / f"{precision}-{fast}-{r}"))
                    with _timed_steps() as times, contextlib.redirect_stdout(io.StringIO()):
                        pretrain(cfg)
                    batch.append(statistics.median(times["batch"][20:]))
                    work.append(statistics.median(times["work"][20:]))
                b, w = statistics.median(batch), statistics.median(work)
                how = "eager (`--fast off`)" if fast == "off" else "compiled whole (`--fast on`)"
                rows.append((f"{precision}, batch {how}", f"{b * 1e3:.1f}", f"{w * 1e3:.1f}",
                             f"{100 * (1 - b / w):.1f}%"))
    return rows
