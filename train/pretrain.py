"""Pre-train a timm model on 1p-frac shards: C-way LPCE (soft-target cross-entropy) over the perturbation classes.

Runbook
  one process (CPU default, minutes on 2 cores):
    fracgen-train pretrain --shards /tmp/cpu-shards --out runs/cpu
  the paper's recipe (ViT-Tiny, 224 px, ~240k steps) on one node with 8 GPUs:
    torchrun --standalone --nproc_per_node=8 -m fracgen_train.pretrain --preset paper --shards shards/ --out runs/paper
  the same command continues a run OUT holds (after a kill, a preemption, a torchrun restart or --stop-after);
  SIGTERM / SIGUSR1 / SIGINT stop it with a checkpoint; --ckpt-minutes M, --keep-ckpts K (docs/training.md):
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 -m fracgen_train.pretrain --preset paper \
        --shards shards/ --out runs/paper --ckpt-minutes 20
  from a published folder (pulled once into --cache-dir, checked by sha256, then read locally):
    fracgen-train pretrain --shards https://HOST/PATH/ --out runs/cpu      (or hf://datasets/ORG/NAME, s3://B/P/)
  no shards: render the samples on the fly from a manifest (the same images; --instances 0: fresh ones forever):
    fracgen-train pretrain --render /tmp/cpu-shards/manifest.json --out runs/cpu-fly --instances 0

Data: a set whose decoded pixels fit the cache budget (1p-frac: 1000 images) is decoded once into device memory
and batches are drawn by index on the device; a larger one is streamed from the shards by loader workers that only
decode. Either way the augmentation runs on the device, batched, every draw made there from the step's counter
(`train.augment`, `train.mixup`, `train.rng`); `--augment cpu` is the PIL path instead. With `--render` the samples
are rendered by fracgen instead of read (`train.onthefly`), into the cache or in loader workers, by the same rule.
The paths live in `train.batches`, the step in `train.step` (`--fast`: compiled model and augmentation, fused AdamW,
on one GPU the whole step as one CUDA graph; on by default on CUDA).
Every rank runs exactly --steps optimizer steps; rank 0 alone logs, evaluates the pretext accuracy and writes
RUN_DIR/{ckpt.pt, checkpoints.json, model.safetensors, config.json, model.pth, summary.json, metrics.jsonl}
(train.checkpoint, train.weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import torch.distributed as dist
import typer
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel as DDP

from fracgen.errors import FracgenError
from fracgen.lock import LOCK_NAME, writing_folder
from fracgen.manifest import other_renderer
from fracgen.untrusted import open_regular, parse_json, printable

from . import batches, data, onthefly, weights
from . import model as model_lib
from .augment import DeviceAugment
from .checkpoint import LATEST, Checkpoints, is_temporary, snapshot
from .evaluate import chance_warning, pretext_accuracy
from .mixup import GroupMix
from .preempt import Agreement, Interrupted, Preemption
from .rng import StepRNG
from .runtime import (
    TrainError,
    atomic_write_bytes,
    atomic_write_json,
    parse_float_pair,
    rng_states,
    run_cli,
    seed_everything,
    set_rng_states,
    setup_distributed,
)
from .step import (
    PRECISIONS,
    BatchMaker,
    Fast,
    TrainStep,
    autocast_for,
    compile_batches,
    compile_model,
    example_batch,
    fast_options,
    flops_per_sample,
    mfu,
    model_compile_mode,
    peak_flops,
    resolve_precision,
)


@dataclass
class Config:
    """Defaults are the CPU preset (docs/design.md section 9): a depth-6 ViT-Tiny at 32 px that learns in minutes."""

    shards: str = ""  # a folder, or a published folder's URL / hf://datasets/ORG/NAME (pulled into cache_dir)
    cache_dir: str = ""  # download cache for a remote --shards; "" = $XDG_CACHE_HOME/fracgen or ~/.cache/fracgen
    render: str = ""  # instead of shards: render the samples on the fly from this manifest (train.onthefly)
    instances: int = -1  # with render: instances per class; -1: the manifest's per_class (the shards' set); 0: no end
    out: str = ""
    preset: str = "cpu"
    model: str = "vit_tiny_patch16_224"
    img_size: int = 32
    patch_size: int = 8  # 0 = the timm model's own default
    depth: int = 6  # 0 = the timm model's own default
    model_args: dict = field(default_factory=dict)  # other shape arguments of train.model.MODEL_ARGS
    drop_path: float = 0.0
    steps: int = 1500
    batch: int = 128  # per rank and micro-step; global batch = batch x accum x world size
    global_batch: int = 0  # > 0: fixes the global batch, and batch = global_batch / (accum x world size)
    accum: int = 1
    blr: float = 4e-3  # lr per 512 images of global batch (linear scaling): 1e-3 at batch 128
    lr: float = 0.0  # absolute lr; 0 = blr x global_batch / 512
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 150  # used when warmup_epochs is 0
    warmup_epochs: float = 0.0  # in passes over the manifest's num_samples (the paper counts epochs)
    crop: bool = True
    crop_scale: tuple[float, float] = (0.35, 1.0)  # the paper's 0.08 crops away most of a 32 px fractal
    flip: bool = True  # horizontal and vertical, p 0.5 each
    randaug: str = ""  # timm RandAugment config string, e.g. rand-m9-mstd0.5; "" = off
    reprob: float = 0.0  # random erasing probability
    mixup: float = 0.8
    cutmix: float = 0.0  # off in the CPU preset (docs/design.md section 9 used Mixup alone); the paper's is 1.0
    mix_switch_prob: float = 0.5
    mix_group: int = 0  # samples per Mixup/CutMix draw; 0: the whole micro-batch (timm's 'batch' mode on one process)
    smoothing: float = 0.1
    # fracgen draws strokes at 127 (the reference's value), which ToTensor maps to 0.5 and the 0.5/0.5
    # normalisation to 0: half the contrast. At 32 px a small ViT then learns nothing in minutes; with
    # strokes stretched to 255 it does (measured, README). The paper preset keeps the reference's 127.
    ink_gain: float = 2.0
    augment: str = "device"  # device: batched on the training device (train.augment); cpu: PIL in loader workers
    cache: str = "auto"  # on: decode the set into device memory; off: stream the shards; auto: on if it fits
    crop_in: str = "auto"  # streamed paths: cut crops in the loader workers or on the device; auto: workers on CUDA
    cache_budget: float = 0.0  # GiB the decoded set may take per rank; 0 = a quarter of the device's memory
    shuffle_buffer: int = 1000  # streaming only
    workers: int = 1  # loader processes per rank; streaming only
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    eval_samples: int = 1000
    ckpt_every: int = 500
    ckpt_minutes: float = 0.0  # > 0: a checkpoint also every that many minutes (a job manager thinks in minutes)
    keep_ckpts: int = 1  # the newest K complete checkpoints stay (train.checkpoint)
    stop_after: int = 0  # > 0: end this run after that many steps with a checkpoint (job time limits)
    fast: str = "auto"  # compiled model and batch maker, fused AdamW, captured step (train.step); auto: on on CUDA
    graph: str = "auto"  # the whole step as one CUDA graph; auto: with --fast on one CUDA rank
    compile: bool = False  # torch.compile the model on any device (the CPU too), whatever --fast says
    compile_mode: str = "default"  # torch.compile's mode: default, reduce-overhead (CUDA graphs), max-autotune
    precision: str = "auto"  # bf16 autocast or fp32; auto: bf16 on CUDA and on CPUs with bf16 units (train.step)
    resume: str = "auto"  # auto: continue the run OUT holds, else start; always: must continue; never: must start
    allow_other_data: bool = False  # continue on data other than the checkpoint's (same class count)


PRESETS = {
    "cpu": {},
    # docs/design.md section 6: the reference scripts' recipe; base lr 1e-3 per 512 gives 5e-4 at batch 256.
    # The official training script (1p-frac repository, train/pre-train.sh): 8 GPUs x batch 32 = 256, RandAugment
    # rand-m9-mstd0.5-inc1, random erasing 0.5 ('pixel'), colour jitter off (timm disables it under RandAugment),
    # timm's Mixup/CutMix per GPU: one mixing draw per 32 samples (mix_group).
    "paper": dict(img_size=224, patch_size=16, depth=0, drop_path=0.1, steps=240_000, global_batch=256, blr=1e-3,
                  warmup_epochs=5.0, randaug="rand-m9-mstd0.5-inc1", reprob=0.5, ink_gain=1.0,
                  crop_scale=(0.08, 1.0), cutmix=1.0, mix_group=32, workers=8, log_every=100, eval_every=5000,
                  ckpt_every=5000),
}

# Options that may differ on --resume (they do not change what is being trained).
RESUMABLE = {"out", "shards", "cache_dir", "render", "resume", "allow_other_data", "steps", "workers", "log_every",
             "eval_every", "eval_samples", "ckpt_every", "ckpt_minutes", "keep_ckpts", "stop_after",
             "fast", "compile", "compile_mode", "graph", "crop_in",
             "cache", "cache_budget", "augment", "shuffle_buffer"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


MAX_METRICS_LINE = 1 << 20  # the trainer's lines take ~150 bytes; a longer one is not its record


def _record(line: bytes, path: Path) -> dict | None:
    """A line of metrics.jsonl as the trainer wrote it (a flat JSON object of numbers, flags and short names, the
    step an integer, the loss a number), or None."""
    try:
        entry = parse_json(line, str(path), MAX_METRICS_LINE)
    except FracgenError:
        return None
    if not isinstance(entry, dict) or len(entry) > 64:
        return None
    if not all(v is None or isinstance(v, (bool, int, float)) or isinstance(v, str) and len(v) <= 1000
               for v in entry.values()):
        return None
    if any(k in entry and (type(entry[k]) is not int) for k in ("step", "resumed_from")):
        return None
    if "loss" in entry and (isinstance(entry["loss"], bool) or not isinstance(entry["loss"], (int, float))):
        return None
    return entry


def _metrics_up_to(path: Path, step: int, log) -> tuple[float | None, float | None]:
    """On resume: drop the metrics a killed run logged after its last checkpoint (they will be logged again), so
    every step appears once; return the run's first and last logged losses. Read line by line, each bounded: a line
    that is not the trainer's record (torn by a kill, longer than MAX_METRICS_LINE, not flat JSON) is dropped with
    a note, and the file is never held whole."""
    try:
        source = open_regular(path)
    except FileNotFoundError:
        return None, None
    except FracgenError as e:
        raise TrainError(f"{e}: refused (the trainer appends its metrics there)") from None
    first = last = None
    skipped = 0

    def keep(out) -> None:
        nonlocal first, last, skipped
        while line := source.readline(MAX_METRICS_LINE + 1):
            if len(line) > MAX_METRICS_LINE:  # the rest of an overlong line, in bounded pieces
                while line and not line.endswith(b"\n"):
                    line = source.readline(MAX_METRICS_LINE + 1)
                skipped += 1
                continue
            entry = _record(line, path)
            if entry is None:
                skipped += 1
            elif not entry.get("final") and entry.get("step", 0) <= step:
                out.write(line.rstrip(b"\n") + b"\n")
                if "loss" in entry:
                    first = entry["loss"] if first is None else first
                    last = entry["loss"]

    with source:
        atomic_write_bytes(keep, path)
    if skipped:
        log(f"note: {printable(path)}: {skipped} line(s) that are not the trainer's records (torn by a kill, longer "
            f"than {MAX_METRICS_LINE:,} bytes, not flat JSON) were dropped")
    return first, last


def per_rank_batch(cfg: Config, world_size: int) -> int:
    """Images per rank and micro-step: --batch, or --global-batch shared out over accumulation and ranks."""
    if not cfg.global_batch:
        return cfg.batch
    share = cfg.accum * world_size
    if cfg.global_batch % share:
        raise TrainError(f"--global-batch {cfg.global_batch} does not divide into {cfg.accum} accumulation step(s) x "
                         f"{world_size} rank(s)")
    return cfg.global_batch // share


def build_model(cfg: Config, num_classes: int, device) -> tuple[torch.nn.Module, dict]:
    model_args = model_lib.architecture_args(cfg.img_size, cfg.patch_size or None, cfg.depth or None,
                                             cfg.model_args)
    return model_lib.create(cfg.model, num_classes, model_args, cfg.drop_path).to(device), model_args


def build_optimizer(cfg: Config, model: torch.nn.Module, lr: float, fused: bool = False) -> torch.optim.Optimizer:
    # timm's AdamW factory leaves biases, norms, pos_embed and cls_token out of weight decay.
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=cfg.weight_decay, **({"fused": True} if fused
                                                                                        else {}))


def build_scheduler(cfg: Config, optimizer, lr: float, warmup: int) -> CosineLRScheduler:
    # warmup_prefix: the cosine starts after the warm-up, so the peak lr is actually reached.
    return CosineLRScheduler(optimizer, t_initial=cfg.steps - warmup, lr_min=cfg.min_lr, warmup_t=warmup,
                             warmup_lr_init=lr / 1000, warmup_prefix=True, t_in_epochs=False)


def device_augment(cfg: Config, cropped: bool = False) -> DeviceAugment:
    """The run's augmentation on the device; `cropped`: the loader workers already applied the ink gain and cut
    the crops at the model's size (`train.augment.HostCrop`), the device does the rest."""
    return DeviceAugment(cfg.img_size, crop=cfg.crop and not cropped, crop_scale=cfg.crop_scale,
                         hflip=0.5 * cfg.flip, vflip=0.5 * cfg.flip, randaug=cfg.randaug or None, reprob=cfg.reprob,
                         mean=data.PRETRAIN_MEAN[0], std=data.PRETRAIN_STD[0],
                         ink_gain=1.0 if cropped else cfg.ink_gain)


def pretrain(cfg: Config) -> dict:
    """Run (or continue) a pre-training; returns rank 0's summary. Rank 0 holds the run folder's lock throughout:
    one writer per run folder."""
    rank, local_rank, world_size, device = setup_distributed()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is not a folder")
    if rank == 0:
        check_out(out)
    if rank != 0:
        with Preemption() as preemption:
            return _pretrain(cfg, rank, local_rank, world_size, device, preemption)
    try:  # a run that fails before writing anything leaves no folder behind
        note = lambda text: print(f"note: {printable(text)}", flush=True)  # noqa: E731
        with writing_folder(out, "fracgen-train pretrain", note, f"--out {out}"), Preemption() as preemption:
            return _pretrain(cfg, rank, local_rank, world_size, device, preemption)
    except FracgenError as e:
        raise TrainError(str(e)) from None
    except OSError as e:
        raise TrainError(f"cannot write the run folder {out}: {e.strerror or e}") from None


METRICS = "metrics.jsonl"


def check_out(out: Path) -> None:
    """Refuse, before anything is written, an --out that is not ours to write: a folder without a checkpoint that
    holds anything but what a run killed before its first checkpoint leaves (a published model folder, a user's
    folder with a config.json, a finished run whose checkpoints were removed: pretrain would replace their files);
    a metrics.jsonl that is a link or not a regular file (appended to, it would be written through)."""
    if not out.is_dir():
        return
    if os.path.lexists(out / METRICS) and not stat.S_ISREG(os.lstat(out / METRICS).st_mode):
        raise TrainError(f"{out / METRICS} is {'a link' if os.path.islink(out / METRICS) else 'not a regular file'}:"
                         " refused (the trainer appends its metrics there and writes nothing through links)")
    if Checkpoints(out).exists():
        return
    leftovers = {METRICS, LOCK_NAME}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in leftovers and not is_temporary(p.name))
    if foreign:
        shown = ", ".join(printable(name)[:60] for name in foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise TrainError(f"--out {out} is not a fracgen-train pretrain run folder: it holds {shown} and no checkpoint; "
                         "nothing was written (choose a new or empty folder)")


def _load_resume(cfg: Config, checkpoints: Checkpoints, log) -> tuple[dict, Path] | tuple[None, None]:
    """The checkpoint this run continues, and its file: the newest complete one in the run folder, unless
    `--no-resume` (which refuses a folder holding one); none for a new run. Refuses one past --steps."""
    if not checkpoints.exists():
        if cfg.resume == "always":
            raise TrainError(f"--resume: no checkpoint in {cfg.out} to continue")
        return None, None
    if cfg.resume == "never":
        raise TrainError(f"{cfg.out} holds a checkpoint of a run: the same command without --no-resume continues it;"
                         " or choose another --out")
    checkpoint, path = checkpoints.load_latest(resume=True, note=log)
    if checkpoint["step"] > cfg.steps:
        raise TrainError(f"the checkpoint is at step {checkpoint['step']}, past --steps {cfg.steps} ({path}); give "
                         f"--steps {checkpoint['step']} or more")
    return checkpoint, path


def _warmup_steps(cfg: Config, epoch_images: int, global_batch: int) -> int:
    warmup = round(cfg.warmup_epochs * epoch_images / global_batch) if cfg.warmup_epochs else cfg.warmup_steps
    return min(warmup, cfg.steps // 2)  # short runs (tests, smoke checks) still get a cosine phase


def _renderer_note(manifest: dict) -> str:
    """Shards an older fracgen drew train as they are, but their images (and so the results) differ from a fresh
    render of the same settings (docs/results.md: one renderer change moved make pretrain's figure by 8.9 points)."""
    other = other_renderer(manifest)
    return f" ({other}: re-render to compare with current figures)" if other else ""


def _augmentations(cfg: Config) -> str:
    augs = [name for name, on in [("crop", cfg.crop), ("flips", cfg.flip), (cfg.randaug, cfg.randaug),
                                  (f"erasing {cfg.reprob}", cfg.reprob), (f"mixup {cfg.mixup}", cfg.mixup),
                                  (f"cutmix {cfg.cutmix}", cfg.cutmix),
                                  (f"smoothing {cfg.smoothing}", cfg.smoothing)] if on]
    return ", ".join(augs) or "none"


@dataclass
class Rank:
    """Where this process runs: torchrun's rank, local rank and world size, and its device. Rank 0 logs, evaluates
    and writes the run folder."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0

    def log(self, *args) -> None:
        if self.master:  # folder names and sources shown as text: no terminal codes, no secret of a URL
            print(printable(" ".join(map(str, args))), flush=True)


@dataclass
class Plan:
    """What the data and the options make of the run, before anything is built."""

    run: batches.RunData
    batch: int  # per rank and micro-step
    global_batch: int
    lr: float
    warmup: int
    fast: Fast
    chosen: tuple[str, str]  # the data path and why (batches.choose_data_path)
    data_sha256: str
    precision: tuple[str, str] = ("fp32", "")  # (bf16 | fp32, why): train.step.resolve_precision


def plan_run(cfg: Config, where: Rank, checkpoint: dict | None) -> Plan:
    """Read the data (pulling a remote source once per node), check it is the checkpoint's, and size the step."""
    run = batches.read_run_data(cfg, where.local_rank, log=lambda text: print(printable(text), flush=True))
    if checkpoint is not None and checkpoint["num_classes"] != run.num_classes:
        raise TrainError(f"{run.source} has {run.num_classes} classes, the checkpoint was trained on "
                         f"{checkpoint['num_classes']}: resume with the data it was trained on")
    data_sha256 = data.data_sha256(run.shards_dir, run.manifest)
    if checkpoint is not None and not cfg.allow_other_data:
        data.check_resume_data(checkpoint, data_sha256, run.source, where.log)
    batch = per_rank_batch(cfg, where.world_size)
    if (cfg.mixup > 0 or cfg.cutmix > 0) and batch % 2:
        raise TrainError(f"the batch per rank ({batch}) must be even with Mixup/CutMix (they pair images in a batch)")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mix_group and (batch % cfg.mix_group or cfg.mix_group % 2):
        raise TrainError(f"--mix-group {cfg.mix_group} must be even and divide the batch per rank ({batch}): each "
                         "group of samples gets its own Mixup/CutMix draw and pairs its images within itself")
    chosen = batches.choose_data_path(cfg, run.manifest, where.device, run.images)  # refuse one that cannot work
    global_batch = batch * cfg.accum * where.world_size
    precision = resolve_precision(cfg.precision, where.device)
    if checkpoint is not None and cfg.precision == "auto":
        # a continued run keeps the arithmetic it started with, whatever this machine would choose (checkpoints from
        # before --precision: bf16 on CUDA, fp32 on a CPU)
        began = checkpoint.get("precision") or ("bf16" if where.device.type == "cuda" else "fp32")
        precision = (began, f"auto: as the run began ({began})")
    return Plan(run, batch, global_batch, cfg.lr or cfg.blr * global_batch / 512,
                _warmup_steps(cfg, run.epoch_images, global_batch),
                fast_options(cfg.fast, cfg.compile, cfg.compile_mode, where.device, cfg.steps - (checkpoint or {}).get(
                    "step", 0), where.world_size, cfg.graph), chosen, data_sha256, precision)


@dataclass
class Parts:
    """What trains: the model (compiled and wrapped in DDP where asked) and the bare one, the optimizer, schedule,
    scaler, the augmentation's random streams and the step."""

    model: torch.nn.Module
    raw_model: torch.nn.Module
    model_args: dict
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler
    rng: StepRNG
    autocast: object
    fast: Fast
    flops: float = 0.0  # of one sample's forward and backward (rank 0 counts them: the log's MFU)
    train_step: TrainStep | None = None


def build(cfg: Config, plan: Plan, where: Rank) -> Parts:
    """The network, optimizer, schedule and random streams of step 0 (every rank initialises alike)."""
    seed_everything(cfg.seed)  # one initialisation on every rank (DDP would broadcast rank 0's anyway)
    model, model_args = build_model(cfg, plan.run.num_classes, where.device)
    seed_everything(cfg.seed + where.rank)  # then offset by rank: different dropout and mixing per rank
    optimizer = build_optimizer(cfg, model, plan.lr, fused=plan.fast.fused)
    # bf16 autocast on CUDA needs no loss scaling; the scaler is kept (disabled) so checkpoints look the same.
    return Parts(model, model, model_args, optimizer, build_scheduler(cfg, optimizer, plan.lr, plan.warmup),
                 torch.amp.GradScaler(where.device.type, enabled=False),
                 StepRNG(cfg.seed, where.rank, where.device),
                 autocast_for(where.device, plan.precision[0]), plan.fast,
                 flops_per_sample(model, cfg.img_size, where.device) if where.master else 0.0)


def restore(cfg: Config, plan: Plan, where: Rank, parts: Parts, checkpoint: dict, path: Path) -> int:
    """Load a checkpoint into the parts (weights, optimizer, schedule, every random stream of this rank); the step
    it was taken at."""
    model_lib.load_weights(parts.raw_model, checkpoint["model"], str(path))
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    parts.scheduler.load_state_dict(checkpoint["scheduler"])
    parts.scaler.load_state_dict(checkpoint["scaler"])
    step = checkpoint["step"]
    if cfg.steps != checkpoint["config"]["steps"]:
        # A new length means a new cosine; the schedule is a pure function of the step, so rebuilding is exact.
        parts.scheduler = build_scheduler(cfg, parts.optimizer, plan.lr, plan.warmup)
    saved = checkpoint["rng"]
    if where.rank < len(saved):
        set_rng_states(saved[where.rank])
        if "micro" not in saved[where.rank].get("augment", {}):
            where.log("note: this checkpoint was written by an older trainer, whose augmentation drew from host "
                      "generators; the run continues with the device's counter-based draws (docs/training.md), so "
                      "it is not bit for bit what an uninterrupted run of that version would have trained")
    else:  # more ranks than the checkpoint had: new streams for the new ranks
        seed_everything(cfg.seed + where.rank + 1_000_003 * step)
    parts.rng.seek(step * cfg.accum)  # the draws are a function of (seed, rank, micro-step): nothing else to load
    return step


def make_step(cfg: Config, plan: Plan, where: Rank, parts: Parts, path: batches.DataPath) -> None:
    """The training step: the model compiled where --fast asks (tried first; eager with a note where it fails) and
    wrapped in DDP on several ranks; the batch maker (the in-memory path's draws, the augmentation on the device,
    Mixup/CutMix by --mix-group, label smoothing) compiled as one graph where asked; LPCE (train.step); on one CUDA
    rank the whole step captured as a CUDA graph at its first call."""
    fast, device = parts.fast, where.device
    if fast.compile:
        mode = model_compile_mode(cfg.compile_mode, fast.graph)
        example = example_batch(parts.raw_model, plan.batch, cfg.img_size, plan.run.num_classes, device,
                                parts.model_args.get("in_chans", 3))
        parts.model, compiled = compile_model(parts.model, mode, example, parts.autocast, where.log)
        fast = dataclasses.replace(fast, compile=compiled, compile_mode=mode)  # the log's `step:` line says what runs
    if where.world_size > 1:
        parts.model = DDP(parts.model, device_ids=[where.local_rank] if device.type == "cuda" else None)
    mix = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mix = GroupMix(plan.run.num_classes, cfg.mixup, cfg.cutmix, cfg.mix_switch_prob, cfg.smoothing, cfg.mix_group)
    maker = BatchMaker(None if path.augmented else device_augment(cfg, path.cropped), mix, plan.run.num_classes,
                       cfg.smoothing, parts.rng.key, path.source if isinstance(path, batches.MemoryPath) else None)
    if fast.augment:
        maker, compiled = compile_batches(maker, (parts.rng.counter.clone(), path.example(plan.batch, device)),
                                          where.log)
        fast = dataclasses.replace(fast, augment=compiled)
    parts.fast = fast
    parts.train_step = TrainStep(parts.model, parts.optimizer, parts.scheduler, maker, parts.rng, accum=cfg.accum,
                                 autocast=parts.autocast, scaler=parts.scaler, distributed=where.world_size > 1,
                                 graph=fast.graph, log=where.log)


def checkpoint_state(cfg: Config, plan: Plan, parts: Parts, step: int, rngs: list) -> dict:
    """What a checkpoint holds: enough to rebuild the network alone (name, args, classes, weights) and to continue
    the run bit for bit (optimizer, schedule, scaler, every rank's random streams, the data's sha256)."""
    return {"model_name": cfg.model, "model_args": parts.model_args, "num_classes": plan.run.num_classes,
            "model": model_lib.clean_state_dict(parts.raw_model), "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(), "step": step,
            "config": dataclasses.asdict(cfg), "rng": rngs, "world_size": len(rngs),
            "fracgen_settings": plan.run.manifest.get("settings", {}), "data_sha256": plan.data_sha256,
            "precision": plan.precision[0]}


class Metrics:
    """metrics.jsonl, rank 0's: one JSON line per log window, evaluation and the final summary. A continued run
    first drops what its predecessor logged after its checkpoint and marks the seam. Appended to, never through a
    link (O_NOFOLLOW)."""

    def __init__(self, out: Path, master: bool, step: int, log=print):
        self.first_loss = self.last_loss = None
        if master and step:
            self.first_loss, self.last_loss = _metrics_up_to(out / METRICS, step, log)
        self.file = _append(out / METRICS) if master else None
        if step:
            self.record({"resumed_from": step})

    def record(self, entry: dict) -> None:
        if self.file:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _append(path: Path):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        why = ("a link: refused (the trainer appends its metrics there and writes nothing through links)"
               if os.path.islink(path) else e.strerror or str(e))
        raise TrainError(f"{path}: {why}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TrainError(f"{path} is not a regular file: refused (the trainer appends its metrics there)")
    return os.fdopen(fd, "a")


@dataclass
class Outcome:
    step: int
    first_loss: float | None
    last_loss: float | None
    stopped_by: str = ""  # the signal that stopped the run, if one did


def train_loop(cfg: Config, plan: Plan, where: Rank, parts: Parts, feed, step: int, end: int, metrics: Metrics,
               evaluate, save, checkpoints: Checkpoints, preemption: Preemption) -> Outcome:
    """Steps `step`..`end`: log every --log-every steps (the loss read from the device then only), evaluate every
    --eval-every, checkpoint when due, and stop early when the ranks agree a signal came."""
    agreement, peak = Agreement(where.world_size), peak_flops(where.device)
    outcome = Outcome(step, metrics.first_loss, metrics.last_loss)
    window_steps, t_window = 0, time.time()
    preemption.defer()  # from here a signal stops the run at a step boundary, with a checkpoint
    while outcome.step < end:
        parts.train_step(outcome.step, feed.take(cfg.accum))
        outcome.step += 1
        step, window_steps = outcome.step, window_steps + 1
        if step % cfg.log_every == 0 or step == end:
            loss = parts.train_step.take_mean_loss()  # rank 0's mean LPCE over the window
            if not math.isfinite(loss):
                raise diverged(f"the loss (LPCE {loss})", step, checkpoints)
            rate = window_steps * plan.global_batch / (time.time() - t_window)
            outcome.first_loss = loss if outcome.first_loss is None else outcome.first_loss
            outcome.last_loss, lr_now = loss, parts.optimizer.param_groups[0]["lr"]
            used = mfu(rate / where.world_size, parts.flops, peak)
            where.log(f"step {step}/{cfg.steps} | LPCE {loss:.4f} | lr {lr_now:.2e} | {rate:.0f} samples/s"
                      f"{f' | MFU {used:.1f}%' if used is not None else ''} | eta "
                      f"{(cfg.steps - step) * plan.global_batch / rate / 60:.1f} min")
            metrics.record({"step": step, "loss": loss, "lr": lr_now, "samples_per_s": rate,
                            **({"mfu": used} if used is not None else {})})
            window_steps, t_window = 0, time.time()
        if where.master and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            result = evaluate()
            where.log(f"step {step}/{cfg.steps} | pretext top-1 {result['pretext_acc']:.1f}% (chance "
                      f"{100 / plan.run.num_classes:.2g}%) | clean CE {result['pretext_loss']:.3f}")
            metrics.record({"step": step, **result})
        stop = by_time = False
        if agreement.asks(step):  # the ranks agree: a signal reached any of them; rank 0's clock says save
            stop, by_time = agreement.decide(preemption.received is not None,
                                             where.master and checkpoints.due_by_time())
        if stop:
            outcome.stopped_by = preemption.name or "a signal to another rank"
            break
        if (checkpoints.due_by_steps(step) or by_time) and step != cfg.steps:
            save(step)
        if window_steps == 0:
            t_window = time.time()  # evaluation and checkpoint time is not training throughput
    return outcome


def check_finite(model: torch.nn.Module, step: int, checkpoints: Checkpoints) -> None:
    """One TrainError line when the weights after `step` hold NaN or infinity (one device sync: every parameter
    reduced on the device)."""
    if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
        raise diverged("the weights", step, checkpoints)


def diverged(what: str, step: int, checkpoints: Checkpoints) -> TrainError:
    last = checkpoints.entries()
    kept = f"its last checkpoint (step {last[-1]['step']}) kept" if last else "with no checkpoint"
    return TrainError(f"{what} became non-finite by step {step}: the run stops, {kept}; lower the learning rate "
                      "(--lr, --blr) and start again in a new --out")


def describe(cfg: Config, plan: Plan, where: Rank, parts: Parts, path, why: str, step: int) -> None:
    """The run's head in the log: network, data, schedule, data path, step."""
    manifest, n_params = plan.run.manifest, sum(p.numel() for p in parts.raw_model.parameters()) / 1e6
    what = (f"rendered on the fly from {cfg.render}" if cfg.render else
            f"{manifest['num_samples']} images in {len(plan.run.urls)} shards{_renderer_note(manifest)}")
    where.log(f"pretrain: {cfg.model} {parts.model_args} ({n_params:.2f}M params, {parts.flops / 1e9:.3g} GFLOP per "
              "sample "
              f"forward + backward), {plan.run.num_classes} classes, {what}")
    where.log(f"pretrain: {cfg.steps} steps, global batch {plan.global_batch} ({where.world_size} x {plan.batch} x "
              f"{cfg.accum}), lr {plan.lr:.2e}, warm-up {plan.warmup} steps, device {where.device.type} "
              f"{plan.precision[0]} ({plan.precision[1]}), augment: {_augmentations(cfg)}")
    where.log(f"data: {path.how} ({why})")
    where.log(f"step: {parts.fast.describe(where.device)}")
    if step:
        where.log(f"pretrain: resumed from step {step}")


def summarise(cfg: Config, plan: Plan, where: Rank, parts: Parts, outcome: Outcome, evaluate, metrics: Metrics,
              preemption: Preemption) -> dict:
    """How the run ended, in the log and the run folder: stopped (by a signal, or --stop-after), or finished with
    its weights (train.weights), summary.json and the pretext accuracy, warned about when near chance."""
    out, num_classes = Path(cfg.out), plan.run.num_classes
    if outcome.stopped_by:
        where.log(f"stopped by {outcome.stopped_by} at step {outcome.step} of {cfg.steps}: checkpoint "
                  f"{out / LATEST} written; the same command continues the run")
        return {"step": outcome.step, "stopped_by": outcome.stopped_by, "signal": preemption.received}
    if outcome.step < cfg.steps:
        where.log(f"stopped at step {outcome.step} of {cfg.steps} (--stop-after {cfg.stop_after}): the same command "
                  "continues the run")
        return {}
    if not where.master:
        return {}
    result = evaluate()
    weights.write_run(out, parts.raw_model, cfg.model, parts.model_args, num_classes, outcome.step,
                      dataclasses.asdict(cfg), weights.data_record(plan.run.manifest, plan.data_sha256,
                                                                   plan.run.source),
                      data.PRETRAIN_MEAN, data.PRETRAIN_STD)
    summary = {"step": outcome.step, "first_loss": outcome.first_loss, "last_loss": outcome.last_loss, **result,
               "chance_acc": 100 / num_classes}
    metrics.record({"final": True, **summary})
    atomic_write_json(summary, out / "summary.json")
    loss = (f"LPCE {outcome.first_loss:.3f} -> {outcome.last_loss:.3f}" if outcome.first_loss is not None
            else "no training steps")
    where.log(f"done: {loss} | pretext top-1 {result['pretext_acc']:.1f}% on {result['eval_samples']} clean "
              f"images (chance {100 / num_classes:.2g}%) | weights: {out / weights.WEIGHTS}")
    settings = plan.run.manifest.get("settings", {})
    warning = chance_warning(result["pretext_acc"], num_classes, cfg.shards, cfg.img_size,
                             settings.get("seed") if settings.get("system", "1p-frac") == "1p-frac" else None)
    if warning:
        where.log(warning)
    return summary


def _pretrain(cfg: Config, rank: int, local_rank: int, world_size: int, device, preemption: Preemption) -> dict:
    where = Rank(rank, local_rank, world_size, device)
    out = Path(cfg.out)
    checkpoints = Checkpoints(out, cfg.keep_ckpts, cfg.ckpt_every, cfg.ckpt_minutes)
    if where.master:
        checkpoints.remove_temporaries()  # of a write that was killed; we hold the run folder's lock
    checkpoint, ckpt_path = _load_resume(cfg, checkpoints, where.log)
    if checkpoint is not None and checkpoint["step"] == cfg.steps:
        missing = weights.finished_problem(out)
        if missing is None:
            where.log(f"pretrain: {out} already finished all {cfg.steps} steps; nothing to do (weights: "
                      f"{out / weights.WEIGHTS})")
            return {}
        # killed after its last checkpoint and before its weights (kill -9, OOM, a full disk at the end)
        where.log(f"pretrain: {out} finished all {cfg.steps} steps, but {missing}: writing them from its checkpoint "
                  f"of step {cfg.steps}")

    plan = plan_run(cfg, where, checkpoint)
    parts = build(cfg, plan, where)
    step = restore(cfg, plan, where, parts, checkpoint, ckpt_path) if checkpoint is not None else 0
    del checkpoint
    end = min(cfg.steps, step + cfg.stop_after) if cfg.stop_after else cfg.steps  # where this run stops
    path, why = batches.open_data(cfg, plan.run, device, plan.batch, rank, world_size, step, plan.chosen)
    if step < end:
        make_step(cfg, plan, where, parts, path)
    feed = batches.Feed(path, device, step * cfg.accum, end * cfg.accum, hint=str(plan.run.shards_dir or cfg.render))
    clean = device_augment(cfg).evaluate

    def evaluate() -> dict:
        return pretext_accuracy(parts.raw_model, path.eval_batches(), clean, device, parts.autocast)

    def save(at: int, wait: bool = False) -> None:
        """Every rank's random streams gathered (a collective), rank 0's copy of the state written by
        `checkpoints` on its thread (`wait`: before returning). Weights that are not all finite are never saved:
        every rank stops (DDP keeps them alike) with one line, the last checkpoint kept."""
        check_finite(parts.raw_model, at, checkpoints)
        mine = {**rng_states(), "augment": parts.rng.state()}
        rngs = [None] * world_size
        if world_size > 1:
            dist.all_gather_object(rngs, mine)  # every rank's RNG, so resume restores each one
        else:
            rngs = [mine]
        if where.master:
            checkpoints.save(snapshot(checkpoint_state(cfg, plan, parts, at, rngs)), at, wait=wait)

    describe(cfg, plan, where, parts, path, why, step)
    metrics = Metrics(out, where.master, step, where.log)
    try:
        outcome = train_loop(cfg, plan, where, parts, feed, step, end, metrics, evaluate, save, checkpoints,
                             preemption)
    except BaseException:
        with contextlib.suppress(BaseException):  # a checkpoint being written completes before the lock goes
            checkpoints.wait()
        raise
    finally:
        feed.close()
    # Every rank reports its own count: all ranks must have run the same number of steps (no DDP hang).
    print(f"[rank {rank}] done: {outcome.step - step} steps this run, at step {outcome.step}", flush=True)
    if outcome.step > step:  # (a finished run writing its missing weights has its checkpoint already)
        save(outcome.step, wait=True)
    summary = summarise(cfg, plan, where, parts, outcome, evaluate, metrics, preemption)
    metrics.close()
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise typer.BadParameter(f"{text!r} is not KEY=VALUE")
    try:
        value = json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        pass  # a string
    return key, model_lib.check_arg(key, value, "--model-arg")


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="run folder for checkpoints, weights and metrics")],
    shards: Annotated[str | None, typer.Option(help="folder written by `fracgen render --out` (has manifest.json), "
                                                    "or a published folder's http(s) URL or "
                                                    "hf://datasets/ORG/NAME\\[@REVISION], pulled once into "
                                                    "--cache-dir")]
    = None,
    render: Annotated[Path | None, typer.Option(help="render the samples on the fly instead of reading shards: a "
                                                     "`fracgen render` folder or its manifest.json (shards not "
                                                     "needed)")] = None,
    instances: Annotated[int | None, typer.Option(help="with --render: instances per class (default: the "
                                                       "manifest's per-class, the shards' images; 0: a fresh "
                                                       "instance every epoch, no end)")] = None,
    preset: Annotated[str, typer.Option(help="cpu (minutes on 2 cores) or paper (docs/design.md section 6)")] = "cpu",
    model: Annotated[str | None, typer.Option(help="timm model name")] = None,
    img_size: Annotated[int | None, typer.Option(help="input resolution in pixels")] = None,
    patch_size: Annotated[int | None, typer.Option(help="ViT patch size (0 = model default)")] = None,
    depth: Annotated[int | None, typer.Option(help="ViT depth (0 = model default)")] = None,
    model_arg: Annotated[list[str] | None, typer.Option(help="another shape argument KEY=VALUE of the timm model "
                                                            "(repeat; embed_dim, num_heads, mlp_ratio, ...: "
                                                            "train.model.MODEL_ARGS)")] = None,
    drop_path: Annotated[float | None, typer.Option(help="stochastic depth rate")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    batch: Annotated[int | None, typer.Option(help="images per rank per micro-step")] = None,
    global_batch: Annotated[int | None, typer.Option(help="images per optimizer step over all ranks and micro-steps "
                                                          "(sets the per-rank batch; the paper preset's 256)")] = None,
    accum: Annotated[int | None, typer.Option(help="gradient accumulation micro-steps")] = None,
    blr: Annotated[float | None, typer.Option(help="lr per 512 images of global batch")] = None,
    lr: Annotated[float | None, typer.Option(help="absolute lr (overrides --blr scaling)")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="warm-up steps")] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="warm-up in passes over the shards")] = None,
    crop: Annotated[bool | None, typer.Option("--crop/--no-crop", help="RandomResizedCrop")] = None,
    crop_scale: Annotated[str | None, typer.Option(help="crop area range MIN,MAX")] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", help="horizontal + vertical flips")] = None,
    randaug: Annotated[str | None, typer.Option(help="timm RandAugment string, e.g. rand-m9-mstd0.5")] = None,
    no_randaug: Annotated[bool, typer.Option("--no-randaug", help="switch RandAugment off")] = False,
    reprob: Annotated[float | None, typer.Option(help="random erasing probability")] = None,
    mixup: Annotated[float | None, typer.Option(help="Mixup alpha (0 = off)")] = None,
    cutmix: Annotated[float | None, typer.Option(help="CutMix alpha (0 = off)")] = None,
    smoothing: Annotated[float | None, typer.Option(help="label smoothing")] = None,
    ink_gain: Annotated[float | None, typer.Option(help="multiply stroke values (127 -> 254 at 2)")] = None,
    augment: Annotated[str | None, typer.Option(help="device: batched augmentation on the training device; cpu: "
                                                      "PIL in loader workers (the old path)")] = None,
    cache: Annotated[str | None, typer.Option(help="auto: hold the decoded set in device memory if it fits the "
                                                   "budget, else stream; on; off")] = None,
    crop_in: Annotated[str | None, typer.Option(help="streamed paths: cut the crops in the loader workers (ship "
                                                     "model-sized crops) or on the device; auto: workers on CUDA")]
    = None,
    cache_budget: Annotated[float | None, typer.Option(help="GiB the decoded set may take per rank (default: a "
                                                            "quarter of the device's memory)")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="download cache for a --shards URL or hf:// source, one "
                                                      "folder per data set (default $XDG_CACHE_HOME/fracgen or "
                                                      "~/.cache/fracgen); not the in-memory --cache")] = None,
    shuffle_buffer: Annotated[int | None, typer.Option(help="samples in the shuffle buffer (streaming)")] = None,
    workers: Annotated[int | None, typer.Option(help="data loader worker processes per rank (streaming)")] = None,
    seed: Annotated[int | None, typer.Option(help="base seed (offset by rank)")] = None,
    log_every: Annotated[int | None, typer.Option(help="log a line every N steps")] = None,
    eval_every: Annotated[int | None, typer.Option(help="pretext accuracy every N steps (0 = only at end)")] = None,
    eval_samples: Annotated[int | None, typer.Option(help="images used for pretext accuracy")] = None,
    ckpt_every: Annotated[int | None, typer.Option(help="checkpoint every N steps (and at the end)")] = None,
    stop_after: Annotated[int | None, typer.Option(help="end this run after N steps with a checkpoint, for job "
                                                        "time limits; --resume continues (the schedule is --steps')")]
    = None,
    fast: Annotated[str | None, typer.Option(help="auto, on or off. on: on CUDA the model and the augmentation "
                                                  "compiled, fused AdamW, the step as one CUDA graph; on the CPU the "
                                                  "augmentation compiled (train.step). auto: on on CUDA, and on the "
                                                  "CPU for runs of 1000 steps or more")]
    = None,
    graph: Annotated[str | None, typer.Option(help="auto, on or off: capture the whole step as one CUDA graph "
                                                   "(auto: with --fast, on one CUDA rank)")] = None,
    mix_group: Annotated[int | None, typer.Option(help="samples per Mixup/CutMix draw (0: the whole batch per rank; "
                                                       "the paper preset's 32, as its 8 GPUs x 32 images)")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model, on any device")] = False,
    compile_mode: Annotated[str | None, typer.Option(help="torch.compile mode: default, reduce-overhead (CUDA "
                                                          "graphs), max-autotune, max-autotune-no-cudagraphs")]
    = None,
    ckpt_minutes: Annotated[float | None, typer.Option(help="also a checkpoint every M minutes (0 = off)")] = None,
    precision: Annotated[str | None, typer.Option(help="auto (bf16 autocast on CUDA and on CPUs with bf16 units, "
                                                       "else fp32), bf16 or fp32")] = None,
    keep_ckpts: Annotated[int | None, typer.Option(help="keep the newest K complete checkpoints")] = None,
    resume: Annotated[bool | None, typer.Option("--resume/--no-resume", help="default: continue the run OUT holds "
                                                "(its newest complete checkpoint) or start one; --resume: must "
                                                "continue; --no-resume: must start (refuses a folder with a "
                                                "checkpoint)")] = None,
    allow_other_data: Annotated[bool, typer.Option("--allow-other-data", help="continue on data other than the "
                                                   "checkpoint's, on purpose")] = False,
) -> None:
    """Pre-train on 1p-frac shards (LIEP images, LPCE loss)."""
    if preset not in PRESETS:
        raise TrainError(f"unknown --preset {preset!r}; choose from {', '.join(PRESETS)}")
    explicit = {k: v for k, v in locals().items() if v is not None and k in Config.__dataclass_fields__}
    explicit.update(crop_scale=parse_float_pair(crop_scale) if crop_scale else None,
                    model_args=dict(_model_arg(a) for a in model_arg) if model_arg else None,
                    randaug="" if no_randaug else randaug, shards=str(shards) if shards else None,
                    render=str(render) if render else None, out=str(out),
                    cache_dir=str(cache_dir) if cache_dir is not None else None)
    explicit = {k: v for k, v in explicit.items() if v is not None}
    if "batch" in explicit and "global_batch" not in explicit:
        explicit["global_batch"] = 0  # an explicit --batch wins over a preset's global batch
    check_options(explicit)
    explicit["resume"] = {None: "auto", True: "always", False: "never"}[resume]
    cfg = run_config(explicit, preset, out)
    if bool(cfg.shards) == bool(cfg.render):
        raise TrainError("give the data as --shards DIR or --render MANIFEST, one of them")
    if cfg.instances >= 0 and not cfg.render:
        raise TrainError("--instances needs --render")
    try:
        summary = pretrain(cfg)
    except Interrupted as stop:  # before the first step: nothing trained, nothing half-written (temporaries go)
        print(f"stopped by {stop.name} before the first training step: nothing to keep; the same command starts "
              "again", file=sys.stderr, flush=True)
        raise typer.Exit(128 + stop.signum) from None
    if summary.get("signal"):  # stopped by a signal, checkpoint written: the shell sees an interrupted run
        raise typer.Exit(128 + summary["signal"])


CHOICES = {"augment": ("device", "cpu"), "fast": ("auto", "on", "off"), "graph": ("auto", "on", "off"),
           "compile_mode": COMPILE_MODES,
           "precision": PRECISIONS,
           "crop_in": ("auto", "workers", "device"), "cache": ("auto", "on", "off")}
AT_LEAST_ONE = ("steps", "batch", "accum", "img_size", "log_every", "eval_samples", "keep_ckpts")
POSITIVE = ("ink_gain", "blr")
NOT_NEGATIVE = ("mixup", "cutmix", "smoothing", "reprob", "lr", "cache_budget", "stop_after", "ckpt_minutes",
                "instances", "mix_group")
AT_MOST = {"workers": 256, "instances": onthefly.MAX_INSTANCES}
# Options of one command, not of the run: a continued run does not inherit them from its checkpoint
THIS_COMMAND = ("stop_after", "cache_dir")


def check_options(options: dict, saved_in: Path | None = None) -> None:
    """The options a command line gave (or, `saved_in`, the config a checkpoint saved), each finite and in its
    range: one TrainError line for the first that is not."""
    def bad(key: str, why: str) -> TrainError:
        if saved_in is None:
            return TrainError(f"--{key.replace('_', '-')} {why}")
        return TrainError(f"{saved_in} was saved with {key}={printable(repr(options[key]))[:80]}, which {why}: not "
                          "a checkpoint of this trainer as it wrote it")

    if saved_in is not None and options.get("instances") == -1:  # the default: the manifest's per-class count
        options = {k: v for k, v in options.items() if k != "instances"}
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(key, "must be a finite number")
    for key, choices in CHOICES.items():
        if key in options and options[key] not in choices:
            if saved_in is None:
                raise TrainError(f"unknown --{key.replace('_', '-')} {options[key]!r}; choose {', '.join(choices)}")
            raise bad(key, f"is not one of {', '.join(choices)}")
    for keys, wrong, what in ((AT_LEAST_ONE, lambda v: v < 1, "must be at least 1"),
                              (POSITIVE, lambda v: v <= 0, "must be positive"),
                              (NOT_NEGATIVE, lambda v: v < 0, "must not be negative")):
        for key in keys:
            if key in options and wrong(options[key]):
                raise bad(key, what)
    for key, most in AT_MOST.items():
        if options.get(key, 0) > most:
            raise bad(key, f"must be at most {most:,}" + (" (0: a fresh instance every epoch)" if key == "instances"
                                                           else ""))


def check_saved(saved: object, path: Path) -> dict:
    """A checkpoint's saved config checked as the command line's options are (it defines the continued run): every
    key one of Config's, of its type, in its range."""
    if not isinstance(saved, dict):
        raise TrainError(f"{path} holds no config of a run: not a checkpoint of this trainer")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    defaults = dataclasses.asdict(Config())
    for key, value in saved.items():
        if key not in fields:
            raise TrainError(f"{path} was saved with an unknown option {printable(repr(key))[:80]}: not a checkpoint "
                             "of this trainer as it wrote it")
        want = type(defaults[key])
        fits = (isinstance(value, bool) if want is bool else type(value) is int if want is int else
                isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
                isinstance(value, str) and len(value) <= 4096 if want is str else
                isinstance(value, dict) if want is dict else
                isinstance(value, (list, tuple)) and len(value) == 2 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
        if not fits:
            raise TrainError(f"{path} was saved with {key}={printable(repr(value))[:80]}, not a {want.__name__}: "
                             "not a checkpoint of this trainer as it wrote it")
    check_options(saved, saved_in=path)
    if "crop_scale" in saved and not 0 < saved["crop_scale"][0] <= saved["crop_scale"][1] <= 1:
        raise TrainError(f"{path} was saved with crop_scale={saved['crop_scale']!r}: not 0 < min <= max <= 1")
    if "model_args" in saved:
        model_lib.check_args(saved["model_args"], f"{path}: saved model argument")
    return saved


def run_config(explicit: dict, preset: str, out: Path) -> Config:
    """The run a command line asks for. One command both starts and continues a run (torchrun's contract: workers
    restarted with the same arguments continue from the latest checkpoint): where OUT holds a checkpoint (and
    --no-resume was not given), its config defines the run (checked as the options are), the RESUMABLE options may
    be given anew, THIS_COMMAND's are this command's alone, and any other option that differs means another run:
    refused in one line (`--precision auto` continues in the precision the run began with). Otherwise the preset
    and the options."""
    checkpoints = Checkpoints(out)
    if explicit["resume"] == "never" or not checkpoints.exists():
        return Config(**{**PRESETS[preset], **explicit})
    loaded = checkpoints.load_latest(resume=False)
    if loaded is None:
        return Config(**{**PRESETS[preset], **explicit})
    path, saved = loaded[1], loaded[0]["config"]
    if isinstance(saved, dict):
        saved = {**saved, "resume": explicit["resume"]}  # older checkpoints stored a bool here
    saved = check_saved(saved, path)
    changed = sorted(k for k, v in explicit.items() if k not in RESUMABLE and k != "preset" and v != saved.get(k)
                     and not (k == "precision" and v == "auto"))
    if changed:
        what = ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
        asks = ", ".join(f"{k}={explicit[k]!r}" for k in changed)
        raise TrainError(f"{out} holds another run ({path} was trained with {what}; this command asks {asks}): "
                         "give the same options to continue it, or choose another --out")
    fresh = {k: getattr(Config(), k) for k in THIS_COMMAND}
    return Config(**{**saved, **fresh, **{k: v for k, v in explicit.items() if k in RESUMABLE}})


if __name__ == "__main__":
    run_cli(app)
