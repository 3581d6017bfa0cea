"""The training step and its speed-ups (issues 19, 37): a run with the compiled batch continues bit for bit from a
checkpoint; the compiled step trains what the eager one trains; a compiler that fails is one note; MFU counts the
FLOPs timm's ViT-Tiny is known to need."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch

from fracgen.dataset import render_dataset
from train import pretrain
from train.pretrain import Config
from train.step import Fast, fast_options, flops_per_sample, mfu

TINY = dict(img_size=32, patch_size=8, depth=2, batch=16, log_every=1, eval_every=0, ckpt_every=0)
AUGMENTED = dict(randaug="rand-m9-mstd0.5-inc1", reprob=0.5, cutmix=1.0, drop_path=0.1, mix_group=8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("step") / "shards"
    render_dataset(out, classes=12, per_class=2, size=64, points=5000, shard_size=8, seed=0, workers=1)
    return out


def _weights(out: Path) -> dict:
    return torch.load(out / "model.pth", weights_only=True)


def test_a_resumed_run_with_the_compiled_batch_equals_an_uninterrupted_one(shards, tmp_path, monkeypatch):
    """The CPU default of a long run (the batch compiled, traced by dynamo; the 'eager' backend keeps the test free
    of a C++ build) trains what the eager step trains, and since every draw is a function of the micro-step, the
    run continued from its step-3 checkpoint ends with the weights of the run that never stopped, bit for bit."""
    from train import step

    monkeypatch.setattr(step, "BACKEND", "eager")
    args = dict(shards=str(shards), **{**TINY, "ckpt_every": 3}, **AUGMENTED, steps=6)
    pretrain.pretrain(Config(**args, out=str(tmp_path / "plain"), fast="off"))
    monkeypatch.setattr(step, "CPU_COMPILE_STEPS", 6)
    pretrain.pretrain(Config(**args, out=str(tmp_path / "fast"), keep_ckpts=2))
    (tmp_path / "resumed").mkdir()  # the mid-run checkpoint alone, as a killed run would have left it
    shutil.copy(tmp_path / "fast" / "ckpt-00000003.pt", tmp_path / "resumed" / "ckpt.pt")
    pretrain.pretrain(Config(**args, out=str(tmp_path / "resumed"), resume="always"))
    plain = _weights(tmp_path / "plain")
    for run in ("fast", "resumed"):
        weights = _weights(tmp_path / run)
        assert all(torch.equal(plain[k], weights[k]) for k in plain), run


def test_fast_is_on_by_default_on_cuda_and_compiles_the_cpus_batch_for_long_runs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fast_options("auto", False, "default", cpu, steps=100) == Fast()
    assert fast_options("auto", False, "default", cpu, steps=1500) == Fast(augment=True)
    assert fast_options("auto", False, "default", cuda) == Fast(True, "default", True, True, True)
    assert fast_options("auto", False, "default", cuda, world_size=8) == Fast(True, "default", True, True, False)
    assert fast_options("auto", False, "default", cuda, graph="off").graph is False
    assert fast_options("off", False, "default", cuda) == Fast()
    assert fast_options("on", False, "reduce-overhead", cpu) == Fast(False, "reduce-overhead", False, True, False)
    assert fast_options("off", True, "default", cpu).compile
    assert fast_options("on", True, "default", cpu) == Fast(True, "default", False, True, False)
    assert fast_options("on", False, "default", cpu, graph="on").graph is False  # no CUDA graphs on a CPU


def test_flops_per_sample_of_vit_tiny_at_224():
    """timm's ViT-Tiny/16 at 224 px: 1.26 GMAC forward, so ~7.5 GFLOP for forward + backward (3x the forward)."""
    model = timm.create_model("vit_tiny_patch16_224", num_classes=1000)
    flops = flops_per_sample(model, 224, torch.device("cpu"))
    assert 7.0e9 < flops < 8.0e9
    assert mfu(15_000, flops, 989e12) == pytest.approx(100 * 15_000 * flops / 989e12)
    assert mfu(15_000, flops, None) is None


def _losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [e["loss"] for e in map(json.loads, lines) if "loss" in e and "final" not in e]


@pytest.mark.slow
def test_the_compiled_step_trains_what_the_eager_step_trains(shards, tmp_path):
    """Same seeds, same batches: torch.compile only reorders floating-point work, so over 160 steps the loss curve
    of the compiled model stays within noise of the eager one (windows of 20 steps)."""
    from torch._dynamo.utils import counters

    args = dict(shards=str(shards), **{**TINY, "log_every": 20}, mixup=0.0, smoothing=0.0, blr=2e-2, steps=160)
    pretrain.pretrain(Config(**args, out=str(tmp_path / "eager")))
    torch._dynamo.reset()
    counters.clear()
    pretrain.pretrain(Config(**args, out=str(tmp_path / "compiled"), compile=True))
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] >= 1 or \
        counters["stats"]["unique_graphs"] >= 1  # compiled for real, not eager twice
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 8
    assert eager[-1] < eager[0] - 0.3  # it learns, so the comparison means something
    assert max(abs(a - b) for a, b in zip(eager, compiled, strict=True)) < 0.1


def _run(shards: Path, out: Path, capsys, **extra) -> tuple[str, dict]:
    args = dict(shards=str(shards), **TINY, steps=3, mixup=0.0, **extra)
    pretrain.pretrain(Config(**args, out=str(out)))
    return capsys.readouterr().out, _weights(out)


def test_a_backend_that_fails_is_one_note_and_the_run_trains_what_eager_trains(shards, tmp_path, capsys,
                                                                               monkeypatch):
    from train import step

    _, eager = _run(shards, tmp_path / "eager", capsys)

    def broken(graph, inputs):
        raise RuntimeError("this backend is broken")

    monkeypatch.setattr(step, "BACKEND", broken)
    log, fallback = _run(shards, tmp_path / "fallback", capsys, compile=True)
    notes = [line for line in log.splitlines() if "torch.compile" in line or line.startswith("step: ")]
    assert notes == ["note: torch.compile failed on this machine (BackendCompilerFailed: backend='broken' raised: "
                     "RuntimeError: this backend is broken); training eagerly", "step: eager"], log
    assert all(torch.equal(eager[k], fallback[k]) for k in eager)  # the try changed no weight, buffer or draw


def test_no_cxx_compiler_is_one_note_not_a_traceback(shards, tmp_path, capsys):
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": (str(tmp_path / "no-such-g++"),)}):
        log, _ = _run(shards, tmp_path / "run", capsys, compile=True)
    assert "note: torch.compile failed on this machine (InductorError: InvalidCxxCompiler" in log, log
    assert "step: eager" in log.splitlines()


def test_a_compiled_run_really_compiles(shards, tmp_path, capsys, monkeypatch):
    """dynamo's counters prove a graph was captured, so the compiled-vs-eager comparisons compare two things. The
    fast suite traces with the 'eager' backend (no C++ build); the slow test below builds with inductor."""
    from torch._dynamo.utils import counters

    from train import step

    monkeypatch.setattr(step, "BACKEND", "eager")
    torch._dynamo.reset()  # a graph an earlier test compiled in this process would be reused, not counted
    counters.clear()
    log, _ = _run(shards, tmp_path / "run", capsys, compile=True)
    assert counters["stats"]["unique_graphs"] >= 1 and "step: torch.compile (default) model" in log.splitlines()
    torch._dynamo.reset()
    counters.clear()
    log, _ = _run(shards, tmp_path / "fast", capsys, fast="on", compile=True)
    assert counters["stats"]["unique_graphs"] >= 2  # the model and the batch
    assert "step: augmentation and mixing compiled whole (inductor), torch.compile (default) model" in \
        log.splitlines()


def test_a_batch_that_does_not_compile_is_one_note_and_trains_what_eager_trains(shards, tmp_path, capsys,
                                                                               monkeypatch):
    from train import step

    _, eager = _run(shards, tmp_path / "eager", capsys, **AUGMENTED)

    def broken(graph, inputs):
        raise RuntimeError("this backend is broken")

    monkeypatch.setattr(step, "BACKEND", broken)
    log, fallback = _run(shards, tmp_path / "fallback", capsys, fast="on", compile=True, **AUGMENTED)
    notes = [line for line in log.splitlines() if line.startswith(("note:", "step: "))]
    assert notes == ["note: torch.compile failed on this machine (BackendCompilerFailed: backend='broken' raised: "
                     "RuntimeError: this backend is broken); training eagerly",
                     "note: compiling the augmentation failed on this machine (BackendCompilerFailed: backend='broken' "
                     "raised: RuntimeError: this backend is broken); it runs eagerly", "step: eager"], log
    assert all(torch.equal(eager[k], fallback[k]) for k in eager)  # the tries moved no weight, buffer or draw


def test_precision_auto_is_bf16_where_the_cpu_has_bf16_units_and_fp32_where_not():
    from train.step import resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu, units="AVX512-BF16") == ("bf16", "auto: this CPU has AVX512-BF16")
    assert resolve_precision("auto", cpu, units="AMX")[0] == "bf16"
    assert resolve_precision("auto", cpu, units=None) == ("fp32", "auto: this CPU has no bf16 units")
    assert resolve_precision("auto", cuda, units=None)[0] == "bf16"
    assert resolve_precision("fp32", cpu, units="AMX") == ("fp32", "--precision fp32")
    assert resolve_precision("bf16", cpu, units=None) == ("bf16", "--precision bf16")


def test_a_bf16_run_says_so_and_continues_in_the_precision_it_began_with(shards, tmp_path, capsys, monkeypatch):
    """A run that began in fp32 (a CPU without bf16 units) and continues on one with them stays fp32: its schedule,
    weights and random streams are those of an fp32 run."""
    from train import step

    args = dict(shards=str(shards), **TINY, steps=4)
    monkeypatch.setattr(step, "bf16_units", lambda: None)
    pretrain.pretrain(Config(**args, out=str(tmp_path / "run"), stop_after=2))
    assert "device cpu fp32 (auto: this CPU has no bf16 units)" in capsys.readouterr().out
    monkeypatch.setattr(step, "bf16_units", lambda: "AVX512-BF16")
    pretrain.pretrain(Config(**args, out=str(tmp_path / "run")))
    assert "device cpu fp32 (auto: as the run began (fp32))" in capsys.readouterr().out
    pretrain.pretrain(Config(**args, out=str(tmp_path / "new")))
    assert "device cpu bf16 (auto: this CPU has AVX512-BF16)" in capsys.readouterr().out
    assert torch.load(tmp_path / "new" / "ckpt.pt", weights_only=False)["precision"] == "bf16"


# --- train/step.py in this process against values worked out by hand (issue 39) ---------------------------------

class _Schedule:
    def __init__(self):
        self.updates = []

    def step_update(self, step):
        self.updates.append(step)


class _Linear(torch.nn.Module):
    """Logits = x @ w; records (the DDP sync flag, the counter) at each forward."""

    def __init__(self, classes=3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(4 * classes, dtype=torch.float32).reshape(4, classes) / 10)
        self.seen = []

    def forward(self, x):
        self.seen.append(getattr(self, "require_backward_grad_sync", None))
        return x @ self.w


def _lpce(logits, target):  # cross-entropy against soft targets, by its definition
    return -(target * torch.log_softmax(logits.double(), -1)).sum(-1).mean()


def test_one_step_over_two_micro_batches_is_lpce_by_hand_and_sgd_on_its_mean_gradient():
    from train.rng import StepRNG
    from train.step import TrainStep

    torch.manual_seed(0)
    xs = [torch.randn(5, 4) for _ in range(4)]
    targets = [torch.softmax(torch.randn(5, 3), -1) for _ in range(4)]
    counters = []

    def make_batch(counter, raw):
        counters.append(int(counter))
        return xs[int(counter)], targets[int(counter)]

    model = _Linear()
    w0 = model.w.detach().clone()
    rng = StepRNG(0, 0, "cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    schedule = _Schedule()
    step = TrainStep(model, optimizer, schedule, make_batch, rng, accum=2, distributed=True)
    step(0)
    w = w0.clone().requires_grad_(True)
    expected = (_lpce(xs[0] @ w, targets[0]) + _lpce(xs[1] @ w, targets[1])) / 2
    expected.backward()
    assert torch.allclose(model.w.detach(), w0 - 0.5 * w.grad.float(), atol=1e-6)
    assert model.w.grad is None  # zeroed after the step
    assert model.seen == [False, True]  # gradients all-reduced on the last micro-step only
    assert (counters, int(rng.counter), rng.micro, schedule.updates) == ([0, 1], 2, 2, [0])
    step(1)
    assert (counters, int(rng.counter), rng.micro, schedule.updates) == ([0, 1, 2, 3], 4, 4, [0, 1])
    w1 = (w0 - 0.5 * w.grad.float()).double()
    second = (_lpce(xs[2].double() @ w1, targets[2]) + _lpce(xs[3].double() @ w1, targets[3])) / 2
    assert step.take_mean_loss() == pytest.approx((expected.item() + second.item()) / 2, rel=1e-5)
    assert step.loss_sum.item() == 0 and step.steps == 0  # the window starts again


def test_a_single_process_step_leaves_the_sync_flag_alone_and_a_window_of_one_step_is_its_loss():
    from train.rng import StepRNG
    from train.step import TrainStep

    x, target = torch.ones(2, 4), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    model = _Linear()
    logits = (x @ model.w).detach()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), _Schedule(), lambda c, r: (x, target),
                     StepRNG(0, 0, "cpu"))
    step(0)
    assert model.seen == [None]
    assert step.take_mean_loss() == pytest.approx(_lpce(logits, target).item(), rel=1e-6)


def test_the_loss_of_a_streamed_step_is_on_the_raw_batches_it_was_given():
    from train.rng import StepRNG
    from train.step import TrainStep

    raws = [(torch.zeros(2, 4), torch.eye(3)[:2]), (torch.ones(2, 4), torch.eye(3)[1:])]
    model = _Linear()
    logits = [(r[0] @ model.w).detach() for r in raws]
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), _Schedule(), lambda c, raw: raw,
                     StepRNG(0, 0, "cpu"), accum=2)
    step(0, raws)
    expected = (_lpce(logits[0], raws[0][1]) + _lpce(logits[1], raws[1][1])) / 2
    assert step.take_mean_loss() == pytest.approx(expected.item(), rel=1e-6)


def test_the_batch_maker_gives_smoothed_targets_that_sum_to_one_and_augments_by_key_and_counter():
    from train.step import BatchMaker

    calls = []

    def augment(images, key, counter):
        calls.append((key, int(counter)))
        return images * 2

    images, labels = torch.ones(3, 1, 2, 2), torch.tensor([0, 4, 2])
    maker = BatchMaker(augment, None, num_classes=5, smoothing=0.1, key=77)
    x, target = maker(torch.tensor(9), (images, labels))
    assert torch.equal(x, images * 2) and calls == [(77, 9)]
    assert torch.allclose(target.sum(1), torch.ones(3))
    assert target[1, 4].item() == pytest.approx(0.9 + 0.02) and target[1, 0].item() == pytest.approx(0.02)
    source = BatchMaker(None, None, 5, 0.0, key=1, source=lambda counter: (images[:1] + counter, labels[:1]))
    x, target = source(torch.tensor(3))
    assert torch.equal(x, images[:1] + 3) and torch.equal(target, torch.eye(5)[:1])


def test_what_a_run_says_of_its_speed_ups():
    from train.step import model_compile_mode

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert Fast().describe(cpu) == "eager"
    assert Fast(augment=True).describe(cpu) == "augmentation and mixing compiled whole (inductor), eager model"
    assert Fast(augment=True).describe(cuda) == "augmentation and mixing compiled whole, eager model"
    assert Fast(fused=True).describe(cuda) == "eager model, fused AdamW"
    assert Fast(True, "max-autotune").describe(cpu) == "torch.compile (max-autotune) model"
    assert Fast(True, "default", True, True, True).describe(cuda) == (
        "one CUDA graph, replayed (augmentation and mixing compiled whole, torch.compile (default) model, "
        "fused AdamW)")
    assert fast_options("auto", False, "default", cpu, steps=999) == Fast()
    assert fast_options("auto", False, "default", cpu, steps=1000) == Fast(augment=True)
    assert fast_options("auto", False, "default", cuda, graph="on", world_size=1).graph
    assert not fast_options("off", False, "default", cuda, graph="on", world_size=2).graph
    assert fast_options("off", False, "default", cuda, graph="on").graph  # asked for by name
    assert model_compile_mode("reduce-overhead", True) == "default"
    assert model_compile_mode("max-autotune", True) == "max-autotune-no-cudagraphs"
    assert model_compile_mode("reduce-overhead", False) == "reduce-overhead"
    assert model_compile_mode("default", True) == "default"


def test_a_compilers_error_is_named_by_its_first_line_or_two():
    from train.step import _reason

    assert _reason(RuntimeError("boom\nsecond\nthird")) == "RuntimeError: boom"
    assert _reason(ValueError("failed:\n  because\nmore")) == "ValueError: failed: because"
    assert _reason(OSError("")) == "OSError: "
    assert _reason(RuntimeError("x" * 300)) == "RuntimeError: " + "x" * 200


def test_the_compile_try_batch_has_the_runs_shapes_and_moves_no_random_stream():
    from train.step import example_batch

    model = torch.nn.Linear(1, 1)
    state = torch.get_rng_state()
    x, target = example_batch(model, 3, 8, 5, torch.device("cpu"), channels=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert x.shape == (3, 1, 8, 8) and target.shape == (3, 5)
    assert torch.allclose(target, torch.full((3, 5), 0.2)) and torch.equal(
        x, example_batch(None, 3, 8, 5, torch.device("cpu"), channels=1)[0])  # the same batch every time
    assert example_batch(None, 2, 4, 3, torch.device("cpu"))[0].shape == (2, 3, 4, 4)


def test_bf16_units_are_read_from_what_the_cpu_kernels_dispatch_on(monkeypatch):
    from train.step import autocast_for, bf16_units, resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert bf16_units() == "AMX"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert bf16_units() == "AVX512-BF16"
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16", "auto: this CPU has AVX512-BF16")
    assert isinstance(autocast_for(torch.device("cpu")), torch.autocast)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert bf16_units() is None  # a CPU without the units: its bf16 would be emulated
    assert resolve_precision("auto", torch.device("cpu"))[0] == "fp32"
    assert not isinstance(autocast_for(torch.device("cpu")), torch.autocast)
    assert isinstance(autocast_for(torch.device("cpu"), "bf16"), torch.autocast)
    with pytest.raises(ValueError, match="precision 'fp16'"):
        resolve_precision("fp16", torch.device("cpu"))


def test_mfu_needs_a_known_card():
    from train.step import PEAK_BF16, peak_flops

    assert peak_flops(torch.device("cpu")) is None
    assert mfu(100.0, 1e9, 1e12) == pytest.approx(10.0)
    assert mfu(100.0, 1e9, 0.0) is None and PEAK_BF16["H200"] == PEAK_BF16["H100"] == 989e12


class _Normed(torch.nn.Module):
    """A buffer a forward changes (BatchNorm's running mean) and a draw (dropout): what a compile try must put back."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.nn.functional.dropout(self.norm(x.flatten(1)[:, :4]), 0.5))


def _fake_compile(monkeypatch, fails: Exception | None):
    """torch.compile's lazy failure, faked: the 'compiled' model runs the forward, then fails (or not). A mutation
    pass skips the real torch.compile, so the try's bookkeeping is checked here without dynamo."""
    calls = []

    def compile(model, **kwargs):
        calls.append(kwargs)

        def compiled(*args):
            out = model(*args)
            if fails is not None:
                raise fails
            return out
        return compiled

    monkeypatch.setattr(torch, "compile", compile)
    return calls


@pytest.mark.parametrize("fails", [None, RuntimeError("inductor failed:\ng++ not found\nmore")])
def test_a_compile_try_leaves_no_gradient_buffer_or_draw_behind(monkeypatch, fails):
    from train.step import compile_model, example_batch

    model = _Normed().train()
    example = example_batch(model, 4, 2, 3, torch.device("cpu"), channels=4)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    calls, notes = _fake_compile(monkeypatch, fails), []
    result, ok = compile_model(model, "reduce-overhead", example, log=notes.append)
    assert ok is (fails is None) and (result is model) is (fails is not None)
    assert calls == [{"mode": "reduce-overhead", "backend": "inductor"}]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)
    assert notes == ([] if fails is None else
                     ["note: torch.compile failed on this machine (RuntimeError: inductor failed: g++ not found); "
                      "training eagerly"])
    compile_model(model, "default", example, log=notes.append, backend="eager")
    assert calls[-1] == {"mode": None, "backend": "eager"}  # "default" is torch.compile's None


def test_a_compile_try_runs_the_loss_under_the_runs_autocast(monkeypatch):
    from train.step import compile_model, example_batch

    seen = []

    class Probe(_Normed):
        def forward(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(x)

    model = Probe()
    _fake_compile(monkeypatch, None)
    compile_model(model, "default", example_batch(model, 4, 2, 3, torch.device("cpu"), channels=4),
                  autocast=torch.autocast("cpu", dtype=torch.bfloat16), log=print)
    assert seen == [True]


def test_an_unknown_mode_is_a_note_before_any_try(monkeypatch):
    from train.step import compile_model

    def refuse(model, **kwargs):
        raise RuntimeError("Unrecognized mode=fastest")

    monkeypatch.setattr(torch, "compile", refuse)
    notes = []
    model = _Normed()
    assert compile_model(model, "fastest", (None, None), log=notes.append) == (model, False)
    assert notes == ["note: torch.compile unavailable (RuntimeError: Unrecognized mode=fastest); training eagerly"]


def test_the_batch_maker_is_compiled_whole_and_a_failure_is_one_note(monkeypatch):
    from train.step import BATCH_COMPILE_OPTIONS, compile_batches

    made = []

    def maker(counter, raw):
        made.append(int(counter))
        return raw

    calls, notes = _fake_compile(monkeypatch, None), []
    compiled, ok = compile_batches(maker, (torch.tensor(5), None), log=notes.append)
    assert ok and compiled is not maker and made == [5] and notes == []
    assert calls == [{"fullgraph": True, "dynamic": False, "backend": "inductor", "options": BATCH_COMPILE_OPTIONS}]
    assert BATCH_COMPILE_OPTIONS == {"realize_opcount_threshold": 16}
    compile_batches(maker, (torch.tensor(6), None), log=notes.append, backend="eager")
    assert calls[-1] == {"fullgraph": True, "dynamic": False, "backend": "eager", "options": None}
    _fake_compile(monkeypatch, RuntimeError("graph break"))
    assert compile_batches(maker, (torch.tensor(7), None), log=notes.append) == (maker, False)
    assert notes == ["note: compiling the augmentation failed on this machine (RuntimeError: graph break); it runs "
                     "eagerly"]


def test_an_older_torch_without_the_cpu_probes_means_no_bf16_units(monkeypatch):
    from train.step import bf16_units

    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert bf16_units() == "AVX512-BF16"  # the probe torch lacks counts as "no"
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert bf16_units() is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert bf16_units() == "AMX"
    monkeypatch.delattr(torch, "cpu")
    assert bf16_units() is None


def test_cuda_runs_are_bf16_autocast_and_their_peak_is_the_cards(monkeypatch):
    import warnings

    from train.step import autocast_for, peak_flops, resolve_precision

    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda) == ("bf16", "auto: CUDA")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: torch warns that it disables the context
        assert autocast_for(cuda).fast_dtype == torch.bfloat16  # CUDA's autocast default would be float16
    names = []

    def card(device):
        names.append(device)
        return card.name

    monkeypatch.setattr(torch.cuda, "get_device_name", card)  # a card faked present
    card.name = "NVIDIA H200"
    assert peak_flops(cuda) == 989e12 and names == [cuda]
    card.name = "NVIDIA A100-SXM4-80GB"
    assert peak_flops(cuda) == 312e12
    card.name = "Tesla T4"
    assert peak_flops(cuda) is None


def test_counting_flops_leaves_no_gradient_and_the_models_mode_as_it_was():
    from train.step import flops_per_sample

    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=1)
    model.eval()
    state = torch.get_rng_state()
    flops = flops_per_sample(model, 32, torch.device("cpu"))
    assert flops > 0 and not model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), state)
    assert flops_per_sample(model, 32, torch.device("cpu")) == flops
