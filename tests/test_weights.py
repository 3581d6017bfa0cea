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
    one_line(result, f"{unfinished} is not a finished fracgen-train pretrain run (no config.json, model.safetensors, "
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


# --- train/weights.py in this process (issue 39): a tiny run folder written by write_run, read back ----------------

NET = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1})


@pytest.fixture
def folder(tmp_path) -> Path:
    from train.model import create

    torch.manual_seed(0)
    net = create(NET[0], 5, NET[1])
    weights.write_run(tmp_path, net, NET[0], NET[1], 5, step=7, recipe={"lr": 1.0}, data={"source": "x"},
                      mean=(0.5,), std=(0.25,))
    (tmp_path / "summary.json").write_text("{}")
    return tmp_path


def test_write_run_records_the_weights_bytes_and_timm_config(folder):
    config = json.loads((folder / "config.json").read_text())
    raw = (folder / "model.safetensors").read_bytes()
    assert config["fracgen"] == {"weights": {"file": "model.safetensors", "bytes": len(raw),
                                             "sha256": hashlib.sha256(raw).hexdigest()},
                                 "step": 7, "data": {"source": "x"}, "recipe": {"lr": 1.0}}
    assert (config["architecture"], config["num_classes"], config["num_features"], config["model_args"]) == \
        (NET[0], 5, 192, NET[1])
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["mean"] == [0.5] and cfg["std"] == [0.25]
    assert (cfg["num_classes"], cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == (5, "bicubic", 1.0,
                                                                                           "center")
    assert (cfg["first_conv"], cfg["classifier"], cfg["fixed_input_size"]) == ("patch_embed.proj", "head", True)
    assert config["global_pool"] == "token"
    meta = safetensors.safe_open(folder / "model.safetensors", "pt").metadata()
    assert meta == {"format": "pt", "architecture": NET[0], "num_classes": "5",
                    "model_args": json.dumps(NET[1], sort_keys=True)}
    state = torch.load(folder / "model.pth", weights_only=True)
    assert state.keys() == safetensors.torch.load(raw).keys()
    assert weights.finished_problem(folder) is None


def test_a_model_without_an_image_size_argument_records_its_default_size(tmp_path):
    from train.model import create

    net = create(NET[0], 2, {"depth": 1})
    config = weights.timm_config(net, NET[0], {"depth": 1}, 2, (0.5,), (0.5,))
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224]
    assert weights.timm_config(net, NET[0], {"img_size": (16, 24)}, 2, (0.5,), (0.5,))["pretrained_cfg"][
        "input_size"] == [3, 16, 24]


def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path):
    from train.model import create

    net = create(NET[0], 2, NET[1])
    with torch.no_grad():
        net.head.bias[0] = float("nan")
    with pytest.raises(TrainError) as refused:
        weights.write_run(tmp_path, net, NET[0], NET[1], 2, 1, {}, {}, (0.5,), (0.5,))
    assert str(refused.value) == (f"the weights hold non-finite values (head.bias): not written to {tmp_path} "
                                  "(lower --lr, or check the run's metrics.jsonl for where the loss diverged)")
    assert list(tmp_path.iterdir()) == []


def test_safetensors_metadata_is_written_in_sorted_order_with_the_tensors_untouched():
    state = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    raw = weights.safetensors_bytes(state, {"z": "1", "a": "2", "m": "3"})
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert list(header["__metadata__"]) == ["a", "m", "z"]
    assert raw[8 + n:] == safetensors.torch.save(state, {"z": "1", "a": "2", "m": "3"})[8 + n:]
    assert weights.safetensors_bytes(state, {"a": "2", "m": "3", "z": "1"}) == raw
    assert len(raw) == len(safetensors.torch.save(state, {"z": "1"})) + len(',"a":"2","m":"3"')
    loaded = safetensors.torch.load(raw)
    assert torch.equal(loaded["b"], state["b"]) and torch.equal(loaded["a"], state["a"])
    odd = {"k": "\u2028 \x1f \"é\" /"}  # characters the two JSON writers might escape differently
    escaped = weights.safetensors_bytes(state, odd)
    assert len(escaped) == len(safetensors.torch.save(state, odd)) and safetensors.torch.load(escaped).keys() == \
        state.keys()


def test_read_config_names_each_way_a_config_is_wrong(folder, tmp_path):
    good = json.loads((folder / "config.json").read_text())
    path = tmp_path / "c.json"
    with pytest.raises(TrainError, match=r": not a fracgen-train pretrain config\.json$"):
        weights.read_config(tmp_path / "none.json")
    for config in ({**good, "architecture": 1}, {**good, "num_classes": "5"}, {**good, "model_args": []}, [1]):
        path.write_text(json.dumps(config))
        with pytest.raises(TrainError) as refused:
            weights.read_config(path)
        assert str(refused.value) == (f"{path} is not a fracgen-train pretrain config.json (needs architecture, "
                                      "num_classes, model_args; a run finished before model.safetensors existed has "
                                      "only ckpt.pt: give that)")
    record = good["fracgen"]["weights"]
    for fracgen in ([], {}, {"weights": {**record, "bytes": "1"}}, {"weights": {**record, "sha256": 1}},
                    {"weights": {**record, "file": "other.safetensors"}}, {"weights": []}):
        path.write_text(json.dumps({**good, "fracgen": fracgen}))
        with pytest.raises(TrainError) as refused:
            weights.read_config(path)
        assert str(refused.value) == f"{path} records no size and sha256 for model.safetensors: not written by " \
                                     "fracgen-train pretrain"
    path.write_text(json.dumps(good))
    assert weights.read_config(path) == good


def test_weights_are_trusted_only_at_their_recorded_size_and_sha256(folder):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    assert weights._checked_bytes(path, len(raw), digest, "R") == raw
    for size in (0, -1, weights.MAX_WEIGHTS_BYTES + 1):
        with pytest.raises(TrainError) as refused:
            weights._checked_bytes(path, size, digest, "R")
        assert str(refused.value) == (f"R says {path} has {size:,} bytes; fracgen reads weights of 1 to "
                                      f"{weights.MAX_WEIGHTS_BYTES:,} bytes (the largest network it builds)")
    with pytest.raises(TrainError) as refused:
        weights._checked_bytes(path, len(raw) - 1, digest, "R")
    assert str(refused.value) == f"{path} has {len(raw):,} bytes, R says {len(raw) - 1:,}: damaged or replaced"
    with pytest.raises(TrainError) as refused:
        weights._checked_bytes(path, len(raw), "0" * 64, "R")
    assert str(refused.value) == f"{path} does not match the sha256 R records: damaged or replaced"
    with pytest.raises(TrainError) as refused:
        weights._checked_bytes(folder / "gone", len(raw), digest, "R")
    assert str(refused.value) == f"{folder / 'gone'} is missing (R records it)"
    (folder / "link").symlink_to(path)
    with pytest.raises(TrainError, match="link"):
        weights._checked_bytes(folder / "link", len(raw), digest, "R")
    assert weights.MAX_WEIGHTS_BYTES == 4 * 10**9 + 2**24


def test_a_run_is_finished_only_with_matching_weights_and_a_summary(folder):
    (folder / "summary.json").unlink()
    assert weights.finished_problem(folder) == "its summary.json is missing"
    (folder / "summary.json").symlink_to(folder / "config.json")
    assert weights.finished_problem(folder) == "its summary.json is missing"
    (folder / "summary.json").unlink()
    (folder / "summary.json").write_text("{}")
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(raw))
    assert weights.finished_problem(folder) == ("its weights (model.safetensors, config.json) are missing or do not "
                                                "match their record")


def test_a_lone_safetensors_file_says_its_network_in_its_metadata(folder, tmp_path):
    state = safetensors.torch.load((folder / "model.safetensors").read_bytes())
    lone = tmp_path / "lone" / "w.safetensors"
    lone.parent.mkdir()
    meta = {"architecture": NET[0], "num_classes": "5", "model_args": json.dumps(NET[1])}
    safetensors.torch.save_file(state, lone, meta)
    got = weights.load(str(lone))
    assert (got.name, got.model_args, got.num_classes) == (NET[0], NET[1], 5) and got.state.keys() == state.keys()
    assert weights.from_safetensors(folder / "model.safetensors").num_classes == 5  # its config.json decides
    for bad in ({k: v for k, v in meta.items() if k != "architecture"}, {**meta, "num_classes": "five"},
                {**meta, "model_args": "{"}):
        safetensors.torch.save_file(state, lone, bad)
        with pytest.raises(TrainError) as refused:
            weights.from_safetensors(lone)
        assert str(refused.value) == (f"{lone} does not say its architecture (safetensors metadata architecture, "
                                      "num_classes, model_args), and there is no config.json beside it")
    safetensors.torch.save_file(state, lone, {**meta, "model_args": "[1]"})
    with pytest.raises(TrainError, match=r"its metadata's model_args is not a JSON object$"):
        weights.from_safetensors(lone)
    lone.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(TrainError, match=r"does not say its architecture"):
        weights.from_safetensors(lone)
    assert weights._metadata(b"\xff" * 8 + b"{}") == {} and weights._metadata(b"\x02\x00\x00\x00\x00\x00\x00\x00[]") \
        == {}
    with pytest.raises(TrainError, match=r"^x is not a safetensors file \("):
        weights._tensors(b"\x02\x00\x00\x00\x00\x00\x00\x00[]", Path("x"))


def test_a_checkpoint_spec_is_a_folder_a_file_or_a_url_and_anything_else_one_line(folder, tmp_path):
    got = weights.load(str(folder))
    assert (got.name, got.num_classes) == (NET[0], 5)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainError) as refused:
        weights.load(str(empty))
    assert str(refused.value) == (f"--checkpoint {empty}: no model.safetensors or ckpt.pt in that folder (a "
                                  "fracgen-train pretrain --out folder)")
    with pytest.raises(TrainError, match=r"^--checkpoint .*/nothing: no such file \(give RUN_DIR, a \.safetensors"):
        weights.load(str(tmp_path / "nothing"))
    with pytest.raises(TrainError, match="is not a fracgen-train pretrain checkpoint"):
        weights.load(str(folder / "config.json"))  # neither .safetensors nor a checkpoint


@pytest.mark.parametrize(("spec", "parsed"), [
    ("hf://org/name", ("org/name", None)), ("hf://org/name@v1.0", ("org/name", "v1.0")),
    ("hf://org/name/", ("org/name", None)), ("hf://a.b/c_d-e", ("a.b/c_d-e", None)),
    ("hf://datasets/org/name", None), ("hf://spaces/org/name", None), ("hf://org", None), ("hf://org/na--me", None),
    ("hf://-org/name", None), ("hf://org/name@a@b", None),
])
def test_hub_specs_name_a_model_repository_and_maybe_a_revision(spec, parsed):
    if parsed is not None:
        assert weights.parse_hub(spec) == parsed
        return
    with pytest.raises(TrainError) as refused:
        weights.parse_hub(spec)
    assert str(refused.value) == (f"{spec!r} is not hf://ORG/NAME[@REVISION] (a model repository; ORG and NAME: "
                                  "letters, digits, '-', '_', '.', no '--' or '..', not starting or ending with '-' "
                                  "or '.')")


def test_sha256sums_must_be_well_formed_and_name_the_config_and_the_weights():
    a, b = "a" * 64, "b" * 64
    assert weights.parse_sums(f"{a}  config.json\n\n{b} *model.safetensors\n".encode(), "S") == \
        {"config.json": a, "model.safetensors": b}
    for text in (b"\xff\xfe", f"{a[:-1]}  config.json".encode(), f"{a}   config.json".encode(),
                 f"{a.upper()}  config.json".encode()):
        with pytest.raises(TrainError) as refused:
            weights.parse_sums(text, "S")
        assert str(refused.value) == "S is not a SHA256SUMS file (lines of sha256, two spaces, file name)"
    with pytest.raises(TrainError) as refused:
        weights.parse_sums(f"{a}  README.md\n".encode(), "S")
    assert str(refused.value) == ("S lists no config.json or model.safetensors: not a folder written by fracgen-train "
                                  "publish")
    with pytest.raises(TrainError, match=r"^S lists no model\.safetensors: not a folder"):
        weights.parse_sums(f"{a}  config.json\n".encode(), "S")
    assert weights._is_commit("0" * 40) and not weights._is_commit("0" * 39) and not weights._is_commit(None)
    assert not weights._is_commit("main") and not weights._is_commit("G" * 40)


def test_a_file_named_otherwise_beside_a_config_says_its_own_network_and_a_run_folders_is_checked(folder):
    state = safetensors.torch.load((folder / "model.safetensors").read_bytes())
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    meta = {"architecture": NET[0], "num_classes": "5", "model_args": json.dumps(NET[1])}
    safetensors.torch.save_file(zeros, folder / "other.safetensors", meta)
    got = weights.from_safetensors(folder / "other.safetensors")  # its own bytes, not the run's weights
    assert all(torch.equal(got.state[k], zeros[k]) for k in state)
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[-1] ^= 1  # the run's own file, changed: checked against config.json's record
    (folder / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(TrainError, match="does not match the sha256"):
        weights.from_safetensors(folder / "model.safetensors")


def test_a_lone_file_is_bounded_in_size_and_its_model_args_in_bytes(folder, tmp_path, monkeypatch):
    state = {"w": torch.zeros(2)}
    lone = tmp_path / "w.safetensors"
    safetensors.torch.save_file(state, lone, {"architecture": NET[0], "num_classes": "5",
                                              "model_args": json.dumps({"pad": "x" * 70_000})})
    with pytest.raises(TrainError, match="does not say its architecture"):  # model_args past 64 KiB
        weights.from_safetensors(lone)
    safetensors.torch.save_file(state, lone, {"architecture": NET[0], "num_classes": "5", "model_args": "{}"})
    size = lone.stat().st_size
    monkeypatch.setattr(weights, "MAX_WEIGHTS_BYTES", size)
    assert weights.from_safetensors(lone).state.keys() == {"w"}  # exactly the bound: read
    monkeypatch.setattr(weights, "MAX_WEIGHTS_BYTES", size - 1)
    with pytest.raises(TrainError) as refused:
        weights.from_safetensors(lone)
    assert str(refused.value) == (f"{lone} has {size:,} bytes, more than the {size - 1:,} of the largest network "
                                  "fracgen builds")
    broken = lone.read_bytes()[:-4]  # the header whole, the tensor data short
    lone.write_bytes(broken)
    monkeypatch.setattr(weights, "MAX_WEIGHTS_BYTES", size)
    with pytest.raises(TrainError, match=rf"^{lone} is not a safetensors file \("):
        weights.from_safetensors(lone)


def test_a_header_that_ends_the_file_still_gives_its_metadata():
    raw = safetensors.torch.save({}, {"architecture": "a"})  # no tensors: the header is the whole file
    assert weights._metadata(raw) == {"architecture": "a"}
    assert weights._metadata(raw[:-1]) == {}


def test_hub_names_of_data_sets_and_spaces_and_upper_case_commits_are_refused():
    for spec in ("hf://datasets/name", "hf://spaces/name"):
        with pytest.raises(TrainError, match="is not hf://ORG/NAME"):
            weights.parse_hub(spec)
    assert weights._is_commit("a" * 40) and not weights._is_commit("A" * 40)


def test_a_published_folder_is_opened_from_its_url_or_its_sums_url_and_refusals_name_it():
    source = weights.open_source("http://host/run/SHA256SUMS#part")
    assert source.url("config.json") == "http://host/run/config.json"
    assert weights.open_source("http://host/run/").url("model.safetensors") == "http://host/run/model.safetensors"
    hub = weights.open_source("hf://org/name")
    assert (hub.spec, hub.kind, hub.base, hub.revision) == ("hf://org/name", "hf", "org/name", "main")
    assert "/org/name/resolve/main/config.json" in hub.url("config.json")
    assert weights.open_source("hf://org/name@v2").revision == "v2"
    with pytest.raises(TrainError, match=r"^--checkpoint ftp://host/x: "):
        weights.open_source("ftp://host/x")


def test_a_published_folder_is_fetched_once_checked_and_said(folder, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, served / name)
    sums = "".join(f"{hashlib.sha256((served / n).read_bytes()).hexdigest()}  {n}\n"
                   for n in ("config.json", "model.safetensors"))
    (served / "SHA256SUMS").write_text(sums)
    logs = []
    with Server(served) as server:
        got = weights.fetch(server.url, tmp_path / "cache", log=logs.append)
        again = weights.fetch(server.url, tmp_path / "cache", log=logs.append)
        assert server.requests.count("/model.safetensors") == 1
    assert got == again == tmp_path / "cache" / "models" / hashlib.sha256(sums.encode()).hexdigest()
    assert logs == [f"checkpoint: fetched config.json, model.safetensors ({got}; checked against {server.url}'s "
                    "SHA256SUMS)", f"checkpoint: found in cache ({got}; checked against {server.url}'s SHA256SUMS)"]
    (served / "SHA256SUMS").write_text(sums + "#" * 70_000)
    with Server(served) as server, pytest.raises(TrainError) as refused:
        weights.fetch(server.url, tmp_path / "cache", log=logs.append)
    assert str(refused.value).startswith(f"--checkpoint {server.url}: {server.url}SHA256SUMS: more than the 65,536 "
                                         "bytes fracgen reads")


def _served(folder: Path, root: Path, config: dict | None = None) -> tuple[Path, str]:
    """A published folder (config.json, model.safetensors, SHA256SUMS) made from `folder`; `config` replaces its
    config.json (the sums follow it)."""
    served = root / "served"
    served.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "model.safetensors", served / "model.safetensors")
    if config is None:
        shutil.copy(folder / "config.json", served / "config.json")
    else:
        (served / "config.json").write_text(json.dumps(config))
    sums = "".join(f"{hashlib.sha256((served / n).read_bytes()).hexdigest()}  {n}\n"
                   for n in ("config.json", "model.safetensors"))
    (served / "SHA256SUMS").write_text(sums)
    return served, sums


def test_a_hub_folder_is_read_from_the_commit_that_served_its_sums_or_a_note_says_the_branch(folder, tmp_path,
                                                                                            monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    served, _ = _served(folder, tmp_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    for header, spec, note in ((None, "hf://org/tiny", True), (None, f"hf://org/tiny@{'a' * 40}", False),
                               (commit, "hf://org/tiny", False)):
        asked, logs = [], []
        with Server(served, commit=header) as server:
            def hf_hub_url(repo_id, filename, *, repo_type=None, revision=None, asked=asked, server=server, **kw):
                asked.append((filename, revision))  # the hub, on loopback
                return f"{server.url}{filename}"

            monkeypatch.setattr(huggingface_hub, "hf_hub_url", hf_hub_url)
            weights.fetch(spec, tmp_path / f"cache-{len(spec)}-{header}", log=logs.append)
        said = [line for line in logs if line.startswith("note:")]
        assert said == ([f"note: {server.url}SHA256SUMS named no commit (X-Repo-Commit): its other files are read "
                         "from the branch main as it is now"] if note else []), logs
        revisions = {revision for name, revision in asked if name != "SHA256SUMS"}
        assert revisions == ({commit} if header else {"main"} if note else {"a" * 40})


def test_a_published_folder_whose_records_disagree_or_claim_too_much_is_one_line(folder, tmp_path, monkeypatch):
    config = json.loads((folder / "config.json").read_text())
    record = config["fracgen"]["weights"]
    size = record["bytes"]
    cases = (({**record, "sha256": "0" * 64}, "{url}config.json and {url}SHA256SUMS record different sha256s for "
                                              "model.safetensors"),
             ({**record, "bytes": 0}, "{url}config.json says model.safetensors has 0 bytes; fracgen reads weights of "
                                      "1 to"))
    for i, (weights_record, says) in enumerate(cases):
        changed = {**config, "fracgen": {**config["fracgen"], "weights": weights_record}}
        served, _ = _served(folder, tmp_path / str(i), changed)  # SHA256SUMS lists the files as served
        with Server(served) as server, pytest.raises(TrainError) as refused:
            weights.fetch(server.url, tmp_path / "cache", log=lambda line: None)
        assert str(refused.value).startswith(says.format(url=server.url)), str(refused.value)
    monkeypatch.setattr(weights, "MAX_WEIGHTS_BYTES", size)  # exactly the bound: fetched
    served, _ = _served(folder, tmp_path / "exact")
    with Server(served) as server:
        assert (weights.fetch(server.url, tmp_path / "cache", log=lambda line: None) / "model.safetensors").exists()
    (tmp_path / "file").write_text("")
    with Server(served) as server, pytest.raises(TrainError) as refused:
        weights.fetch(server.url, tmp_path / "file" / "cache", log=lambda line: None)
    assert str(refused.value) == f"--checkpoint {server.url}: cannot write the cache: Not a directory"


def test_a_run_folders_weights_are_named_in_each_refusal(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00[]")
    raw = (folder / "model.safetensors").read_bytes()
    config["fracgen"]["weights"].update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrainError, match=rf"^{folder / 'model.safetensors'} is not a safetensors file \("):
        weights.from_folder(folder)
    config["fracgen"]["weights"]["sha256"] = "0" * 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrainError) as refused:
        weights.from_folder(folder)
    assert str(refused.value) == (f"{folder / 'model.safetensors'} does not match the sha256 {folder / 'config.json'} "
                                  "records: damaged or replaced")


def test_config_records_the_models_own_input_size_and_the_data_it_was_trained_on():
    from train.model import create

    net = create("vit_tiny_patch16_384", 2, {"depth": 1})
    config = weights.timm_config(net, "vit_tiny_patch16_384", {"depth": 1}, 2, (0.5,), (0.5,))
    assert config["pretrained_cfg"]["input_size"] == [3, 384, 384]
    manifest = {"num_classes": 3, "num_samples": 30, "fracgen_version": "0.5.0",
                "settings": {"system": "1p-frac", "seed": 1}}
    record = weights.data_record(manifest, "ab" * 32, "shards/x")
    command = record.pop("command")
    assert record == {"manifest_sha256": "ab" * 32, "source": "shards/x", "num_classes": 3, "num_samples": 30,
                      "system": "1p-frac", "fracgen_version": "0.5.0", "settings": {"system": "1p-frac", "seed": 1}}
    assert command.startswith("fracgen render")
    older = weights.data_record({"num_classes": 3, "settings": {"seed": 1}}, "cd" * 32, "s")  # before 0.3: 1p-frac
    assert (older["system"], older["num_samples"], older["fracgen_version"]) == ("1p-frac", None, None)


def test_weights_of_one_byte_and_of_exactly_the_bound_are_read(tmp_path, monkeypatch):
    one = tmp_path / "one"
    one.write_bytes(b"x")
    assert weights._checked_bytes(one, 1, hashlib.sha256(b"x").hexdigest(), "R") == b"x"
    monkeypatch.setattr(weights, "MAX_WEIGHTS_BYTES", 1)
    assert weights._checked_bytes(one, 1, hashlib.sha256(b"x").hexdigest(), "R") == b"x"


def test_a_safetensors_error_is_its_first_line_in_120_characters_or_its_type(monkeypatch):
    class Odd(Exception):
        pass

    def fails(text):
        def load(raw):
            raise Odd(text)
        return load

    monkeypatch.setattr(safetensors.torch, "load", fails("x" * 200 + "\nsecond"))
    with pytest.raises(TrainError) as refused:
        weights._tensors(b"", Path("w"))
    assert str(refused.value) == f"w is not a safetensors file ({'x' * 120})"
    monkeypatch.setattr(safetensors.torch, "load", fails("  "))
    with pytest.raises(TrainError) as refused:
        weights._tensors(b"", Path("w"))
    assert str(refused.value) == "w is not a safetensors file (Odd)"


def test_each_check_of_loaded_weights_names_where_they_came_from(folder, tmp_path):
    good = weights.from_folder(folder)
    for bad, says in ((good._replace(model_args={"depth": 0}), "W: model argument depth=0 must be in 1..96"),
                      (good._replace(name="no_such_net"), "W: unknown timm model 'no_such_net'"),
                      (good._replace(state={}), "W: the weights do not fit the network they name")):
        with pytest.raises(TrainError) as refused:
            weights.checked(bad, "W")
        assert str(refused.value).startswith(says), str(refused.value)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model_name": good.name, "model_args": good.model_args, "num_classes": good.num_classes,
                "model": good.state, "step": 3, "config": {}}, run / "ckpt.pt")
    assert weights.load(str(run)).state.keys() == good.state.keys()  # an unfinished run: its last checkpoint
    torch.save({"model_name": good.name, "model_args": good.model_args, "num_classes": good.num_classes + 1,
                "model": good.state, "step": 3, "config": {}}, run / "ckpt.pt")
    with pytest.raises(TrainError, match=rf"^{run / 'ckpt.pt'}: weight head\.weight has shape"):
        weights.load(str(run))
    (folder / "model.safetensors").write_bytes(b"changed")
    with pytest.raises(TrainError, match=rf"^{folder / 'model.safetensors'} has 7 bytes, {folder / 'config.json'} "):
        weights.load(str(folder))


def test_metadata_is_sorted_with_non_ascii_values_and_a_header_that_needs_no_padding():
    state = {"t": torch.zeros(1)}
    raw = weights.safetensors_bytes(state, {"z": "é", "a": "ü"})
    n = int.from_bytes(raw[:8], "little")
    assert list(json.loads(raw[8:8 + n])["__metadata__"]) == ["a", "z"]
    unpadded = 0
    for pad in range(16):  # some value length makes the header a multiple of 8 with no padding
        meta = {"z": "v" * pad, "a": "1"}
        plain = safetensors.torch.save(state, meta)
        n = int.from_bytes(plain[:8], "little")
        if not plain[8:8 + n].endswith(b" "):
            unpadded += 1
            raw = weights.safetensors_bytes(state, meta)
            assert list(json.loads(raw[8:8 + n])["__metadata__"]) == ["a", "z"]
    assert unpadded
