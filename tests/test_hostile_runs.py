"""A run folder that cannot lie and an --out that is only ours (issue 38, the trainer's items): "finished" means the
weights exist and match their record; nothing is written through a link planted in --out; a folder that is not a
run of ours is refused; the checkpoint marker, a checkpoint's saved config and metrics.jsonl are records to check,
read within bounds; a full disk is one line; non-finite options and losses stop cleanly; a continued run is the
run that never stopped, down to the bytes of its weights file."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import python_m, wait_for

from fracgen.dataset import render_dataset
from train.checkpoint import MARKER, file_name

TINY = ["--img-size", "16", "--patch-size", "8", "--depth", "1", "--batch", "8", "--log-every", "2",
        "--eval-every", "0", "--eval-samples", "16"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile-runs") / "shards"
    render_dataset(out, classes=8, per_class=2, size=32, points=2000, shard_size=8, seed=0, workers=1)
    return out


def train(shards: Path, out: Path, *extra, steps: int = 4):
    return python_m("train.pretrain", "--shards", shards, "--out", out, "--steps", steps, *TINY, *extra)


def one_line(result, match: str, code: int = 1) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def forge(run: Path, edit) -> None:
    """Rewrite the newest listed checkpoint with `edit(checkpoint)` applied and the marker updated to match: what a
    hostile file looks like once it passes the marker's size and sha256."""
    marker = json.loads((run / MARKER).read_text())
    entry = marker["checkpoints"][-1]
    checkpoint = torch.load(run / entry["file"], weights_only=False)
    edit(checkpoint)
    (run / entry["file"]).unlink()
    torch.save(checkpoint, run / entry["file"])
    raw = (run / entry["file"]).read_bytes()
    entry.update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    (run / MARKER).write_text(json.dumps(marker))
    (run / "ckpt.pt").unlink(missing_ok=True)


# --- 1. "finished" means the weights exist and match their record -----------------------------------------------

def test_a_finished_run_without_its_weights_writes_them_from_its_last_checkpoint(shards, tmp_path):
    """Killed after its last checkpoint, before the weights (kill -9, OOM, a full disk at the end): the same
    command writes them, the same bytes the run would have written; a damaged weights file is rewritten too."""
    run = tmp_path / "run"
    assert train(shards, run).returncode == 0
    weights, config, summary = (run / "model.safetensors").read_bytes(), (run / "config.json").read_bytes(), \
        json.loads((run / "summary.json").read_text())
    for damage in ("delete", "flip"):
        if damage == "delete":
            for name in ("model.safetensors", "config.json", "model.pth", "summary.json"):
                (run / name).unlink()
        else:
            raw = bytearray(weights)
            raw[-1] ^= 1
            (run / "model.safetensors").write_bytes(bytes(raw))
        result = train(shards, run)
        assert result.returncode == 0, result.stderr
        assert "finished all 4 steps" in result.stdout and "writing them" in result.stdout, result.stdout
        assert (run / "model.safetensors").read_bytes() == weights and (run / "config.json").read_bytes() == config
        assert json.loads((run / "summary.json").read_text())["pretext_acc"] == summary["pretext_acc"]
    result = train(shards, run)  # now whole: nothing to do
    assert result.returncode == 0 and "nothing to do" in result.stdout


# --- 2. nothing is written through a link planted in --out -------------------------------------------------------

PLANTED = ["summary.json.tmp", "config.json.tmp", "model.pth.tmp", "model.safetensors.tmp", "checkpoints.json.tmp",
           f"{file_name(4)}.tmp", "ckpt.pt.tmp", "summary.json", "config.json", "model.safetensors", "model.pth"]


def test_links_planted_in_out_are_replaced_not_written_through(shards, tmp_path):
    """Links under every name a run writes (final and temporary), planted in a run folder between two commands:
    the continued run finishes, each target is as it was, and no link is left in the folder."""
    run = tmp_path / "run"
    assert train(shards, run, "--stop-after", "2", "--ckpt-every", "2", "--keep-ckpts", "2").returncode == 0
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in PLANTED:
        (victim / name).write_text("precious")
        (run / name).symlink_to(victim / name)
    result = train(shards, run, "--ckpt-every", "2", "--keep-ckpts", "2")
    assert result.returncode == 0, result.stderr
    assert all((victim / name).read_text() == "precious" for name in PLANTED)
    assert not any(p.is_symlink() for p in run.iterdir())
    assert json.loads((run / "summary.json").read_text())["step"] == 4


def test_a_linked_metrics_file_is_refused_and_its_target_left_whole(shards, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(victim)
    one_line(train(shards, run), "metrics.jsonl")
    assert victim.read_text() == "precious"


def test_finetune_does_not_write_its_results_through_a_link(shards, tmp_path):
    run = tmp_path / "run"
    assert train(shards, run).returncode == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "results.json.tmp").symlink_to(victim)
    result = python_m("train.finetune", "--checkpoint", run, "--out", tmp_path / "ft", "--steps", "2", "--seeds",
                      "0", "--batch", "16")
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "precious" and json.loads((tmp_path / "ft" / "results.json").read_text())


# --- 3. a folder that is not a run of ours -------------------------------------------------------------------------

def test_an_out_that_is_not_a_run_of_ours_is_refused_and_left_as_it_was(shards, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "notes.txt").write_text("mine")
    one_line(train(shards, mine), "not a fracgen-train pretrain run folder")
    assert (mine / "config.json").read_text() == '{"my": "settings"}' and sorted(os.listdir(mine)) == \
        ["config.json", "notes.txt"]
    run = tmp_path / "run"
    assert train(shards, run).returncode == 0
    published = tmp_path / "published"
    result = python_m("train.publish", run, "--out", published)
    assert result.returncode == 0, result.stderr
    before = {p.name: sha(p) for p in published.iterdir()}
    one_line(train(shards, published), "not a fracgen-train pretrain run folder")
    assert {p.name: sha(p) for p in published.iterdir()} == before


def test_what_a_run_killed_before_its_first_checkpoint_leaves_is_not_foreign(shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 2.0}\n')
    (run / "model.safetensors.tmp").write_bytes(b"half")
    assert train(shards, run).returncode == 0


# --- 5. the marker and a local config.json are records to check --------------------------------------------------

def _marker_lists(run: Path, **entry) -> None:
    marker = json.loads((run / MARKER).read_text())
    marker["checkpoints"][-1].update(entry)
    (run / MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("size", [10**12, -5, 2**70, "12"])
def test_absurd_sizes_in_the_marker_are_one_line(shards, tmp_path, size):
    run = tmp_path / "run"
    assert train(shards, run, "--stop-after", "2").returncode == 0  # stopped with its checkpoint
    _marker_lists(run, bytes=size)
    (run / "ckpt.pt").unlink()
    one_line(train(shards, run), "no checkpoint")


def test_a_listed_checkpoint_that_is_a_link_or_a_fifo_is_not_read(shards, tmp_path):
    """A listed file symlinked to /dev/zero with a huge recorded size (read until the size: 4 GB of memory before),
    and a FIFO (a read that never returns): neither is opened; the run says so and starts from what is intact."""
    for kind in ("zero", "fifo"):
        run = tmp_path / kind
        assert train(shards, run, "--stop-after", "2", "--ckpt-every", "2").returncode == 0
        entry = json.loads((run / MARKER).read_text())["checkpoints"][-1]
        (run / entry["file"]).unlink()
        (run / "ckpt.pt").unlink()
        if kind == "zero":
            (run / entry["file"]).symlink_to("/dev/zero")
            _marker_lists(run, bytes=8 * 2**30)
        else:
            os.mkfifo(run / entry["file"])
        t0 = time.time()
        result = train(shards, run)
        assert time.time() - t0 < 60 and "Traceback" not in result.stderr
        one_line(result, "no checkpoint")


def test_a_forged_step_in_the_marker_neither_restarts_the_run_nor_prunes_the_real_checkpoints(shards, tmp_path):
    run = tmp_path / "run"
    assert train(shards, run, "--stop-after", "2", "--ckpt-every", "2", "--keep-ckpts", "3", steps=6).returncode == 0
    marker = json.loads((run / MARKER).read_text())
    marker["checkpoints"].append({**marker["checkpoints"][-1], "step": 10**9})
    (run / MARKER).write_text(json.dumps(marker))
    result = train(shards, run, "--ckpt-every", "2", "--keep-ckpts", "3", steps=6)
    assert result.returncode == 0, result.stderr
    assert "resumed from step 2" in result.stdout
    assert [e["step"] for e in json.loads((run / MARKER).read_text())["checkpoints"]] == [2, 4, 6]


def test_a_local_config_with_absurd_weight_records_is_one_line(shards, tmp_path):
    run = tmp_path / "run"
    assert train(shards, run).returncode == 0
    config = json.loads((run / "config.json").read_text())
    for size in (10**15, -1, 2**80):
        config["fracgen"]["weights"]["bytes"] = size
        (run / "config.json").write_text(json.dumps(config))
        result = python_m("train.finetune", "--checkpoint", run, "--out", tmp_path / "ft", "--steps", "1",
                          "--seeds", "0")
        one_line(result, "model.safetensors")


# --- 6. a checkpoint's saved config passes the options' checks ---------------------------------------------------

@pytest.mark.parametrize(("key", "value", "match"), [("log_every", 0, "log_every"), ("precision", "fp16", "precision"),
                                                      ("keep_ckpts", -1, "keep_ckpts"), ("workers", 10**6, "workers"),
                                                      ("no_such_option", 1, "no_such_option"),
                                                      ("lr", float("nan"), "lr")])
def test_a_checkpoints_saved_config_is_checked_like_the_options(shards, tmp_path, key, value, match):
    run = tmp_path / "run"
    assert train(shards, run, "--stop-after", "2").returncode == 0

    def edit(checkpoint):
        checkpoint["config"][key] = value

    forge(run, edit)
    one_line(train(shards, run), match)


def test_a_checkpoints_cache_dir_is_not_obeyed(shards, tmp_path):
    """The download cache is this machine's: a continued run uses --cache-dir or the default, never a folder a
    checkpoint names."""
    run = tmp_path / "run"
    assert train(shards, run, "--stop-after", "2").returncode == 0
    elsewhere = tmp_path / "elsewhere"

    def edit(checkpoint):
        checkpoint["config"]["cache_dir"] = str(elsewhere)
        checkpoint["config"]["shards"] = "http://127.0.0.1:9/"

    forge(run, edit)
    result = train(shards, run)
    assert result.returncode == 0, result.stderr
    assert not elsewhere.exists()


# --- 7. metrics.jsonl on resume --------------------------------------------------------------------------------------

def test_metrics_of_a_continued_run_are_read_in_bounds_and_bad_lines_skipped(shards, tmp_path):
    run = tmp_path / "run"
    assert train(shards, run, "--stop-after", "2", steps=4).returncode == 0
    good = (run / "metrics.jsonl").read_text()
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[" * 200_000 + "\n")  # a RecursionError for json.loads
        f.write('{"step": 1, "loss": 3.0, "pad": "' + "x" * (4 << 20) + '"}\n')  # a line longer than any of ours
        f.write('{"step": 2, "loss": "not a number"}\n')
    result = train(shards, run)
    assert result.returncode == 0, result.stderr
    assert "note:" in result.stdout and "metrics.jsonl" in result.stdout
    kept = (run / "metrics.jsonl").read_text()
    assert kept.startswith(good) and "[[[" not in kept and "xxxx" not in kept
    assert (run / "metrics.jsonl").stat().st_size < 1 << 16


# --- 8. a full disk --------------------------------------------------------------------------------------------------

def test_a_full_disk_at_the_final_write_is_one_line_and_leaves_no_temporaries(shards, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_fsync = os.fsync

    def full(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "model" in name or "config" in name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    result = train(shards, run)
    one_line(result, "full")
    assert "free" in result.stderr and str(run) in result.stderr
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name], list(run.iterdir())
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert train(shards, run).returncode == 0 and (run / "model.safetensors").is_file()


def test_a_full_disk_during_a_checkpoint_says_so(shards, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_fsync = os.fsync

    def full(fd):
        if "ckpt-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    result = train(shards, run, "--ckpt-every", "2")
    one_line(result, "full")
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


# --- 10. non-finite numbers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option", [("--lr", "inf"), ("--blr", "inf"), ("--ink-gain", "nan"), ("--lr", "nan"),
                                    ("--warmup-epochs", "nan"), ("--cache-budget", "nan"), ("--mixup", "inf"),
                                    ("--smoothing", "nan")])
def test_non_finite_options_are_one_line(shards, tmp_path, option):
    one_line(train(shards, tmp_path / "run", *option), option[0])
    assert not (tmp_path / "run").exists()


def test_a_loss_that_turns_non_finite_stops_the_run_with_its_last_finite_checkpoint(shards, tmp_path):
    run = tmp_path / "run"
    result = train(shards, run, "--lr", "1e30", "--ckpt-every", "2", "--log-every", "1", steps=8)
    one_line(result, "non-finite")
    if (run / MARKER).exists():
        newest = json.loads((run / MARKER).read_text())["checkpoints"][-1]
        state = torch.load(run / newest["file"], weights_only=False)["model"]
        assert all(torch.isfinite(t).all() for t in state.values())
    assert not (run / "model.safetensors").exists()


def test_publish_refuses_non_finite_weights(shards, tmp_path):
    from safetensors.torch import load, save

    run = tmp_path / "run"
    assert train(shards, run).returncode == 0
    config = json.loads((run / "config.json").read_text())
    tensors = load((run / "model.safetensors").read_bytes())
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], math.nan)
    raw = save(tensors, {"format": "pt"})
    (run / "model.safetensors").write_bytes(raw)
    config["fracgen"]["weights"].update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    (run / "config.json").write_text(json.dumps(config))
    one_line(python_m("train.publish", run, "--out", tmp_path / "pub"), "non-finite")


# --- 11. continuing ---------------------------------------------------------------------------------------------------

def test_continuing_without_stop_after_runs_to_the_end(shards, tmp_path):
    run = tmp_path / "run"
    assert train(shards, run, "--stop-after", "2", steps=6).returncode == 0
    result = train(shards, run, steps=6)
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "summary.json").read_text())["step"] == 6


def test_precision_auto_continues_a_run_begun_in_fp32(shards, tmp_path):
    run = tmp_path / "run"
    assert train(shards, run, "--stop-after", "2", "--precision", "fp32").returncode == 0
    result = train(shards, run)
    assert result.returncode == 0, result.stderr
    assert "fp32" in result.stdout
    one_line(train(shards, run, "--precision", "bf16"), "precision")


# --- 14. the weights file of a continued run ------------------------------------------------------------------------

def test_a_continued_runs_weights_file_is_byte_for_byte_the_uninterrupted_runs(shards, tmp_path):
    assert train(shards, tmp_path / "straight", steps=6).returncode == 0
    assert train(shards, tmp_path / "stopped", "--stop-after", "3", steps=6).returncode == 0
    assert train(shards, tmp_path / "stopped", steps=6).returncode == 0
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert (straight / "model.safetensors").read_bytes() == (stopped / "model.safetensors").read_bytes()
    # config.json records the run folder too (recipe.out): the same text once that is put aside
    assert (straight / "config.json").read_text().replace(str(straight), "RUN") == \
        (stopped / "config.json").read_text().replace(str(stopped), "RUN")


# --- 4. signals before the first step ----------------------------------------------------------------------------

@pytest.mark.slow  # a real process, a slow server on loopback
def test_sigterm_during_a_slow_pull_stops_at_once_and_leaves_nothing_half_written(shards, tmp_path):
    from helpers import Server

    from fracgen.share import publish

    published = tmp_path / "published"
    shutil.copytree(shards, published)
    publish(published)
    cache = tmp_path / "cache"
    with Server(published, delay=20.0) as server:
        proc = subprocess.Popen([sys.executable, "-m", "train.pretrain", "--shards", server.url, "--cache-dir", cache,
                                 "--out", tmp_path / "run", *TINY], cwd=Path(__file__).resolve().parents[1],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert wait_for(lambda: server.tars(), 120)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert time.time() - t0 < 15, (out, err)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert "SIGTERM" in out + err and "Traceback" not in err
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix == ".tar"]  # no shard half kept


@pytest.mark.slow  # a real process compiling
def test_sigterm_during_the_compile_try_stops_at_once(shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "train.pretrain", "--shards", shards, "--out", run, *TINY,
                             "--compile"], cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert wait_for(lambda: (run / ".fracgen.lock").exists(), 120)
    time.sleep(8)  # well into the compilation (cold caches: ~30 s)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 30, (out, err)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, (out, err)



# --- 13. control characters of a folder name -------------------------------------------------------------------------

def test_a_folder_names_control_characters_reach_neither_the_log_nor_the_card(shards, tmp_path):
    run = tmp_path / "run\x1b[31mred\x07"
    result = train(shards, run)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout + result.stderr and "\\x1b" in result.stdout
    published = tmp_path / "published"
    assert python_m("train.publish", run, "--out", published).returncode == 0
    card = (published / "README.md").read_text()
    assert "\x1b" not in card and "\x07" not in card


def test_a_signal_before_the_first_step_is_one_line_from_any_command(monkeypatch, capsys):
    """The experiments call pretrain() as a library: their command ends in one line too, exit 128 + the signal."""
    import typer

    from train.preempt import Interrupted
    from train.runtime import run_cli

    app = typer.Typer(add_completion=False)

    @app.command()
    def main() -> None:
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(sys, "argv", ["experiments"])
    with pytest.raises(SystemExit) as stop:
        run_cli(app)
    err = capsys.readouterr().err
    assert stop.value.code == 128 + signal.SIGINT and err.strip() == \
        "stopped by SIGINT before the first training step: nothing to keep"
