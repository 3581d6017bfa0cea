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
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from fracgen.dataset import render_sample
from fracgen.errors import FracgenError

MEASURES = ("separation", "confusable", "diversity", "fill")


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
    """Bytes of memory free now (Linux); 16 GiB where the system does not say."""
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


def shrunk_pairs(manifest: dict, at: tuple[int, ...], classes: int | None = None):
    """({at: (instances 0, instances 1) as (n, at * at) float32 arrays}, fill of each instance 0): the first `classes`
    classes rendered one image at a time and shrunk at once, so memory grows with the resolutions scored, not with
    the rendered size."""
    n = manifest["num_classes"] if classes is None else min(classes, manifest["num_classes"])
    pairs = {a: (np.empty((n, a * a), np.float32), np.empty((n, a * a), np.float32)) for a in at}
    fills = np.empty(n)
    for k in range(n):
        for m in (0, 1):
            image = render_sample(manifest, k, m)[0]
            if m == 0:
                fills[k] = np.count_nonzero(image) / image.size
            for a in at:
                pairs[a][m][k] = shrink(image, a)
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


def score(manifest: dict, at: tuple[int, ...] = (32, 224), classes: int | None = None) -> list[dict]:
    """One row of measures per training resolution in `at`, from the first `classes` classes; refused in one line
    when it would not fit in memory (check_memory)."""
    check_memory(manifest, at, classes)
    pairs, fills = shrunk_pairs(manifest, at, classes)
    return [score_arrays(*pairs[size], fills, size) for size in at]
