"""A contact sheet of a dataset's first images, each labelled with its class, for a person to look at."""

from __future__ import annotations

import io
import tarfile
from itertools import islice
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from fracgen.errors import FracgenError
from fracgen.manifest import read_manifest
from fracgen.shards import atomic_write, check_sample, iter_samples

MAX_COUNT, MAX_TILE = 1024, 1024  # a sheet for a person to look at: at most 1 Gpixel, not unbounded


def contact_sheet(dataset: str | Path, out: str | Path, *, count: int = 16, columns: int = 4,
                  tile: int = 192) -> int:
    """Write a grid of the first `count` images to `out` (PNG); return how many were drawn."""
    if not (1 <= count <= MAX_COUNT and 1 <= columns <= MAX_COUNT and 32 <= tile <= MAX_TILE):
        raise FracgenError(f"--count and --columns must be in 1..{MAX_COUNT} and --tile in 32..{MAX_TILE}, got "
                           f"{count}, {columns} and {tile}")
    dataset = Path(dataset)
    manifest = read_manifest(dataset)
    tiles = []
    for entry in manifest["shards"]:
        path = dataset / entry["file"]
        try:
            for key, parts in islice(iter_samples(path), count - len(tiles)):
                problem = check_sample(key, parts, manifest["num_classes"], manifest["image"]["size"])
                if problem:
                    raise FracgenError(f"{path}: {problem} (`fracgen verify` checks every shard)")
                with Image.open(io.BytesIO(parts["png"])) as im:
                    tiles.append((int(parts["cls"]), ImageOps.autocontrast(im.convert("L")).resize((tile, tile))))
        except (tarfile.TarError, OSError) as e:
            raise FracgenError(f"{path} is not a readable shard ({e}); `fracgen verify` checks every shard") from None
        if len(tiles) >= count:
            break
    if not tiles:
        raise FracgenError(f"{dataset} holds no samples to preview")
    rows = -(-len(tiles) // columns)
    sheet = Image.new("L", (columns * tile, rows * tile), 0)
    draw = ImageDraw.Draw(sheet)
    for n, (label, im) in enumerate(tiles):
        x, y = (n % columns) * tile, (n // columns) * tile
        sheet.paste(im, (x, y))
        draw.rectangle([x, y, x + tile - 1, y + tile - 1], outline=64)
        draw.text((x + 4, y + 4), f"class {label}", fill=255)
    out = Path(out)
    if out.is_dir():
        raise FracgenError(f"--out {out} is a directory; give a .png file name")
    if not out.parent.is_dir():
        raise FracgenError(f"--out {out}: directory {out.parent} does not exist")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write(out, lambda f: f.write(buf.getvalue()))
    return len(tiles)
