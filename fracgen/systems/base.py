"""The interface every data system implements, and the registry that finds them (`fracgen.systems` imports each
system module, whose `@register` puts it here). The lowest layer of the systems: it imports the settings, never a
system."""


from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from fracgen import png
from fracgen.errors import FracgenError
from fracgen.settings import Settings

Progress = Callable[[str, int, int], None]  # (phase, done, total)

# settings every system reads; each system lists the others it reads in `System.uses`
COMMON = ("system", "classes", "per_class", "size", "seed", "shard_size", "name", "png_level")


class System:
    """The interface of a data system (subclass it and decorate it with `@register`)."""

    name: str = ""
    summary: str = ""
    uses: tuple[str, ...] = ()  # the settings besides COMMON that change its bytes
    class_keys: tuple[str, ...] = ()  # what every class record in the manifest must hold

    def validate(self, s: Settings) -> None:
        """Raise FracgenError (one line) for settings this system cannot draw."""

    def resolve(self, s: Settings, pool, progress: Progress | None) -> tuple[dict, list[dict], dict]:
        """Draw the classes from the seed: (header, class records, PNGs already drawn by sample index). The header
        goes into the manifest's `base` (what all classes share); the class records into `classes`, in order.
        `pool` runs jobs in parallel (`fracgen.workers`), on this machine or a cluster."""
        raise NotImplementedError

    def find(self, s: Settings, header: dict, k: int, rows: np.ndarray) -> dict | None:
        """For systems that use `find_classes`: class k's record, its instance 0 drawn into `rows`."""
        raise NotImplementedError

    def prepare(self, s: Settings, header: dict) -> object:
        """Per-process state a worker builds once before drawing samples (e.g. a decoded source image)."""
        return None

    def draw(self, s: Settings, header: dict, state: object, c: dict, k: int, m: int, rows: np.ndarray | None) -> dict:
        """Draw instance m of class k (record c) into the image part of `rows` (a `png.row_buffer`) and return
        the sample's metadata (its `.json`). `rows` None: only the metadata, of an instance 0 `find` drew."""
        raise NotImplementedError


SYSTEMS: dict[str, System] = {}


def register(cls: type[System]) -> type[System]:
    SYSTEMS[cls.name] = cls()
    return cls


def get_system(name: str) -> System:
    try:
        return SYSTEMS[name]
    except KeyError:
        raise FracgenError(f"unknown --system {name!r}; choose one of {', '.join(SYSTEMS)}") from None


def image_of(rows: np.ndarray) -> np.ndarray:
    """The image part of a `png.row_buffer` (its first column holds the PNG filter bytes)."""
    return rows[:, rows.shape[1] - rows.shape[0]:]


def fill_hint(s: Settings) -> str:
    """The other way past --fill: the share of the canvas ink covers grows with the points drawn and shrinks with the
    pixels to cover (a toy's 2,000 points cannot cover much of a 512 px canvas)."""
    return f", or draw more --points than {s.points:,} for a --size of {s.size} px (or a smaller --size)"


def _find_chunk(s: Settings, system_name: str, header: dict, ks: range):
    system = get_system(system_name)
    records, pngs = [], {}
    rows = png.row_buffer(s.size)
    for k in ks:
        record = system.find(s, header, k, rows)
        if record is None:
            return k, [], {}
        records.append(record)
        pngs[k] = png.encode_rows(rows, s.png_level)  # sample k is instance 0 of class k: drawn already
    return None, records, pngs


def find_classes(s: Settings, system: System, header: dict, pool, progress: Progress | None,
                 failure: Callable[[int], str]) -> tuple[list[dict], dict[int, bytes]]:
    """For systems whose classes are searched (redrawn until instance 0 passes a check): `system.find(s, header,
    k, rows)` returns class k's record with instance 0 drawn into `rows`, or None after `--max-retries` draws,
    which stops the run with `failure(k)`. Runs in parallel on `pool`; the result does not depend on its size."""
    chunk = max(1, min(64, -(-s.classes // (4 * pool.workers))))
    chunks = [range(i, min(i + chunk, s.classes)) for i in range(0, s.classes, chunk)]
    classes: list[dict] = []
    pngs: dict[int, bytes] = {}
    jobs = [(s, system.name, header, ks) for ks in chunks]
    with contextlib.closing(pool.map_unordered(_find_chunk, jobs)) as results:  # a failure stops the others now
        for failed, part, part_pngs in results:
            if failed is not None:
                raise FracgenError(failure(failed))
            classes.extend(part)
            pngs.update(part_pngs)
            if progress:
                progress("classes", len(classes), s.classes)
    return sorted(classes, key=lambda c: c["class"]), pngs

