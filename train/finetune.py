"""Fine-tune a pre-trained checkpoint (or a scratch model) on a downstream data set; report held-out top-1.

Runbook
  pre-trained vs scratch on 10 digits per class (CPU default, docs/design.md section 9), 3 seeds each:
    fracgen-train finetune --checkpoint runs/cpu --out runs/cpu-digits
    fracgen-train finetune --checkpoint none --out runs/scratch-digits
  from published weights (train.publish; fetched once, checked against the folder's SHA256SUMS):
    fracgen-train finetune --checkpoint https://HOST/PATH/ --out runs/cpu-digits     (or hf://ORG/NAME[@REVISION])
  CIFAR-100 from a local copy (download=False), the paper's recipe (the official finetuning.sh, docs/design.md 7):
    fracgen-train finetune --preset paper --checkpoint runs/paper/ckpt.pt --dataset cifar100 --data-root data \
        --out runs/c100
  the same recipe for fewer steps (the schedule keeps its shape: warm-up, then cosine to the end):
    fracgen-train finetune --preset paper --checkpoint runs/cpu/ckpt.pt --steps 300 --warmup-steps 3

The default recipe is AdamW, lr = blr x batch / 512 = 1e-3 at batch 64, weight decay 0.05, the best for both
scratch and pre-trained networks on the grid we swept on digits (docs/results.md). The paper's (docs/design.md 7)
is `--preset paper`; its optimizer alone at the default's size is `--opt sgd --blr 0.08 --weight-decay 1e-4`.
Either way: warm-up then cosine, RandomResizedCrop + horizontal flip (+ optional RandAugment, erasing,
Mixup/CutMix), label smoothing, ImageNet mean/std, and a new head (the pretext head is dropped). The reported
top-1 is the last step's (the official script prints the best of its evaluations, an optimistic readout).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from timm.data import Mixup
from timm.data.mixup import one_hot
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from fracgen.untrusted import printable, redact

from . import data, downstream, weights
from . import model as model_lib
from .pretrain import Config as PretrainConfig
from .runtime import (
    TrainError,
    atomic_write_json,
    parse_float_pair,
    run_cli,
    seed_everything,
)
from .step import PRECISIONS, autocast_for, resolve_precision


@dataclass
class Config:
    """Defaults are the CPU check of docs/design.md section 9: 300 steps on 10 digits per class, 3 seeds."""

    checkpoint: str = "none"  # a run folder, .safetensors, ckpt.pt, http(s)/hf:// published folder, or "none"
    cache_dir: str = ""  # where a published --checkpoint is fetched to; "" = $XDG_CACHE_HOME/fracgen/models
    out: str = ""
    dataset: str = "digits"
    data_root: str = "data"
    shots: int = 0  # images per class for training; 0 = --train-fraction, or the data set's default
    train_fraction: float = 0.0
    split_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    batch: int = 64
    # AdamW at lr 1e-3 (batch 64): the best of the grid we swept for scratch *and* for pre-trained networks
    # (docs/results.md); the paper's SGD recipe is --opt sgd --blr 0.08 --weight-decay 1e-4.
    blr: float = 0.008
    weight_decay: float = 0.05
    opt: str = "adamw"  # "sgd": the paper's fine-tuning optimizer (timm's "sgd": Nesterov, momentum 0.9)
    warmup_steps: int = 30
    # warm-up start and cosine floor per 512 images, scaled with the batch as lr is (the official 1.5e-6 and 1.5e-5
    # are 1e-6 and 1e-5 x 768 / 512, DeiT's convention); 0: warm up from lr / 100 and end at 0, as before
    warmup_blr: float = 0.0
    min_blr: float = 0.0
    crop_pct: float = 1.0  # evaluation: resize to img_size / crop_pct, centre-crop img_size (timm's name); 1: resize
    crop: bool = True
    crop_scale: tuple[float, float] | None = None  # None: (0.35, 1) on digits, the paper's (0.08, 1) elsewhere
    flip: bool | None = None  # None: off on digits (not mirror-symmetric), on elsewhere as in the paper
    randaug: str = ""
    reprob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.1
    drop_path: float = 0.0
    workers: int = 0
    # Architecture for --checkpoint none (a pre-trained checkpoint brings its own); default: the pretrain CPU one.
    model: str = PretrainConfig.model
    img_size: int = PretrainConfig.img_size
    patch_size: int = PretrainConfig.patch_size
    depth: int = PretrainConfig.depth
    preset: str = "default"
    precision: str = "auto"  # bf16 autocast or fp32; auto: bf16 on CUDA and on CPUs with bf16 units (train.step)


# The official fine-tuning script (1p-frac repository, finetuning.sh; docs/design.md 7): 8 GPUs x 96 = 768 a step, SGD
# Nesterov 0.9, lr 0.01 / warm-up 1e-6 / floor 1e-5 per 512 (0.015 / 1.5e-6 / 1.5e-5 at 768), 650 warm-up steps
# (10 of its 1000 CIFAR-100 epochs), ~65,000 steps, drop path 0.1, evaluation at 256 -> centre 224. One process
# here, so the 768 is one batch; a data set with fewer training images uses them all and the lr follows the batch.
PRESETS = {
    "default": {},
    "paper": dict(opt="sgd", batch=768, blr=0.01, warmup_blr=1e-6, min_blr=1e-5, weight_decay=1e-4,
                  warmup_steps=650, steps=65_000, drop_path=0.1, randaug="rand-m9-mstd0.5-inc1", reprob=0.25,
                  mixup=0.8, cutmix=1.0, smoothing=0.1, crop_pct=224 / 256),
}


def learning_rates(cfg: Config, batch: int) -> tuple[float, float, float]:
    """(peak, warm-up start, floor) for the batch actually used: each is per 512 images (linear scaling)."""
    lr = cfg.blr * batch / 512
    warmup_lr = cfg.warmup_blr * batch / 512 if cfg.warmup_blr else lr / 100
    return lr, warmup_lr, cfg.min_blr * batch / 512


def build_scheduler(cfg: Config, optimizer, batch: int) -> CosineLRScheduler:
    """Linear warm-up from the warm-up lr to the peak, then a cosine that reaches the floor at the last step."""
    lr, warmup_lr, min_lr = learning_rates(cfg, batch)
    warmup = min(cfg.warmup_steps, cfg.steps // 2)  # short runs (tests, smoke checks) still get a cosine phase
    # warmup_prefix: the cosine starts after the warm-up, so the peak lr is actually reached
    return CosineLRScheduler(optimizer, t_initial=cfg.steps - warmup, lr_min=min_lr, warmup_t=warmup,
                             warmup_lr_init=warmup_lr, warmup_prefix=True, t_in_epochs=False)


def test_transform(cfg: Config, img_size: int):
    """The whole image resized (crop_pct 1), or timm's evaluation: resize to img_size / crop_pct, centre crop."""
    if cfg.crop_pct >= 1:
        return data.eval_transform(img_size, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD)
    return T.Compose([T.Resize(math.floor(img_size / cfg.crop_pct), interpolation=InterpolationMode.BICUBIC),
                      T.CenterCrop(img_size), T.ToTensor(), T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])


def crop_and_flip(cfg: Config) -> tuple[tuple[float, float], bool]:
    """The crop's area range and the horizontal flip, given or by data set: an 8x8 digit cropped to 8% of its area
    is no longer a digit, and a mirrored 2 is not a 2."""
    digits = cfg.dataset == "digits"
    crop_scale = cfg.crop_scale or ((0.35, 1.0) if digits else (0.08, 1.0))
    return crop_scale, (not digits) if cfg.flip is None else cfg.flip


def smoothed(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing as timm spreads it: `smoothing` over all classes, the rest on the label
    (each row sums to 1)."""
    off = smoothing / num_classes
    return one_hot(y, num_classes, on_value=1 - smoothing + off, off_value=off)


def batch_used(cfg: Config, train_images: int) -> int:
    """--batch, or every training image when there are fewer (10-shot digits: 100); even under Mixup/CutMix."""
    batch = min(cfg.batch, train_images)
    return batch - batch % 2 if cfg.mixup > 0 or cfg.cutmix > 0 else batch


def load_pretrained(spec: str, cache_dir: str = ""):
    """(model_name, model_args, num_classes, state_dict) of a --checkpoint (train.weights.load: a run folder, a
    .safetensors file, a ckpt.pt, or a published folder's URL)."""
    return weights.load(spec, cache_dir or None)


def build_optimizer(cfg: Config, model: torch.nn.Module, batch: int) -> torch.optim.Optimizer:
    """AdamW, or the paper's SGD (timm's "sgd": Nesterov, momentum 0.9), at the lr the batch scales to."""
    extra = {"momentum": 0.9} if cfg.opt == "sgd" else {}
    return create_optimizer_v2(model, cfg.opt, lr=learning_rates(cfg, batch)[0], weight_decay=cfg.weight_decay,
                               **extra)


def init_model(cfg: Config, pretrained, num_classes: int) -> torch.nn.Module:
    """The network fine-tuning starts from: the checkpoint's weights with a new, freshly initialised head for the
    downstream classes (the pretext head is dropped), or the same architecture from scratch."""
    if pretrained is None:
        model_args = model_lib.architecture_args(cfg.img_size, cfg.patch_size or None, cfg.depth or None)
        return model_lib.create(cfg.model, num_classes, model_args, cfg.drop_path)
    name, model_args, pretext_classes, state = pretrained
    model = model_lib.create(name, pretext_classes, model_args, cfg.drop_path)
    model_lib.load_weights(model, state, "--checkpoint")  # checked by weights.load: this cannot fail
    model.reset_classifier(num_classes)
    return model


def finetune_one(cfg: Config, seed: int, train_set, test_set, num_classes: int, pretrained, device) -> float:
    """One fine-tuning run; returns top-1 (%) on the held-out set."""
    seed_everything(seed)
    model = init_model(cfg, pretrained, num_classes).to(device)

    batch = batch_used(cfg, len(train_set))
    optimizer = build_optimizer(cfg, model, batch)
    scheduler = build_scheduler(cfg, optimizer, batch)
    autocast = autocast_for(device, cfg.precision)
    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                         num_classes=num_classes)
    criterion = SoftTargetCrossEntropy()

    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=cfg.workers, generator=generator,
                                         persistent_workers=cfg.workers > 0)
    model.train()
    step = 0
    while step < cfg.steps:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if mixup_fn is not None:
                x, target = mixup_fn(x, y)
            else:
                target = smoothed(y, num_classes, cfg.smoothing)
            scheduler.step_update(step)
            with autocast:  # the loss in fp32 under bf16 autocast too
                loss = criterion(model(x).float(), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == cfg.steps:
                break

    model.eval()
    correct = 0
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=256, num_workers=cfg.workers)
    with torch.no_grad(), autocast:
        for x, y in test_loader:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return 100 * correct / len(test_set)


def finetune(cfg: Config) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pretrained = None if cfg.checkpoint.lower() == "none" else load_pretrained(cfg.checkpoint, cfg.cache_dir)
    img_size = cfg.img_size if pretrained is None else pretrained[1].get("img_size", cfg.img_size)

    train_base, test_base, num_classes = downstream.load(cfg.dataset, Path(cfg.data_root))
    shots = cfg.shots or (10 if cfg.dataset == "digits" and not cfg.train_fraction else 0)
    train_idx, rest_idx = downstream.split(downstream.targets_of(train_base), shots, cfg.train_fraction,
                                           cfg.split_seed, has_test=test_base is not None)
    crop_scale, flip = crop_and_flip(cfg)
    train_tf = data.train_transform(img_size, crop=cfg.crop, crop_scale=crop_scale, flip=flip,
                                    vflip=False, randaug=cfg.randaug or None, reprob=cfg.reprob,
                                    mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD)
    test_tf = test_transform(cfg, img_size)
    train_set = downstream.Transformed(train_base, train_idx, train_tf)
    if test_base is None:
        test_set = downstream.Transformed(train_base, rest_idx, test_tf)
    else:
        test_set = downstream.Transformed(test_base, range(len(test_base)), test_tf)

    source = "scratch" if pretrained is None else printable(cfg.checkpoint)  # no password or signature of a URL
    batch = batch_used(cfg, len(train_set))
    lr = learning_rates(cfg, batch)[0]
    print(f"finetune: {cfg.dataset}, {num_classes} classes, {len(train_set)} training images"
          f"{f' ({shots} per class)' if shots else ''}, {len(test_set)} test images, {img_size} px, "
          f"{cfg.steps} steps at batch {batch}, {cfg.opt} lr {lr:.2e} (blr {cfg.blr} x {batch} / 512), "
          f"{'preset ' + cfg.preset + ', ' if cfg.preset != 'default' else ''}crop {crop_scale}, "
          f"flip {'on' if flip else 'off'}, {'{} ({})'.format(*resolve_precision(cfg.precision, device))}, from "
          f"{source}")
    accuracies = []
    for seed in cfg.seeds:
        t0 = time.time()
        acc = finetune_one(cfg, seed, train_set, test_set, num_classes, pretrained, device)
        accuracies.append(acc)
        print(f"seed {seed}: top-1 {acc:.1f}% ({time.time() - t0:.0f} s)", flush=True)
    mean = statistics.mean(accuracies)
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    recorded = {**dataclasses.asdict(cfg), "checkpoint": redact(cfg.checkpoint)}
    result = {"dataset": cfg.dataset, "checkpoint": recorded["checkpoint"], "top1_mean": mean, "top1_std": std,
              "top1": dict(zip(map(str, cfg.seeds), accuracies, strict=True)), "train_images": len(train_set),
              "test_images": len(test_set), "batch_used": batch, "config": recorded,
              "precision": resolve_precision(cfg.precision, device)[0]}
    if cfg.out:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(result, Path(cfg.out) / "results.json")
    print(f"top-1 {mean:.1f} +- {std:.1f} % over {len(accuracies)} seed(s) on {cfg.dataset} held-out "
          f"({source})")
    return result


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    checkpoint: Annotated[str, typer.Option(help="pretrain RUN_DIR, its model.safetensors or ckpt.pt, a published "
                                                 "folder's http(s):// URL or hf://ORG/NAME\\[@REVISION], or none for "
                                                 "scratch")],
    cache_dir: Annotated[Path | None, typer.Option(help="download cache for a published --checkpoint (default "
                                                      "$XDG_CACHE_HOME/fracgen/models)")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for results.json")] = None,
    dataset: Annotated[str, typer.Option(help="digits, cifar10, cifar100 or an ImageFolder path")] = "digits",
    data_root: Annotated[Path, typer.Option(help="folder holding the extracted CIFAR archives")] = Path("data"),
    shots: Annotated[int, typer.Option(help="training images per class (digits default: 10)")] = 0,
    train_fraction: Annotated[float, typer.Option(help="stratified fraction of the training pool")] = 0.0,
    split_seed: Annotated[int, typer.Option(help="seed of the few-shot / train-test split")] = 0,
    seeds: Annotated[str, typer.Option(help="comma-separated training seeds (mean +- std is reported)")] = "0,1,2",
    steps: Annotated[int, typer.Option(help="SGD steps per seed")] = Config.steps,
    batch: Annotated[int, typer.Option(help="batch size")] = Config.batch,
    blr: Annotated[float, typer.Option(help="lr per 512 images (lr = blr x batch / 512)")] = Config.blr,
    weight_decay: Annotated[float, typer.Option(help="weight decay")] = Config.weight_decay,
    opt: Annotated[str, typer.Option(help="optimizer: sgd (momentum 0.9, the paper's) or adamw")] = Config.opt,
    warmup_steps: Annotated[int, typer.Option(help="warm-up steps")] = Config.warmup_steps,
    crop: Annotated[bool, typer.Option("--crop/--no-crop", help="RandomResizedCrop")] = True,
    crop_scale: Annotated[str | None, typer.Option(help="crop area MIN,MAX (digits 0.35,1; else 0.08,1)")] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", help="horizontal flip (off on digits)")] = None,
    randaug: Annotated[str, typer.Option(help="timm RandAugment string; empty = off")] = "",
    reprob: Annotated[float, typer.Option(help="random erasing probability")] = 0.0,
    mixup: Annotated[float, typer.Option(help="Mixup alpha (0 = off)")] = 0.0,
    cutmix: Annotated[float, typer.Option(help="CutMix alpha (0 = off)")] = 0.0,
    smoothing: Annotated[float, typer.Option(help="label smoothing")] = Config.smoothing,
    drop_path: Annotated[float, typer.Option(help="stochastic depth rate")] = 0.0,
    workers: Annotated[int, typer.Option(help="data loader worker processes")] = 0,
    model: Annotated[str, typer.Option(help="timm model for --checkpoint none")] = Config.model,
    img_size: Annotated[int, typer.Option(help="input size for --checkpoint none")] = Config.img_size,
    patch_size: Annotated[int, typer.Option(help="patch size for --checkpoint none (0 = default)")] = 8,
    depth: Annotated[int, typer.Option(help="depth for --checkpoint none (0 = default)")] = 6,
    preset: Annotated[str, typer.Option(help="default, or paper: the official finetuning.sh (SGD Nesterov, batch "
                                             "768, 65,000 steps, RandAugment, Mixup/CutMix; options given "
                                             "win)")] = "default",
    warmup_blr: Annotated[float, typer.Option(help="warm-up start lr per 512 images (0: lr / 100)")] = 0.0,
    min_blr: Annotated[float, typer.Option(help="lr per 512 images the cosine ends at")] = 0.0,
    crop_pct: Annotated[float, typer.Option(help="evaluation: resize to size / crop-pct, centre-crop size (1: "
                                               "resize only; the paper's 0.875 = 224 / 256)")] = 1.0,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA and on CPUs with bf16 units, else "
                                                "fp32), bf16 or fp32")] = "auto",
    *,
    ctx: typer.Context,
) -> None:
    """Fine-tune on a downstream data set and report held-out top-1 (mean +- std over seeds)."""
    if preset not in PRESETS:
        raise TrainError(f"unknown --preset {preset!r}; choose from {', '.join(PRESETS)}")
    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise TrainError(f"--seeds {seeds!r} is not a comma-separated list of integers") from None
    if steps < 1 or batch < 1:
        raise TrainError("--steps and --batch must be at least 1")
    if opt not in ("sgd", "adamw"):
        raise TrainError(f"unknown --opt {opt!r}; choose sgd or adamw")
    if precision not in PRECISIONS:
        raise TrainError(f"unknown --precision {precision!r}; choose {', '.join(PRECISIONS)}")
    if shots < 0 or not 0 <= train_fraction <= 1:
        raise TrainError("--shots must be >= 0 and --train-fraction in [0, 1]")
    if not 0 < crop_pct <= 1 or warmup_blr < 0 or min_blr < 0:
        raise TrainError("--crop-pct must be in (0, 1], --warmup-blr and --min-blr not negative")
    options = dict(checkpoint=checkpoint, cache_dir=str(cache_dir or ""), out=str(out or ""), dataset=dataset,
                   data_root=str(data_root), shots=shots,
                   train_fraction=train_fraction, split_seed=split_seed, seeds=seed_list, steps=steps, batch=batch,
                   blr=blr, weight_decay=weight_decay, opt=opt, warmup_steps=warmup_steps, crop=crop,
                   crop_scale=parse_float_pair(crop_scale) if crop_scale else None, flip=flip, randaug=randaug,
                   reprob=reprob, mixup=mixup, cutmix=cutmix, smoothing=smoothing, drop_path=drop_path,
                   workers=workers, model=model, img_size=img_size, patch_size=patch_size, depth=depth,
                   warmup_blr=warmup_blr, min_blr=min_blr, crop_pct=crop_pct, preset=preset, precision=precision)
    # the preset fills what the command line left at its default; an option given on the command line wins
    options.update({k: v for k, v in PRESETS[preset].items() if ctx.get_parameter_source(k).name == "DEFAULT"})
    ignored = [f"--{k.replace('_', '-')}" for k in ("model", "img_size", "patch_size", "depth")
               if ctx.get_parameter_source(k).name != "DEFAULT"]
    if ignored and checkpoint.lower() != "none":
        print(f"note: {', '.join(ignored)} ignored: --checkpoint brings its own network (its config says the "
              "architecture and input size)", flush=True)
    finetune(Config(**options))


if __name__ == "__main__":
    run_cli(app)
