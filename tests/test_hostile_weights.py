"""Issue 27: weights from anywhere (a run folder, a lone file, a served folder, the hub) may not steer the model
factory, fill a disk, leak a secret or end in a traceback; and the smaller holes of that round (publish's --out, a
hard-linked lock, nested JSON, labels beyond the manifest, a scheduler that only looks like Dask, fracgen score).
Real components throughout: a finished pre-training run, timm, the standard library's HTTP server on loopback."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import Server
from typer.testing import CliRunner

from fracgen import score as score_lib
from fracgen.cli import app as fracgen_app
from fracgen.dataset import render_dataset
from fracgen.errors import FracgenError
from fracgen.lock import FolderLock
from train import publish, weights
from train.finetune import Config as FinetuneConfig
from train.finetune import finetune
from train.pretrain import Config as PretrainConfig
from train.pretrain import pretrain
from train.runtime import TrainError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, depth=2, batch=16, log_every=1, eval_every=0, eval_samples=8)
DEEP = "[" * 100_000 + "]" * 100_000  # past the JSON parser's recursion limit


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile") / "shards"
    render_dataset(folder, classes=8, size=32, points=3000, shard_size=8, seed=0, workers=1)
    return folder


@pytest.fixture(scope="module")
def run_dir(shards) -> Path:
    out = shards.parent / "run"
    pretrain(PretrainConfig(shards=str(shards), out=str(out), steps=2, **TINY))
    return out


def _copy(run_dir: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / name, ignore=shutil.ignore_patterns(".fracgen.lock")))


def _edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def _reseal(folder: Path) -> None:
    """What a hostile publisher does after editing: SHA256SUMS that match the edited files."""
    names = ["README.md", "config.json", "model.safetensors"]
    (folder / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in names))


def _lone(run_dir: Path, path: Path, state=None, model_args=None, **meta) -> Path:
    state = safetensors.torch.load_file(run_dir / "model.safetensors") if state is None else state
    metadata = {"format": "pt", "architecture": "vit_tiny_patch16_224", "num_classes": "8",
                "model_args": json.dumps(model_args if model_args is not None else
                                         {"img_size": 32, "patch_size": 8, "depth": 2}), **meta}
    path.write_bytes(safetensors.torch.save(state, metadata))
    return path


def _published(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "published"
    publish.publish(run_dir, out, url="http://example.org/tiny/")
    return out


def _run_cli(*args, timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# --- 1. the model factory takes shapes only ---------------------------------------------------------------------

HOSTILE_ARGS = [
    {"pretrained": True, "pretrained_cfg_overlay": {"url": "EVIL/evil.pth"}},
    {"checkpoint_path": "/etc/passwd"},
    {"pretrained_cfg": {"hf_hub_id": "someone/else"}, "pretrained": True},
]


@pytest.mark.parametrize("hostile", HOSTILE_ARGS)
def test_model_arguments_read_from_any_source_cannot_make_timm_fetch_or_open(run_dir, tmp_path, hostile):
    evil_asked = []
    with Server(tmp_path, routes={"/evil.pth": lambda h: (evil_asked.append(1), h.send_error(404))}) as evil:
        args = json.loads(json.dumps(hostile).replace("EVIL/", evil.url))
        folder = _copy(run_dir, tmp_path)
        _edit_config(folder, lambda c: c["model_args"].update(args))
        with pytest.raises(TrainError, match="is not one fracgen accepts"):
            weights.load(str(folder))
        lone = _lone(run_dir, tmp_path / "lone.safetensors", model_args={"img_size": 32, **args})
        with pytest.raises(TrainError, match="is not one fracgen accepts"):
            weights.load(str(lone))
        served = _published(run_dir, tmp_path)
        _edit_config(served, lambda c: c["model_args"].update(args))
        _reseal(served)
        with Server(served) as server:
            with pytest.raises(TrainError, match="is not one fracgen accepts"):
                weights.load(server.url, tmp_path / "cache", log=lambda line: None)
    assert evil_asked == []


def test_a_hostile_config_through_finetune_is_one_line_and_fetches_nothing(run_dir, tmp_path):
    folder = _copy(run_dir, tmp_path)
    _edit_config(folder, lambda c: c["model_args"].update(pretrained=True, checkpoint_path="/etc/passwd"))
    result = _run_cli("-m", "train.finetune", "--checkpoint", folder, "--steps", "1", "--seeds", "0")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "is not one fracgen accepts" in result.stderr


def test_the_command_line_takes_the_same_shape_arguments(shards, tmp_path):
    with pytest.raises(Exception, match="is not one fracgen accepts"):
        from train.pretrain import _model_arg
        _model_arg("pretrained=true")
    from train.pretrain import _model_arg
    assert _model_arg("embed_dim=96") == ("embed_dim", 96) and _model_arg("mlp_ratio=2") == ("mlp_ratio", 2.0)
    with pytest.raises(TrainError, match="must be in 1..96"):
        _model_arg("depth=1000")


@pytest.mark.parametrize(("change", "match"), [
    (lambda c: c.update(num_classes=10**9), "num_classes 1000000000 must be in 1..100,000"),
    (lambda c: c.update(architecture="vit_giant_patch14_224"), "the network needs|more than the 1,000M"),
    (lambda c: c.update(architecture="hf-hub:someone/model"), "unknown timm model"),
    (lambda c: c.update(architecture="no_such_net"), "unknown timm model"),
    (lambda c: c["model_args"].update(depth="six"), "depth='six' must be an integer"),
    (lambda c: c["model_args"].update(depth=3), "lacks"),
    (lambda c: c["model_args"].update(embed_dim=100, num_heads=7), "cannot be built"),
    (lambda c: c.update(model_args=[1, 2]), "not a train.pretrain config.json"),
])
def test_weights_that_do_not_fit_or_name_no_buildable_network_are_one_line(run_dir, tmp_path, change, match):
    folder = _copy(run_dir, tmp_path)
    _edit_config(folder, change)
    t0 = time.monotonic()
    with pytest.raises(TrainError, match=match) as refused:
        weights.load(str(folder))
    assert "\n" not in str(refused.value) and time.monotonic() - t0 < 20  # sized on the meta device, not built


@pytest.mark.parametrize(("dtype", "match"), [
    (torch.int8, "is int8, not float32"), (torch.bool, "is bool, not float32"),
    (torch.float64, "is float64, not float32"), ("nan", "NaN or infinite"),
])
def test_weights_of_another_dtype_or_not_finite_are_refused(run_dir, tmp_path, dtype, match):
    state = safetensors.torch.load_file(run_dir / "model.safetensors")
    if dtype == "nan":
        state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    else:
        state = {k: v.to(dtype) for k, v in state.items()}
    with pytest.raises(TrainError, match=match):
        weights.load(str(_lone(run_dir, tmp_path / "odd.safetensors", state)))
    half = {k: v.to(torch.bfloat16) for k, v in safetensors.torch.load_file(run_dir / "model.safetensors").items()}
    assert weights.load(str(_lone(run_dir, tmp_path / "half.safetensors", half))).num_classes == 8


# --- 2. secrets in a URL, and signed URLs ---------------------------------------------------------------------

def test_a_password_or_a_signature_in_a_checkpoint_url_is_used_but_never_shown(run_dir, tmp_path, capsys):
    served = _published(run_dir, tmp_path)
    with Server(served, query="sig=s3cr3t&se=2030") as server:
        spec = f"{server.url}SHA256SUMS?sig=s3cr3t&se=2030"
        result = finetune(FinetuneConfig(checkpoint=spec, cache_dir=str(tmp_path / "cache"), seeds=(0,), steps=1,
                                         out=str(tmp_path / "ft")))
        assert sorted(set(server.requests)) == ["/SHA256SUMS", "/config.json", "/model.safetensors"]
    with Server(served) as server:
        login = server.url.replace("http://", "http://user:hunter2@")
        finetune(FinetuneConfig(checkpoint=login, cache_dir=str(tmp_path / "cache2"), seeds=(0,), steps=1,
                                out=str(tmp_path / "ft2")))
        assert server.headers[0]["Authorization"].startswith("Basic ")  # the login went in a header
    shown = capsys.readouterr()
    stored = (tmp_path / "ft" / "results.json").read_text() + (tmp_path / "ft2" / "results.json").read_text()
    for text in (shown.out, shown.err, stored):
        assert "s3cr3t" not in text and "hunter2" not in text
    assert result["checkpoint"].endswith("SHA256SUMS?***")


# --- 3. bounded downloads ---------------------------------------------------------------------------------------

def test_served_weights_that_claim_too_much_or_do_not_fit_the_disk_are_refused_before_a_byte(run_dir, tmp_path,
                                                                                             monkeypatch):
    served = _published(run_dir, tmp_path)
    _edit_config(served, lambda c: c["fracgen"]["weights"].update(bytes=10**15))
    _reseal(served)
    with Server(served) as server:
        with pytest.raises(TrainError, match="fracgen reads weights of 1 to"):
            weights.load(server.url, tmp_path / "cache", log=lambda line: None)
        assert "/model.safetensors" not in server.requests

    honest = _published(run_dir, tmp_path / "honest")
    from fracgen import share

    real = shutil.disk_usage
    monkeypatch.setattr(share.shutil, "disk_usage", lambda p: real(p)._replace(free=share.RESERVE + 1000))
    with Server(honest) as server:
        with pytest.raises(TrainError, match=r"model.safetensors \([\d,]+ bytes\) take .* GB free"):
            weights.load(server.url, tmp_path / "cache2", log=lambda line: None)
        assert "/model.safetensors" not in server.requests


def test_an_endless_body_stops_at_the_recorded_size_and_leaves_no_temporary(run_dir, tmp_path):
    served = _published(run_dir, tmp_path)

    def endless(handler):
        handler.send_response(200)
        handler.end_headers()
        try:
            while True:
                handler.wfile.write(b"\0" * 65536)
        except OSError:
            pass

    cache = tmp_path / "cache"
    with Server(served, routes={"/model.safetensors": endless}) as server:
        with pytest.raises(TrainError, match="more than the [\\d,]+ bytes config.json records"):
            weights.load(server.url, cache, log=lambda line: None)
    assert [p.name for p in cache.rglob("*.tmp")] == []


def test_temporaries_of_a_killed_fetch_are_cleaned_on_the_next(run_dir, tmp_path):
    served = _published(run_dir, tmp_path)
    folder = tmp_path / "cache" / "models" / hashlib.sha256((served / "SHA256SUMS").read_bytes()).hexdigest()
    folder.mkdir(parents=True)
    (folder / ".model.safetensors.abc123.tmp").write_bytes(b"\0" * 1000)
    with Server(served) as server:
        weights.load(server.url, tmp_path / "cache", log=lambda line: None)
    assert sorted(p.name for p in folder.iterdir()) == [".fracgen.lock", "config.json", "model.safetensors"]


def test_redirects_to_other_schemes_are_refused_at_once_and_retries_are_said(run_dir, tmp_path):
    served = _published(run_dir, tmp_path)

    def to_ftp(handler):
        handler.send_response(302)
        handler.send_header("Location", "ftp://127.0.0.1:9/SHA256SUMS")
        handler.end_headers()

    with Server(served, routes={"/SHA256SUMS": to_ftp}) as server:
        t0 = time.monotonic()
        with pytest.raises(TrainError, match="follows redirects to http\\(s\\) only"):
            weights.load(server.url, tmp_path / "cache", log=lambda line: None)
        assert time.monotonic() - t0 < 5
    said = []
    with Server(served, fail_once=("/config.json",)) as server:
        weights.load(server.url, tmp_path / "cache", log=said.append)
    assert any("HTTP 503" in line and "trying again" in line for line in said), said


# --- 7, 8. publish's --out and the lock ------------------------------------------------------------------------

def test_publish_replaces_only_what_it_wrote(run_dir, shards, tmp_path):
    dataset = Path(shutil.copytree(shards, tmp_path / "dataset"))
    with pytest.raises(TrainError, match="holds a data set"):
        publish.publish(run_dir, dataset, overwrite=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "README.md").write_text("my own card\n")
    with pytest.raises(TrainError, match="a README.md that train.publish did not write"):
        publish.publish(run_dir, foreign)
    assert (foreign / "README.md").read_text() == "my own card\n"
    publish.publish(run_dir, foreign, overwrite=True)
    assert "my own card" not in (foreign / "README.md").read_text()
    publish.publish(run_dir, foreign)  # this run's files: published again
    other = _copy(run_dir, tmp_path, "other")
    _edit_config(other, lambda c: c["fracgen"].update(step=99))
    with pytest.raises(TrainError, match="another model's published files"):
        publish.publish(other, foreign)
    (tmp_path / "afile").write_text("x")
    result = _run_cli("-m", "train.publish", run_dir, "--out", tmp_path / "afile")
    assert result.returncode == 1 and result.stderr.startswith("error: --out") and \
        len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_hard_linked_lock_is_refused_and_the_file_it_shares_kept(tmp_path):
    precious = tmp_path / "precious.json"
    precious.write_text('{"keep": true}\n')
    folder = tmp_path / "folder"
    folder.mkdir()
    os.link(precious, folder / ".fracgen.lock")
    with pytest.raises(FracgenError, match="hard link"):
        with FolderLock(folder, "test"):
            pass
    assert precious.read_text() == '{"keep": true}\n'


# --- 10. one line, not a traceback ----------------------------------------------------------------------------

def test_deeply_nested_json_anywhere_is_one_line(run_dir, tmp_path):
    folder = _copy(run_dir, tmp_path)
    (folder / "config.json").write_text('{"fracgen": ' + DEEP + "}")
    with pytest.raises(TrainError, match="nested too deeply"):
        weights.load(str(folder))
    header = json.dumps({"__metadata__": {"x": "y"}}).encode()[:-1] + b', "deep": ' + DEEP.encode() + b"}"
    (tmp_path / "deep.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(TrainError) as refused:
        weights.load(str(tmp_path / "deep.safetensors"))
    assert "\n" not in str(refused.value)
    published = _copy(run_dir, tmp_path, "nested-metrics")
    with open(published / "metrics.jsonl", "a") as f:
        f.write(DEEP + "\n")
    publish.publish(published)  # the line is skipped like a torn one
    (tmp_path / "results.json").write_text(DEEP)
    with pytest.raises(TrainError, match="not a train.finetune results.json"):
        publish.publish(run_dir, tmp_path / "out", results=[tmp_path / "results.json"])


@pytest.mark.parametrize("spec", ["hf://someone/..", "hf://some--one/x", "hf://-x/y", "hf://x/y."])
def test_hub_names_the_hub_would_reject_are_one_line(spec, tmp_path):
    with pytest.raises(TrainError, match="is not hf://ORG/NAME"):
        weights.load(spec, tmp_path)
    result = CliRunner().invoke(fracgen_app, ["pull", spec.replace("hf://", "hf://datasets/"), str(tmp_path / "p")])
    assert result.exit_code == 1 and "is not hf://datasets/ORG/NAME" in result.output
    assert len(result.output.strip().splitlines()) == 1


def _relabel(shards: Path, out: Path, label: bytes) -> Path:
    """A self-consistent copy whose first sample's class is `label`: its manifest lists the shard's new sha256."""
    folder = Path(shutil.copytree(shards, out))
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["shards"][0]
    src = (folder / entry["file"]).read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(src)) as old, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT
                                                                     ) as new:
        for i, member in enumerate(old):
            payload = old.extractfile(member).read()
            if member.name.endswith(".cls") and i < 3:
                payload, member.size = label, len(label)
            new.addfile(member, io.BytesIO(payload))
    raw = buf.getvalue()
    (folder / entry["file"]).write_bytes(raw)
    entry.update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("cache", ["on", "off"])
def test_labels_beyond_the_manifest_in_a_self_consistent_folder_are_one_line(shards, tmp_path, cache):
    folder = _relabel(shards, tmp_path / "relabelled", b"99")
    with pytest.raises(TrainError, match=r"has class '99', not one of the manifest's 8 classes.*fracgen verify"):
        pretrain(PretrainConfig(shards=str(folder), out=str(tmp_path / "run"), steps=1, cache=cache, workers=0,
                                **TINY))


def test_a_peer_that_frames_its_first_message_like_dask_is_one_line_and_quick(tmp_path):
    pytest.importorskip("distributed")
    import socket
    import threading

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    held = []

    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            payload = b"\x93\x01\x02\x03" + b"x" * 12  # a length-framed message that is not Dask's handshake
            conn.sendall(len(payload).to_bytes(8, "little") + payload)
            held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    t0 = time.monotonic()
    try:
        result = _run_cli("-m", "fracgen", "render", "--out", tmp_path / "ds", "--classes", "8", "--size", "64",
                          "--scheduler", f"tcp://127.0.0.1:{sock.getsockname()[1]}", timeout=120)
    finally:
        sock.close()
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert "cannot reach the Dask scheduler" in result.stderr and "Exception ignored" not in result.stderr
    assert time.monotonic() - t0 < 30


# --- 5, 11. fracgen score -------------------------------------------------------------------------------------

def test_score_is_bounded_in_memory_and_prints_names_as_text(shards, tmp_path, monkeypatch):
    manifest = json.loads((shards / "manifest.json").read_text())
    big = {**manifest, "num_classes": 1000, "image": {**manifest["image"], "size": 16384}}
    assert score_lib.memory_needed(big, (4096,)) > 100 * 2**30  # what `--at 4096` on 1000 classes asks
    small = {**manifest, "num_classes": 20, "image": {**manifest["image"], "size": 16384}}
    assert score_lib.memory_needed(small, (32, 224)) < 2 * 2**30  # one render at a time, not 40 at 16384 px
    monkeypatch.setattr(score_lib, "available_memory", lambda: 64 * 2**20)
    result = CliRunner().invoke(fracgen_app, ["score", str(shards), "--at", "1024"])
    assert result.exit_code == 1 and "more than half of the 0.1 GiB free" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(fracgen_app, ["info", str(shards), "--score-at", "1024"])
    assert result.exit_code == 1 and "--classes" in result.output
    monkeypatch.undo()
    named = Path(shutil.copytree(shards, tmp_path / "[red]x[/red]\x1b[31m"))
    result = CliRunner().invoke(fracgen_app, ["score", str(named), "--at", "16"])
    assert result.exit_code == 0, result.output
    assert "[red]x[/red]" in result.output and "\x1b[31m" not in result.output
