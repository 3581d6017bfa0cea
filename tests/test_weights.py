"""Sharing pre-trained weights (issue 22) with real components and no internet: a tiny finished run, timm loading its
model.safetensors, `train.publish`, the standard library's HTTP server on a loopback port and train.finetune from
its URL. The fakes: for hf://, huggingface_hub's `hf_hub_url` points at that server (as in test_share.py), timm's
hub download reads the published folder, and the upload's HfApi methods only record their calls."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from helpers import Server, python

from fracgen.dataset import render_dataset
from train import publish, weights
from train.finetune import Config as FinetuneConfig
from train.finetune import finetune
from train.runtime import TrainError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--batch", "16", "--log-every", "1"]
SECRET = "hf_NotARealTokenButSecret"


def run(*args, timeout=240) -> subprocess.CompletedProcess:
    return python(*args, timeout=timeout)


def one_line(result: subprocess.CompletedProcess, match: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished two-step run with a (three-step) fine-tuning result in RUN/digits, as `make finetune` leaves it."""
    root = tmp_path_factory.mktemp("weights")
    render_dataset(root / "shards", classes=8, size=32, points=3000, shard_size=8, seed=0, workers=1)
    out = root / "run"
    pre = run("-m", "train.pretrain", "--shards", root / "shards", "--out", out, "--steps", "2", *TINY,
              "--eval-every", "0")
    assert pre.returncode == 0, pre.stderr
    finetune(FinetuneConfig(checkpoint=str(out), out=str(out / "digits"), seeds=(0,), steps=3))
    return out


def _tiny_finetune(checkpoint: str, cache: Path) -> float:
    """Enough steps to leave chance (10%), so that other weights would give another top-1."""
    return finetune(FinetuneConfig(checkpoint=checkpoint, cache_dir=str(cache), seeds=(0,), steps=40))["top1_mean"]


@pytest.fixture(scope="module")
def published(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("published")
    publish.publish(run_dir, out, url="http://example.org/models/tiny/")
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_writes_weights_timm_loads_strictly(run_dir, tmp_path, monkeypatch):
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["architecture"], config["num_classes"]) == ("vit_tiny_patch16_224", 8)
    assert config["model_args"] == {"img_size": 32, "patch_size": 8, "depth": 2}
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["mean"] == [0.5] * 3
    data = config["fracgen"]["data"]
    assert data["manifest_sha256"] == hashlib.sha256((run_dir.parent / "shards" / "manifest.json").read_bytes()
                                                     ).hexdigest()
    assert data["command"].startswith("fracgen render") and config["fracgen"]["recipe"]["steps"] == 2
    saved = safetensors.torch.load_file(run_dir / "model.safetensors")
    assert _same(saved, torch.load(run_dir / "model.pth", weights_only=True))

    # timm's three ways in; each loads strictly (a missing or unexpected key raises)
    by_file = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=8, **config["model_args"],
                                pretrained_cfg_overlay={"file": str(run_dir / "model.safetensors"), "num_classes": 8})
    assert _same(by_file.state_dict(), saved)
    assert _same(timm.create_model(f"local-dir:{run_dir}", pretrained=True).state_dict(), saved)
    import timm.models._hub as timm_hub

    def hf_hub_download(*args, **kw):  # the hub's cache, holding the published files
        return str(run_dir / (kw.get("filename") or args[1]))

    monkeypatch.setattr(timm_hub, "hf_hub_download", hf_hub_download)
    from_hub = timm.create_model("hf-hub:fracgen-org/tiny", pretrained=True)
    assert _same(from_hub.state_dict(), saved)

    # train's own readers: the run folder, a lone .safetensors (its metadata says the architecture), ckpt.pt
    lone = tmp_path / "lone.safetensors"
    shutil.copy(run_dir / "model.safetensors", lone)
    for spec in (run_dir, run_dir / "model.safetensors", lone, run_dir / "ckpt.pt"):
        name, args, classes, state = weights.load(str(spec))
        assert (name, args, classes) == ("vit_tiny_patch16_224", config["model_args"], 8) and _same(state, saved)


def test_publish_writes_a_card_a_hub_reads_and_sums(run_dir, published, tmp_path):
    from huggingface_hub.repocard import metadata_load

    meta = metadata_load(published / "README.md")
    assert meta["library_name"] == "timm" and meta["license"] == "cc-by-4.0"
    assert {"timm", "image-classification", "1p-frac"} <= set(meta["tags"])
    card = (published / "README.md").read_text()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["fracgen"]["data"]["manifest_sha256"] in card and "fracgen render" in card
    assert "Pretext top-1" in card and "| step | LPCE |" in card
    assert "| digits | fine-tuning | these weights |" in card
    sums = dict(reversed(line.split("  ")) for line in (published / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == ["README.md", "config.json", "model.safetensors"]
    assert all(hashlib.sha256((published / f).read_bytes()).hexdigest() == digest for f, digest in sums.items())
    assert (published / "model.safetensors").read_bytes() == (run_dir / "model.safetensors").read_bytes()


def test_the_card_escapes_what_it_copies_from_files(run_dir, tmp_path):
    scratch = tmp_path / "scratch" / "results.json"
    scratch.parent.mkdir()
    hostile = "<img src=x onerror=alert(1)> | [link](http://evil) **bold**\n---\nlicense: other\n```"
    scratch.write_text(json.dumps({"dataset": hostile, "checkpoint": "none", "top1_mean": 12.5, "top1_std": 1.0,
                                   "top1": {"0": 12.5}, "train_images": "`x`"}))
    out = tmp_path / "out"
    publish.publish(run_dir, out, url="http://example.org/m/ `rm -rf ~`", results=[scratch])
    card = (out / "README.md").read_text()
    row = next(line for line in card.splitlines() if "| scratch |" in line)
    assert "<img" not in card and "&lt;img" in row and "\\[link\\]" in row and "\\*\\*bold\\*\\*" in row
    assert row.count(" | ") == 5  # the pipe in the name did not add a cell
    from huggingface_hub.repocard import metadata_load

    assert metadata_load(out / "README.md")["license"] == "cc-by-4.0"
    assert "--checkpoint 'http://example.org/m/ `rm -rf ~`'" in card  # quoted for the shell


def test_publish_refuses_a_folder_that_is_not_a_finished_run(run_dir, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run_dir / "ckpt.pt", unfinished / "ckpt.pt")
    result = run("-m", "train.publish", unfinished)
    one_line(result, f"{unfinished} is not a finished train.pretrain run (no config.json, model.safetensors, "
                     "summary.json): finish it with")
    changed = Path(shutil.copytree(run_dir, tmp_path / "changed"))
    raw = bytearray((changed / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (changed / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(TrainError, match="does not match the sha256"):
        publish.publish(changed)
    assert not (changed / "README.md").exists()


def test_weights_from_a_url_equal_the_run_folders_and_are_fetched_once(run_dir, published, tmp_path):
    cache = tmp_path / "cache"
    saved = safetensors.torch.load_file(run_dir / "model.safetensors")
    with Server(published) as server:
        first = weights.load(server.url, cache)
        assert (first.name, first.num_classes) == ("vit_tiny_patch16_224", 8) and _same(first.state, saved)
        assert sorted(server.requests) == ["/SHA256SUMS", "/config.json", "/model.safetensors"]
        server.requests.clear()
        again = weights.load(server.url + "SHA256SUMS", cache)  # the sums' URL names the folder too
        assert server.requests == ["/SHA256SUMS"]  # the cache is checked, not fetched again
    assert _same(again.state, saved)
    key = hashlib.sha256((published / "SHA256SUMS").read_bytes()).hexdigest()
    kept = sorted(p.name for p in (cache / "models" / key).iterdir())
    assert kept == [".fracgen.lock", "config.json", "model.safetensors"]  # one writer at a time fills the cache


@pytest.mark.slow  # two 40-step fine-tunings; the fast suite checks the fetched weights are the run folder's
def test_finetune_from_a_url_gives_the_run_folders_accuracy(run_dir, published, tmp_path):
    local = _tiny_finetune(str(run_dir), tmp_path / "unused")
    assert local > 15
    with Server(published) as server:
        assert _tiny_finetune(server.url, tmp_path / "cache") == local


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_changed_byte_is_refused_and_nothing_is_kept(published, tmp_path, name):
    served = Path(shutil.copytree(published, tmp_path / "served"))
    raw = bytearray((served / name).read_bytes())
    raw[len(raw) // 2] ^= 1
    (served / name).write_bytes(bytes(raw))
    cache = tmp_path / "cache"
    with Server(served) as server:
        with pytest.raises(TrainError, match=f"{server.url}{name} does not match the sha256 in SHA256SUMS"):
            weights.load(server.url, cache)
    kept = [p.name for p in cache.rglob("*") if p.is_file() and p.name != ".fracgen.lock"]
    assert kept == (["config.json"] if name != "config.json" else [])


def test_fetch_from_the_hub_through_huggingface_hub(run_dir, published, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    asked = []
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with Server(published, commit=commit) as server:
        def hf_hub_url(repo_id, filename, *, repo_type=None, revision=None, **kw):  # the hub, on loopback
            asked.append((repo_id, filename, repo_type, revision))
            return f"{server.url}{filename}"

        monkeypatch.setattr(huggingface_hub, "hf_hub_url", hf_hub_url)
        pretrained = weights.load("hf://fracgen-org/tiny@v1", tmp_path / "cache")
    assert _same(pretrained.state, safetensors.torch.load_file(run_dir / "model.safetensors"))
    assert asked[0] == ("fracgen-org/tiny", "SHA256SUMS", "model", "v1")
    assert {rev for _, name, _, rev in asked if name != "SHA256SUMS"} == {commit}  # the commit that served the sums
    assert all(h.get("Authorization") == f"Bearer {SECRET}" for h in server.headers)


def test_publish_uploads_to_a_hub_model_repo_without_showing_the_token(run_dir, tmp_path, monkeypatch, capsys):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw["repo_type"])))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(
        ("upload", self.token, kw["repo_id"], kw["repo_type"], kw["revision"], sorted(kw["allow_patterns"]))))
    result = publish.publish(run_dir, tmp_path / "out", to="hf://fracgen-org/tiny@v1")
    assert result["url"] == "https://huggingface.co/fracgen-org/tiny/tree/v1"
    assert calls == [("create", "fracgen-org/tiny", "model"),
                     ("upload", SECRET, "fracgen-org/tiny", "model", "v1",
                      ["README.md", "SHA256SUMS", "config.json", "model.safetensors"])]

    with monkeypatch.context() as no_token:
        no_token.setattr(huggingface_hub, "get_token", lambda: None)
        with pytest.raises(TrainError, match="uploading needs a Hugging Face token"):
            publish.publish(run_dir, tmp_path / "no-token", to="hf://fracgen-org/tiny")
    assert not (tmp_path / "no-token").exists()  # refused before any work

    def refuse(self, **kw):
        raise RuntimeError(f"401 Unauthorized for token {SECRET}")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    with pytest.raises(TrainError) as refused:
        publish.publish(run_dir, tmp_path / "out", to="hf://fracgen-org/tiny")
    assert SECRET not in str(refused.value) and "***" in str(refused.value)
    assert SECRET not in capsys.readouterr().out
