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
