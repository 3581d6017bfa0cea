"""`fracgen`: the command line. It only parses, reports and turns FracgenError into one red line."""

from __future__ import annotations

import json
import shlex
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from fracgen.dataset import Settings, render_dataset, used_settings, verify_dataset
from fracgen.errors import FracgenError
from fracgen.ifs import IFS, load_base
from fracgen.manifest import other_renderer, read_manifest, renderer_of
from fracgen.preview import contact_sheet
from fracgen.shards import atomic_write
from fracgen.share import JOBS, MAX_JOBS, RATE_WINDOW, Limits
from fracgen.share import publish as publish_folder
from fracgen.share import pull as pull_folder
from fracgen.systems import SYSTEMS
from fracgen.untrusted import printable
from fracgen.version import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Render synthetic pre-training data (1p-frac, FractalDB, one real image, noise) "
                       "into WebDataset shards.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
D = Settings()  # defaults shown in --help come from the library


def _print_version(value: bool) -> None:
    if value:
        out.print(f"fracgen {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the version and exit.")] = False):
    """Eager, so that `fracgen --version` needs no command."""


@contextmanager
def _errors(interrupted: str = "finished shards are kept, `--resume` completes the rest"):
    try:
        yield
    except FracgenError as e:
        _error(str(e))
        raise typer.Exit(1) from None
    except OSError as e:  # disk full, permissions: still one line, never a traceback
        _error(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print(f"[bold red]interrupted[/]; {interrupted}")
        raise typer.Exit(130) from None


def _say(console: Console, text: object, prefix: str = "") -> None:
    """Print one line whose text may come from files or servers: shown as it is (`printable`), markup escaped."""
    console.print(prefix + escape(printable(text)), highlight=False, soft_wrap=True)


def _error(text: object) -> None:
    _say(err, text, "[bold red]error:[/] ")


@contextmanager
def _bars(progress: Progress):
    """`with _bars(_progress()) as bar:`; when the block fails, the bar goes and the error line takes its place
    (rich's Progress ends with an empty line when stderr is not a terminal: it came before every such error)."""
    with progress:
        try:
            yield progress
        except BaseException:
            progress.live.transient = True
            progress.live.stop()
            progress.disable = True  # Progress.stop then prints nothing more
            raise


def _progress(transient: bool = False):
    return Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=transient)


def _byte_progress():
    # transient: the summary line (or the one error line) replaces the bar; none at all in a log file
    return Progress(TextColumn("{task.description:>8}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)


def _note(text: str) -> None:
    _say(err, text, "note: ")


def _command(s: Settings, out_dir: Path, base: Path | None) -> str:
    """The full command that regenerates these bytes: every setting the system uses spelled out, whatever was
    typed."""
    args = ["fracgen", "render", "--out", str(out_dir)]
    for field, value in used_settings(s).items():
        if field == "base":
            args += ["--base", str(base)] if base is not None else []
        elif value is not None:
            args += [f"--{field.replace('_', '-')}", str(value)]
    return shlex.join(args)


@app.command()
def render(
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory for the shards and manifest.json.")],
    system: Annotated[str, typer.Option(help=f"Data system: {', '.join(SYSTEMS)} ("
                                             + "; ".join(f"{k}: {v.summary}" for k, v in SYSTEMS.items())
                                             + ").")] = D.system,
    sigma: Annotated[float, typer.Option(help="Sigma-factor of the base IFS (smaller: more complex); fractaldb: "
                                              "of every class's IFS.")] = D.sigma,
    delta: Annotated[float, typer.Option(help="Perturbation size Delta of the classes (1p-frac, real).")] = D.delta,
    perturb: Annotated[str, typer.Option(help="scale: coef x U(1-D, 1+D) (reference code); "
                                              "shift: coef + U(-D/2, D/2) (paper text).")] = D.perturb,
    classes: Annotated[int, typer.Option(help="Number of perturbation classes C.")] = D.classes,
    per_class: Annotated[int, typer.Option(help="Images per class.")] = D.per_class,
    maps: Annotated[int, typer.Option(help="Affine maps N in the base IFS.")] = D.maps,
    points: Annotated[int, typer.Option(help="Chaos-game points per image.")] = D.points,
    size: Annotated[int, typer.Option(help="Canvas side in pixels.")] = D.size,
    pad: Annotated[int, typer.Option(help="Padding around the attractor in pixels.")] = D.pad,
    fill: Annotated[float, typer.Option(help="A class image must ink more than this fraction of pixels.")] = D.fill,
    seed: Annotated[int, typer.Option(help="Seed of everything: base, perturbations, renders.")] = D.seed,
    base: Annotated[Path | None, typer.Option(help="Read the base IFS from JSON (an IFS or a fracgen "
                                                   "manifest.json) instead of sampling it.")] = None,
    bases: Annotated[int, typer.Option(help="1p-frac: base fractals, each perturbed into classes / bases classes "
                                            "(1: the paper's 1p-frac).")] = D.bases,
    max_retries: Annotated[int, typer.Option(help="Draws allowed per class (and for the base) to pass --fill.")]
    = D.max_retries,
    shard_size: Annotated[int, typer.Option(help="Samples per shard.")] = D.shard_size,
    name: Annotated[str, typer.Option(help="Shard file prefix: NAME-000000.tar (default: the system's name).")]
    = "",
    search: Annotated[str, typer.Option(help="fractaldb: find class systems by the sigma-factor (sigma) or by "
                                             "FractalDB's filling-rate search (filling).")] = D.search,
    image: Annotated[Path | None, typer.Option(help="real: the image (default: scikit-learn's china.jpg).")]
    = None,
    image_mode: Annotated[str, typer.Option(help="real: gray or edges (Sobel magnitude).")] = D.image_mode,
    noise: Annotated[str, typer.Option(help="noise: gaussian or uniform.")] = D.noise,
    png_level: Annotated[int, typer.Option(help="PNG deflate level 0..3 (ISA-L; lossless at every level).")]
    = D.png_level,
    workers: Annotated[int, typer.Option(help="Parallel processes (default: all cores, but no more than one per "
                                              "2000 images: a worker takes ~1 s to start).")] = 0,
    # help texts are rich markup: a [word] would vanish unless escaped
    backend: Annotated[str, typer.Option(help="local: processes on this machine; dask: the workers of a Dask "
                                              "cluster (--scheduler, or DASK_SCHEDULER_ADDRESS), with the dask "
                                              "extra: pip install 'fracgen\\[dask]'.")] = "",
    scheduler: Annotated[str, typer.Option(help="Address of a Dask scheduler, e.g. tcp://HOST:8786 (implies "
                                                "--backend dask).")] = "",
    overwrite: Annotated[bool, typer.Option(help="Replace a dataset already in --out.")] = False,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted render: write only missing shards.")] = False,
):
    """Render a data system (by default 1p-frac: perturbed copies of one fractal) into WebDataset shards, with
    every parameter saved."""
    with _errors():
        base_json = load_base(base).to_json() if base is not None else None
        settings = Settings(system=system, sigma=sigma, delta=delta, perturb=perturb, classes=classes,
                            per_class=per_class, maps=maps, points=points, size=size, pad=pad, fill=fill, seed=seed,
                            max_retries=max_retries, shard_size=shard_size, name=name, png_level=png_level,
                            base=base_json, bases=bases, search=search, image=str(image) if image else None,
                            image_mode=image_mode, noise=noise)
        t0 = time.perf_counter()
        stats: dict = {}
        with _bars(_progress()) as bar:
            tasks = {}

            def report(phase, done, total):
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase, total=total)
                bar.update(tasks[phase], completed=done)

            manifest = render_dataset(out_dir, settings, workers=workers or None, backend=backend or None,
                                      scheduler=scheduler or None, overwrite=overwrite, resume=resume,
                                      progress=report, note=_note,
                                      stats=stats, command=_command(settings, out_dir, base))
        dt = time.perf_counter() - t0
        total = sum(e["bytes"] for e in manifest["shards"])
        if not stats["rendered"]:
            repaired = f", {len(stats['repaired'])} shard(s) re-rendered" if stats["repaired"] else ""
            _say(err, f"{out_dir} is complete (renderer {renderer_of(manifest)}, fracgen "
                 f"{manifest['fracgen_version']}){repaired}: every shard matches the manifest")
            if other_renderer(manifest):  # kept as it is: make pretrain must not redraw a user's data
                _say(err, f"note: {out_dir} was {other_renderer(manifest)}: kept as it is; --overwrite redraws it")
            return
        n = len(manifest["shards"])
        what = f"{manifest['num_samples']} samples in {n} shards" if stats["rendered"] == n else \
            f"{stats['rendered']} of {n} shards ({manifest['num_samples']} samples in all)"
        _say(err, f"wrote {what} ({total / 1e6:.1f} MB) to {out_dir} in {dt:.1f} s")


@app.command()
def verify(dataset: Annotated[Path, typer.Argument(help="Directory with manifest.json and shards.")]):
    """Re-hash every shard against the manifest and decode every sample."""
    with _errors():
        with _bars(_progress()) as bar:
            task = bar.add_task("verify")
            problems = verify_dataset(dataset, lambda _, done, total: bar.update(task, completed=done, total=total))
        if problems:
            for p in problems:
                _error(p)
            raise typer.Exit(1)
        _say(out, f"ok: {dataset} matches its manifest")


@app.command()
def info(
    dataset: Annotated[Path, typer.Argument(help="Directory with manifest.json and shards.")],
    score_at: Annotated[list[int] | None, typer.Option(help="Also `fracgen score`'s measures at this training "
                                                            "resolution in px (repeatable; renders 2 images a "
                                                            "class).")] = None,
):
    """Summarise a dataset: settings, base system, shards."""
    with _errors():
        m = read_manifest(dataset)
        s, b = m["settings"], m["base"]
        system = s.get("system", "1p-frac")
        t = Table(title=escape(printable(dataset)), show_header=False)
        rows = [
            ("fracgen", f"{m['fracgen_version']} (format {m['format_version']}, renderer {renderer_of(m)})"),
            ("system", f"{system}: {SYSTEMS[system].summary}"),
            ("complete", str(m["complete"])),
            ("command", m.get("command") or "-"),
            ("samples", f"{m['num_samples']} = {m['num_classes']} classes x {s['per_class']}"),
            ("shards", f"{len(m['shards'])} x <= {s['shard_size']} samples, "
                       f"{sum(e['bytes'] for e in m['shards']) / 1e6:.1f} MB"),
            ("image", f"{s['size']} px, PNG level {s['png_level']}"
                      + (f", {s['points']} points, pad {s['pad']}" if "points" in SYSTEMS[system].uses else "")),
        ]
        if system == "1p-frac":
            drawn = f"{b['sigma_drawn']:.4f}" if isinstance(b.get("sigma_drawn"), (int, float)) else "-"
            rows += [
                ("perturbation", f"{s['perturb']}, delta {s['delta']}, fill > {s['fill']}, seed {s['seed']}"),
                ("base", f"{b.get('source', '?')}, sigma {s['sigma']} (drawn {drawn}), attempt "
                         f"{b.get('attempt', '?')}, fill {b.get('fill', float('nan')):.3f}"),
            ]
            base_ifs = IFS.from_json(b["ifs"])  # checks the base; a malformed one is a one-line error
            for i, (row, p) in enumerate(zip(base_ifs.coef, base_ifs.probabilities, strict=True)):
                rows.append((f"map {i}", "  ".join(f"{k}={v:+.4f}" for k, v in zip("abcdef", row, strict=True))
                             + f"  p={p:.4f}"))
        else:
            rows.append(("system header", ", ".join(f"{k} {v}" for k, v in b.items())))
        if m["classes"] and "fill" in m["classes"][0]:
            fills = [c.get("fill", float("nan")) for c in m["classes"]]
            retries = sum(c.get("attempt", 0) for c in m["classes"])
            rows.append(("class fill", f"min {min(fills):.3f}, mean {sum(fills) / len(fills):.3f}, "
                                       f"max {max(fills):.3f}; {retries} redraws in all"))
        if score_at:
            from fracgen import score as score_lib

            with _bars(_progress(transient=True)) as bar:
                task = bar.add_task("score")
                scored = score_lib.score(m, _resolutions(score_at), note=_note,
                                         progress=lambda done, total: bar.update(task, completed=done, total=total))
            for r in scored:
                rows.append((f"score at {r['at']} px", ", ".join(f"{k} {r[k]:.3f}" for k in score_lib.MEASURES)))
        for k, v in rows:  # values come from the manifest: shown as text, never as markup or terminal codes
            t.add_row(k, escape(printable(v)))
        out.print(t)


def _resolutions(sizes) -> tuple[int, ...]:
    if any(not 4 <= a <= 4096 for a in sizes):
        raise FracgenError(f"training resolutions go from 4 to 4096 px, got {', '.join(map(str, sizes))}")
    return tuple(sizes)


@app.command()
def score(
    dataset: Annotated[Path, typer.Argument(help="Directory with manifest.json (the shards are not read).")],
    at: Annotated[list[int] | None, typer.Option(help="Training resolution in px, repeatable (default: 32 and "
                                                      "224).")] = None,
    classes: Annotated[int | None, typer.Option(help="Score only the first N classes (default: all).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the rows to this JSON file.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Refuse, after timing two classes, a score estimated to "
                                                           "take longer (default: 10).")] = None,
):
    """How learnable the set is at a training resolution, from the data alone (fracgen/score.py): separation (the
    nearest other class over the spread of two renders of one class), the share of confusable classes, diversity
    and fill. Renders instances 0 and 1 of every class: seconds for 1000 classes at 512 px, an hour at 16384."""
    from fracgen import score as score_lib

    with _errors():
        sizes = _resolutions(at or (32, 224))
        if classes is not None and classes < 2:
            raise FracgenError(f"--classes must be at least 2 (a nearest other class), got {classes}")
        if max_minutes is not None and not max_minutes > 0:
            raise FracgenError(f"--max-minutes must be more than 0, got {max_minutes:g}")
        m = read_manifest(dataset)
        if m["num_classes"] < 2:
            raise FracgenError(f"{dataset} has one class: there is nothing to tell apart")
        bound = None if max_minutes is None else max_minutes * 60
        with _bars(_progress(transient=True)) as bar:
            task = bar.add_task("score")
            rows = score_lib.score(m, sizes, classes, max_seconds=bound, note=_note,
                                   progress=lambda done, total: bar.update(task, completed=done, total=total))
        t = Table(title=escape(printable(f"{dataset}: {rows[0]['classes']} classes")))
        for column in ("at px", *score_lib.MEASURES, "spread", "nearest"):
            t.add_column(column, justify="right")
        for r in rows:
            t.add_row(str(r["at"]), *(f"{r[k]:.3f}" for k in (*score_lib.MEASURES, "spread", "nearest")))
        out.print(t)
        if json_out is not None:
            text = json.dumps(rows, indent=2) + "\n"
            atomic_write(json_out, lambda f: f.write(text.encode()))


@app.command()
def preview(
    dataset: Annotated[Path, typer.Argument(help="Directory with manifest.json and shards.")],
    out_file: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("preview.png"),
    count: Annotated[int, typer.Option(help="How many images.")] = 16,
    columns: Annotated[int, typer.Option(help="Images per row.")] = 4,
    tile: Annotated[int, typer.Option(help="Tile side in pixels.")] = 192,
):
    """Write a contact sheet of the first images, labelled with their classes."""
    with _errors():
        n = contact_sheet(dataset, out_file, count=count, columns=columns, tile=tile)
        _say(out, f"wrote {n} images to {out_file}")


@app.command()
def publish(
    dataset: Annotated[Path, typer.Argument(help="A finished folder (manifest.json and shards) to share.")],
    to: Annotated[str | None, typer.Option(help="Also upload it to hf://datasets/ORG/NAME\\[@REVISION] (needs "
                                                "huggingface_hub and a token in HF_TOKEN) or s3://BUCKET/PREFIX/ "
                                                "(needs boto3 and AWS credentials; AWS_ENDPOINT_URL for other "
                                                "stores).")] = None,
    url: Annotated[str | None, typer.Option(help="Where the folder will be served, for the card's pull and train "
                                                 "commands (default: --to).")] = None,
    license: Annotated[str, typer.Option(help="License written into the dataset card (a hub license id).")]
    = "cc-by-4.0",
    pretty_name: Annotated[str | None, typer.Option(help="Title of the dataset card (default: from the "
                                                         "settings).")] = None,
):
    """Verify a folder, then write a dataset card (README.md), SHA256SUMS and preview.png beside its shards."""
    with _errors(interrupted="run publish again"):
        with _bars(_progress(transient=True)) as bar:
            task = bar.add_task("verify")
            result = publish_folder(dataset, to=to, url=url, license=license, pretty_name=pretty_name,
                                    progress=lambda _, done, total: bar.update(task, completed=done, total=total),
                                    note=_note)
        _say(out, f"wrote README.md (dataset card), SHA256SUMS and preview.png to {dataset}; serve the folder with "
             "any static web server" + (f"; uploaded to {result['url']}" if result["url"] else ""))


@app.command()
def pull(
    source: Annotated[str, typer.Argument(help="A folder, the http(s) URL of a published folder (or of its "
                                               "manifest.json), s3://BUCKET/PREFIX/ or "
                                               "hf://datasets/ORG/NAME\\[@REVISION].")],
    dataset: Annotated[Path, typer.Argument(help="Folder to pull into (created if missing).")],
    overwrite: Annotated[bool, typer.Option(help="Replace another data set already in the folder.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds a server may stay silent (connecting or sending).")]
    = Limits.timeout,
    min_rate: Annotated[float, typer.Option(help="Bytes/s each file must arrive at, measured over every "
                                                 f"{RATE_WINDOW:g} s (slower: tried again).")] = Limits.min_rate,
    deadline: Annotated[float, typer.Option(help="Seconds one file may take, its retries included.")]
    = Limits.deadline,
    jobs: Annotated[int, typer.Option(help=f"Shards fetched at once (1..{MAX_JOBS}), each checked as when alone.")]
    = JOBS,
):
    """Fetch a published folder, each shard checked by size and sha256 before it takes its name; run it again to
    resume."""
    with _errors(interrupted="finished shards are kept; run the same pull again to fetch the rest"):
        t0 = time.perf_counter()
        with _bars(_byte_progress()) as bar:
            tasks = {}

            def report(phase, done, total):
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase, total=total)
                bar.update(tasks[phase], completed=done, total=total)

            result = pull_folder(source, dataset, overwrite=overwrite, progress=report, note=_note,
                                 command=shlex.join(["fracgen", "pull", source, str(dataset)]),
                                 limits=Limits(timeout=timeout, min_rate=min_rate, deadline=deadline), jobs=jobs)
        n = len(result.manifest["shards"])
        if not result.fetched:
            _say(out, f"{dataset} already holds all {n} shards of {source} (each checked by sha256): nothing fetched")
            return
        _say(out, f"pulled {len(result.fetched)} of {n} shards ({result.fetched_bytes / 1e6:.1f} MB) from {source} "
             f"into {dataset} in {time.perf_counter() - t0:.1f} s; every shard matches the manifest")
