"""The on-the-fly source (issue 12): `train.pretrain --render` draws the shards' images bit for bit, fresh seeded
instances beyond them, the same batches for any number of loader workers, and needs no shards on disk."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import python_m

from fracgen.dataset import render_dataset
from train import data, onthefly
from train.augment import HostCrop
from train.pretrain import Config, pretrain
from train.runtime import TrainError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, depth=2, batch=16, log_every=1, eval_every=0, ckpt_every=0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fly") / "shards"
    render_dataset(out, classes=12, per_class=2, size=64, points=5000, shard_size=8, seed=0, workers=1)
    return out


def test_instance_i_of_class_k_is_the_shard_image_bit_for_bit(shards):
    manifest = onthefly.read_manifest(shards)
    decoded, labels = data.load_images(shards, manifest)
    rendered, rendered_labels = onthefly.render_all(manifest, instances=2, workers=0)
    assert rendered.dtype == torch.uint8 and torch.equal(rendered, decoded) and torch.equal(rendered_labels, labels)
    # beyond the shards: fresh instances of the same class, seeded (the same when drawn again)
    fresh, _ = onthefly.render_images(manifest, [(5, 2), (5, 3), (5, 2)])
    assert not torch.equal(fresh[0], decoded[1 * 12 + 5]) and not torch.equal(fresh[0], fresh[1])
    assert torch.equal(fresh[0], fresh[2]) and fresh[0].any()


def test_streamed_batches_are_the_caches_for_any_number_of_workers(shards):
    """Micro-batch t is a pure function of (seed, t, rank): rendered in 0 or 2 loader workers it is the batch the
    in-memory cache of the shards gives at step t."""
    manifest = onthefly.read_manifest(shards)
    images, labels = data.load_images(shards, manifest)
    memory = data.MemorySource(images, labels, batch=10, seed=3, rank=1, world_size=2)
    draws = onthefly.Draws(12, 2, batch=10, seed=3, rank=1, world_size=2)
    for workers in (0, 2):
        batches = list(onthefly.loader(manifest, draws, first=2, last=9, workers=workers))
        assert len(batches) == 7
        for t, (x, y) in enumerate(batches, start=2):
            mx, my = memory(torch.tensor(t))  # drawn from a device counter, as the step draws it
            assert torch.equal(x, mx) and torch.equal(y, my)


def test_crops_cut_by_rendering_workers_do_not_depend_on_the_worker_count(shards):
    """With the crops cut in the workers (`--crop-in workers`), micro-batch t's crops come from (seed, t, rank)."""
    manifest = onthefly.read_manifest(shards)
    draws = onthefly.Draws(12, 0, batch=6, seed=3, rank=1, world_size=2)
    crop = HostCrop(16, scale=(0.35, 1.0), ink_gain=2.0)
    runs = [list(onthefly.loader(manifest, draws, first=1, last=5, workers=w, crop=crop)) for w in (0, 2)]
    assert all(x.shape == (6, 1, 16, 16) for x, _ in runs[0])
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*runs, strict=True))
    assert not torch.equal(runs[0][0][0], runs[0][1][0])


def test_unbounded_instances_show_every_class_each_epoch_as_a_new_instance():
    draws = onthefly.Draws(num_classes=7, instances=0, batch=5, seed=1)
    drawn = [pair for t in range(14) for pair in draws(t)]  # 70 = ten epochs of 7
    assert len(set(drawn)) == 70  # never the same image twice
    for epoch in range(10):
        assert sorted(drawn[epoch * 7:(epoch + 1) * 7]) == [(k, epoch) for k in range(7)]
    assert [k for k, _ in drawn[:7]] != [k for k, _ in drawn[7:14]]  # a new order each epoch
    assert onthefly.Draws(7, 0, 5, seed=1)(9) == draws(9)


def test_a_manifest_alone_is_enough_and_bad_ones_are_one_line(shards, tmp_path):
    (tmp_path / "only").mkdir()
    shutil.copy(shards / "manifest.json", tmp_path / "only" / "manifest.json")  # no shards
    for where in (tmp_path / "only", tmp_path / "only" / "manifest.json"):
        assert onthefly.read_manifest(where)["num_classes"] == 12
    with pytest.raises(TrainError, match="no manifest there"):
        onthefly.read_manifest(tmp_path / "missing")
    manifest = json.loads((shards / "manifest.json").read_text())
    (tmp_path / "old.json").write_text(json.dumps({**manifest, "renderer": 2}))
    with pytest.raises(TrainError, match="drawn by renderer 2"):
        onthefly.read_manifest(tmp_path / "old.json")


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]


def test_training_on_the_fly_equals_training_on_the_shards(shards, tmp_path, capsys):
    """The same batches, so the same losses, bit for bit: shards in memory, rendered into memory, rendered in two
    loader workers."""
    runs = {"shards": dict(shards=str(shards)), "render": dict(render=str(shards / "manifest.json")),
            "render-stream": dict(render=str(shards), cache="off", workers=2)}
    losses = {}
    for name, args in runs.items():
        pretrain(Config(**TINY, **args, steps=4, out=str(tmp_path / name)))
        losses[name] = _losses(tmp_path / name)
    out = capsys.readouterr().out
    assert "rendered on the fly (2 per class)" in out and "rendering on the fly, 2 loader worker(s)" in out
    assert len(losses["shards"]) == 4 and losses["render"] == losses["shards"] == losses["render-stream"]


def test_a_resumed_on_the_fly_run_equals_an_uninterrupted_one(shards, tmp_path):
    """Streamed, unbounded: the batches are a function of the step, so stopping and resuming changes no weight."""
    args = dict(TINY, render=str(shards), instances=0, cache="off", workers=1, steps=5, mixup=0.8, reprob=0.5)
    pretrain(Config(**args, out=str(tmp_path / "a")))
    pretrain(Config(**args, out=str(tmp_path / "b"), stop_after=3))
    assert not (tmp_path / "b" / "model.pth").exists()
    pretrain(Config(**args, out=str(tmp_path / "b"), resume=True))
    a, b = torch.load(tmp_path / "a" / "model.pth"), torch.load(tmp_path / "b" / "model.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def run(*args: str) -> subprocess.CompletedProcess:
    return python_m("train.pretrain", *args)


@pytest.mark.slow  # kept out of `make test` (10-minute budget); `make test-slow` runs it
def test_unbounded_runs_repeat_exactly(shards, tmp_path):
    args = ["--render", str(shards), "--instances", "0", "--steps", "3", "--img-size", "32", "--patch-size", "8",
            "--depth", "2", "--batch", "16", "--log-every", "1", "--eval-every", "2", "--eval-samples", "20"]
    first = run(*args, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    assert "data: rendering on the fly, 1 loader worker(s): a fresh instance of every class every epoch" in first.stdout
    assert "pretext top-1" in first.stdout
    second = run(*args, "--out", str(tmp_path / "b"), "--workers", "0")
    assert second.returncode == 0, second.stderr
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 3


@pytest.mark.parametrize(("args", "message"), [
    (["--render", "SHARDS", "--shards", "SHARDS"], "--shards DIR or --render MANIFEST, one of them"),
    (["--shards", "SHARDS", "--instances", "3"], "--instances needs --render"),
    (["--render", "SHARDS", "--instances", "-1"], "--instances must not be negative"),
    (["--render", "SHARDS", "--instances", "0", "--cache", "on"], "--cache on needs a finite --instances"),
    (["--render", "SHARDS", "--augment", "cpu"], "--render needs --augment device"),
])
def test_bad_render_options_are_refused(shards, tmp_path, args, message):
    from train.pretrain import app

    args = [a.replace("SHARDS", str(shards)) for a in args]
    with pytest.raises(TrainError, match=re.escape(message)):
        app([*args, "--out", str(tmp_path / "run"), "--steps", "1"], standalone_mode=False)
    assert not (tmp_path / "run").exists()


def test_a_missing_manifest_is_one_line(tmp_path):
    result = run("--render", str(tmp_path / "nothing"), "--out", str(tmp_path / "run"), "--steps", "1")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "no manifest there" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_shards_of_an_older_renderer_train_and_the_log_says_so(shards, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "renderer": 2}))  # an older fracgen's render
    pretrain(Config(**TINY, shards=str(old), steps=1, out=str(tmp_path / "run")))
    said = capsys.readouterr().out
    assert "drawn by renderer 2; this fracgen draws renderer 3, whose images differ: re-render" in said
    pretrain(Config(**TINY, shards=str(shards), steps=1, out=str(tmp_path / "current")))
    assert "drawn by renderer" not in capsys.readouterr().out
