"""Share a finished pre-training run as the ecosystem expects: a model card, SHA256SUMS, and the hub.

    fracgen-train publish runs/cpu-seed4                          # README.md + SHA256SUMS beside the weights
    fracgen-train publish runs/cpu-seed4 --out /srv/www/cpu-seed4  # or a folder of just the published files
    fracgen-train publish runs/cpu-seed4 --to hf://ORG/NAME        # and upload them (HF_TOKEN or `hf auth login`)

The published files are README.md (the model card: YAML front matter a hub reads, then the data the weights were
pre-trained on with its manifest's sha256 and the command that renders it again, the recipe, the LPCE curve, the
pretext top-1 and the fine-tuning results the run folder holds), config.json and model.safetensors (train.weights)
and SHA256SUMS. Served over HTTP or uploaded, the folder is a `--checkpoint` for train.finetune and train.probe,
and `timm.create_model("hf-hub:ORG/NAME", pretrained=True)` loads it. Everything copied from a file into the card
is escaped: a data set's name cannot add markup, links or front matter to it.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from fracgen import s3, share
from fracgen.errors import FracgenError
from fracgen.lock import FolderLock, writing_folder
from fracgen.shards import atomic_write, file_sha256
from fracgen.untrusted import parse_json, printable, read_json, without_controls

from . import weights
from .runtime import TrainError, run_cli

CARD = "README.md"
FILES = [CARD, weights.CONFIG, weights.WEIGHTS]  # SHA256SUMS lists these
MAX_JSON_BYTES = 1 << 26  # a run's metrics.jsonl: a line per logged step
LICENSE = "cc-by-4.0"  # the data sets' default (fracgen publish); --license changes it


# --- escaping --------------------------------------------------------------------------------------------------

def md(value) -> str:
    """Any value as literal Markdown text on one line: HTML escaped (no tags, no entities), and the characters that
    make emphasis, code, links, table cells or headings backslashed. Line starts need no care: text from files never
    begins a line of the card."""
    text = html.escape(" ".join(printable(value).split()), quote=False)
    return re.sub(r"([\\`*_\[\]|#~])", r"\\\1", text)


def code_block(text: str, lang: str = "") -> str:
    """A fenced block that no backtick run inside `text` can close."""
    text = without_controls(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


# --- what the run folder holds ---------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return read_json(path, max_bytes=MAX_JSON_BYTES)
    except (OSError, FracgenError):
        return None


def finished_run(run: Path) -> tuple[dict, dict, bytes]:
    """(config, summary, the checked weights' bytes) of a finished train.pretrain run; anything else is one line."""
    if not run.is_dir():
        raise TrainError(f"{run} is not a folder (give a fracgen-train pretrain --out folder)")
    missing = [name for name in (weights.CONFIG, weights.WEIGHTS, "summary.json") if not (run / name).is_file()]
    if missing:
        hint = (f": finish it with `fracgen-train pretrain --out {run} --resume`" if (run / "ckpt.pt").is_file()
                else "")
        raise TrainError(f"{run} is not a finished fracgen-train pretrain run (no {', '.join(missing)}){hint}")
    config = weights.read_config(run / weights.CONFIG)
    record = config["fracgen"]["weights"]
    raw = weights._checked_bytes(run / weights.WEIGHTS, record["bytes"], record["sha256"], str(run / weights.CONFIG))
    tensors = weights._tensors(raw, run / weights.WEIGHTS)  # a safetensors file, not only the recorded bytes
    # the network they name, fitting it, finite: what finetune checks before it trains is checked before publishing
    weights.checked(weights.Pretrained(config["architecture"], config["model_args"], config["num_classes"], tensors),
                    str(run / weights.WEIGHTS))
    summary = _read_json(run / "summary.json")
    if not isinstance(summary, dict) or not isinstance(summary.get("pretext_acc"), (int, float)):
        raise TrainError(f"{run / 'summary.json'} is not a fracgen-train pretrain summary (no pretext_acc)")
    return config, summary, raw


def lpce_curve(path: Path, points: int = 5) -> list[tuple[int, float]]:
    """(step, LPCE) at about `points` evenly spaced logged steps of metrics.jsonl, first and last included."""
    entries = []
    try:
        with open(path, "rb") as f:
            lines = f.read(MAX_JSON_BYTES).splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            e = parse_json(line, str(path))
        except FracgenError:
            continue
        if isinstance(e, dict) and isinstance(e.get("step"), int) and isinstance(e.get("loss"), (int, float)):
            entries.append((e["step"], float(e["loss"])))
    if len(entries) <= points:
        return entries
    picks = sorted({round(i * (len(entries) - 1) / (points - 1)) for i in range(points)})
    return [entries[i] for i in picks]


def fine_tuning_results(run: Path, extra: list[Path]) -> list[dict]:
    """results.json (train.finetune) and probe.json (train.probe) in the run folder's sub-folders (`make finetune`
    writes RUN/digits) and in `extra` (e.g. the scratch baseline's): those that read as such."""
    found = []
    for path in extra:
        r = _read_json(path)
        if not (isinstance(r, dict) and isinstance(r.get("top1_mean"), (int, float))):
            raise TrainError(f"--results {path}: not a fracgen-train finetune results.json or fracgen-train probe "
                             "probe.json")
    for path in sorted(run.glob("*/results.json")) + sorted(run.glob("*/probe.json")) + list(extra):
        r = _read_json(path)
        if isinstance(r, dict) and isinstance(r.get("top1_mean"), (int, float)) and math.isfinite(r["top1_mean"]):
            seeds = r.get("top1") if isinstance(r.get("top1"), dict) else {}
            found.append({"kind": "linear probe" if path.name == "probe.json" else "fine-tuning",
                          "dataset": r.get("dataset", "?"), "checkpoint": str(r.get("checkpoint", "?")),
                          "top1_mean": float(r["top1_mean"]), "top1_std": r.get("top1_std"), "seeds": len(seeds),
                          "train_images": r.get("train_images", r.get("shots")), "file": path})
    return found


# --- the card --------------------------------------------------------------------------------------------------

def _hub_dataset(source: str) -> str | None:
    """ORG/NAME when the data came from hf://datasets/ORG/NAME."""
    match = re.search(r"hf://datasets/([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@[^@\s]+)?/?$", source or "")
    return match.group(1) if match else None


def model_card(config: dict, summary: dict, curve: list, results: list[dict], *, license: str, name: str,
               source: str) -> str:
    fg = config["fracgen"]
    data, recipe = fg.get("data") or {}, fg.get("recipe") or {}
    arch, args, c = config["architecture"], config["model_args"], config["num_classes"]
    system = str(data.get("system", "1p-frac"))
    dataset = _hub_dataset(str(data.get("source", "")))
    front = ["---", "library_name: timm", f"license: {share._yaml(license)}", "pipeline_tag: image-classification",
             "tags:", "- timm", "- image-classification", "- synthetic-pretraining", f"- {share._yaml(system)}",
             *(["datasets:", f"- {share._yaml(dataset)}"] if dataset else []), "---", ""]
    args_text = ", ".join(f"{k}={v}" for k, v in args.items())
    chance = 100 / c
    rows = [("architecture", f"{arch} ({args_text})"), ("pretext classes", c),
            ("steps", fg.get("step")), ("batch", recipe.get("global_batch") or recipe.get("batch")),
            ("lr", recipe.get("lr") or f"blr {recipe.get('blr')} per 512 images"),
            ("weight decay", recipe.get("weight_decay")), ("warm-up", recipe.get("warmup_epochs") and
                                                          f"{recipe['warmup_epochs']} epochs"
                                                          or f"{recipe.get('warmup_steps')} steps"),
            ("crop scale", recipe.get("crop_scale")), ("flips", recipe.get("flip")),
            ("RandAugment", recipe.get("randaug") or "off"), ("random erasing", recipe.get("reprob")),
            ("Mixup / CutMix", f"{recipe.get('mixup')} / {recipe.get('cutmix')}"),
            ("label smoothing", recipe.get("smoothing")), ("drop path", recipe.get("drop_path")),
            ("ink gain", recipe.get("ink_gain")), ("seed", recipe.get("seed"))]
    data_rows = [("system", system), ("classes", data.get("num_classes")), ("images", data.get("num_samples")),
                 ("manifest.json sha256", data.get("manifest_sha256")), ("read from", data.get("source")),
                 ("fracgen", data.get("fracgen_version"))]
    lines = [
        *front,
        f"# {md(name)}",
        "",
        f"A {md(arch)} pre-trained by `fracgen-train pretrain` on synthetic {md(system)} images alone: "
        f"{md(data.get('num_classes'))} classes, {md(data.get('num_samples'))} images, {md(fg.get('step'))} steps. "
        "Its head tells the pre-training classes apart; it is meant to be fine-tuned.",
        "",
        "## Use it",
        "",
        code_block("import timm\n\n" + (
            f"model = timm.create_model({json.dumps('hf-hub:' + source[5:])}, pretrained=True, num_classes=10)"
            if source.startswith("hf://") else
            'model = timm.create_model("local-dir:FOLDER", pretrained=True, num_classes=10)  # FOLDER: these files'
        ) + "\n# num_classes: a new head for your classes (the pre-training head is dropped)", "python"),
        "",
        code_block(f"fracgen-train finetune --checkpoint {shlex.quote(source)} --out runs/digits   # fetched once, "
                   "checked against SHA256SUMS", "bash"),
        "",
        "## Pre-training data",
        "",
        "| | |", "|---|---|",
        *(f"| {md(k)} | {md(v)} |" for k, v in data_rows if v is not None),
        "",
        "Render them again (the same bytes, checked by that sha256):",
        "",
        code_block(str(data.get("command", "")), "bash"),
        "",
        "## Recipe",
        "",
        "| | |", "|---|---|",
        *(f"| {md(k)} | {md(v)} |" for k, v in rows if v is not None),
        "",
        "Every setting is in `config.json` (`fracgen.recipe`).",
        "",
        "## Pre-training",
        "",
        f"Pretext top-1 **{summary['pretext_acc']:.1f}%** on {md(summary.get('eval_samples'))} clean images "
        f"(chance {chance:.2g}%).",
        "",
    ]
    if curve:
        lines += ["| step | LPCE |", "|---|---|", *(f"| {step} | {loss:.4f} |" for step, loss in curve), ""]
    lines += ["## Fine-tuning", ""]
    if results:
        lines += ["| data set | evaluation | from | top-1 (%) | seeds or splits | training images |",
                  "|---|---|---|---|---|---|"]
        for r in results:
            origin = "scratch" if r["checkpoint"].lower() == "none" else "these weights"
            std = f" ± {r['top1_std']:.1f}" if isinstance(r["top1_std"], (int, float)) else ""
            lines.append(f"| {md(r['dataset'])} | {r['kind']} | {origin} | {r['top1_mean']:.1f}{std} | "
                         f"{r['seeds']} | {md(r['train_images'])} |")
        lines.append("")
    else:
        lines += ["No fine-tuning results were in the run folder when it was published.", ""]
    lines += ["## Files", "",
              f"- `{weights.WEIGHTS}`: the weights ({fg['weights']['bytes']:,} bytes, sha256 "
              f"`{fg['weights']['sha256']}`).",
              f"- `{weights.CONFIG}`: timm's model config, and under `fracgen` the data and the recipe.",
              f"- `{weights.SUMS}`: `sha256sum -c {weights.SUMS}` checks the files.", ""]
    return "\n".join(lines)


# --- publish ---------------------------------------------------------------------------------------------------

def _hub_token():
    try:
        return share.hub_token()
    except FracgenError as e:
        raise TrainError(str(e)) from None


def _upload(folder: Path, files: list[str], to: str) -> str:
    try:
        if to.startswith("s3://"):  # SHA256SUMS last: a reader that finds it finds the files it lists
            return s3.upload(folder, [weights.WEIGHTS, weights.CONFIG, CARD, weights.SUMS], to)
        return share.hub_upload(folder, files, to, *weights.parse_hub(to), repo_type="model",
                                tool="fracgen-train publish")
    except FracgenError as e:
        raise TrainError(str(e)) from None


def _check_destination(to: str) -> None:
    if to.startswith("s3://"):
        try:
            s3.parse(to)
            s3.check_credentials(to)
        except FracgenError as e:
            raise TrainError(str(e)) from None
    else:
        weights.parse_hub(to)
        _hub_token()


def _claim(out: Path, config_raw: bytes, overwrite: bool) -> None:
    """May the published files of these weights be written into `out`? Yes into an empty folder, the run folder, or
    a folder that holds this run's published files (publishing again); a data set, another model's published files
    or a card and sums train.publish did not write there are refused unless `overwrite` (never a data set)."""
    if (out / "manifest.json").exists():
        raise TrainError(f"--out {out} holds a data set (manifest.json): publish the weights into a folder of their "
                         "own")
    sums_path, card_path = out / weights.SUMS, out / CARD
    if sums_path.exists():
        try:
            listed = set(weights.parse_sums(sums_path.read_bytes()[: weights.MAX_SUMS_BYTES + 1], str(sums_path)))
        except (TrainError, OSError):
            listed = set()
        if listed != set(FILES):
            what = f"a {weights.SUMS} that lists other files than a published model's"
        elif (out / weights.CONFIG).is_file() and (out / weights.CONFIG).read_bytes() != config_raw:
            what = "another model's published files (its config.json differs)"
        else:
            return  # this run's published files: written again
    elif card_path.exists():
        what = f"a {CARD} that fracgen-train publish did not write (no {weights.SUMS} beside it)"
    else:
        return
    if not overwrite:
        raise TrainError(f"--out {out} holds {what}; choose another folder, or pass --overwrite to replace it")


def publish(run: str | Path, out: str | Path | None = None, to: str | None = None, url: str | None = None,
            license: str = LICENSE, name: str | None = None, results: list[Path] = (),
            overwrite: bool = False) -> dict:
    """Check a finished run, write the card and SHA256SUMS into `out` (default: the run folder) beside config.json
    and model.safetensors, and with `to` (hf://ORG/NAME[@REVISION]) upload those files. `url`: where the folder
    will be served, for the card's commands (default `to`). One writer per folder: the run's lock is held, and
    `out`'s when it is another folder; files already in `out` are replaced only as _claim allows."""
    run = Path(run)
    out = Path(out) if out else run
    if to is not None:
        _check_destination(to)  # a bad destination, or no token or credentials, fails before any work
    try:
        with FolderLock(run, "fracgen-train publish"):
            config, summary, raw = finished_run(run)
            curve = lpce_curve(run / "metrics.jsonl")
            found = fine_tuning_results(run, [Path(p) for p in results])
            system = (config["fracgen"].get("data") or {}).get("system", "1p-frac")
            name = name or f"{config['architecture']} pre-trained on {system}"
            card = model_card(config, summary, curve, found, license=license, name=name,
                              source=url or to or "https://YOUR-SERVER/PATH/")
            config_raw = (run / weights.CONFIG).read_bytes()
            same = out.exists() and out.resolve() == run.resolve()
            claimed = writing_folder(out, "fracgen-train publish", name=f"--out {out}")
            with contextlib.nullcontext() if same else claimed:
                _claim(out, config_raw, overwrite)
                if not same:
                    atomic_write(out / weights.CONFIG, lambda f: f.write(config_raw))
                    atomic_write(out / weights.WEIGHTS, lambda f: f.write(raw))
                atomic_write(out / CARD, lambda f: f.write(card.encode()))
                sums = "".join(f"{file_sha256(out / f)[0]}  {f}\n" for f in FILES).encode()  # `sha256sum -c` reads it
                atomic_write(out / weights.SUMS, lambda f: f.write(sums))
    except FracgenError as e:
        raise TrainError(str(e)) from None
    files = [*FILES, weights.SUMS]
    page = _upload(out, files, to) if to else None
    return {"folder": out, "files": files, "url": page, "results": len(found)}


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    run: Annotated[Path, typer.Argument(help="a finished fracgen-train pretrain --out folder")],
    out: Annotated[Path | None, typer.Option(help="write the published files here (default: into RUN)")] = None,
    to: Annotated[str | None, typer.Option(help="upload to hf://ORG/NAME\\[@REVISION] (token: HF_TOKEN or `hf auth "
                                                "login`) or s3://BUCKET/PREFIX/ (AWS credentials)")] = None,
    url: Annotated[str | None, typer.Option(help="where the folder will be served (http(s)://...), for the card's "
                                                 "commands (default: --to)")] = None,
    license: Annotated[str, typer.Option(help="the weights' license, for the card")] = LICENSE,
    name: Annotated[str | None, typer.Option(help="the card's title")] = None,
    results: Annotated[list[Path] | None, typer.Option(help="more fracgen-train finetune results.json or "
                                                            "fracgen-train probe probe.json for the card, e.g. the "
                                                            "scratch baseline's "
                                                            "(repeat)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace another model's published files (or a "
                                                                "card and sums of another tool) in --out")] = False,
) -> None:
    """Write a model card and SHA256SUMS for a finished run; optionally upload it to the Hugging Face hub."""
    r = publish(run, out, to, url, license, name, results or [], overwrite)
    print(f"published {', '.join(r['files'])} in {r['folder']} ({r['results']} fine-tuning result(s) in the card)"
          + (f"; uploaded to {r['url']}" if r["url"] else ""), file=sys.stdout)


if __name__ == "__main__":
    run_cli(app)
