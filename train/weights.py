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
from urllib.parse import urlsplit, urlunsplit

import safetensors.torch
import torch

from fracgen import share
from fracgen.errors import FracgenError
from fracgen.lock import waiting_lock
from fracgen.shards import file_sha256
from fracgen.untrusted import open_regular, parse_json, printable, read_json

from . import model as model_lib
from .runtime import TrainError, atomic_save, atomic_write_bytes, atomic_write_json, load_checkpoint
from .source import LOCK_WAIT, default_cache_dir

WEIGHTS, CONFIG, SUMS = "model.safetensors", "config.json", "SHA256SUMS"
MAX_SUMS_BYTES = 1 << 16  # a few lines
MAX_CONFIG_BYTES = 1 << 24  # the recipe and the data's settings: kilobytes
MAX_WEIGHTS_BYTES = 4 * model_lib.MAX_PARAMS + (1 << 24)  # the largest network fracgen builds, float32, and a header
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
    the same weights as a plain state dict for older readers), each written under a temporary name and renamed.
    The same weights give the same bytes (`safetensors_bytes`); non-finite weights are refused, nothing written."""
    state = {k: v.detach().cpu().contiguous() for k, v in model_lib.clean_state_dict(model).items()}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise TrainError(f"the weights hold non-finite values ({bad}): not written to {out} (lower --lr, or check "
                         "the run's metrics.jsonl for where the loss diverged)")
    raw = safetensors_bytes(state, {"format": "pt", "architecture": name, "num_classes": str(num_classes),
                                    "model_args": json.dumps(model_args, sort_keys=True)})
    atomic_write_bytes(lambda f: f.write(raw), out / WEIGHTS)
    atomic_save(state, out / "model.pth")
    config = timm_config(model, name, model_args, num_classes, mean, std)
    config["fracgen"] = {"weights": {"file": WEIGHTS, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()},
                         "step": step, "data": data, "recipe": recipe}
    atomic_write_json(config, out / CONFIG)


def safetensors_bytes(state: dict, metadata: dict) -> bytes:
    """safetensors.torch.save with the header's __metadata__ keys in sorted order. safetensors keeps them in a Rust
    HashMap, whose order is seeded per process: the same weights gave files with other sha256s (which a model card
    and SHA256SUMS publish) depending on whether the run had been stopped and continued. The keys are put in order
    in the header's own bytes: same length, the tensors' offsets untouched."""
    raw = safetensors.torch.save(state, metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # serde_json and json.dumps disagree on an escape: keep safetensors' own bytes
        return raw
    return raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:]


# --- reading ---------------------------------------------------------------------------------------------------

def read_config(path: Path) -> dict:
    """A run's config.json, checked for what loading needs: one TrainError line for each way it can be wrong."""
    try:
        config = read_json(path, max_bytes=MAX_CONFIG_BYTES)
    except (OSError, FracgenError) as e:
        raise TrainError(f"{printable(e)}: not a fracgen-train pretrain config.json") from None
    kinds = {"architecture": str, "num_classes": int, "model_args": dict}
    if not isinstance(config, dict) or any(not isinstance(config.get(k), t) for k, t in kinds.items()):
        raise TrainError(f"{path} is not a fracgen-train pretrain config.json (needs architecture, num_classes, "
                         "model_args; a run finished before model.safetensors existed has only ckpt.pt: give that)")
    record = config.get("fracgen", {}).get("weights") if isinstance(config.get("fracgen"), dict) else None
    if not (isinstance(record, dict) and isinstance(record.get("bytes"), int) and
            isinstance(record.get("sha256"), str) and record.get("file") == WEIGHTS):
        raise TrainError(f"{path} records no size and sha256 for {WEIGHTS}: not written by fracgen-train pretrain")
    return config


def _checked_bytes(path: Path, size: int, sha256: str, record: str) -> bytes:
    """The file's bytes, trusted only when their size and sha256 are the record's: a regular file (no link, FIFO or
    device) whose size on disk is compared before a byte is read; then read once and hashed."""
    if not 0 < size <= MAX_WEIGHTS_BYTES:
        raise TrainError(f"{record} says {path} has {size:,} bytes; fracgen reads weights of 1 to "
                         f"{MAX_WEIGHTS_BYTES:,} bytes (the largest network it builds)")
    try:
        with open_regular(path) as f:
            found = os.fstat(f.fileno()).st_size
            if found != size:
                raise TrainError(f"{path} has {found:,} bytes, {record} says {size:,}: damaged or replaced")
            raw = f.read(size + 1)
    except FileNotFoundError:
        raise TrainError(f"{path} is missing ({record} records it)") from None
    except (OSError, FracgenError) as e:
        raise TrainError(printable(e)) from None
    if len(raw) != size or hashlib.sha256(raw).hexdigest() != sha256:
        raise TrainError(f"{path} does not match the sha256 {record} records: damaged or replaced")
    return raw


def finished_problem(run: Path) -> str | None:
    """What a run folder whose last checkpoint is its final step lacks to be finished (None: nothing): its weights
    matching config.json's record, and summary.json. "Finished" never means less."""
    try:
        record = read_config(run / CONFIG)["fracgen"]["weights"]
        _checked_bytes(run / WEIGHTS, record["bytes"], record["sha256"], str(run / CONFIG))
    except TrainError:
        return f"its weights ({WEIGHTS}, {CONFIG}) are missing or do not match their record"
    if not (run / "summary.json").is_file() or (run / "summary.json").is_symlink():
        return "its summary.json is missing"
    return None


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
        header = parse_json(raw[8:8 + n], "the safetensors header") if 8 + n <= len(raw) else {}
    except FracgenError:
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
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise TrainError(f"{path} has {path.stat().st_size:,} bytes, more than the {MAX_WEIGHTS_BYTES:,} of the "
                         "largest network fracgen builds")
    raw = path.read_bytes()
    meta = _metadata(raw)
    try:
        name, num_classes = meta["architecture"], int(meta["num_classes"])
        model_args = parse_json(meta["model_args"], "model_args", MAX_SUMS_BYTES)
    except (KeyError, ValueError, TypeError, FracgenError):
        raise TrainError(f"{path} does not say its architecture (safetensors metadata architecture, num_classes, "
                         f"model_args), and there is no {CONFIG} beside it") from None
    if not isinstance(model_args, dict):
        raise TrainError(f"{path}: its metadata's model_args is not a JSON object")
    return Pretrained(name, model_args, num_classes, _tensors(raw, path))


def load(spec: str, cache_dir: str | Path | None = None, log: Callable[[str], None] = print) -> Pretrained:
    """The weights a `--checkpoint` names (see the module docstring), checked to fit the network they name."""
    shown = printable(spec)  # no password or signed query of a URL in a message
    if share.is_remote(spec):
        folder = fetch(spec, cache_dir, log)
        return checked(from_folder(folder), f"{shown} ({folder / CONFIG})")
    path = Path(spec)
    if path.is_dir():
        if (path / WEIGHTS).is_file():
            return checked(from_folder(path), str(path / CONFIG))
        if (path / "ckpt.pt").is_file():  # an unfinished run, or one finished before model.safetensors
            return checked(_from_checkpoint(path / "ckpt.pt"), str(path / "ckpt.pt"))
        raise TrainError(f"--checkpoint {shown}: no {WEIGHTS} or ckpt.pt in that folder (a fracgen-train pretrain "
                         "--out folder)")
    if not path.is_file():
        raise TrainError(f"--checkpoint {shown}: no such file (give RUN_DIR, a .safetensors file, RUN_DIR/ckpt.pt, "
                         "an http(s):// or hf:// published folder, or none)")
    if path.suffix == ".safetensors":
        return checked(from_safetensors(path), shown)
    return checked(_from_checkpoint(path), shown)


def checked(pretrained: Pretrained, where: str) -> Pretrained:
    """The weights, if the network their file names may be built (train.model's allow list and size bound) and
    they fit it exactly: names, shapes, floating-point dtypes, finite values. Nothing is allocated before that."""
    args = model_lib.check_args(pretrained.model_args, f"{where}: model argument")
    skeleton = model_lib.skeleton(pretrained.name, pretrained.num_classes, args, where)
    model_lib.check_weights(skeleton, pretrained.state, where)
    return pretrained._replace(model_args=args)


def _from_checkpoint(path: Path) -> Pretrained:
    ckpt = load_checkpoint(path)
    return Pretrained(ckpt["model_name"], ckpt["model_args"], ckpt["num_classes"], ckpt["model"])


# --- fetching a published folder -------------------------------------------------------------------------------

@dataclass
class _ModelSource(share.Source):
    """fracgen's download source, for a model repository on the hub (fracgen's own serves data sets)."""

    def url(self, name: str) -> str:
        if self.kind == "hf":
            return share.hub_url(self.base, name, "model", self.commit or self.revision)
        return super().url(name)


def parse_hub(spec: str) -> tuple[str, str | None]:
    """(ORG/NAME, REVISION or None) of hf://ORG/NAME[@REVISION]."""
    match = HUB_PATTERN.fullmatch(spec)
    if not match or spec.startswith(("hf://datasets/", "hf://spaces/")) or not share.valid_repo_id(match.group(1)):
        raise TrainError(f"{printable(spec)!r} is not hf://ORG/NAME[@REVISION] (a model repository; ORG and NAME: "
                         "letters, digits, '-', '_', '.', no '--' or '..', not starting or ending with '-' or '.')")
    return match.group(1), match.group(2)


def open_source(spec: str) -> share.Source:
    try:
        if spec.startswith("hf://"):
            repo, revision = parse_hub(spec)
            return _ModelSource(spec, "hf", repo, revision or "main", token=share._hub().get_token())
        parts = urlsplit(spec)  # the folder's URL, or its SHA256SUMS' (a signed one keeps its query)
        if parts.path.endswith("/" + SUMS):
            spec = urlunsplit(parts._replace(path=parts.path[: -len(SUMS)], fragment=""))
        return share.open_source(spec)  # http(s): files relative to the folder's URL
    except FracgenError as e:
        raise TrainError(f"--checkpoint {printable(spec)}: {e}") from None


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
        raise TrainError(f"{where} lists no {' or '.join(missing)}: not a folder written by fracgen-train publish")
    return sums


def fetch(spec: str, cache_dir: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """A published folder's config.json and model.safetensors in the local cache, each checked against the
    folder's SHA256SUMS (and the weights' size against config.json) before it is renamed into place. A folder
    fetched before is only checked: only SHA256SUMS is downloaded again. Every rule of fracgen's downloader holds
    (share.download_file: bounded size, --min-rate, deadline, retries said in a note); the weights may not claim
    more than MAX_WEIGHTS_BYTES, and the disk must have room for them before the first byte."""
    shown = printable(spec)
    source = open_source(spec)

    def note(text: str) -> None:
        log(f"note: {printable(text)}")

    try:
        sums_raw = _download(source, SUMS, MAX_SUMS_BYTES, note)
        if source.kind == "hf" and source.seen_commit and source.commit is None:
            source.commit = source.seen_commit  # every file from the commit that served SHA256SUMS
        elif source.kind == "hf" and source.commit is None and not _is_commit(source.revision):
            log(f"note: {source.url(SUMS)} named no commit (X-Repo-Commit): its other files are read from the "
                f"branch {source.revision} as it is now")
        sums = parse_sums(sums_raw, source.url(SUMS))
        folder = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "models" / \
            hashlib.sha256(sums_raw).hexdigest()
        folder.mkdir(parents=True, exist_ok=True)
        fetched = []
        with waiting_lock(folder, f"train --checkpoint {shown}", note, LOCK_WAIT):
            share.remove_temporaries(folder, (CONFIG, WEIGHTS))  # of a fetch that was killed
            if not _matches(folder / CONFIG, sums[CONFIG]):
                share.download_file(source, CONFIG, folder, sums[CONFIG], limit=MAX_CONFIG_BYTES, note=note,
                                    what=SUMS)
                fetched.append(CONFIG)
            record = read_config(folder / CONFIG)["fracgen"]["weights"]
            if record["sha256"] != sums[WEIGHTS]:
                raise TrainError(f"{source.url(CONFIG)} and {source.url(SUMS)} record different sha256s for "
                                 f"{WEIGHTS}")
            if not 0 < record["bytes"] <= MAX_WEIGHTS_BYTES:
                raise TrainError(f"{source.url(CONFIG)} says {WEIGHTS} has {record['bytes']:,} bytes; fracgen reads "
                                 f"weights of 1 to {MAX_WEIGHTS_BYTES:,} bytes (the largest network it builds)")
            if not _matches(folder / WEIGHTS, sums[WEIGHTS]):
                share.ensure_room(folder, record["bytes"], f"{WEIGHTS} ({record['bytes']:,} bytes)")
                share.download_file(source, WEIGHTS, folder, sums[WEIGHTS], size=record["bytes"], note=note,
                                    what=SUMS, sized_by=CONFIG)
                fetched.append(WEIGHTS)
    except FracgenError as e:
        raise TrainError(f"--checkpoint {shown}: {e}") from None
    except OSError as e:
        raise TrainError(f"--checkpoint {shown}: cannot write the cache: {e.strerror or e}") from None
    log(f"checkpoint: {'fetched ' + ', '.join(fetched) if fetched else 'found in cache'} ({folder}; checked "
        f"against {shown}'s {SUMS})")
    return folder


def _is_commit(revision: str | None) -> bool:
    return bool(revision and re.fullmatch(r"[0-9a-f]{40}", revision))


def _download(source: share.Source, name: str, limit: int, note) -> bytes:
    f = tempfile.SpooledTemporaryFile()
    with f:
        share._download(source, name, f, limit, lambda n: None, note, what="fracgen reads")
        f.seek(0)
        return f.read()


def _matches(path: Path, sha256: str) -> bool:
    return path.is_file() and file_sha256(path)[0] == sha256
