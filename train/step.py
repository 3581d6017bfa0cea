"""The training step of a pre-training run, and what makes it fast on a GPU.

`TrainStep` is one optimizer step: `accum` micro-steps of Mixup/CutMix, forward, LPCE and backward, then AdamW.
Nothing in it waits for the device: the loss is summed on the device and read only at log steps, and every random
choice (Mixup's lambda, CutMix's box) is drawn on the host.

`--fast` (on by default on CUDA, `--no-fast` turns it off) adds what only pays on a GPU: the model compiled with
torch.compile (`--compile-mode`; a model that does not compile on this machine, tried on one step's shapes before
the run, falls back to eager with one note), fused AdamW, and
the next batch augmented on a side stream while this step runs (`batches.DeviceBatches`). None of them changes what
is trained; a test checks that the loss curve of the fast step matches the eager one.

MFU: the FLOPs of one sample's forward and backward pass are counted once with torch.utils.flop_counter, so that
samples/s can be read against the card's dense bf16 peak.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch._dynamo as dynamo
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


BACKEND = "inductor"  # torch.compile's; the tests swap in a failing one


def compile_model(model: torch.nn.Module, mode: str, example: tuple[torch.Tensor, torch.Tensor], autocast=None,
                  log=print, backend=None) -> tuple[torch.nn.Module, bool]:
    """(the model torch.compile made, True), or (`model`, False) with one `note:` line where it does not compile.

    torch.compile is lazy: the forward compiles at the first call and the backward at the first backward, so a
    missing C++ compiler or a failing backend shows up inside the first training step (as a 2,000-line traceback),
    not here. So the compiled model is tried here on `example` (an input batch and soft targets of the run's
    shapes) for one forward, LPCE and backward, under the run's autocast; the graphs it compiles are the ones the
    first step reuses. The try leaves nothing behind: gradients are dropped, buffers and random states restored.
    No process-wide `suppress_errors`: a graph that fails is not silently run eagerly frame by frame."""
    try:
        compiled = torch.compile(model, mode=None if mode == "default" else mode, backend=backend or BACKEND)
    except Exception as e:  # an unknown mode or backend
        log(f"note: torch.compile unavailable ({_reason(e)}); training eagerly")
        return model, False
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    x, target = example
    try:
        with autocast or contextlib.nullcontext():
            loss = SoftTargetCrossEntropy()(compiled(x).float(), target)
        loss.backward()
        ok = True
    except Exception as e:  # dynamo's, inductor's and the C++ compiler's errors are many types
        log(f"note: torch.compile failed on this machine ({_reason(e)}); training eagerly")
        dynamo.reset()  # no half-compiled graph is kept for later calls
        ok = False
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
    return (compiled, True) if ok else (model, False)


def _reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(error).__name__}: {first[:200]}"  # the first line; with its cause where it ends in a colon


def example_batch(model: torch.nn.Module, batch: int, img_size: int, num_classes: int, device,
                  channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the run's shapes for compile_model's try: images and soft targets over the C classes."""
    x = torch.randn(batch, channels, img_size, img_size, device=device)
    return x, torch.full((batch, num_classes), 1 / num_classes, device=device)


PRECISIONS = ("auto", "bf16", "fp32")


def bf16_units() -> str | None:
    """The CPU's bf16 arithmetic, by name (AMX, AVX512-BF16), or None where it has none (its bf16 would be emulated
    and slower than fp32). Read from what torch's CPU kernels dispatch on."""
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def resolve_precision(precision: str, device, units: str | None | bool = False) -> tuple[str, str]:
    """(bf16 | fp32, why) for `--precision auto|bf16|fp32` on `device`. auto: bf16 autocast on CUDA, and on a CPU
    with bf16 units (1.65x the CPU preset's fp32 step on AVX512-BF16, docs/speed.md); fp32 on a CPU without them.
    `units`: the CPU's bf16 units (default: this CPU's, bf16_units())."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}")
    if precision != "auto":
        return precision, f"--precision {precision}"
    if device.type == "cuda":
        return "bf16", "auto: CUDA"
    units = bf16_units() if units is False else units
    return ("bf16", f"auto: this CPU has {units}") if units else ("fp32", "auto: this CPU has no bf16 units")


def autocast_for(device, precision: str = "auto"):
    """bf16 autocast (no loss scaling needed) or fp32, as resolve_precision decides."""
    if resolve_precision(precision, device)[0] == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
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
            with self.autocast:  # the loss in fp32 under bf16 autocast too: log-softmax over C classes
                loss = self.lpce(self.model(xb).float(), target) / self.accum
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
