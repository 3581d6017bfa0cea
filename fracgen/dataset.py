"""The shard writer every data system shares: manifest, shards, resume, repair, verify, one writer per folder.

Order of work: (1) the system draws its classes from the seed (`System.resolve`, in parallel where it searches);
(2) the shards, rendered in parallel, each sample drawn by `System.draw`. Every random draw is keyed by (seed,
class, instance, attempt), so the output is the same for any `workers`.

Sample i of the dataset is instance i // C of class i % C, so every shard mixes many classes
even with several images per class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import isal
import numpy as np

from fracgen import interrupt, png
from fracgen.errors import FracgenError
from fracgen.lock import writing_folder
from fracgen.manifest import (  # noqa: F401 (API)
    FORMAT_VERSION,
    check_card,
    check_timm_info,
    other_renderer,
    read_manifest,
    remove_published_files,
    renderer_of,
    write_readers_files,
    write_timm_info,
)
from fracgen.render import RENDERER
from fracgen.settings import MAX_CLASSES, MAX_NAME, Settings, render_seed, validate_common  # noqa: F401 (API)
from fracgen.shards import (
    Sample,
    atomic_write,
    matches,
    shard_in_memory,
    verify_shard,
    write_bytes_unfinished,
    write_shard_unfinished,
)
from fracgen.systems import get_system, image_of, used_settings, validate  # noqa: F401 (API)
from fracgen.untrusted import parse_json
from fracgen.version import __version__
from fracgen.workers import PROBE_PREFIX, LocalPool, Probe, sees_folder

MANIFEST = "manifest.json"
JOURNAL = ".fracgen-journal.jsonl"  # an unfinished render's record of the shards it finished, one line each
Progress = Callable[[str, int, int], None]  # (phase, done, total)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


IMAGES_PER_WORKER = 2000  # starting a worker process costs ~1 s: the time one core renders ~2000 images


def default_workers(s: Settings) -> int:
    """All cores for big renders; fewer for small ones, whose worker start-up would cost more than the
    extra cores save (the 1000-image 1p-frac set: 1.1 s on one worker, 2.0 s on two)."""
    return max(1, min(available_cores(), s.num_samples // IMAGES_PER_WORKER))


def _shard_range(s: Settings, index: int) -> range:
    return range(index * s.shard_size, min((index + 1) * s.shard_size, s.num_samples))


def _shard_samples(s: Settings, header: dict, classes: dict[int, dict], index: int, cached: dict[int, bytes]):
    system = get_system(s.system)
    state = system.prepare(s, header)
    rows = png.row_buffer(s.size)
    for i in _shard_range(s, index):
        k, m = i % s.classes, i // s.classes
        if i in cached:  # drawn already when the class was searched: the same bytes, not drawn twice
            meta, data = system.draw(s, header, state, classes[k], k, m, None), cached[i]
        else:
            meta, data = system.draw(s, header, state, classes[k], k, m, rows), png.encode_rows(rows, s.png_level)
        yield Sample(f"c{k:06d}-i{m:06d}", data, k, meta)


def _write_shard(out: Path, s: Settings, header: dict, classes: dict[int, dict], index: int,
                 cached: dict[int, bytes], probe: Probe | None) -> tuple[int, Path | bytes, dict]:
    """One shard job, in a worker: the shard under a temporary name in `out`, or its bytes for a cluster worker
    that does not see `out`; either way the render process renames it into place (`_unfinished`)."""
    samples = _shard_samples(s, header, classes, index, cached)
    if sees_folder(out, probe):
        tmp, entry = write_shard_unfinished(out / s.shard_name(index), samples)
        return index, tmp, entry
    data, entry = shard_in_memory(s.shard_name(index), samples)
    return index, data, entry


def _unfinished(out: Path, result: tuple[int, Path | bytes, dict]) -> tuple[int, Path, dict]:
    """A shard job's result as a temporary file in `out` (the bytes a worker sent are written here)."""
    index, tmp, entry = result
    if isinstance(tmp, bytes):
        tmp = write_bytes_unfinished(out / entry["file"], tmp, entry)
    return index, tmp, entry


def _remove_temporaries(out: Path, s: Settings) -> None:
    """Half-written shards of a run that died, or of a cluster job that ran again after its worker was lost: nobody
    else's (this run holds the folder)."""
    for tmp in out.glob(f".{s.name}-*.tar.*.tmp"):
        tmp.unlink(missing_ok=True)


def settings_of(manifest: dict) -> Settings:
    """A manifest's settings (older manifests lack the fields added since: they had their defaults)."""
    known = {k: v for k, v in manifest["settings"].items() if k in Settings.__dataclass_fields__}
    return Settings(**known)


def render_sample(manifest: dict, k: int, m: int) -> tuple[np.ndarray, dict]:
    """Instance m of class k of the dataset `manifest` describes, drawn alone: the image (uint8, size x size),
    bit for bit the one in its shards for m < per_class and a fresh, seeded instance beyond, and its `.json`.
    The one public way to the renderer for code that consumes data (the trainer's on-the-fly source)."""
    s = settings_of(manifest)
    if other_renderer(manifest):
        raise FracgenError(f"this dataset was {other_renderer(manifest)}: its samples cannot be drawn again")
    if not 0 <= k < s.classes or m < 0:
        raise FracgenError(f"no sample: class {k} of {s.classes}, instance {m}")
    system = get_system(s.system)
    rows = png.row_buffer(s.size)
    meta = system.draw(s, manifest["base"], system.prepare(s, manifest["base"]), manifest["classes"][k], k, m, rows)
    return image_of(rows).copy(), meta


def _settings_json(s: Settings) -> dict:
    return dataclasses.asdict(s)


def _same_settings(old: dict, s: Settings) -> list[str]:
    """The settings that differ from an earlier run's (fields it predates count as their defaults)."""
    before = {**dataclasses.asdict(Settings(system=old.get("system", "1p-frac"))), **old}
    return [f"{k}={before.get(k)!r}->{v!r}" for k, v in _settings_json(s).items() if before.get(k) != v]


def _prepare_out(out: Path, s: Settings, overwrite: bool, resume: bool) -> dict | None:
    """Check the output folder (this run holds its lock); return the existing manifest when resuming."""
    _remove_temporaries(out, s)
    for probe in out.glob(f"{PROBE_PREFIX}*"):  # left by a cluster render that died
        probe.unlink(missing_ok=True)
    existing = (out / MANIFEST).exists() or any(out.glob(f"{s.name}-*.tar"))
    if existing and overwrite:
        remove_published_files(out)  # the old data set's card, sums and preview would describe other data
    if not existing or overwrite:
        return None
    if not resume:
        raise FracgenError(f"{out} already holds a dataset; pass --overwrite to replace it or --resume to finish it")
    if not (out / MANIFEST).exists():
        raise FracgenError(f"cannot --resume: {out} has shards but no {MANIFEST}")
    old = read_manifest(out)
    if other_renderer(old) and not old["complete"]:
        raise FracgenError(f"cannot --resume: {out} was {other_renderer(old)}; use --overwrite")
    diff = _same_settings(old["settings"], s)
    if not other_renderer(old) and diff:
        raise FracgenError(f"cannot --resume with different settings ({', '.join(diff)}); use --overwrite")
    return old


def _read_journal(out: Path) -> dict[str, dict]:
    """The shards an unfinished run recorded as finished (a torn last line, from a kill mid-write, is skipped)."""
    recorded = {}
    try:
        lines = (out / JOURNAL).read_text().splitlines()
    except FileNotFoundError:
        return recorded
    for line in lines:
        try:
            entry = parse_json(line, JOURNAL)
            recorded[entry["file"]] = entry
        except (FracgenError, KeyError, TypeError):
            continue
    return recorded


def render_dataset(
    out: str | Path,
    settings: Settings | None = None,
    *,
    workers: int | None = None,
    backend: str | None = None,
    scheduler: object = None,
    overwrite: bool = False,
    resume: bool = False,
    command: str | None = None,
    progress: Progress | None = None,
    note: Callable[[str], None] | None = None,
    stats: dict | None = None,
    **overrides,
) -> dict:
    """Render a dataset into `out` and return its manifest. `overrides` replace fields of `settings`.

    One writer per folder: the run holds `out`'s lock throughout (FolderLock). With `resume`, a shard already on
    disk is kept only when its size and sha256 are those recorded for it (by the finished manifest, or by the
    unfinished run's journal); anything else is rendered again. A finished dataset is never rewritten: shards that
    no longer match it are re-rendered and must come out with the recorded bytes. `note` receives one-line
    messages (a stale lock taken over, shards repaired, the cluster's workers); `stats`, if given, gets
    {"rendered": shards rendered, "repaired": names of shards a finished dataset had to have re-rendered}.

    Where the jobs run: `backend` "local" (the default) in `workers` processes on this machine; "dask" on the
    workers of the Dask cluster whose scheduler is `scheduler` (an address, a `distributed.Client`, or None for
    the address in DASK_SCHEDULER_ADDRESS); giving a `scheduler` implies "dask". Same bytes either way.
    """
    s = dataclasses.replace(settings or Settings(), **overrides)
    validate(s)
    if overwrite and resume:
        raise FracgenError("--overwrite and --resume exclude each other")
    backend = backend or ("dask" if scheduler is not None else "local")
    if backend == "local":
        if scheduler is not None:
            raise FracgenError("--scheduler needs --backend dask")
        workers = workers or default_workers(s)
        if workers < 1:
            raise FracgenError(f"--workers must be at least 1, got {workers}")
        pool = LocalPool(workers)
    elif backend == "dask":
        if workers:
            raise FracgenError("--workers is for --backend local; a Dask cluster renders on all its workers "
                               "(start them with `dask worker --nworkers N`)")
        from fracgen import cluster

        pool = cluster.connect(scheduler)  # before anything is created: an unreachable scheduler leaves no trace
    else:
        raise FracgenError(f"--backend must be local or dask, got {backend!r}")
    out = Path(out)
    stats = {} if stats is None else stats
    stats.update(rendered=0, repaired=[])
    with interrupt.recorded(), contextlib.closing(pool), writing_folder(out, command or "fracgen render", note,
                                                                        name=f"--out {out}"):
        try:
            return _render_locked(out, s, pool, overwrite, resume, command, progress, note, stats)
        finally:
            pool.close()  # a cluster's probe file goes while the folder is still this run's


def _render_locked(out: Path, s: Settings, pool, overwrite: bool, resume: bool, command: str | None,
                   progress: Progress | None, note, stats: dict) -> dict:
    old = _prepare_out(out, s, overwrite, resume)
    where = pool.attach(out)
    if where and note:
        note(where)
    if old is not None and old["complete"]:
        return _repair_finished(out, s, old, pool, progress, note, stats)
    recorded = _read_journal(out) if old is not None else {}
    if old is not None:
        header, classes, pngs = old["base"], old["classes"], {}
    else:
        (out / JOURNAL).unlink(missing_ok=True)
        header, classes, pngs = get_system(s.system).resolve(s, pool, progress)
    manifest = {
        "format": "fracgen-shards",
        "format_version": FORMAT_VERSION,
        "fracgen_version": __version__,
        "renderer": RENDERER,
        "system": s.system,
        "command": command,
        "complete": False,
        "settings": _settings_json(s),
        "num_classes": s.classes,
        "num_samples": s.num_samples,
        "image": {"size": s.size, "mode": "L", "format": "png", "ink": 127,
                  "encoder": f"fracgen.png (isal {isal.__version__}, level {s.png_level})"},
        "base": header,
        "classes": classes,
        "shards": [],
    }
    _write_manifest(out, manifest)

    done: dict[int, dict] = {}
    for index in range(s.num_shards):
        entry = recorded.get(s.shard_name(index))
        if entry is not None and matches(out / entry["file"], entry):
            done[index] = entry  # finished by the earlier run, and still the bytes it recorded
    todo = [i for i in range(s.num_shards) if i not in done]
    if progress:
        progress("shards", len(done), s.num_shards)
    # closing(): an error or Ctrl-C here stops the jobs still running now, not when the traceback is freed
    with open(out / JOURNAL, "a") as journal, contextlib.closing(
            _render_shards(out, s, header, classes, pngs, todo, pool)) as shards:
        for index, entry in shards:
            try:
                journal.write(json.dumps(entry) + "\n")
                journal.flush()
                os.fsync(journal.fileno())
            except OSError as e:  # a full disk: say which file (the error itself names none)
                raise FracgenError(f"cannot write {out / JOURNAL}: {e.strerror or e}") from None
            done[index] = entry
            stats["rendered"] += 1
            if progress:
                progress("shards", len(done), s.num_shards)

    manifest["shards"] = [done[i] for i in range(s.num_shards)]
    manifest["complete"] = True
    _write_manifest(out, manifest)
    write_readers_files(out, manifest)
    (out / JOURNAL).unlink(missing_ok=True)
    _remove_temporaries(out, s)
    keep = {e["file"] for e in manifest["shards"]}
    for stale in out.glob(f"{s.name}-*.tar"):  # left over from an --overwrite'n larger dataset
        if stale.name not in keep:
            stale.unlink()
    return manifest


def _needed(s: Settings, classes: list[dict] | dict[int, dict], index: int) -> dict[int, dict]:
    """Only the classes a shard holds travel to its worker (all of them made the parent pickle ~0.5 MB per shard
    at 1000 classes, which capped the speed-up of 2 workers at 1.2x)."""
    return {k: classes[k] for k in sorted({i % s.classes for i in _shard_range(s, index)})}


def _render_shards(out: Path, s: Settings, header: dict, classes: list[dict], pngs: dict[int, bytes],
                   todo: list[int], pool):
    """Render shards `todo` on the pool; yield (index, entry) as each is renamed into place by this process."""
    def cached(index):  # samples this shard holds that the class search drew already
        return {i: pngs[i] for i in _shard_range(s, index) if i in pngs}

    jobs = [(out.absolute(), s, header, _needed(s, classes, index), index, cached(index), pool.probe)
            for index in todo]
    with contextlib.closing(pool.map_unordered(_write_shard, jobs)) as results:
        for result in results:
            index, tmp, entry = _unfinished(out, result)
            interrupt.check()  # a Ctrl-C that a finalizer swallowed still stops the render before this rename
            os.replace(tmp, out / entry["file"])
            yield index, entry


def _repair_finished(out: Path, s: Settings, manifest: dict, pool, progress, note, stats: dict) -> dict:
    """--resume on a finished dataset: check every shard against the manifest; re-render the ones that differ,
    which must come out as the recorded bytes. The manifest itself is left as it is."""
    bad = [i for i, entry in enumerate(manifest["shards"]) if not matches(out / entry["file"], entry)]
    if progress:
        progress("check", len(manifest["shards"]), len(manifest["shards"]))
    if not bad:
        write_readers_files(out, manifest)  # a folder from before fracgen wrote them gets them here, nothing redrawn
        return manifest
    names = ", ".join(manifest["shards"][i]["file"] for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
    if other_renderer(manifest):
        raise FracgenError(f"{len(bad)} shard(s) of {out} do not match its manifest ({names}); the data set was "
                           f"{other_renderer(manifest)}, so they cannot be drawn again; use --overwrite")
    s = settings_of(manifest)
    classes = {c["class"]: c for c in manifest["classes"]}
    jobs = [(out.absolute(), s, manifest["base"], _needed(s, classes, index), index, {}, pool.probe) for index in bad]
    with contextlib.closing(pool.map_unordered(_write_shard, jobs)) as results:
        for result in results:
            index, tmp, entry = _unfinished(out, result)
            recorded = manifest["shards"][index]
            if (entry["bytes"], entry["sha256"]) != (recorded["bytes"], recorded["sha256"]):
                tmp.unlink(missing_ok=True)
                raise FracgenError(f"re-rendering {entry['file']} gave other bytes than {out / MANIFEST} records: "
                                   "the folder was written by another fracgen or edited; use --overwrite")
            interrupt.check()
            os.replace(tmp, out / entry["file"])
            stats["repaired"].append(entry["file"])
    _remove_temporaries(out, s)
    write_readers_files(out, manifest)
    if note:
        note(f"re-rendered {len(bad)} shard(s) that did not match the manifest: {names}")
    return manifest


def manifest_text(manifest: dict) -> str:
    """The manifest as JSON with one line per key, class and shard: readable and diffable, and
    written by the C encoder (`indent=` switches json to its Python encoder, which took 0.4 ms per
    class: most of a 2,000-image render's run time)."""
    lines = []
    for key, value in manifest.items():
        if isinstance(value, list) and value:
            items = ",\n  ".join(json.dumps(v) for v in value)
            lines.append(f" {json.dumps(key)}: [\n  {items}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _write_manifest(out: Path, manifest: dict) -> None:
    text = manifest_text(manifest).encode()
    atomic_write(out / MANIFEST, lambda f: f.write(text))


def verify_dataset(out: str | Path, progress: Progress | None = None, card: bool = True) -> list[str]:
    """Problems found (shard name: reason); empty when every shard matches the manifest. With `card`, the dataset
    card's configs too (`check_card`; `publish` writes the card again, so it passes False)."""
    out = Path(out)
    manifest = read_manifest(out)
    problems = []
    if not manifest.get("complete"):
        problems.append(f"{MANIFEST}: the render did not finish (run `fracgen render --resume`)")
    shards = manifest["shards"]
    for n, entry in enumerate(shards):
        problem = verify_shard(out / entry["file"], entry, manifest["num_classes"], manifest["image"]["size"],
                               n * manifest["settings"]["shard_size"])
        if problem:
            problems.append(f"{entry['file']}: {problem}")
        if progress:
            progress("verify", n + 1, len(shards))
    total = sum(e["samples"] for e in shards)
    if manifest.get("complete") and total != manifest["num_samples"]:
        problems.append(f"{MANIFEST}: shards hold {total} samples, num_samples says {manifest['num_samples']}")
    for problem in (check_timm_info(out, manifest), check_card(out, manifest) if card else None):
        if problem:
            problems.append(problem)
    return problems
