"""Where `--shards` points: a local folder, used as it is, or a published one (an http(s) URL or hf://datasets/...)
pulled once into a cache folder named by its manifest's sha256. Training then reads only local files that
`fracgen pull` has checked against the manifest: no unverified byte reaches the model.

On several ranks, local rank 0 of each node pulls while the node's other ranks wait; every rank then learns every
outcome, so a failed pull stops all of them with its one line instead of leaving them at a barrier.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from fracgen import share
from fracgen.dataset import MANIFEST
from fracgen.errors import FracgenError
from fracgen.lock import FolderBusy
from fracgen.manifest import read_manifest
from fracgen.shards import file_sha256, matches
from fracgen.untrusted import printable, read_json, redact

from .runtime import TrainError

LOCK_WAIT = 3600.0  # seconds to wait for another job on this node that is pulling the same data set


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/fracgen, else ~/.cache/fracgen."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fracgen"


def resolve_shards(spec: str, cache_dir: str | Path | None = None, local_rank: int = 0,
                   log: Callable[[str], None] = print) -> Path:
    """The local shard folder for `--shards spec`; pulls a remote source into the cache first (see module doc)."""
    if not share.is_remote(spec):
        return Path(spec)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    outcome = _pull_into_cache(spec, cache, log) if local_rank == 0 else None
    if dist.is_available() and dist.is_initialized():
        # A collective is a barrier: the other ranks wait here while each node's local rank 0 pulls.
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, outcome)
    else:
        outcomes = [outcome]
    outcomes = [o for o in outcomes if o is not None]
    for status, text, _ in outcomes:
        if status == "error":
            raise TrainError(text)
    host = socket.gethostname()  # the folder this node's local rank 0 pulled
    return cache / next((text for _, text, where in outcomes if where == host), outcomes[0][1])


def _pull_into_cache(spec: str, cache: Path, log) -> tuple[str, str, str]:
    """("ok", the cache folder's name, host) or ("error", one line, host)."""
    t0 = time.time()
    shown = redact(spec)  # what the log and the lock show: no password or signed query of the URL
    try:
        source = share.open_source(spec)
        try:
            remote = share.fetch_manifest(source, note=lambda text: log(f"note: {printable(text)}"))
        except FracgenError as e:
            copy = cached_copy(cache, redact(source.spec))
            if copy is None:
                raise
            folder, pulled, count = copy
            log(f"note: {shown} cannot be read now ({printable(e)}); training from its copy in {folder}, pulled "
                f"{pulled}: its manifest and all {count} shards checked by sha256")
            return "ok", folder.name, socket.gethostname()
        folder = cache / remote.sha256
        waited = False
        while True:
            try:
                result = share.pull(source, folder, remote=remote, note=lambda text: log(f"note: {printable(text)}"),
                                    command=f"fracgen-train pretrain --shards {shown}")
                break
            except FolderBusy as e:  # another job on this node is pulling the same data set: let it finish
                if time.time() - t0 > LOCK_WAIT:
                    raise
                if not waited:
                    log(f"shards: waiting: {e}")
                    waited = True
                time.sleep(2)
    except FracgenError as e:
        return "error", printable(f"--shards {shown}: {e}"), socket.gethostname()
    if result.fetched:
        log(f"shards: pulled {len(result.fetched)} shards ({result.fetched_bytes / 1e6:.1f} MB) from {shown} into "
            f"{folder} in {time.time() - t0:.1f} s")
    else:
        log(f"shards: found in cache {folder} (all {result.kept} shards checked by sha256 against {shown}'s manifest; "
            "nothing fetched)")
    return "ok", remote.sha256, socket.gethostname()


def cached_copy(cache: Path, source: str) -> tuple[Path, str, int] | None:
    """The newest finished pull of `source` (as its source.json records it, secrets left out) in `cache` whose
    manifest still has the sha256 that names its folder and whose shards all have their recorded size and sha256:
    (folder, when it was pulled, shard count). For a run that starts again (a requeued job, a restarted pod) while
    the server is down: the bytes are the ones it trained on, or it is not used."""
    found = []
    for record_path in cache.glob(f"*/{share.SOURCE_FILE}"):
        try:
            record = read_json(record_path, max_bytes=1 << 16)
        except (OSError, FracgenError):
            continue
        folder = record_path.parent
        if (isinstance(record, dict) and record.get("source") == source and isinstance(record.get("finished"), str)
                and record.get("manifest_sha256") == folder.name):
            found.append((record["finished"], folder))
    for finished, folder in sorted(found, reverse=True):
        try:
            if file_sha256(folder / MANIFEST)[0] != folder.name:
                continue
            manifest = read_manifest(folder)
        except (OSError, FracgenError):
            continue
        if manifest.get("complete") and all(matches(folder / e["file"], e) for e in manifest["shards"]):
            return folder, finished, len(manifest["shards"])
    return None
