"""How learnable a rendered set is at a training resolution, from the data alone (`fracgen score`).

The pretext task asks a network to tell C classes apart from one render of each, under crops and flips. Whether it
can depends on how far apart the classes' images are at the resolution it trains at, against how far apart two
renders of the *same* class are (new chaos-game points, new patch masks: noise the network must ignore). FractalDB
filters its classes by filling rate; 1p-frac has no such filter, and at 32 px two classes Delta = 0.1 apart can
differ by less than one pixel.

For every class k we render instances 0 and 1 (`render_sample`, bit for bit the shards' instance 0), shrink them to
`at` x `at` the way the trainer's clean view does (PIL's antialiased bicubic resize of the whole image), and measure
in root-mean-square grey levels (0..1 per pixel):
- spread_k: instance 0 against instance 1 of class k, the noise within a class;
- nearest_k: instance 0 of k against the closest instance 0 of another class;
and report over the classes:
- separation: median of nearest_k / spread_k (below 1: most classes are closer to another class than to themselves);
- confusable: the share of classes with nearest_k <= spread_k;
- diversity: median distance between two classes over median spread (how different the classes are at all);
- fill: mean share of non-zero pixels at the rendered size (FractalDB's filling rate).
Which of these predicts pretext accuracy is an empirical question (docs/results.md, "Which base will learn?").

The time goes into rendering at the manifest's size: ~4 ms a class at 512 px, ~3.3 s at 16384 px (a manifest that
claims it made 1000 classes an hour's silent work). The second class's time (the first carries the renderer's
start-up) gives an estimate: said before the rest when it is long, refused past a bound (MAX_SECONDS, `fracgen score
--max-minutes`) with how to proceed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from fracgen.dataset import render_sample
from fracgen.errors import FracgenError

MEASURES = ("separation", "confusable", "diversity", "fill")
MAX_SECONDS = 600.0  # the most a score may take unless asked (`--max-minutes`): 1000 classes at 512 px take ~5 s
NOTE_SECONDS = 10.0  # a score estimated at longer says so before the rest of its work


def shrink(image: np.ndarray, at: int) -> np.ndarray:
    """A uint8 image brought to at x at as the trainer's clean view is (antialiased bicubic), in 0..1."""
    small = Image.fromarray(image).resize((at, at), Image.BICUBIC) if image.shape[0] != at else image
    return np.asarray(small, dtype=np.float32).ravel() / 255


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS distances between the rows of a and of b (a Gram matrix: seconds for 1000 x 1000 at 224 px)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0) / a.shape[1])


def memory_needed(manifest: dict, at: tuple[int, ...], classes: int | None = None) -> int:
    """Bytes `score` holds at its peak: both instances of every class shrunk to each resolution (float32), the
    class-by-class distance matrices, and one render at the manifest's size in flight."""
    n = manifest["num_classes"] if classes is None else min(classes, manifest["num_classes"])
    size = manifest["image"]["size"]
    return 8 * n * sum(a * a for a in at) + 32 * n * n + 4 * size * size


def available_memory() -> int:
    """Bytes of memory a new allocation can have now: Linux's MemAvailable, which counts the page cache the kernel
    gives back (free pages alone, SC_AVPHYS_PAGES, read 0.8 GiB of 22 GiB after a few pip installs filled the
    cache); free pages where there is no /proc/meminfo; 16 GiB where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def check_memory(manifest: dict, at: tuple[int, ...], classes: int | None = None) -> None:
    """One FracgenError line, before any work, when scoring would take more than half the memory free now."""
    need, free = memory_needed(manifest, at, classes), available_memory()
    if need > free // 2:
        n = manifest["num_classes"] if classes is None else min(classes, manifest["num_classes"])
        raise FracgenError(f"scoring {n:,} classes at {', '.join(map(str, at))} px needs about {need / 2**30:,.1f} "
                           f"GiB of memory, more than half of the {free / 2**30:,.1f} GiB free: score fewer classes "
                           "(--classes) or at lower resolutions (--at)")


def duration(seconds: float) -> str:
    """0.4 s, 6 s, 2 min 5 s, 3 h 12 min: a time as a person reads it."""
    if seconds >= 3600:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
    if seconds >= 60:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    return f"{seconds:.1f}".removesuffix(".0") + " s"


def check_time(manifest: dict, n: int, per_class: float, spent: float, max_seconds: float | None = None,
               note: Callable[[str], None] | None = None) -> None:
    """After two of `n` classes (`spent` seconds, the second `per_class`): one FracgenError line, saying how to go
    on, when the whole would take longer than `max_seconds` (default MAX_SECONDS); else the estimate to `note` when
    it is NOTE_SECONDS or more."""
    bound = MAX_SECONDS if max_seconds is None else max_seconds
    estimate = spent + per_class * (n - 2)
    what = (f"scoring {n:,} classes renders {2 * n:,} images of {manifest['image']['size']} px: about "
            f"{duration(estimate)}")
    if estimate > bound:
        fit = max(2, int(bound // per_class)) if per_class > 0 else n
        raise FracgenError(f"{what} ({per_class:.2f} s a class here), past the {duration(bound)} bound: score fewer "
                           f"classes (--classes {fit}) or allow the time (--max-minutes {math.ceil(estimate / 60)})")
    if note and estimate >= NOTE_SECONDS:
        note(what)


def shrunk_pairs(manifest: dict, at: tuple[int, ...], classes: int | None = None, *, max_seconds: float | None = None,
                 note: Callable[[str], None] | None = None, progress: Callable[[int, int], None] | None = None):
    """({at: (instances 0, instances 1) as (n, at * at) float32 arrays}, fill of each instance 0): the first `classes`
    classes rendered one image at a time and shrunk at once, so memory grows with the resolutions scored, not with
    the rendered size. Timed on its second class (`check_time`); `progress(done, n)` after each class."""
    n = manifest["num_classes"] if classes is None else min(classes, manifest["num_classes"])
    pairs = {a: (np.empty((n, a * a), np.float32), np.empty((n, a * a), np.float32)) for a in at}
    fills = np.empty(n)
    start = time.monotonic()
    for k in range(n):
        begun = time.monotonic()
        for m in (0, 1):
            image = render_sample(manifest, k, m)[0]
            if m == 0:
                fills[k] = np.count_nonzero(image) / image.size
            for a in at:
                pairs[a][m][k] = shrink(image, a)
        if k == 1:  # class 0 carries the renderer's start-up (~0.4 s); class 1 costs what every further one does
            check_time(manifest, n, time.monotonic() - begun, time.monotonic() - start, max_seconds, note)
        if progress:
            progress(k + 1, n)
    return pairs, fills


def score_arrays(a: np.ndarray, b: np.ndarray, fills: np.ndarray, at: int) -> dict:
    """The measures of the module's docstring for one resolution, from the shrunk instances 0 (`a`) and 1 (`b`)."""
    spread = np.sqrt(((a - b) ** 2).mean(1))
    between = _distances(a, a)
    np.fill_diagonal(between, np.inf)
    nearest = between.min(1)
    pairs = between[np.triu_indices(len(a), 1)]
    tiny = 1e-12  # identical renders (a degenerate set): a ratio of 0 rather than a division by zero
    return {
        "at": at,
        "classes": len(a),
        "separation": float(np.median(nearest / np.maximum(spread, tiny))),
        "confusable": float(np.mean(nearest <= spread)),
        "diversity": float(np.median(pairs) / max(float(np.median(spread)), tiny)) if len(pairs) else 0.0,
        "fill": float(np.mean(fills)),
        "spread": float(np.median(spread)),
        "nearest": float(np.median(nearest)),
    }


def score(manifest: dict, at: tuple[int, ...] = (32, 224), classes: int | None = None, *,
          max_seconds: float | None = None, note: Callable[[str], None] | None = None,
          progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One row of measures per training resolution in `at`, from the first `classes` classes; refused in one line
    when it would not fit in memory (check_memory), or take longer than `max_seconds` (check_time, after two
    classes; `note` hears a long one's estimate first, `progress` each class)."""
    check_memory(manifest, at, classes)
    pairs, fills = shrunk_pairs(manifest, at, classes, max_seconds=max_seconds, note=note, progress=progress)
    return [score_arrays(*pairs[size], fills, size) for size in at]
