"""The training step of a pre-training run, and what makes it fast on a GPU.

`TrainStep` is one optimizer step: `accum` micro-steps of [the batch drawn, augmented and mixed (`BatchMaker`),
forward, LPCE, backward], then AdamW. Every random number of a step is drawn on the device from the micro-step
counter (`train.rng`), the loss is summed on the device and read only at log steps, and no shape or branch depends
on a value on the device: the host never waits for the device, and the whole step can be one graph.

`--fast` (on by default on CUDA, `--no-fast`/`--fast off` turns it off) adds what pays on a GPU: the model compiled
with torch.compile (`--compile-mode`), fused AdamW, the batch maker compiled as one graph (`fullgraph=True`), and,
on one rank, the whole step captured as one CUDA graph that the host only replays (`--graph`). Each is tried
before the run and falls back with one note where it fails. None of them changes what is trained: the draws are
the same integers in every mode, and tests check the images and the loss curve against the eager step. On the CPU
`--fast auto` compiles the batch maker alone, for runs long enough to pay its compilation back (docs/speed.md).

MFU: the FLOPs of one sample's forward and backward pass are counted once with torch.utils.flop_counter, so that
samples/s can be read against the card's dense bf16 peak.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch._dynamo as dynamo
from timm.loss import SoftTargetCrossEntropy

from .mixup import GroupMix, smoothed_targets

# Dense bf16 peak FLOP/s by the name torch gives the device (vendor data sheets, SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
# On the CPU `--fast auto` compiles the batch maker for runs of at least this many steps: compiling it costs
# 10-25 s once on 2 cores (3 s from inductor's cache) and saves ~5 ms a step of the CPU preset (docs/speed.md).
CPU_COMPILE_STEPS = 1000


@dataclass
class Fast:
    """The speed-ups of a run, each on or off."""

    compile: bool = False  # the model under torch.compile
    compile_mode: str = "default"
    fused: bool = False  # fused AdamW
    augment: bool = False  # the batch maker (draws, augmentation, mixing) compiled as one graph
    graph: bool = False  # the whole step captured as one CUDA graph and replayed

    def describe(self, device) -> str:
        model = f"torch.compile ({self.compile_mode}) model" if self.compile else "eager model"
        parts = [("augmentation and mixing compiled whole" + (" (inductor)" if device.type == "cpu" else ""))
                 if self.augment else "", model if self.compile or self.augment or self.fused else "",
                 "fused AdamW" if self.fused else ""]
        what = ", ".join(p for p in parts if p) or "eager"
        return f"one CUDA graph, replayed ({what})" if self.graph else what


def fast_options(fast: str, compile: bool, compile_mode: str, device, steps: int = 0, world_size: int = 1,
                 graph: str = "auto") -> Fast:
    """What `--fast auto|on|off`, `--compile` and `--graph auto|on|off` turn on for a run of `steps` more steps.

    On CUDA, --fast on (auto: on) is the model and the batch maker compiled, fused AdamW, and on one rank the step
    captured (unless --graph off). On the CPU, --fast on is the batch maker compiled (the model compiled gains
    nothing there: docs/speed.md), and auto turns it on for runs of CPU_COMPILE_STEPS steps or more. `--compile`
    compiles the model on any device."""
    cuda = device.type == "cuda"
    on = fast == "on" or (fast == "auto" and (cuda or steps >= CPU_COMPILE_STEPS))
    captured = cuda and world_size == 1 and (graph == "on" or (graph == "auto" and on))
    return Fast(compile=(on and cuda) or compile, compile_mode=compile_mode, fused=on and cuda, augment=on,
                graph=captured)


def model_compile_mode(mode: str, graph: bool) -> str:
    """torch.compile's mode for the model: --compile-mode, but without torch.compile's own CUDA graphs where the
    whole step is captured (a graph does not nest in another's capture)."""
    if not graph:
        return mode
    return {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)


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
    """A batch of the run's shapes for compile_model's try: images and soft targets over the C classes. Its own
    generator: the run's random streams (drop-path's) must not move."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, channels, img_size, img_size, device=device, generator=generator)
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


class BatchMaker:
    """The model's input and soft targets of one micro-batch, made on the device from the micro-step counter: the
    in-memory path's sample indices (`source`, a `data.MemorySource`) or the loader's raw batch, the augmentation
    (`train.augment.DeviceAugment`; None where the loader workers already gave model-ready images), Mixup/CutMix
    by groups (`train.mixup.GroupMix`) or label smoothing. A pure function of the counter (and the raw batch),
    with fixed shapes: `compile_batches` compiles it as one graph."""

    def __init__(self, augment, mix: GroupMix | None, num_classes: int, smoothing: float, key: int, source=None):
        self.augment, self.mix, self.num_classes, self.smoothing = augment, mix, num_classes, smoothing
        self.key, self.source = key, source

    def __call__(self, counter: torch.Tensor, raw: tuple[torch.Tensor, torch.Tensor] | None = None):
        images, labels = self.source(counter) if self.source is not None else raw
        x = self.augment(images, self.key, counter) if self.augment is not None else images
        if self.mix is not None:
            return self.mix(x, labels, self.key, counter)
        return x, smoothed_targets(labels, self.num_classes, self.smoothing)


# Inductor inlines a pointwise producer into each of its consumers; a hash's xor-shifts use their input twice, so
# a long chain of them blows up its code generation exponentially (76 s for the CPU preset's batch maker on 2
# cores). Materialising buffers past 16 ops cuts that to ~10 s and costs the CPU preset's batch ~0.5 ms.
BATCH_COMPILE_OPTIONS = {"realize_opcount_threshold": 16}


def compile_batches(maker: BatchMaker, example: tuple, log=print, backend=None):
    """(the batch maker compiled whole with `fullgraph=True`, True), or (`maker`, False) with one `note:` line
    where it does not compile on this machine; tried here on `example` (the counter and raw batch of a first
    call), whose result is dropped (a pure function: nothing else moves)."""
    backend = backend or BACKEND
    try:
        compiled = torch.compile(maker, fullgraph=True, dynamic=False, backend=backend,
                                 options=BATCH_COMPILE_OPTIONS if backend == "inductor" else None)
        compiled(*example)
    except Exception as e:  # dynamo's, inductor's and the C++ compiler's errors are many types
        log(f"note: compiling the augmentation failed on this machine ({_reason(e)}); it runs eagerly")
        dynamo.reset()
        return maker, False
    return compiled, True


GRAPH_WARMUP = 3  # eager runs on a side stream before a capture (PyTorch's CUDA graph recipe)


class TrainStep:
    """One optimizer step over `accum` micro-batches; `loss_sum` is the device-side sum of the step losses since
    the last `take_mean_loss()`. `graph`: on CUDA, the step's device work is captured at the first call as one
    CUDA graph, which every later call replays (`_capture`)."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, make_batch, rng, *, accum: int = 1,
                 autocast=None, scaler=None, distributed: bool = False, graph: bool = False, log=print):
        self.model, self.optimizer, self.scheduler, self.make_batch, self.rng = model, optimizer, scheduler, \
            make_batch, rng
        self.accum, self.distributed, self.graph, self.log = accum, distributed, graph, log
        self.autocast = autocast or contextlib.nullcontext()
        self.scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
        self.lpce = SoftTargetCrossEntropy()  # LPCE: cross-entropy against soft targets over the C classes
        self.loss_sum = torch.zeros((), device=rng.counter.device)
        self.steps = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: list | None = None  # the captured step's input batches (streamed paths)
        self._lr: list[torch.Tensor] = []

    def work(self, raws: list | None) -> None:
        """The step's device work: what runs eagerly, or what the CUDA graph holds."""
        for micro in range(self.accum):
            x, target = self.make_batch(self.rng.counter, None if raws is None else raws[micro])
            if self.distributed:
                # nanoGPT's trick: all-reduce gradients only on the last micro-step of an accumulation.
                self.model.require_backward_grad_sync = micro == self.accum - 1
            with self.autocast:  # the loss in fp32 under bf16 autocast too: log-softmax over C classes
                loss = self.lpce(self.model(x).float(), target) / self.accum
            self.scaler.scale(loss).backward()
            self.loss_sum += loss.detach()
            self.rng.counter += 1
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def __call__(self, step: int, raws: list | None = None) -> None:
        """Optimizer step `step` (0-based) on the next `accum` raw micro-batches (None: the in-memory path, whose
        batches the step draws itself)."""
        self.scheduler.step_update(step)
        if self.graph:
            self._replay(raws)
        else:
            self.work(raws)
            self.optimizer.zero_grad(set_to_none=True)
        self.rng.micro += self.accum
        self.steps += 1

    def take_mean_loss(self) -> float:
        """The mean step loss since the last call: the one read of the device per log window."""
        mean = self.loss_sum.item() / self.steps
        self.loss_sum.zero_()
        self.steps = 0
        return mean

    # -- the step as one CUDA graph ------------------------------------------------------------------------------

    def _replay(self, raws: list | None) -> None:
        if self._graph is None:
            self._capture(raws)
            return
        for tensor, group in zip(self._lr, self.optimizer.param_groups, strict=True):
            tensor.fill_(group["lr"])  # the float the schedule just wrote
        for (x, y), (sx, sy) in zip(raws or (), self._static or (), strict=True):
            sx.copy_(x, non_blocking=True)
            sy.copy_(y, non_blocking=True)
        self._graph.replay()

    def _state(self) -> list[torch.Tensor]:
        """Every tensor the step changes: what a warm-up must leave as it found it."""
        tensors = [p for p in self.model.parameters()] + [self.rng.counter, self.loss_sum]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        return tensors

    def _capture(self, raws: list | None) -> None:
        """Capture the step at its first call: a few eager warm-up steps on a side stream (they compile and allocate
        what the step needs), everything they changed put back, then one capture and this step's replay. The
        learning rate becomes a device tensor the host fills before each replay (fused AdamW, capturable); the
        input batches of a streamed path are copied into static buffers. The replay's loss is checked against the
        first warm-up's (the same step from the same state); a capture that fails, or disagrees, is one note and
        the run goes on uncaptured from the untouched state."""
        device = self.rng.counter.device
        self._static = [(x.to(device).clone(), y.to(device).clone()) for x, y in raws] if raws else None
        saved = {id(t): t.detach().clone() for t in self._state()}
        cuda_rng = torch.cuda.get_rng_state(device)
        groups = self.optimizer.param_groups
        self._lr = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) for g in groups]
        try:
            for group, lr in zip(groups, self._lr, strict=True):
                group["lr"], group["capturable"] = lr, True
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for i in range(GRAPH_WARMUP):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.work(self._static)
                    if i == 0:
                        expected = self.loss_sum.clone()
            torch.cuda.current_stream(device).wait_stream(side)
            self._restore(saved, cuda_rng)
            self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates .grad from its own pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.work(self._static)
            graph.replay()
            got, want = self.loss_sum.item(), expected.item()  # one read of the device, at the first step only
            if not math.isfinite(got) or abs(got - want) > 1e-3 * max(1.0, abs(want)):
                raise RuntimeError(f"the replayed step's loss {got:.6f} is not the eager step's {want:.6f}")
            self._graph = graph
        except Exception as e:  # CUDA's, dynamo's and our own check's
            self.log(f"note: capturing the step as a CUDA graph failed ({_reason(e)}); the step runs uncaptured")
            torch.cuda.synchronize(device)
            self._restore(saved, cuda_rng)
            for group in groups:
                group["capturable"] = False
            self.optimizer.zero_grad(set_to_none=True)
            self.graph, self._graph = False, None
            self.scheduler.step_update(self.rng.micro // self.accum)  # the floats the schedule writes, again
            self.work(self._static)
            self.optimizer.zero_grad(set_to_none=True)
        for group in groups:
            group["lr"] = float(group["lr"])  # the schedule writes floats; the graph reads self._lr

    def _restore(self, saved: dict, cuda_rng: torch.Tensor) -> None:
        """Put back what warm-ups changed: weights, counter, loss sum, AdamW's moments and step counts (those the
        warm-ups created start at zero, as a first step would create them), the device's random state."""
        with torch.no_grad():
            for t in self._state():
                if id(t) in saved:
                    t.copy_(saved[id(t)])
                else:
                    t.zero_()
        torch.cuda.set_rng_state(cuda_rng, self.rng.counter.device)


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
