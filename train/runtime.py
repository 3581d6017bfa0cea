"""What both train scripts need around the training loop: one-line errors, DDP set-up, atomic checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import sys
import warnings
from pathlib import Path

import click
import numpy as np
import torch
import torch.distributed as dist
import typer

from fracgen.errors import FracgenError
from fracgen.shards import atomic_write
from fracgen.untrusted import printable

from .preempt import Interrupted


class TrainError(Exception):
    """A user-facing problem (bad path, bad option): printed as one line, exit code 1, no traceback."""


def run_cli(app) -> None:
    """Run a typer app so that every user error is one line on stderr: exit code 2 for a usage error (an unknown
    option, a value of the wrong type), as click and `fracgen` exit, 1 for the rest. Click itself would print a
    multi-line box."""
    try:
        rc = app(standalone_mode=False)
    except (click.exceptions.Abort, typer.Abort):
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    # typer >= 0.2x vendors its own click (typer.TyperException); older ones raise click's own exceptions.
    except (click.ClickException, typer.TyperException, TrainError) as e:
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        print(f"error: {printable(_own_line(message))}", file=sys.stderr)  # one line, no secret of a URL
        sys.exit(getattr(e, "exit_code", 1))  # click's UsageError: 2
    except Interrupted as stop:  # a signal before a run's first step (train.preempt), where no command said more
        print(f"stopped by {stop.name} before the first training step: nothing to keep", file=sys.stderr)
        sys.exit(128 + stop.signum)
    sys.exit(rc if isinstance(rc, int) else 0)


def _own_line(message: str) -> str:
    """A TrainError raised in a DataLoader worker reaches us as torch re-raised it: its line after the worker's
    traceback. Keep the line."""
    lines = message.strip().splitlines()
    prefix = f"{TrainError.__module__}.{TrainError.__qualname__}: "
    if "Original Traceback" in message and lines[-1].startswith(prefix):
        return lines[-1][len(prefix):]
    return message


def setup_distributed() -> tuple[int, int, int, torch.device]:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE (nanoGPT style); plain `python` means one process.

    Returns (rank, local_rank, world_size, device). Backend nccl on CUDA, gloo on CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            _init_process_group("nccl", device_id=device)
        else:
            device = torch.device("cpu")
            _init_process_group("gloo")
        return rank, local_rank, world_size, device
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return 0, 0, 1, device


def _init_process_group(backend: str, **kwargs) -> None:
    """init_process_group from torchrun's environment, the store's keys under this attempt's name. torchrun keeps one
    store server across the restarts of a group (TCPStore sharing): a restarted worker could read the address a
    worker of the killed group published and wait on it for the 30-minute timeout (seen with gloo, torch 2.14)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend, **kwargs)
        return
    store, rank, world_size = next(dist.rendezvous("env://"))
    dist.init_process_group(backend, store=dist.PrefixStore(f"fracgen/attempt-{attempt}", store), rank=rank,
                            world_size=world_size, **kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """Every global random stream, as tensors and plain values only: a checkpoint must load with
    torch.load(weights_only=True), which refuses numpy arrays."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    saved = states["numpy"]
    if isinstance(saved, dict):
        saved = (saved["name"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                 saved["cached_gaussian"])
    np.random.set_state(saved)  # a tuple holding an array: checkpoints written before the dict form
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


CHECKPOINT_FIELDS = {"model_name": str, "model_args": dict, "num_classes": int, "model": dict, "step": int,
                     "config": dict}
RESUME_FIELDS = {"optimizer": dict, "scheduler": dict, "scaler": dict, "rng": list}


# What older checkpoints need beyond tensors and plain values: numpy's RNG state was stored as an array. These
# rebuild an ndarray from its bytes and run nothing else.
LEGACY_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType,
                  (getattr(np, "_core", None) or np.core).multiarray._reconstruct]  # numpy 2 renamed core


def load_checkpoint(path, resume: bool = False, name: Path | None = None) -> dict:
    """A train.pretrain checkpoint, checked once here: every way it can be damaged or foreign is one TrainError
    line. `resume`: it must also hold the optimizer, scheduler, scaler and RNG states. Loaded with
    torch.load(weights_only=True): a pickle that asks for anything but tensors, plain values and LEGACY_GLOBALS is
    refused before any of it runs. `path`: a file, or a binary stream (its bytes already checked), `name` then
    the file it came from, for messages."""
    source = path if hasattr(path, "read") else Path(path)
    path = Path(name) if name is not None else source
    try:
        # catch_warnings: torch warns on stderr about pickle protocols it reads with care; the verdict is ours
        with torch.serialization.safe_globals(LEGACY_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)|but got <class '([^']+)'>", str(e))
        if found:
            raise TrainError(f"{path} is not a fracgen-train pretrain checkpoint: it asks to run "
                             f"{next(g for g in found.groups() if g)} on loading; refused, nothing of it was run"
                             ) from None
        operand = re.search(r"Unsupported operand \d+", str(e))
        raise TrainError(f"{path} is not a fracgen-train pretrain checkpoint (unreadable: not tensors and plain values"
                         f"{': ' + operand.group(0) if operand else ''}; nothing of it was run)") from None
    except Exception as e:  # truncated archives, random bytes, empty files: torch raises them all
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise TrainError(f"{path} is not a fracgen-train pretrain checkpoint (unreadable: {type(e).__name__}"
                         f"{': ' + reason if reason else ''})") from None
    fields = {**CHECKPOINT_FIELDS, **(RESUME_FIELDS if resume else {})}
    if not isinstance(ckpt, dict):
        raise TrainError(f"{path} is not a fracgen-train pretrain checkpoint (it holds a {type(ckpt).__name__})")
    for key, kind in fields.items():
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            raise TrainError(f"{path} is not a fracgen-train pretrain checkpoint ('{key}' is missing or not a "
                             f"{kind.__name__})")
    if not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise TrainError(f"{path} is not a fracgen-train pretrain checkpoint ('model' is not a dict of tensors)")
    return ckpt


def atomic_save(obj, path: Path) -> None:
    """torch.save through fracgen's writer (atomic_write_bytes' rules): a kill mid-write never leaves a truncated
    checkpoint, and no link planted in the folder is written through."""
    atomic_write_bytes(lambda f: torch.save(obj, f), path)


def atomic_write_bytes(write, path: Path) -> None:
    """write(f) into a new temporary file beside `path` (created exclusively: a name planted there, a link
    included, is never opened), fsynced, renamed over `path` (a link there is replaced, not followed). A full disk
    or a lost permission is one TrainError line naming the file (and the free space); the temporary is removed."""
    try:
        atomic_write(Path(path), write)
    except FracgenError as e:
        raise TrainError(str(e)) from None


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write_bytes(lambda f: f.write(text.encode()), path)


def atomic_write_json(obj, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def parse_float_pair(text: str) -> tuple[float, float]:
    """A crop-scale style option, "0.08,1"."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not two comma-separated numbers like 0.08,1") from None
    if not 0 < lo <= hi <= 1:
        raise typer.BadParameter(f"{text!r}: crop area fractions need 0 < min <= max <= 1")
    return lo, hi
