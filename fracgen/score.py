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

import numpy as np
from PIL import Image

from fracgen.dataset import render_sample

MEASURES = ("separation", "confusable", "diversity", "fill")


def shrink(image: np.ndarray, at: int) -> np.ndarray:
    """A uint8 image brought to at x at as the trainer's clean view is (antialiased bicubic), in 0..1."""
    small = Image.fromarray(image).resize((at, at), Image.BICUBIC) if image.shape[0] != at else image
    return np.asarray(small, dtype=np.float32).ravel() / 255


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS distances between the rows of a and of b (a Gram matrix: seconds for 1000 x 1000 at 224 px)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0) / a.shape[1])


def render_pairs(manifest: dict, classes: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Instances 0 and 1 of the first `classes` classes (all by default), at the rendered size."""
    n = manifest["num_classes"] if classes is None else min(classes, manifest["num_classes"])
    first = [render_sample(manifest, k, 0)[0] for k in range(n)]
    second = [render_sample(manifest, k, 1)[0] for k in range(n)]
    return first, second


def score_pairs(first: list[np.ndarray], second: list[np.ndarray], at: int) -> dict:
    """The measures of the module's docstring for one resolution."""
    a = np.stack([shrink(im, at) for im in first])
    b = np.stack([shrink(im, at) for im in second])
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
        "fill": float(np.mean([np.count_nonzero(im) / im.size for im in first])),
        "spread": float(np.median(spread)),
        "nearest": float(np.median(nearest)),
    }


def score(manifest: dict, at: tuple[int, ...] = (32, 224), classes: int | None = None) -> list[dict]:
    """One row of measures per training resolution in `at`, from the first `classes` classes."""
    first, second = render_pairs(manifest, classes)
    return [score_pairs(first, second, size) for size in at]
