"""The training step of a pre-training run, and what makes it fast on a GPU.

`TrainStep` is one optimizer step: `accum` micro-steps of Mixup/CutMix, forward, LPCE and backward, then AdamW.
Nothing in it waits for the device: the loss is summed on the device and read only at log steps, and every random
choice (Mixup's lambda, CutMix's box) is drawn on the host.

`--fast` (on by default on CUDA, `--no-fast` turns it off) adds what only pays on a GPU: the model compiled with
torch.compile (`--compile-mode`; a model that does not compile falls back to eager with a note), fused AdamW, and
the next batch augmented on a side stream while this step runs (`batches.DeviceBatches`). None of them changes what
is trained; a test checks that the loss curve of the fast step matches the eager one.

MFU: the FLOPs of one sample's forward and backward pass are counted once with torch.utils.flop_counter, so that
samples/s can be read against the card's dense bf16 peak.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from timm.data.mixup import one_hot
from timm.loss import SoftTargetCrossEntropy

# Dense bf16 peak FLOP/s by the name torch gives the device (vendor data sheets, SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


@dataclass
class Fast:
    """The speed-ups of a run, each on or off."""

    compile: bool = False
    compile_mode: str = "default"
    fused: bool = False
    prefetch: bool = False

    def describe(self, device) -> str:
        # on CUDA the prefetched batch is augmented on a side stream, beside the step (batches.DeviceBatches)
        ahead = "augmentation prefetched on a side stream" if device.type == "cuda" else \
            "the next batch made a step ahead"
        parts = [f"torch.compile ({self.compile_mode})" if self.compile else "",
                 "fused AdamW" if self.fused else "", ahead if self.prefetch else ""]
        return ", ".join(p for p in parts if p) or "eager"


def fast_options(fast: str, compile: bool, compile_mode: str, device) -> Fast:
    """`--fast auto|on|off` (auto: on on CUDA) and `--compile` (the model alone, on any device)."""
    on = fast == "on" or (fast == "auto" and device.type == "cuda")
    cuda = device.type == "cuda"
    return Fast(compile=on or compile, compile_mode=compile_mode, fused=on and cuda, prefetch=on)


def compile_model(model: torch.nn.Module, mode: str, log=print) -> torch.nn.Module:
    """torch.compile, falling back to eager (with a note) where the backend cannot compile the model: a slower run
    is better than none on a machine without a working compiler."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    try:
        return torch.compile(model, mode=None if mode == "default" else mode)
    except Exception as e:  # compile itself is lazy; this catches an unknown mode or a missing backend
        log(f"note: torch.compile unavailable ({type(e).__name__}: {str(e)[:120]}); training eagerly")
        return model


def autocast_for(device):
    """bf16 autocast on CUDA (no loss scaling needed); fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TrainStep:
    """One optimizer step over `accum` micro-batches; `loss_sum` holds the device-side sum of the step losses since
    the last `take_mean_loss()`."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, num_classes: int, *, mixup_fn=None,
                 smoothing: float = 0.0, accum: int = 1, autocast=None, scaler=None, distributed: bool = False):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.num_classes, self.mixup_fn, self.smoothing, self.accum = num_classes, mixup_fn, smoothing, accum
        self.autocast = autocast or contextlib.nullcontext()
        self.scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
        self.distributed = distributed
        self.lpce = SoftTargetCrossEntropy()  # LPCE: cross-entropy against soft targets over the C classes
        self.loss_sum: torch.Tensor | None = None
        self.steps = 0

    def targets(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup_fn is not None:
            return self.mixup_fn(x, y)
        off = self.smoothing / self.num_classes
        return x, one_hot(y, self.num_classes, on_value=1 - self.smoothing + off, off_value=off)

    def __call__(self, step: int, batches) -> None:
        """Optimizer step `step` (0-based) on the next `accum` micro-batches of the iterator `batches`."""
        self.scheduler.step_update(step)
        for micro in range(self.accum):
            xb, yb = next(batches)
            xb, target = self.targets(xb, yb)
            if self.distributed:
                # nanoGPT's trick: all-reduce gradients only on the last micro-step of an accumulation.
                self.model.require_backward_grad_sync = micro == self.accum - 1
            with self.autocast:
                loss = self.lpce(self.model(xb), target) / self.accum
            self.scaler.scale(loss).backward()
            loss = loss.detach()
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def take_mean_loss(self) -> float:
        """The mean step loss since the last call: the one read of the device per log window."""
        mean = self.loss_sum.item() / self.steps
        self.loss_sum, self.steps = None, 0
        return mean


def flops_per_sample(model: torch.nn.Module, img_size: int, device, channels: int = 3) -> float:
    """FLOPs of one sample's forward + backward pass, counted by torch.utils.flop_counter on a batch of 2: the
    matmuls, attention and convolutions the step really runs (no gradient for the input images), what MFU is
    conventionally counted in."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.train()
    counter = FlopCounterMode(display=False)
    # Its own random streams: counting must not move the run's (drop-path draws), or resumes would differ.
    # The math attention backend: its matmuls are counted on every device (the CPU's fused kernel is not).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), sdpa_kernel(SDPBackend.MATH), \
            counter:
        x = torch.randn(2, channels, img_size, img_size, device=device)
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return counter.get_total_flops() / 2


def peak_flops(device) -> float | None:
    """The card's dense bf16 peak, where we know it; None on the CPU or an unknown card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def mfu(samples_per_s: float, flops: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in %, or None where the peak is unknown."""
    return None if not peak else 100 * samples_per_s * flops / peak
