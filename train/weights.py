"""Pre-trained weights as the ecosystem reads them, and every place `--checkpoint` may point at.

A finished `train.pretrain` run folder holds `model.safetensors` (the weights, with the architecture in its
metadata) and a timm-style `config.json` (`architecture`, `num_classes`, `num_features`, `model_args`,
`pretrained_cfg`, plus a `fracgen` block: the weights file's size and sha256, the pre-training data's manifest sha256,
settings and the command that renders them again, the recipe). timm loads them as they are:

    timm.create_model("local-dir:RUN_DIR", pretrained=True)             # or "hf-hub:ORG/NAME" once published
    timm.create_model(arch, pretrained=True, num_classes=C, **model_args,
                      pretrained_cfg_overlay={"file": "RUN_DIR/model.safetensors", "num_classes": C})

`load(spec)` turns a `--checkpoint` into (architecture, model_args, num_classes, weights): a run folder, a
`.safetensors` file, a `ckpt.pt` (torch.load with weights_only: nothing in it runs), or a published folder (its
http(s) URL or hf://ORG/NAME[@REVISION], written by `train.publish`), fetched once into a cache folder named by the
sha256 of its SHA256SUMS, every file checked against it. Weights are read from safetensors, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import safetensors.torch
import torch

from fracgen import share
from fracgen.errors import FracgenError
from fracgen.shards import file_sha256
from train import model as model_lib
from train.runtime import TrainError, atomic_save, atomic_write_json, load_checkpoint
from train.source import default_cache_dir

WEIGHTS, CONFIG, SUMS = "model.safetensors", "config.json", "SHA256SUMS"
MAX_SUMS_BYTES = 1 << 16  # a few lines
MAX_CONFIG_BYTES = 1 << 24  # the recipe and the data's settings: kilobytes
HUB_PATTERN = re.compile(r"hf://([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@([^@/]+))?/?")


class Pretrained(NamedTuple):
    name: str  # timm architecture
    model_args: dict
    num_classes: int  # of the pretext head
    state: dict


# --- writing ---------------------------------------------------------------------------------------------------

def data_record(manifest: dict, sha256: str, source: str) -> dict:
    """What config.json says of the pre-training data: enough to find it again, or render it again."""
    return {"manifest_sha256": sha256, "source": source, "num_classes": manifest["num_classes"],
            "num_samples": manifest.get("num_samples"), "system": manifest.get("settings", {}).get("system",
                                                                                                    "1p-frac"),
            "fracgen_version": manifest.get("fracgen_version"), "settings": manifest.get("settings", {}),
            "command": share.regenerate_command(manifest)}


def timm_config(model: torch.nn.Module, name: str, model_args: dict, num_classes: int, mean, std) -> dict:
    """The keys timm's hub and local-dir loaders read (timm.models._hub: architecture, num_classes, model_args,
    pretrained_cfg); the rest of pretrained_cfg is this model's own (first conv, classifier)."""
    size = model_args.get("img_size") or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    size = list(size) if isinstance(size, (list, tuple)) else [size, size]
    default = model.pretrained_cfg
    return {"architecture": name, "num_classes": num_classes, "num_features": int(model.num_features),
            "global_pool": getattr(model, "global_pool", None) or None, "model_args": dict(model_args),
            "pretrained_cfg": {"input_size": [3, *size], "fixed_input_size": bool(default.get("fixed_input_size")),
                               "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                               "mean": list(mean), "std": list(std), "num_classes": num_classes,
                               "first_conv": default.get("first_conv"), "classifier": default.get("classifier")}}


def write_run(out: Path, model: torch.nn.Module, name: str, model_args: dict, num_classes: int, step: int,
              recipe: dict, data: dict, mean, std) -> None:
    """A finished run's weights: model.safetensors, then config.json recording its size and sha256 (and model.pth,
    the same weights as a plain state dict for older readers), each written under a temporary name and renamed."""
    state = {k: v.detach().cpu().contiguous() for k, v in model_lib.clean_state_dict(model).items()}
    metadata = {"format": "pt", "architecture": name, "num_classes": str(num_classes),
                "model_args": json.dumps(model_args)}
    raw = safetensors.torch.save(state, metadata)
    _atomic_write_bytes(raw, out / WEIGHTS)
    atomic_save(state, out / "model.pth")
    config = timm_config(model, name, model_args, num_classes, mean, std)
    config["fracgen"] = {"weights": {"file": WEIGHTS, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()},
                         "step": step, "data": data, "recipe": recipe}
    atomic_write_json(config, out / CONFIG)


def _atomic_write_bytes(raw: bytes, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, path)


# --- reading ---------------------------------------------------------------------------------------------------

def read_config(path: Path) -> dict:
    """A run's config.json, checked for what loading needs: one TrainError line for each way it can be wrong."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainError(f"{path} is unreadable ({type(e).__name__}): not a train.pretrain config.json") from None
    kinds = {"architecture": str, "num_classes": int, "model_args": dict}
    if not isinstance(config, dict) or any(not isinstance(config.get(k), t) for k, t in kinds.items()):
        raise TrainError(f"{path} is not a train.pretrain config.json (needs architecture, num_classes, model_args;"
                         " a run finished before model.safetensors existed has only ckpt.pt: give that)")
    record = config.get("fracgen", {}).get("weights") if isinstance(config.get("fracgen"), dict) else None
    if not (isinstance(record, dict) and isinstance(record.get("bytes"), int) and
            isinstance(record.get("sha256"), str) and record.get("file") == WEIGHTS):
        raise TrainError(f"{path} records no size and sha256 for {WEIGHTS}: not written by train.pretrain")
    return config


def _checked_bytes(path: Path, size: int, sha256: str, record: str) -> bytes:
    """The file's bytes, trusted only when their size and sha256 are the record's (read once, hashed as read)."""
    with open(path, "rb") as f:
        raw = f.read(size + 1)
    if len(raw) != size:
        raise TrainError(f"{path} has {'more than ' if len(raw) > size else ''}{len(raw):,} bytes, {record} says "
                         f"{size:,}: damaged or replaced")
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise TrainError(f"{path} does not match the sha256 {record} records: damaged or replaced")
    return raw


def _tensors(raw: bytes, where: Path) -> dict:
    try:
        return safetensors.torch.load(raw)
    except Exception as e:  # safetensors raises its own error types for every malformed header
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise TrainError(f"{where} is not a safetensors file ({reason})") from None


def _metadata(raw: bytes) -> dict:
    """The safetensors header's __metadata__ (8 bytes of header length, then the JSON header)."""
    n = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8:8 + n]) if 8 + n <= len(raw) else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def from_folder(folder: Path) -> Pretrained:
    """model.safetensors of a finished run (or published) folder, checked against its config.json's record."""
    config = read_config(folder / CONFIG)
    record = config["fracgen"]["weights"]
    raw = _checked_bytes(folder / WEIGHTS, record["bytes"], record["sha256"], str(folder / CONFIG))
    return Pretrained(config["architecture"], config["model_args"], config["num_classes"],
                      _tensors(raw, folder / WEIGHTS))


def from_safetensors(path: Path) -> Pretrained:
    """A .safetensors file: a run's model.safetensors is checked against the config.json beside it; another file
    says its architecture in its metadata (train.pretrain writes it there too)."""
    if path.name == WEIGHTS and (path.parent / CONFIG).is_file():
        return from_folder(path.parent)
    raw = path.read_bytes()
    meta = _metadata(raw)
    try:
        name, num_classes, model_args = meta["architecture"], int(meta["num_classes"]), json.loads(meta["model_args"])
    except (KeyError, ValueError, TypeError):
        raise TrainError(f"{path} does not say its architecture (safetensors metadata architecture, num_classes, "
                         f"model_args), and there is no {CONFIG} beside it") from None
    if not isinstance(model_args, dict):
        raise TrainError(f"{path}: its metadata's model_args is not a JSON object")
    return Pretrained(name, model_args, num_classes, _tensors(raw, path))


def load(spec: str, cache_dir: str | Path | None = None, log: Callable[[str], None] = print) -> Pretrained:
    """The weights a `--checkpoint` names (see the module docstring)."""
    if share.is_remote(spec):
        return from_folder(fetch(spec, cache_dir, log))
    path = Path(spec)
    if path.is_dir():
        if (path / WEIGHTS).is_file():
            return from_folder(path)
        if (path / "ckpt.pt").is_file():  # an unfinished run, or one finished before model.safetensors
            return _from_checkpoint(path / "ckpt.pt")
        raise TrainError(f"--checkpoint {spec}: no {WEIGHTS} or ckpt.pt in that folder (a train.pretrain --out folder)")
    if not path.is_file():
        raise TrainError(f"--checkpoint {spec}: no such file (give RUN_DIR, a .safetensors file, RUN_DIR/ckpt.pt, "
                         "an http(s):// or hf:// published folder, or none)")
    if path.suffix == ".safetensors":
        return from_safetensors(path)
    return _from_checkpoint(path)


def _from_checkpoint(path: Path) -> Pretrained:
    ckpt = load_checkpoint(path)
    return Pretrained(ckpt["model_name"], ckpt["model_args"], ckpt["num_classes"], ckpt["model"])


# --- fetching a published folder -------------------------------------------------------------------------------

@dataclass
class _ModelSource(share.Source):
    """fracgen's download source, for a model repository on the hub (fracgen's own serves data sets)."""

    def url(self, name: str) -> str:
        if self.kind == "hf":
            return share._hub().hf_hub_url(self.base, name, repo_type="model", revision=self.commit or self.revision)
        return super().url(name)


def parse_hub(spec: str) -> tuple[str, str | None]:
    """(ORG/NAME, REVISION or None) of hf://ORG/NAME[@REVISION]."""
    match = HUB_PATTERN.fullmatch(spec)
    if not match or spec.startswith(("hf://datasets/", "hf://spaces/")):
        raise TrainError(f"{spec!r} is not hf://ORG/NAME[@REVISION] (a model repository)")
    return match.group(1), match.group(2)


def open_source(spec: str) -> share.Source:
    try:
        if spec.startswith("hf://"):
            repo, revision = parse_hub(spec)
            return _ModelSource(spec, "hf", repo, revision or "main", token=share._hub().get_token())
        folder = spec[: -len(SUMS)] if spec.endswith("/" + SUMS) else spec  # the folder's URL, or its SHA256SUMS'
        return share.open_source(folder)  # http(s): files relative to the folder's URL
    except FracgenError as e:
        raise TrainError(f"--checkpoint {spec}: {e}") from None


def parse_sums(text: bytes, where: str) -> dict[str, str]:
    """{file: sha256} of a SHA256SUMS (`sha256sum` format); it must name the config and the weights."""
    sums = {}
    try:
        for line in text.decode().splitlines():
            if line.strip():
                digest, name = re.fullmatch(r"([0-9a-f]{64}) [ *](\S+)", line.strip()).groups()
                sums[name] = digest
    except (UnicodeDecodeError, AttributeError):
        raise TrainError(f"{where} is not a SHA256SUMS file (lines of sha256, two spaces, file name)") from None
    missing = [name for name in (CONFIG, WEIGHTS) if name not in sums]
    if missing:
        raise TrainError(f"{where} lists no {' or '.join(missing)}: not a folder written by train.publish")
    return sums


def fetch(spec: str, cache_dir: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """A published folder's config.json and model.safetensors in the local cache, each checked against the
    folder's SHA256SUMS (and the weights' size against config.json) before it is renamed into place. A folder
    fetched before is only checked: only SHA256SUMS is downloaded again."""
    source = open_source(spec)
    try:
        sums_raw = _download(source, SUMS, MAX_SUMS_BYTES)
        if source.kind == "hf" and source.seen_commit and source.commit is None:
            source.commit = source.seen_commit  # every file from the commit that served SHA256SUMS
        sums = parse_sums(sums_raw, source.url(SUMS))
        folder = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "models" / \
            hashlib.sha256(sums_raw).hexdigest()
        folder.mkdir(parents=True, exist_ok=True)
        fetched = []
        if not _matches(folder / CONFIG, sums[CONFIG]):
            _fetch_file(source, folder, CONFIG, MAX_CONFIG_BYTES, sums[CONFIG], None)
            fetched.append(CONFIG)
        record = read_config(folder / CONFIG)["fracgen"]["weights"]
        if record["sha256"] != sums[WEIGHTS]:
            raise TrainError(f"{source.url(CONFIG)} and {source.url(SUMS)} record different sha256s for {WEIGHTS}")
        if not _matches(folder / WEIGHTS, sums[WEIGHTS]):
            _fetch_file(source, folder, WEIGHTS, record["bytes"], sums[WEIGHTS], record["bytes"])
            fetched.append(WEIGHTS)
    except FracgenError as e:
        raise TrainError(f"--checkpoint {spec}: {e}") from None
    except OSError as e:
        raise TrainError(f"--checkpoint {spec}: cannot write the cache: {e.strerror or e}") from None
    log(f"checkpoint: {'fetched ' + ', '.join(fetched) if fetched else 'found in cache'} ({folder}; checked "
        f"against {spec}'s {SUMS})")
    return folder


def _download(source: share.Source, name: str, limit: int) -> bytes:
    f = tempfile.SpooledTemporaryFile()
    with f:
        share._download(source, name, f, limit, lambda n: None, None)
        f.seek(0)
        return f.read()


def _matches(path: Path, sha256: str) -> bool:
    return path.is_file() and file_sha256(path)[0] == sha256


def _fetch_file(source: share.Source, folder: Path, name: str, limit: int, sha256: str, size: int | None) -> None:
    """Download into a hidden temporary file, hashing it; rename it into place only when it is the recorded one."""
    url = source.url(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w+b") as f:
            digest, got = share._download(source, name, f, limit, lambda n: None, None)
        if size is not None and got != size:
            raise TrainError(f"--checkpoint {source.spec}: {url} has {got:,} bytes, config.json says {size:,}: "
                             "truncated or replaced; nothing was kept")
        if digest != sha256:
            raise TrainError(f"--checkpoint {source.spec}: {url} does not match the sha256 in {SUMS}: damaged or "
                             "replaced; nothing was kept")
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
