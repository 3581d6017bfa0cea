"""The manifest: the record a shard folder is trusted by. `check_manifest` holds any manifest (a file, a server's
answer) to fracgen's schema and to the settings `render` accepts, for the data system it names; every reader of a
folder goes through `load_manifest` / `read_manifest`. It sits above the shard format (`fracgen.shards`), the settings
and the systems, and below the writer (`fracgen.dataset`).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

from fracgen.errors import FracgenError
from fracgen.render import RENDERER
from fracgen.settings import Settings
from fracgen.shards import atomic_write, max_shard_bytes
from fracgen.systems import SYSTEMS, validate
from fracgen.untrusted import printable, read_json

FORMAT_VERSION = 1  # of the shard folder: manifest.json + tar shards, as the README documents it
SHARD_FILE = re.compile(r"[A-Za-z0-9_-]+\.tar")  # a plain name in the folder: no path, not hidden
VERSION = re.compile(r"[0-9A-Za-z.+-]{1,40}")  # a fracgen_version as manifests write it
SETTINGS_USED = ("classes", "per_class", "size", "seed", "shard_size", "name", "png_level")
# settings older manifests lack (they had the defaults)
SETTINGS_SINCE_0_3 = ("system", "bases", "search", "image", "image_mode", "noise")



TIMM_INFO = "_info.json"  # beside the shards: what timm's WebDataset reader (`wds/NAME`) reads a folder by


def timm_info(manifest: dict) -> dict:
    """timm's split record of a finished folder: one split "train" with every shard and its sample count."""
    shards = manifest["shards"]
    return {"name": manifest["settings"]["name"], "source": "fracgen manifest.json",
            "splits": {"train": {"name": "train", "num_samples": sum(e["samples"] for e in shards),
                                 "filenames": [e["file"] for e in shards],
                                 "shard_lengths": [e["samples"] for e in shards]}}}


def timm_info_text(manifest: dict) -> bytes:
    return (json.dumps(timm_info(manifest), indent=1) + "\n").encode()


def write_timm_info(folder: Path, manifest: dict) -> None:
    """_info.json from the manifest (a finished folder's): written only by fracgen, always derived, so it can never
    say other than the record it comes from."""
    if manifest["complete"]:
        text = timm_info_text(manifest)
        atomic_write(Path(folder) / TIMM_INFO, lambda f: f.write(text))


def check_timm_info(folder: Path, manifest: dict) -> str | None:
    """A problem line when the folder's _info.json (if any) is not the one its manifest gives."""
    path = Path(folder) / TIMM_INFO
    if not path.exists() or not manifest["complete"]:
        return None
    expected = timm_info_text(manifest)
    try:
        with open(path, "rb") as f:
            same = f.read(len(expected) + 1) == expected  # one byte more tells a longer file; never the whole file
    except OSError:
        same = False
    return None if same else (f"{TIMM_INFO} does not match the manifest (`fracgen render --resume` or `fracgen "
                              "publish` write it again)")


CARD = "README.md"  # the dataset card `fracgen publish` writes: Hugging Face `datasets` reads its `configs`
SUMS, PREVIEW = "SHA256SUMS", "preview.png"  # what `publish` writes beside the shards, with the card
# the last line of each card fracgen writes: a README.md without either is its owner's, and never touched
LOCAL_MARK = "<!-- fracgen: local card, written again with the data; `fracgen publish` writes the full one -->"
PUBLISH_MARK = "<!-- fracgen: dataset card written by `fracgen publish` -->"
HF_YAML = ".huggingface.yaml"  # `datasets` reads this file's configs over the card's; fracgen writes none
MAX_CARD_BYTES = 1 << 20  # a card publish writes takes ~3 KB (a base with 256 maps: ~30 KB)
# huggingface_hub's REGEX_YAML_BLOCK: the front matter exactly as `datasets.load_dataset` finds it
FRONT_MATTER = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


MAX_NAMED_CLASSES = 10_000  # class names in a card's features: 25 bytes each; above this `cls` stays an integer


def card_front_matter(manifest: dict) -> list[str]:
    """The YAML a dataset card's front matter must hold for Hugging Face `datasets` to read the folder: `configs`
    (the shards only) and `dataset_info.features`. Without the features its webdataset loader infers types from the
    first samples, and a .json's 64-bit render seed overflows the int64 it infers; `json` as its Json feature keeps
    every value exact. `cls` is a ClassLabel named as the sample keys name classes (c000000, ...)."""
    n = manifest["num_classes"]
    cls = (["    dtype:", "      class_label:", "        names:"] + [f"          '{k}': c{k:06d}" for k in range(n)]
           if n <= MAX_NAMED_CLASSES else ["    dtype: int64"])
    return ["configs:", "- config_name: default", "  data_files:", "  - split: train",
            f"    path: {json.dumps(card_pattern(manifest))}",
            "dataset_info:", "  features:", "  - name: __key__", "    dtype: string", "  - name: __url__",
            "    dtype: string", "  - name: cls", *cls, "  - name: json", "    dtype: json", "  - name: png",
            "    dtype: image"]


def local_card(manifest: dict) -> str:
    """README.md for a folder `render` or `pull` finished: the front matter `datasets.load_dataset(folder)` needs,
    and what the folder is. `fracgen publish` replaces it with the full dataset card."""
    s, n = manifest["settings"], manifest["num_samples"]
    return "\n".join(["---", *card_front_matter(manifest), "---", "",
                      f"# {s['name']}: {s.get('system', '1p-frac')}, {manifest['num_classes']} classes, "
                      f"{manifest['image']['size']} px", "",
                      f"{n} samples in {len(manifest['shards'])} WebDataset shards, written by fracgen "
                      f"{manifest.get('fracgen_version')}; every setting and each shard's sha256 are in manifest.json "
                      "(`fracgen verify .` checks them). `fracgen publish` writes the full dataset card here.", "",
                      LOCAL_MARK, ""])


def _card_mark(folder: Path) -> str | None:
    """LOCAL_MARK or PUBLISH_MARK when the folder's README.md is a card fracgen wrote; None otherwise."""
    try:
        with open(Path(folder) / CARD, "rb") as f:
            text = f.read(MAX_CARD_BYTES).decode("utf-8", "replace")
    except OSError:
        return None
    return next((mark for mark in (LOCAL_MARK, PUBLISH_MARK) if mark in text), None)


def write_local_card(folder: Path, manifest: dict) -> None:
    """local_card() into a finished folder with no README.md, or whose README.md is an earlier local card; a
    published card or the owner's own is left as it is."""
    path = Path(folder) / CARD
    if manifest["complete"] and (not path.exists() or _card_mark(folder) == LOCAL_MARK):
        text = local_card(manifest).encode()
        atomic_write(path, lambda f: f.write(text))


def write_readers_files(folder: Path, manifest: dict) -> None:
    """What the tools that read a finished folder need beside its shards, both derived from its manifest: timm's
    _info.json and, unless a card is already there, the local card Hugging Face `datasets` reads."""
    write_timm_info(folder, manifest)
    write_local_card(folder, manifest)


def remove_published_files(folder: Path) -> None:
    """Before another data set is written into `folder` (--overwrite): the files publish wrote for the old one, and
    a card fracgen wrote (the owner's own card stays)."""
    if _card_mark(folder):
        (Path(folder) / CARD).unlink(missing_ok=True)
    for name in (SUMS, PREVIEW):
        (Path(folder) / name).unlink(missing_ok=True)


def card_pattern(manifest: dict) -> str:
    """The card's data_files: the shards only (manifest.json and _info.json must not be taken for data)."""
    return f"{manifest['settings']['name']}-*.tar"


def card_configs(manifest: dict) -> list:
    """The card's `configs` as `fracgen publish` writes them (and as YAML reads them back)."""
    return [{"config_name": "default", "data_files": [{"split": "train", "path": card_pattern(manifest)}]}]


def _card_paths(configs: object) -> Iterator[tuple[str, str]]:
    """("data_files path" or "data_dir", the path) for each path a card's configs name, in the forms `datasets`
    takes (a string, a list of strings, a list of {split, path} with a string or a list, a {split: ...} map). The
    first 100 of each list only: YAML's aliases can make lists of lists that never end."""
    for config in configs[:100] if isinstance(configs, list) else []:
        if not isinstance(config, dict):
            continue
        if isinstance(config.get("data_dir"), str):
            yield "data_dir", config["data_dir"]
        files = config.get("data_files")
        files = list(itertools.islice(files.values(), 100)) if isinstance(files, dict) else \
            files[:100] if isinstance(files, list) else [files]
        for item in files:
            paths = item.get("path") if isinstance(item, dict) else item
            for path in paths[:100] if isinstance(paths, list) else [paths]:
                if isinstance(path, str):  # anything else is not publish's configs either
                    yield "data_files path", path


def _outside(path: str) -> bool:
    """Can this pattern name files outside the folder: absolute, the home folder, a URL or any scheme (hf://,
    zip://, C:), or a '..'?"""
    return path.startswith(("/", "\\", "~")) or ".." in path or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", path) is not None


def check_card(folder: Path, manifest: dict) -> str | None:
    """A problem line when the folder's dataset card (if any) could point Hugging Face `datasets` at other files
    than its shards: the front matter read as huggingface_hub reads it, its `configs` held to the ones `fracgen
    publish` writes (the rest of the card is its owner's to edit), and no .huggingface.yaml to override them."""
    where, again = f"{CARD} (dataset card)", "`fracgen publish` writes it again"
    if (Path(folder) / HF_YAML).exists():
        return f"{HF_YAML}: `datasets` reads its configs over the card's, and fracgen writes none (remove it)"
    try:
        with open(Path(folder) / CARD, "rb") as f:
            raw = f.read(MAX_CARD_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{where}: unreadable ({e.strerror or e})"
    if len(raw) > MAX_CARD_BYTES:
        return f"{where}: larger than the {MAX_CARD_BYTES:,} bytes fracgen reads of it: {again}"
    try:
        match = FRONT_MATTER.search(raw.decode("utf-8-sig"))
        front = yaml.safe_load(match.group(2)) if match else None
    except UnicodeDecodeError:
        return f"{where}: not UTF-8 text: {again}"
    except (yaml.YAMLError, RecursionError) as e:
        why = printable((str(e).splitlines() or [type(e).__name__])[0])[:100]
        return f"{where}: its front matter is not YAML ({why}): {again}"
    configs = front.get("configs") if isinstance(front, dict) else None
    if configs == card_configs(manifest):
        return None
    named = list(_card_paths(configs))
    for kind, path in named:
        if _outside(path):
            return (f"{where}: its {kind} '{printable(path[:300])}' is outside the folder (`datasets` would read data "
                    f"from there): {again}")
    pattern = card_pattern(manifest)
    for kind, path in named:
        if kind == "data_files path" and path != pattern:
            return f"{where}: its data_files path '{printable(path[:300])}' is not the shards' '{pattern}': {again}"
    return f"{where}: its configs are not the ones `fracgen publish` writes (data_files '{pattern}'): {again}"


def renderer_of(manifest: dict) -> int:
    """The renderer that drew a dataset's images (fracgen 0.1 wrote no number: renderer 1)."""
    return manifest.get("renderer", 1)


def other_renderer(manifest: dict) -> str | None:
    """None where this fracgen draws the data set's renderer; else what every message says of it, in one wording:
    such data are read and trained on as they are, but no longer drawn again (docs/results.md: one renderer change
    moved make pretrain's figure by 8.9 points)."""
    drawn = renderer_of(manifest)
    if drawn == RENDERER:
        return None
    return f"drawn by renderer {drawn}; this fracgen draws renderer {RENDERER}, whose images differ"


def check_manifest(manifest: object, path: Path) -> dict:
    """The manifest if every reader can rely on it; else one FracgenError line saying what is wrong. The one place
    a manifest is checked (render --resume, verify, info, preview, publish, pull, and the trainer read it through
    here): its shape and types, settings a render accepts (the render's own checks), and totals that agree with
    those settings (counts, every shard's name and sample count, sizes no shard can exceed)."""

    def fail(what: str):
        raise FracgenError(f"{path} is not a usable fracgen manifest: {what}")

    def need(obj: dict, key: str, kind, where: str = ""):
        value = obj.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            fail(f"{where}'{key}' is {'missing' if key not in obj else type(value).__name__}, not "
                 f"{getattr(kind, '__name__', 'a number')}")
        return value

    def number(obj: dict, key: str, where: str):
        if key in obj and obj[key] is not None and (isinstance(obj[key], bool) or not isinstance(obj[key],
                                                                                                  (int, float))):
            fail(f"{where}'{key}' is {type(obj[key]).__name__}, not a number")

    if not isinstance(manifest, dict) or manifest.get("format") != "fracgen-shards":
        fail("its 'format' is not fracgen-shards")
    if need(manifest, "format_version", int) > FORMAT_VERSION:
        fail(f"format_version {manifest['format_version']} is newer than this fracgen reads ({FORMAT_VERSION})")
    need(manifest, "complete", bool)
    if not VERSION.fullmatch(str(manifest.get("fracgen_version", "0"))):
        fail("'fracgen_version' is not a version number")
    if not isinstance(manifest.get("renderer", 1), int) or isinstance(manifest.get("renderer"), bool):
        fail("'renderer' is not an integer")
    if not isinstance(manifest.get("command"), (str, type(None))):
        fail("'command' is not a string")
    settings = need(manifest, "settings", dict)
    for key in SETTINGS_USED:
        if key not in settings:
            fail(f"settings lack '{key}'")
    num_classes, num_samples = need(manifest, "num_classes", int), need(manifest, "num_samples", int)
    if num_classes < 1 or num_samples < 0:
        fail("num_classes must be >= 1 and num_samples >= 0")
    if need(need(manifest, "image", dict), "size", int, "image.") < 1:
        fail("image.size must be >= 1")
    name = settings.get("system", "1p-frac")  # manifests before fracgen 0.3 are all 1p-frac
    if name not in SYSTEMS:
        fail(f"its system {str(name)[:40]!r} is not one this fracgen knows ({', '.join(SYSTEMS)})")
    for key in SYSTEMS[name].uses:
        if key not in settings and key not in SETTINGS_SINCE_0_3:
            fail(f"settings lack '{key}'")
    fields = Settings.__dataclass_fields__
    known = {}
    for key, value in settings.items():
        if key not in fields:
            continue  # a newer fracgen's setting: the renderer check below refuses what this one cannot draw
        kind = {"int": int, "float": (int, float), "str": str, "dict | None": (dict, type(None)),
                "str | None": (str, type(None))}[fields[key].type]
        if not isinstance(value, kind) or (value is not None and isinstance(value, bool)):
            fail(f"setting '{key}' is {type(value).__name__}, not {fields[key].type}")
        known[key] = value
    try:
        s = Settings(**known)
        validate(s)
    except FracgenError as e:
        fail(f"its settings are not ones fracgen renders ({e})")
    if (num_classes, num_samples, manifest["image"]["size"]) != (s.classes, s.num_samples, s.size):
        fail(f"num_classes {num_classes}, num_samples {num_samples} and image.size {manifest['image']['size']} "
             f"contradict its settings (classes {s.classes} x per_class {s.per_class}, size {s.size})")
    base = need(manifest, "base", dict)
    if name == "1p-frac" and not isinstance(need(base, "ifs", dict, "base.").get("maps"), list):
        fail("base.ifs has no 'maps' list")
    for key in ("fill", "sigma_drawn", "attempt"):
        number(base, key, "base.")
    keys = SYSTEMS[name].class_keys
    classes = need(manifest, "classes", list)
    if len(classes) != num_classes:
        fail(f"it holds {len(classes)} classes, num_classes says {num_classes}")
    for c in classes:
        if not isinstance(c, dict) or any(key not in c for key in keys):
            fail(f"every class must be an object with {', '.join(repr(k) for k in keys)}")
        for key in ("fill", "attempt"):
            number(c, key, "a class's ")
    shards = need(manifest, "shards", list)
    if len(shards) > s.num_shards or (manifest["complete"] and len(shards) != s.num_shards):
        fail(f"it lists {len(shards)} shards; its settings make {s.num_shards}")
    for index, entry in enumerate(shards):
        if not isinstance(entry, dict):
            fail("every shard must be an object with file, samples, bytes, sha256")
        file = need(entry, "file", str, "a shard's ")
        if not SHARD_FILE.fullmatch(file):
            fail(f"shard file {file[:60]!r} is not a plain file name in the folder")
        if file != s.shard_name(index):
            fail(f"shard {index} is {file[:60]!r}, not {s.shard_name(index)!r}")
        samples, size = need(entry, "samples", int, "a shard's "), need(entry, "bytes", int, "a shard's ")
        expected = min(s.shard_size, s.num_samples - index * s.shard_size)
        if samples != expected:
            fail(f"shard {file} lists {samples} samples; its settings put {expected} in it")
        if not 0 <= size <= max_shard_bytes(samples, s.size, s.maps):
            fail(f"shard {file} lists {size:,} bytes; {samples} samples of {s.size} px take at most "
                 f"{max_shard_bytes(samples, s.size, s.maps):,}")
        if not re.fullmatch(r"[0-9a-f]{64}", need(entry, "sha256", str, "a shard's ")):
            fail(f"shard {file}: sha256 is not 64 hex digits")
    return manifest


def load_manifest(path: Path) -> dict:
    """A manifest file parsed (bounded in size and nesting) and checked (`check_manifest`)."""
    try:
        manifest = read_json(path)
    except FileNotFoundError:
        raise FracgenError(f"no {Path(path).name} at {Path(path).parent}: not a fracgen dataset") from None
    except FracgenError as e:
        raise FracgenError(f"{path} is unreadable: {e}") from None
    return check_manifest(manifest, path)


def read_manifest(out: Path) -> dict:
    if not Path(out).is_dir():
        raise FracgenError(f"{out} is not a directory")
    if not (Path(out) / "manifest.json").exists():
        raise FracgenError(f"no manifest.json in {out}: not a fracgen dataset")
    return load_manifest(Path(out) / "manifest.json")
