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
    (lambda c: c.update(model_args=[1, 2]), "not a fracgen-train pretrain config.json"),
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
    with pytest.raises(TrainError, match="a README.md that fracgen-train publish did not write"):
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
    with pytest.raises(TrainError, match="not a fracgen-train finetune results.json"):
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


# --- train/model.py in this process, each bound and message exact (issue 39) -------------------------------------

def test_model_arguments_are_checked_one_by_one_at_their_bounds():
    from train.model import MODEL_ARGS, architecture_args, check_arg, check_args

    assert architecture_args(32, None, 2, {"embed_dim": 64}) == {"embed_dim": 64, "img_size": 32, "depth": 2}
    assert architecture_args() == {} and architecture_args(patch_size=4) == {"patch_size": 4}
    assert check_arg("img_size", 8) == 8 and check_arg("img_size", 4096) == 4096
    assert check_arg("mlp_ratio", 4) == 4.0 and isinstance(check_arg("mlp_ratio", 4), float)
    assert check_arg("mlp_ratio", 0.25) == 0.25 and check_arg("drop_rate", 1.0) == 1.0
    assert check_arg("class_token", False) is False and check_arg("global_pool", "") == ""
    for key, value, says in (
            ("img_size", 7, "model argument img_size=7 must be in 8..4096"),
            ("img_size", 4097, "model argument img_size=4097 must be in 8..4096"),
            ("depth", True, "model argument depth=True must be an integer"),
            ("depth", 2.0, "model argument depth=2.0 must be an integer"),
            ("mlp_ratio", True, "model argument mlp_ratio=True must be a number"),
            ("mlp_ratio", float("nan"), "model argument mlp_ratio=nan must be in 0.25..16.0"),
            ("mlp_ratio", 16.5, "model argument mlp_ratio=16.5 must be in 0.25..16.0"),
            ("qkv_bias", 1, "model argument qkv_bias=1 must be true or false"),
            ("global_pool", "mean", "model argument global_pool='mean' must be one of 'token', 'avg', 'max', "
                                    "'avgmax', 'map', ''"),
            ("global_pool", 3, "model argument global_pool=3 must be a string"),
            ("img_size", "x" * 50, "model argument img_size='" + "x" * 36 + "... must be an integer"),
            ("img_size", "x" * 38, "model argument img_size='" + "x" * 38 + "' must be an integer"),  # 40: whole
            ("img_size", "x" * 39, "model argument img_size='" + "x" * 36 + "... must be an integer"),
            ("pretrained", True, "model argument 'pretrained' is not one fracgen accepts (only "
                                 + ", ".join(MODEL_ARGS) + "): refused, nothing was built or fetched")):
        with pytest.raises(TrainError) as refused:
            check_arg(key, value)
        assert str(refused.value) == says
    with pytest.raises(TrainError, match=r"^config\.json: model argument depth=0 must be in 1\.\.96$"):
        check_args({"depth": 0}, "config.json: model argument")
    with pytest.raises(TrainError, match=r"^config\.json: model arguments are not a JSON object$"):
        check_args([1], "config.json: model argument")
    assert check_args({"depth": 2, "mlp_ratio": 2}) == {"depth": 2, "mlp_ratio": 2.0}


def test_a_model_is_a_registered_name_a_bounded_class_count_and_at_most_a_billion_parameters():
    from fracgen.limits import MAX_CLASSES
    from train.model import MAX_PARAMS, create, skeleton

    assert MAX_PARAMS == 1_000_000_000
    model = create("vit_tiny_patch16_224", 7, {"img_size": 32, "patch_size": 8, "depth": 2}, drop_path_rate=0.1)
    assert model.head.out_features == 7 and len(model.blocks) == 2
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    assert next(skeleton("vit_tiny_patch16_224", 7, {"depth": 1}).parameters()).device.type == "meta"
    assert skeleton("vit_tiny_patch16_224", MAX_CLASSES, {"depth": 1}).head.out_features == MAX_CLASSES
    for name, classes, args, where, says in (
            ("no_such_net", 3, {}, "f.json", "f.json: unknown timm model 'no_such_net' (a registered name, see "
                                             "timm.list_models())"),
            ("hf-hub:x/y", 3, {}, "", "unknown timm model 'hf-hub:x/y' (a registered name"),
            (7, 3, {}, "", "unknown timm model 7 (a registered name"),
            ("vit_tiny_patch16_224", 0, {}, "w", f"w: num_classes 0 must be in 1..{MAX_CLASSES:,}"),
            ("vit_tiny_patch16_224", MAX_CLASSES + 1, {}, "", f"num_classes {MAX_CLASSES + 1} must be in 1.."),
            ("vit_tiny_patch16_224", True, {}, "", "num_classes True must be in 1.."),
            ("vit_tiny_patch16_224", 3, {"depth": 0}, "w", "w: model argument depth=0 must be in 1..96"),
            ("vit_tiny_patch16_224", 3, {"embed_dim": 100, "num_heads": 3}, "w",
             "w: timm model 'vit_tiny_patch16_224' cannot be built with {'embed_dim': 100, 'num_heads': 3}: dim "
             "should be divisible by num_heads"),
            ("vit_giant_patch14_224", 3, {"depth": 96, "embed_dim": 4096}, "w",
             "w: vit_giant_patch14_224 {'depth': 96, 'embed_dim': 4096} with 3 classes has 20,507,")):
        with pytest.raises(TrainError) as refused:
            create(name, classes, args, where=where)
        assert str(refused.value).startswith(says), str(refused.value)
    with pytest.raises(TrainError, match=r"^unknown timm model 'no_such_net'"):  # no `where`: no prefix
        create("no_such_net", 3, {})
    assert create("vit_tiny_patch16_224", 1, {"depth": 1}).head.out_features == 1  # one class is a class count


def test_the_parameter_bound_is_exact_and_its_message_whole(monkeypatch):
    import train.model
    from train.model import skeleton

    args = {"img_size": 32, "patch_size": 8, "depth": 1}
    n = sum(p.numel() for p in skeleton("vit_tiny_patch16_224", 3, args).parameters())
    monkeypatch.setattr(train.model, "MAX_PARAMS", n)
    assert sum(p.numel() for p in skeleton("vit_tiny_patch16_224", 3, args).parameters()) == n  # exactly: built
    monkeypatch.setattr(train.model, "MAX_PARAMS", n - 1)
    with pytest.raises(TrainError) as refused:
        skeleton("vit_tiny_patch16_224", 3, args)
    assert str(refused.value) == (f"vit_tiny_patch16_224 {args} with 3 classes has {n:,} parameters, more than the "
                                  f"{n - 1:,} fracgen builds")  # no `where`: nothing before the name
    with pytest.raises(TrainError, match=rf"^x\.json: vit_tiny_patch16_224 .* has {n:,} parameters"):
        skeleton("vit_tiny_patch16_224", 3, args, "x.json")


def test_a_network_timm_cannot_build_is_named_by_the_first_line_of_why(monkeypatch):
    import train.model
    from train.model import check_args, create

    def fails(error):
        def create_model(*args, **kwargs):
            raise error
        return create_model

    for error, reason in ((AssertionError(), "AssertionError"), (ValueError("  \n"), "ValueError"),
                          (ValueError("first\nsecond"), "first"), (TypeError("y" * 300), "y" * 160)):
        monkeypatch.setattr(train.model.timm, "create_model", fails(error))
        with pytest.raises(TrainError) as refused:
            create("vit_tiny_patch16_224", 3, {"depth": 1}, where="c.json")
        assert str(refused.value) == f"c.json: timm model 'vit_tiny_patch16_224' cannot be built with " \
                                     f"{{'depth': 1}}: {reason}"
    with pytest.raises(TrainError, match=r"^model arguments are not a JSON object$"):  # the default `where`
        check_args("depth=1")


def test_a_model_is_built_without_drop_path_unless_asked():
    from timm.layers import DropPath

    from train.model import create

    model = create("vit_tiny_patch16_224", 3, {"img_size": 32, "patch_size": 8, "depth": 2})
    assert not [m for m in model.modules() if isinstance(m, DropPath)]


def test_weights_must_fit_the_network_exactly_and_be_finite_floats():
    from train.model import check_weights, skeleton

    net = skeleton("vit_tiny_patch16_224", 3, {"img_size": 32, "patch_size": 8, "depth": 1})
    good = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in net.state_dict().items()}
    check_weights(net, good, "w")
    check_weights(net, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in good.items()}, "w")
    check_weights(net, {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in good.items()}, "w")
    keys = sorted(good)
    cases = [
        ({k: v for k, v in good.items() if k not in keys[:4]},
         f"w: the weights do not fit the network they name: it lacks 4 ({', '.join(keys[:3])}...) tensors"),
        ({k: v for k, v in good.items() if k != keys[0]},
         f"w: the weights do not fit the network they name: it lacks 1 ({keys[0]}) tensors"),
        ({**good, "extra.a": torch.zeros(1)}, "w: the weights do not fit the network they name: it has 1 unknown "
                                              "(extra.a) tensors"),
        ({k: v for k, v in good.items() if k not in keys[:3]},  # three named: no "..."
         f"w: the weights do not fit the network they name: it lacks 3 ({', '.join(keys[:3])}) tensors"),
        ({**good, "x": torch.zeros(1), "y": torch.zeros(1), "z": torch.zeros(1)},
         "w: the weights do not fit the network they name: it has 3 unknown (x, y, z) tensors"),
        ({**{k: v for k, v in good.items() if k != keys[0]}, "x": torch.zeros(1), "y": torch.zeros(1),
          "z": torch.zeros(1), "zz": torch.zeros(1)},
         f"w: the weights do not fit the network they name: it lacks 1 ({keys[0]}); has 4 unknown (x, y, z...) "
         "tensors"),
        ({**good, "head.bias": torch.zeros(4)}, "w: weight head.bias has shape (4,), the network needs (3,)"),
        ({**good, "head.bias": [0.0, 0.0, 0.0]}, "w: weight head.bias has shape list, the network needs (3,)"),
        ({**good, "head.bias": torch.zeros(3, dtype=torch.float64)},
         "w: weight head.bias is float64, not float32, float16 or bfloat16: not trained weights of this network"),
        ({**good, "head.bias": torch.tensor([0.0, float("inf"), 0.0])},
         "w: weight head.bias holds non-finite values (NaN or infinite): a diverged or damaged run"),
        ({**good, "head.bias": torch.tensor([0.0, float("nan"), 0.0])}, "w: weight head.bias holds non-finite"),
    ]
    for state, says in cases:
        with pytest.raises(TrainError) as refused:
            check_weights(net, state, "w")
        got = str(refused.value)
        assert got == says if says.endswith("tensors") else got.startswith(says), got  # the counts: whole
    norm = torch.nn.BatchNorm1d(2)  # an integer buffer: num_batches_tracked
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    check_weights(norm, state, "w")
    with pytest.raises(TrainError) as refused:
        check_weights(norm, {**state, "num_batches_tracked": torch.tensor(0.0)}, "w")
    assert str(refused.value) == "w: weight num_batches_tracked is torch.float32, the network needs torch.int64"


def test_loading_is_strict_and_wrappers_prefixes_are_taken_off():
    from train.model import clean_state_dict, load_weights, unwrap

    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(TrainError, match=r"^w: the weights do not fit the network \(Error\(s\) in loading "):
        load_weights(net, {"0.weight": torch.zeros(2, 2)}, "w")  # the bias is missing: never a partial load
    with pytest.raises(TrainError) as refused:  # torch's long report: its first 200 characters, on one line
        load_weights(net, {f"extra_{i}": torch.zeros(1) for i in range(40)}, "w")
    assert len(str(refused.value)) == len("w: the weights do not fit the network ()") + 200
    assert "\n" not in str(refused.value)
    state = {"0.weight": torch.ones(2, 2), "0.bias": torch.ones(2)}
    load_weights(net, state, "w")
    assert torch.equal(net[0].weight, torch.ones(2, 2))

    class Wrapper(torch.nn.Module):  # DDP's `module`, torch.compile's `_orig_mod`
        def __init__(self, inner, attr):
            super().__init__()
            setattr(self, attr, inner)

    wrapped = Wrapper(Wrapper(Wrapper(net, "module"), "_orig_mod"), "module")
    assert unwrap(wrapped) is net and unwrap(net) is net
    assert set(clean_state_dict(wrapped)) == {"0.weight", "0.bias"}
    compiled_ddp = Wrapper(Wrapper(net, "module"), "_orig_mod")  # torch.compile(DDP(model)): _orig_mod.module.
    assert set(clean_state_dict(compiled_ddp)) == {"0.weight", "0.bias"}
