"""The trainer end to end on CPU with real components: fracgen shards on disk, webdataset, timm, torchrun, digits."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import python_m
from typer.testing import CliRunner

from fracgen.cli import app as fracgen_app
from fracgen.dataset import render_dataset
from train import data
from train.finetune import Config as FinetuneConfig
from train.finetune import finetune

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--batch", "16", "--log-every", "1"]


def render_shards(out: Path, classes: int, size: int = 64, shard_size: int = 8) -> dict:
    render_dataset(out, classes=classes, size=size, points=5000, shard_size=shard_size, seed=0, workers=1)
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    render_shards(out, classes=16)
    return out


def run(module: str, *args: str, torchrun: int = 0, timeout: int = 240) -> subprocess.CompletedProcess:
    """The command in this process (helpers.python_m), or under torchrun in processes of its own."""
    if not torchrun:
        return python_m(module, *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
           "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_pretrain_checkpoint_loads_into_timm_and_resumes(shards, tmp_path):
    out = tmp_path / "run"
    first = run("train.pretrain", "--shards", str(shards), "--out", str(out), "--steps", "3", *TINY,
                "--eval-every", "2", "--ckpt-every", "2", "--workers", "2")
    assert first.returncode == 0, first.stderr
    assert "[rank 0] done: 3 steps this run, at step 3" in first.stdout
    assert "pretext top-1" in first.stdout

    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["num_classes"] == 16
    assert {"optimizer", "scheduler", "scaler", "rng", "config"} <= set(ckpt)
    model = timm.create_model(ckpt["model_name"], num_classes=ckpt["num_classes"], **ckpt["model_args"])
    model.load_state_dict(ckpt["model"], strict=True)
    saved = json.loads((out / "config.json").read_text())  # timm's hub format (test_weights.py)
    bare = timm.create_model(saved["architecture"], num_classes=saved["num_classes"], **saved["model_args"])
    bare.load_state_dict(torch.load(out / "model.pth", map_location="cpu", weights_only=True), strict=True)

    second = run("train.pretrain", "--shards", str(shards), "--out", str(out), "--resume", "--steps", "5")
    assert second.returncode == 0, second.stderr
    assert "resumed from step 3" in second.stdout
    assert "[rank 0] done: 2 steps this run, at step 5" in second.stdout
    resumed = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    assert resumed["step"] == 5 and resumed["config"]["depth"] == 2  # the saved config, not the preset's
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [e["step"] for e in entries if "lr" in e]
    assert steps_logged == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("path", ["memory", "stream"])
def test_ddp_two_ranks_same_steps_with_fewer_shards_than_workers(tmp_path, path):
    shards = tmp_path / "shards"
    render_shards(shards, classes=4, shard_size=4)  # 1 shard for 2 ranks x 2 workers: resampling must cope
    assert len(data.read_manifest(shards)["shards"]) == 1
    out = tmp_path / "run"
    result = run("train.pretrain", "--shards", str(shards), "--out", str(out), "--steps", "4", *TINY,
                 "--accum", "2", "--workers", "2", "--ckpt-every", "2",
                 *(["--cache", "on"] if path == "memory" else ["--cache", "off", "--crop-in", "workers"]), torchrun=2)
    assert result.returncode == 0, result.stderr
    assert ("in-memory cache" if path == "memory" else "streaming 1 shards, 2 loader worker(s) decoding and cutting "
            "crops") in result.stdout
    counts = dict(re.findall(r"\[rank (\d)\] done: (\d+) steps", result.stdout))
    assert counts == {"0": "4", "1": "4"}
    assert "global batch 64 (2 x 16 x 2)" in result.stdout
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert all("augment" in states for states in ckpt["rng"])


def test_train_stream_differs_between_workers(shards):
    """Seeds per worker: two workers of one rank must not yield the same sample order."""
    urls = data.shard_urls(shards, data.read_manifest(shards))
    loader = data.train_loader(urls, 8, data.eval_transform(16, gray=True), batches=2, seed=0, shuffle_buffer=16,
                               workers=2)
    (_, y0), (_, y1) = list(loader)  # batches alternate between worker 0 and worker 1
    assert y0.tolist() != y1.tolist()


def test_finetune_digits_beats_chance(tmp_path):
    cfg = FinetuneConfig(out=str(tmp_path), seeds=(0,), steps=100, depth=2)  # 43.7% when measured
    result = finetune(cfg)
    assert result["train_images"] == 100 and result["test_images"] == 1697
    assert result["top1_mean"] > 30  # chance is 10%
    assert json.loads((tmp_path / "results.json").read_text())["top1_mean"] == result["top1_mean"]


def _digits_image_folder(root: Path, per_class: dict[str, int]) -> None:
    """scikit-learn's digits written as PNGs, one folder per class (ImageFolder layout) under each split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    start = 0
    for split_name, n in per_class.items():
        for label in range(10):
            folder = root / split_name / f"digit{label}"
            folder.mkdir(parents=True)
            members = np.flatnonzero(digits.target == label)[start:start + n]
            for i in members:
                Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(folder / f"{i}.png")
        start += n


@pytest.mark.slow  # kept out of `make test` (10-minute budget); `make test-slow` runs it
def test_finetune_on_image_folders_with_and_without_a_test_split(tmp_path):
    _digits_image_folder(tmp_path / "both", {"train": 30, "val": 20})
    # digits' own augmentation: the generic defaults (8% crops, mirroring) destroy 8x8 digits
    digit_aug = dict(crop_scale=(0.35, 1.0), flip=False, seeds=(0,), steps=100, depth=2)
    result = finetune(FinetuneConfig(dataset=str(tmp_path / "both"), **digit_aug))
    assert result["train_images"] == 300 and result["test_images"] == 200
    assert result["top1_mean"] > 20  # chance is 10%; 34.5% when measured
    _digits_image_folder(tmp_path / "one", {"all": 40})
    result = finetune(FinetuneConfig(dataset=str(tmp_path / "one" / "all"), train_fraction=0.75, **digit_aug))
    assert result["train_images"] == 300 and result["test_images"] == 100
    assert result["top1_mean"] > 20  # 42.0% when measured


@pytest.fixture(scope="module")
def finished_run(shards, tmp_path_factory) -> Path:
    """A finished two-step run: its folder (read only: copy it to change it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    pre = run("train.pretrain", "--shards", str(shards), "--out", str(out), "--steps", "2", *TINY)
    assert pre.returncode == 0, pre.stderr
    return out


def test_finetune_from_pretrain_checkpoint(finished_run, tmp_path):
    result = run("train.finetune", "--checkpoint", str(finished_run / "ckpt.pt"), "--steps", "5", "--seeds", "0,1",
                 "--out", str(tmp_path / "ft"))
    assert result.returncode == 0, result.stderr
    assert re.search(r"top-1 \d+\.\d \+- \d+\.\d % over 2 seed\(s\)", result.stdout)


class WritesAMarker:
    """A pickle payload: unpickling it calls Path.write_text, as a malicious checkpoint would run its code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "code ran")


@pytest.mark.parametrize("command", ["finetune", pytest.param("probe", marks=pytest.mark.slow),
                                     pytest.param("resume", marks=pytest.mark.slow)])  # one loader, three callers
def test_a_checkpoint_that_would_run_code_is_refused_unread(finished_run, shards, tmp_path, command):
    marker = tmp_path / "marker"
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)  # this test's own file
    torch.save({**ckpt, "extra": WritesAMarker(marker)}, out / "ckpt.pt")  # a real checkpoint, plus a payload
    # Whoever can write the folder can also rewrite checkpoints.json: list the payload as the newest, intact checkpoint.
    listed = json.loads((out / "checkpoints.json").read_text())
    entry = listed["checkpoints"][-1]
    shutil.copyfile(out / "ckpt.pt", out / entry["file"])
    payload = (out / "ckpt.pt").read_bytes()
    entry.update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    (out / "checkpoints.json").write_text(json.dumps(listed))
    args = {"finetune": ["train.finetune", "--checkpoint", str(out / "ckpt.pt"), "--steps", "2", "--seeds", "0"],
            "probe": ["train.probe", "--checkpoint", str(out / "ckpt.pt"), "--seeds", "0"],
            "resume": ["train.pretrain", "--shards", str(shards), "--out", str(out), "--resume", "--steps", "3"],
            }[command]
    result = run(*args)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "asks to run" in lines[0] and "refused" in lines[0], result.stderr
    assert not marker.exists()


def _relabel(shard: Path) -> None:
    """Change one sample's class in place: the same size, a valid tar, another sha256."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".cls"))
    raw = bytearray(shard.read_bytes())
    label = raw[member.offset_data:member.offset_data + member.size]
    raw[member.offset_data] = ord("1") if label[:1] != b"1" else ord("2")
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("path", [["--cache", "off"], ["--augment", "cpu"]])
def test_streaming_and_pil_paths_refuse_a_shard_that_does_not_match_its_manifest(shards, tmp_path, path):
    copy = Path(shutil.copytree(shards, tmp_path / "shards"))
    manifest = data.read_manifest(copy)
    shard = copy / manifest["shards"][1]["file"]
    _relabel(shard)
    assert shard.stat().st_size == manifest["shards"][1]["bytes"]
    result = run("train.pretrain", "--shards", str(copy), "--out", str(tmp_path / "run"), "--steps", "3", *TINY,
                 "--eval-every", "0", "--workers", "1", *path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (f"error: shard {shard} does not match its manifest (sha256 differs): "
                                            "re-render it with `fracgen render ... --resume` or check it with "
                                            "`fracgen verify`"), result.stderr
    assert not (tmp_path / "run" / "model.pth").exists()


def test_the_pretext_evaluation_checks_the_shards_it_reads(shards, tmp_path):
    copy = Path(shutil.copytree(shards, tmp_path / "shards"))
    manifest = data.read_manifest(copy)
    _relabel(copy / manifest["shards"][0]["file"])
    urls = data.shard_urls(copy, manifest)
    with pytest.raises(data.TrainError, match="does not match its manifest"):
        list(data.eval_images(urls, 4, max_samples=2))  # two samples of the first shard: it is read to its end
    assert sum(len(y) for _, y in data.eval_images(data.shard_urls(shards, manifest), 4, max_samples=10)) == 10


def test_resume_refuses_other_data_of_the_same_class_count(finished_run, tmp_path):
    other = tmp_path / "other"
    render_dataset(other, classes=16, size=64, points=5000, shard_size=8, seed=1, workers=1)
    out = Path(shutil.copytree(finished_run, tmp_path / "run"))  # two steps on `shards`
    refused = run("train.pretrain", "--shards", str(other), "--out", str(out), "--resume", "--steps", "3")
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not the data the checkpoint was trained on" in lines[0], refused.stderr
    assert "--allow-other-data" in lines[0]
    allowed = run("train.pretrain", "--shards", str(other), "--out", str(out), "--resume", "--steps", "3",
                  "--allow-other-data", "--eval-every", "0")
    assert allowed.returncode == 0, allowed.stderr
    assert "resumed from step 2" in allowed.stdout


def test_an_undecodable_image_in_an_image_folder_is_one_line(tmp_path):
    _digits_image_folder(tmp_path / "both", {"train": 3, "val": 2})
    bad = tmp_path / "both" / "train" / "digit3" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    result = run("train.finetune", "--checkpoint", "none", "--dataset", str(tmp_path / "both"), "--steps", "30",
                 "--batch", "8", "--seeds", "0", "--depth", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad} is not an image this can read"), result.stderr


def test_usage_errors_exit_2_in_both_tools_and_each_tool_says_its_version(tmp_path, capsys):
    """An unknown option, a value of the wrong type, no command or an unknown one: one line and exit 2, as click
    (and so `fracgen`) exits for usage errors; other errors stay 1."""
    from fracgen.version import __version__
    from train import cli

    for args, says in ((["--shards", "x", "--out", "y", "--bogus"], "No such option: --bogus"),
                       (["--shards", "x", "--out", "y", "--steps", "many"], "Invalid value for '--steps'"),
                       (["--shards", "x", "--out", "y", "--crop-scale", "2,1"],
                        "crop area fractions need 0 < min <= max <= 1")):
        result = run("train.pretrain", *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and says in result.stderr
    for argv, code in (([], 2), (["train"], 2), (["--help"], 0), (["--version"], 0)):
        with pytest.raises(SystemExit) as ended:
            cli.main(argv)
        assert ended.value.code == code, argv
    out, err = capsys.readouterr()
    assert "error: unknown command 'train'; usage: fracgen-train {pretrain," in err
    assert out.strip().endswith(f"fracgen-train {__version__}")
    fracgen_usage = CliRunner().invoke(fracgen_app, ["render", "--classes", "many"])
    assert fracgen_usage.exit_code == 2


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        ("train.pretrain", ["--shards", "/nonexistent", "--out", "OUT"], "does not exist"),
        ("train.pretrain", ["--shards", "EMPTY", "--out", "OUT"], "manifest.json is missing"),
        ("train.pretrain", ["--shards", "EMPTY", "--out", "OUT", "--preset", "gpu"], "unknown --preset"),
        ("train.pretrain", ["--shards", "EMPTY", "--out", "OUT", "--resume"], "no checkpoint"),
        ("train.pretrain", ["--shards", "EMPTY", "--out", "OUT", "--ink-gain", "0"], "--ink-gain must be positive"),
        ("train.pretrain", ["--shards", "EMPTY", "--out", "OUT", "--mixup", "-1"], "--mixup must not be negative"),
        ("train.pretrain", ["--shards", "EMPTY", "--out", "OUT", "--augment", "gpu"], "unknown --augment"),
        ("train.pretrain", ["--shards", "EMPTY", "--out", "OUT", "--cache", "yes"], "unknown --cache"),
        ("train.pretrain", ["--shards", "EMPTY", "--out", "OUT", "--stop-after", "-1"], "--stop-after must not be"),
        ("train.pretrain", ["--shards", "SHARDS", "--out", "OUT", "--cache", "on", "--cache-budget", "1e-6"],
         "the decoded set needs 0.00 GiB (16 images of 64^2 bytes)"),
        ("train.pretrain", ["--shards", "SHARDS", "--out", "OUT", "--cache", "on", "--augment", "cpu"],
         "--cache on needs --augment device"),
        ("train.pretrain", ["--shards", "SHARDS", "--out", "OUT", "--global-batch", "30", "--accum", "4"],
         "--global-batch 30 does not divide"),
        ("train.pretrain", ["--render", "SHARDS", "--out", "OUT", "--instances", str(10**12)],
         "--instances must be at most 67,108,864"),
        ("train.pretrain", ["--render", "SHARDS", "--out", "OUT", "--instances", str(2**23), "--batch", "16"],
         "--instances 8,388,608 x 16 classes is 134,217,728 images an epoch, more than the 67,108,864"),
        ("train.finetune", ["--checkpoint", "/nonexistent.pt"], "no such file"),
        ("train.finetune", ["--checkpoint", "none", "--dataset", "cifar10", "--data-root", "EMPTY"],
         "cifar-10-python.tar.gz"),
        ("train.finetune", ["--checkpoint", "none", "--dataset", "imagenet"], "unknown --dataset"),
        ("train.finetune", ["--checkpoint", "none", "--opt", "lamb"], "unknown --opt"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(shards, tmp_path, module, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.replace("EMPTY", str(tmp_path / "empty")).replace("OUT", str(tmp_path / "out"))
            .replace("SHARDS", str(shards)) for a in args]
    result = run(module, *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_ink_gain_stretches_strokes_and_clips():
    from PIL import Image

    image = Image.fromarray(np.array([[0, 64, 127, 200]], dtype=np.uint8))
    assert np.asarray(data._Ink(gray=True, ink_gain=2.0)(image)).tolist() == [[0, 128, 254, 255]]
    assert np.asarray(data._Ink(gray=True)(image.convert("RGB"))).tolist() == [[0, 64, 127, 200]]
    rgb = np.asarray(data._Ink(gray=False, ink_gain=2.0)(image))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 2].tolist() == [0, 128, 254, 255]


@pytest.mark.parametrize("randaug", [None, "rand-m9-mstd0.5"])
def test_gray_pipeline_gives_the_rgb_pipelines_images(shards, randaug):
    import random

    import webdataset as wds

    sample = next(iter(wds.WebDataset(data.shard_urls(shards, data.read_manifest(shards))[:1], shardshuffle=False)
                       .decode("pil")))
    image = sample["png"]
    kw = dict(img_size=24, randaug=randaug, reprob=0.5)
    outs = []
    for gray, im in ((False, image.convert("RGB")), (True, image.convert("L"))):
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        outs.append(torch.stack([data.train_transform(**kw, gray=gray)(im) for _ in range(20)]))
    assert outs[0].shape == outs[1].shape == (20, 3, 24, 24)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.slow
def test_kill_and_resume_loses_at_most_the_steps_since_the_last_checkpoint(shards, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "train.pretrain", "--shards", str(shards), "--out", str(out), "--steps", "400",
           *TINY, "--ckpt-every", "5", "--eval-every", "0", "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # let it train past the checkpoint, then kill it without warning
    proc.send_signal(signal.SIGKILL)
    stdout, _ = proc.communicate()
    logged = [int(s) for s in re.findall(r"^step (\d+)/400 \| LPCE", stdout, re.MULTILINE)]
    saved = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)["step"]
    assert saved % 5 == 0 and saved >= 5 and logged and max(logged) - saved <= 5

    result = run("train.pretrain", "--shards", str(shards), "--out", str(out), "--resume")
    assert result.returncode == 0, result.stderr
    assert f"resumed from step {saved}" in result.stdout
    assert f"done: {400 - saved} steps this run, at step 400" in result.stdout


AUGMENTED = ["--randaug", "rand-m9-mstd0.5-inc1", "--reprob", "0.5", "--cutmix", "1.0", "--drop-path", "0.1"]


def test_a_resumed_run_equals_an_uninterrupted_one(shards, tmp_path):
    """In-memory data path: batches are a function of the step and every random stream (augmentation parameters,
    erasing noise, Mixup/CutMix, drop-path) is restored from the checkpoint, so stopping and resuming changes
    nothing: the weights are bit for bit those of a run that never stopped."""
    args = ["--shards", str(shards), "--steps", "6", *TINY, "--eval-every", "0", *AUGMENTED]
    straight = run("train.pretrain", *args, "--out", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr
    assert "in-memory cache on cpu" in straight.stdout
    first = run("train.pretrain", *args, "--out", str(tmp_path / "b"), "--stop-after", "4")
    assert first.returncode == 0, first.stderr
    assert "stopped at step 4 of 6" in first.stdout and not (tmp_path / "b" / "model.pth").exists()
    second = run("train.pretrain", "--shards", str(shards), "--out", str(tmp_path / "b"), "--resume")
    assert second.returncode == 0, second.stderr
    a = torch.load(tmp_path / "a" / "model.pth")
    b = torch.load(tmp_path / "b" / "model.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("args", "says"), [(["--cache", "off"], "1 loader worker(s) decoding; augmentation on the"),
                                            (["--cache", "off", "--crop-in", "workers"],
                                             "1 loader worker(s) decoding and cutting crops; augmentation on the"),
                                            (["--augment", "cpu"], "decoding and augmenting with PIL")])
def test_streaming_and_pil_paths_train(shards, tmp_path, args, says):
    result = run("train.pretrain", "--shards", str(shards), "--out", str(tmp_path / "run"), "--steps", "3", *TINY,
                 "--eval-every", "2", "--workers", "1", *AUGMENTED, *args)
    assert result.returncode == 0, result.stderr
    assert says in result.stdout and "[rank 0] done: 3 steps" in result.stdout and "pretext top-1" in result.stdout


def test_paper_preset_follows_the_reference_script():
    from train.pretrain import PRESETS, Config, per_rank_batch

    paper = Config(**PRESETS["paper"])
    assert (paper.randaug, paper.reprob, paper.global_batch) == ("rand-m9-mstd0.5-inc1", 0.5, 256)
    assert [per_rank_batch(paper, ranks) for ranks in (1, 8)] == [256, 32]  # the reference: 8 GPUs x 32


def test_load_images_decodes_what_webdataset_reads(shards):
    import webdataset as wds

    manifest = data.read_manifest(shards)
    images, labels = data.load_images(shards, manifest)
    assert images.shape == (16, 1, 64, 64) and images.dtype == torch.uint8
    samples = list(wds.WebDataset(data.shard_urls(shards, manifest), shardshuffle=False).decode("l8"))
    assert labels.tolist() == [int(s["cls"]) for s in samples]
    assert all(np.array_equal(images[i, 0].numpy(), s["png"]) for i, s in enumerate(samples))


def test_load_images_refuses_a_shard_that_does_not_match_its_manifest(tmp_path):
    shards = tmp_path / "shards"
    manifest = render_shards(shards, classes=8, shard_size=4)
    path = shards / manifest["shards"][1]["file"]
    raw = bytearray(path.read_bytes())
    raw[700] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(data.TrainError, match=re.escape(f"shard {path} does not match its manifest")):
        data.load_images(shards, manifest)


def test_memory_source_deals_out_epochs_like_a_distributed_sampler():
    n, batch, ranks = 10, 3, 2
    sources = [data.MemorySource(torch.zeros(n, 1, 2, 2), torch.arange(n), batch, seed=7, rank=r, world_size=ranks)
               for r in range(ranks)]
    drawn = torch.cat([torch.cat([s.indices(t) for s in sources]) for t in range(5)])  # 30 = three epochs
    for epoch in range(3):
        assert sorted(drawn[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert drawn[:n].tolist() != drawn[n:2 * n].tolist()  # a new permutation each epoch
    again = data.MemorySource(torch.zeros(n, 1, 2, 2), torch.arange(n), batch, seed=7, rank=1, world_size=ranks)
    assert torch.equal(again.indices(3), sources[1].indices(3))  # a pure function of the step
    for t in range(5):  # drawn on the device from a counter tensor (the step's graph) as on the host (loaders)
        assert all(torch.equal(s.indices(torch.tensor(t)), s.indices(t)) for s in sources)
    wide = data.MemorySource(torch.zeros(n, 1, 2, 2), torch.arange(n), 23, seed=7)  # a batch over three epochs
    assert torch.equal(wide.indices(torch.tensor(4)), wide.indices(4))


def test_pil_path_survives_zero_bit_posterize():
    """rand-...-inc1 at magnitude 10 asks Posterize for 0 bits: Pillow 13 raises, the paper's Pillow gave black."""
    from PIL import Image

    transform = data.train_transform(32, randaug="rand-m10-n3-p1.0-inc1", gray=True)
    image = Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64))
    for _ in range(60):  # 3 ops of 15 per call: Posterize is drawn ~12 times
        transform(image)
    assert data._posterize(image, 0).getextrema() == (0, 0)


def test_a_plain_pickle_is_refused_in_one_line_without_warnings(tmp_path, recwarn):
    """torch's weights-only reader warns on stderr about protocol-4 pickles: that would be a second line."""
    import pickle

    from train.runtime import load_checkpoint

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"model_name": "x"}, protocol=4))
    with pytest.raises(data.TrainError, match="is not a fracgen-train pretrain checkpoint .unreadable: not tensors"):
        load_checkpoint(path)
    assert [str(w.message) for w in recwarn] == []
