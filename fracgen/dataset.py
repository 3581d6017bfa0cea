"""The 1p-frac dataset: one base fractal, C perturbed classes (LIEP), rendered into shards.

Order of work: (1) the base system, sampled from the seed (or read from a file) and itself
checked for fill; (2) every class's perturbation, redrawn until its image covers more than
`fill` of the canvas, with bounded retries; (3) the shards, rendered in parallel. Every random
draw is keyed by (seed, class, instance, attempt), so the output is the same for any `workers`.

Sample i of the dataset is instance i // C of class i % C, so every shard mixes many classes
even with several images per class.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import isal
import numpy as np
from joblib import Parallel, delayed

import fracgen
from fracgen import png
from fracgen.errors import FracgenError
from fracgen.ifs import (
    IFS,
    PERTURB_MODES,
    check_sigma,
    class_seed,
    perturb,
    sample_sigma_system,
)
from fracgen.lock import LOCK_NAME, FolderLock
from fracgen.render import RENDERER, check_canvas, check_points, render
from fracgen.rng import TAG_BASE, TAG_RENDER, derive_seed
from fracgen.shards import (
    FORMAT_VERSION,
    Sample,
    atomic_write,
    matches,
    read_manifest,
    verify_shard,
    write_shard_unfinished,
)

MANIFEST = "manifest.json"
JOURNAL = ".fracgen-journal.jsonl"  # an unfinished render's record of the shards it finished, one line each
MAX_CLASSES = 100_000
MAX_NAME = 100  # a shard's file name and its tar members' names must stay short
Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class Settings:
    """Everything that determines the bytes of the dataset (`workers` does not)."""

    sigma: float = 3.5
    delta: float = 0.1
    perturb: str = "scale"
    classes: int = 1000
    per_class: int = 1
    maps: int = 2
    points: int = 100_000
    size: int = 512
    pad: int = 6
    fill: float = 0.05
    seed: int = 0
    max_retries: int = 100
    shard_size: int = 100
    name: str = "1p-frac"
    png_level: int = 1  # ISA-L deflate level, 0..3
    base: dict | None = None  # an IFS in JSON form; None samples one from `seed` and `sigma`

    @property
    def num_samples(self) -> int:
        return self.classes * self.per_class

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_name(self, index: int) -> str:
        return f"{self.name}-{index:06d}.tar"


def validate(s: Settings) -> None:
    if s.base is None:
        check_sigma(s.sigma, s.maps)
    if not (np.isfinite(s.delta) and s.delta >= 0):
        raise FracgenError(f"--delta must be >= 0, got {s.delta}")
    if s.perturb not in PERTURB_MODES:
        raise FracgenError(f"--perturb must be one of {', '.join(PERTURB_MODES)}, got {s.perturb!r}")
    for label, value in (("--classes", s.classes), ("--per-class", s.per_class),
                         ("--shard-size", s.shard_size), ("--max-retries", s.max_retries)):
        if value < 1:
            raise FracgenError(f"{label} must be at least 1, got {value}")
    if not 0 <= s.fill < 1:
        raise FracgenError(f"--fill must be in [0, 1), got {s.fill}")
    if s.png_level not in png.LEVELS:
        raise FracgenError(f"--png-level must be one of {', '.join(map(str, png.LEVELS))}, got {s.png_level}")
    if not 0 <= s.seed < 2**64:
        raise FracgenError(f"--seed must be in [0, 2^64) (seeds are 64-bit), got {s.seed}")
    if s.classes > MAX_CLASSES:
        raise FracgenError(f"--classes must be at most {MAX_CLASSES:,} (the manifest holds every class's system; "
                           f"FractalDB-10k has 10,000), got {s.classes:,}")
    if not (re.fullmatch(r"[A-Za-z0-9_-]+", s.name) and len(s.name) <= MAX_NAME):
        raise FracgenError(f"--name must be 1 to {MAX_NAME} letters, digits, '-' and '_', got {s.name[:40]!r}"
                           + ("..." if len(s.name) > 40 else ""))
    check_canvas(s.size, s.pad)
    check_points(s.points)


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


def render_seed(s: Settings, k: int, m: int, attempt: int) -> int:
    return derive_seed(s.seed, TAG_RENDER, k, m, attempt)


def resolve_base(s: Settings) -> dict:
    """The base system and how it was obtained; it must itself pass the fill check."""
    if s.base is not None:
        base = IFS.from_json(s.base)
        _, fill = render(base, derive_seed(s.seed, TAG_BASE, 0), points=s.points, size=s.size, pad=s.pad)
        if fill <= s.fill:
            raise FracgenError(f"the --base system covers only {fill:.3f} of the canvas, not more than "
                               f"--fill {s.fill}; it is degenerate at these settings")
        return {"source": "file", "ifs": base.to_json(), "sigma_drawn": None, "attempt": 0, "fill": fill}
    for attempt in range(s.max_retries):
        base, a = sample_sigma_system(s.sigma, s.maps, derive_seed(s.seed, TAG_BASE, attempt))
        _, fill = render(base, derive_seed(s.seed, TAG_BASE, attempt), points=s.points, size=s.size, pad=s.pad)
        if fill > s.fill:
            return {"source": "sampled", "ifs": base.to_json(), "sigma_drawn": a, "attempt": attempt,
                    "fill": fill}
    raise FracgenError(f"no base system with sigma {s.sigma} covered more than --fill {s.fill} in "
                       f"{s.max_retries} draws from seed {s.seed}; try another --seed or a lower --fill")


def _resolve_classes(s: Settings, base: IFS, ks: range, parent_pid: int) -> tuple[list[dict], dict[int, bytes]]:
    """Accepted perturbations of classes `ks`, and the PNG of each one's instance 0 (the image
    that passed the fill check), kept so the shard writer need not render it again."""
    _watch_parent(parent_pid)
    out, pngs = [], {}
    rows = png.row_buffer(s.size)
    for k in ks:
        for attempt in range(s.max_retries):
            system, noise = perturb(base, s.delta, s.perturb, class_seed(s.seed, k, attempt))
            _, fill = render(system, render_seed(s, k, 0, attempt), points=s.points, size=s.size, pad=s.pad,
                             out=rows)
            if fill > s.fill:
                out.append({"class": k, "attempt": attempt, "noise": noise.tolist(), "fill": fill,
                            "ifs": system.to_json()})
                pngs[k] = png.encode_rows(rows, s.png_level)
                break
        else:
            return [{"class": k, "failed": True}], {}
    return out, pngs


def resolve_classes(s: Settings, base_info: dict, workers: int,
                    progress: Progress | None) -> tuple[list[dict], dict[int, bytes]]:
    """Each class's accepted perturbation (and its instance-0 PNG), found in parallel; fails naming
    the base if a class never passes the fill check."""
    base = IFS.from_json(base_info["ifs"])
    chunk = max(1, min(64, -(-s.classes // (4 * workers))))
    chunks = [range(i, min(i + chunk, s.classes)) for i in range(0, s.classes, chunk)]
    classes: list[dict] = []
    pngs: dict[int, bytes] = {}
    jobs = (delayed(_resolve_classes)(s, base, ks, os.getpid()) for ks in chunks)
    for part, part_pngs in Parallel(n_jobs=workers, return_as="generator_unordered")(jobs):
        if part and part[0].get("failed"):
            where = (f"sampled from seed {s.seed} (attempt {base_info['attempt']})" if base_info["source"] ==
                     "sampled" else "read from --base")
            raise FracgenError(f"class {part[0]['class']}: no perturbation (delta {s.delta}) of the base {where} "
                               f"covered more than --fill {s.fill} in {s.max_retries} tries; the base is "
                               f"degenerate: pick another --seed, a smaller --delta or a lower --fill")
        classes.extend(part)
        pngs.update(part_pngs)
        if progress:
            progress("classes", len(classes), s.classes)
    return sorted(classes, key=lambda c: c["class"]), pngs


def _shard_range(s: Settings, index: int) -> range:
    return range(index * s.shard_size, min((index + 1) * s.shard_size, s.num_samples))


def _shard_samples(s: Settings, classes: dict[int, dict], index: int, cached: dict[int, bytes]):
    rows = png.row_buffer(s.size)
    for i in _shard_range(s, index):
        k, m = i % s.classes, i // s.classes
        c = classes[k]
        seed = render_seed(s, k, m, c["attempt"])
        if m == 0 and k in cached:
            data, fill = cached[k], c["fill"]
        else:
            _, fill = render(IFS.from_json(c["ifs"]), seed, points=s.points, size=s.size, pad=s.pad, out=rows)
            data = png.encode_rows(rows, s.png_level)
        meta = {"class": k, "instance": m, "attempt": c["attempt"], "seed": seed, "fill": fill,
                "perturb": s.perturb, "delta": s.delta, "noise": c["noise"], "ifs": c["ifs"]}
        yield Sample(f"c{k:06d}-i{m:06d}", data, k, meta)


def _write_shard(out: Path, s: Settings, classes: dict[int, dict], index: int, cached: dict[int, bytes],
                 parent_pid: int) -> tuple[int, Path, dict]:
    _watch_parent(parent_pid)
    tmp, entry = write_shard_unfinished(out / s.shard_name(index), _shard_samples(s, classes, index, cached))
    return index, tmp, entry


def _settings_json(s: Settings) -> dict:
    return dataclasses.asdict(s)


def renderer_of(manifest: dict) -> int:
    """The renderer that drew a dataset's images (fracgen 0.1 wrote no number: renderer 1)."""
    return manifest.get("renderer", 1)


def _make_folder(out: Path) -> bool:
    """Create --out if needed; True when this call created it (a failed render then removes it again)."""
    if out.exists() and not out.is_dir():
        raise FracgenError(f"--out {out} exists and is not a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FracgenError(f"cannot create --out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise FracgenError(f"--out {out} is not writable")
    return created


def _prepare_out(out: Path, s: Settings, overwrite: bool, resume: bool) -> dict | None:
    """Check the output folder (this run holds its lock); return the existing manifest when resuming."""
    for tmp in out.glob(f".{s.name}-*.tar.*.tmp"):  # half-written shards of a run that died: nobody else's
        tmp.unlink()
    existing = (out / MANIFEST).exists() or any(out.glob(f"{s.name}-*.tar"))
    if not existing or overwrite:
        return None
    if not resume:
        raise FracgenError(f"{out} already holds a dataset; pass --overwrite to replace it or --resume to finish it")
    if not (out / MANIFEST).exists():
        raise FracgenError(f"cannot --resume: {out} has shards but no {MANIFEST}")
    old = read_manifest(out)
    if renderer_of(old) != RENDERER and not old["complete"]:
        raise FracgenError(f"cannot --resume: {out} was drawn by renderer {renderer_of(old)} "
                           f"(fracgen {old.get('fracgen_version')}), this fracgen draws renderer {RENDERER}, "
                           "whose images differ; use --overwrite")
    if renderer_of(old) == RENDERER and old["settings"] != _settings_json(s):
        diff = [f"{k}={old['settings'].get(k)!r}->{v!r}" for k, v in _settings_json(s).items()
                if old["settings"].get(k) != v]
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
            entry = json.loads(line)
            recorded[entry["file"]] = entry
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return recorded


def _watch_parent(parent_pid: int) -> None:
    """In a worker process: exit at once when the render that started it dies (kill -9 included), instead of
    rendering on for nothing. Files a worker writes are only temporaries; the parent renames them."""
    global _watched
    if _watched == parent_pid or os.getpid() == parent_pid:
        return
    _watched = parent_pid

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="fracgen-parent-watch", daemon=True).start()


_watched: int | None = None


def render_dataset(
    out: str | Path,
    settings: Settings | None = None,
    *,
    workers: int | None = None,
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
    messages (a stale lock taken over, shards repaired); `stats`, if given, gets {"rendered": shards rendered,
    "repaired": names of shards a finished dataset had to have re-rendered}.
    """
    s = dataclasses.replace(settings or Settings(), **overrides)
    validate(s)
    workers = workers or default_workers(s)
    if workers < 1:
        raise FracgenError(f"--workers must be at least 1, got {workers}")
    if overwrite and resume:
        raise FracgenError("--overwrite and --resume exclude each other")
    out = Path(out)
    created = _make_folder(out)
    stats = {} if stats is None else stats
    stats.update(rendered=0, repaired=[])
    try:
        with FolderLock(out, command or "fracgen render", note):
            return _render_locked(out, s, workers, overwrite, resume, command, progress, note, stats)
    except BaseException:
        if created and {p.name for p in out.iterdir()} <= {LOCK_NAME}:  # nothing of ours worth keeping
            (out / LOCK_NAME).unlink(missing_ok=True)
            out.rmdir()
        raise


def _render_locked(out: Path, s: Settings, workers: int, overwrite: bool, resume: bool, command: str | None,
                   progress: Progress | None, note, stats: dict) -> dict:
    old = _prepare_out(out, s, overwrite, resume)
    if old is not None and old["complete"]:
        return _repair_finished(out, s, old, workers, progress, note, stats)
    recorded = _read_journal(out) if old is not None else {}
    if old is not None:
        base_info, classes, pngs = old["base"], old["classes"], {}
    else:
        (out / JOURNAL).unlink(missing_ok=True)
        base_info = resolve_base(s)
        classes, pngs = resolve_classes(s, base_info, workers, progress)
    manifest = {
        "format": "fracgen-shards",
        "format_version": FORMAT_VERSION,
        "fracgen_version": fracgen.__version__,
        "renderer": RENDERER,
        "command": command,
        "complete": False,
        "settings": _settings_json(s),
        "num_classes": s.classes,
        "num_samples": s.num_samples,
        "image": {"size": s.size, "mode": "L", "format": "png", "ink": 127,
                  "encoder": f"fracgen.png (isal {isal.__version__}, level {s.png_level})"},
        "base": base_info,
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
    with open(out / JOURNAL, "a") as journal:
        for index, entry in _render_shards(out, s, classes, pngs, todo, workers):
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
            done[index] = entry
            stats["rendered"] += 1
            if progress:
                progress("shards", len(done), s.num_shards)

    manifest["shards"] = [done[i] for i in range(s.num_shards)]
    manifest["complete"] = True
    _write_manifest(out, manifest)
    (out / JOURNAL).unlink(missing_ok=True)
    keep = {e["file"] for e in manifest["shards"]}
    for stale in out.glob(f"{s.name}-*.tar"):  # left over from an --overwrite'n larger dataset
        if stale.name not in keep:
            stale.unlink()
    return manifest


def _render_shards(out: Path, s: Settings, classes: list[dict], pngs: dict[int, bytes], todo: list[int],
                   workers: int):
    """Render shards `todo` in parallel; yield (index, entry) as each is renamed into place by this process."""
    def cached(index):  # instance-0 images this shard holds, already rendered by the fill check
        return {i: pngs[i] for i in _shard_range(s, index) if i < s.classes and i in pngs}

    def needed(index):  # only the classes a shard holds travel to its worker (all of them made the
        # parent pickle ~0.5 MB per shard at 1000 classes, which capped the speed-up of 2 workers at 1.2x)
        return {k: classes[k] for k in sorted({i % s.classes for i in _shard_range(s, index)})}

    jobs = (delayed(_write_shard)(out, s, needed(index), index, cached(index), os.getpid()) for index in todo)
    for index, tmp, entry in Parallel(n_jobs=min(workers, max(1, len(todo))), return_as="generator_unordered")(jobs):
        os.replace(tmp, out / entry["file"])
        yield index, entry


def _repair_finished(out: Path, s: Settings, manifest: dict, workers: int, progress, note, stats: dict) -> dict:
    """--resume on a finished dataset: check every shard against the manifest; re-render the ones that differ,
    which must come out as the recorded bytes. The manifest itself is left as it is."""
    bad = [i for i, entry in enumerate(manifest["shards"]) if not matches(out / entry["file"], entry)]
    if progress:
        progress("check", len(manifest["shards"]), len(manifest["shards"]))
    if not bad:
        return manifest
    names = ", ".join(manifest["shards"][i]["file"] for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
    if renderer_of(manifest) != RENDERER:
        raise FracgenError(f"{len(bad)} shard(s) of {out} do not match its manifest ({names}) and were drawn by "
                           f"renderer {renderer_of(manifest)}, which this fracgen cannot draw again; use --overwrite")
    s = dataclasses.replace(s, **{k: v for k, v in manifest["settings"].items() if k in Settings.__dataclass_fields__})
    classes = {c["class"]: c for c in manifest["classes"]}
    jobs = (delayed(_write_shard)(out, s, {k: classes[k] for k in {i % s.classes for i in _shard_range(s, index)}},
                                  index, {}, os.getpid()) for index in bad)
    for index, tmp, entry in Parallel(n_jobs=min(workers, len(bad)), return_as="generator_unordered")(jobs):
        recorded = manifest["shards"][index]
        if (entry["bytes"], entry["sha256"]) != (recorded["bytes"], recorded["sha256"]):
            tmp.unlink(missing_ok=True)
            raise FracgenError(f"re-rendering {entry['file']} gave other bytes than {out / MANIFEST} records: the "
                               "folder was written by another fracgen or edited; use --overwrite")
        os.replace(tmp, out / entry["file"])
        stats["repaired"].append(entry["file"])
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


def verify_dataset(out: str | Path, progress: Progress | None = None) -> list[str]:
    """Problems found (shard name: reason); empty when every shard matches the manifest."""
    out = Path(out)
    manifest = read_manifest(out)
    problems = []
    if not manifest.get("complete"):
        problems.append(f"{MANIFEST}: the render did not finish (run `fracgen render --resume`)")
    shards = manifest["shards"]
    for n, entry in enumerate(shards):
        problem = verify_shard(out / entry["file"], entry, manifest["num_classes"])
        if problem:
            problems.append(f"{entry['file']}: {problem}")
        if progress:
            progress("verify", n + 1, len(shards))
    total = sum(e["samples"] for e in shards)
    if manifest.get("complete") and total != manifest["num_samples"]:
        problems.append(f"{MANIFEST}: shards hold {total} samples, num_samples says {manifest['num_samples']}")
    return problems
