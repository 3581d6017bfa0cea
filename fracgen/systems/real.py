"""One real image instead of a fractal (the paper's "one real image" ablation, docs/design.md section 7).

The image (`--image PATH`; by default scikit-learn's bundled china.jpg, so nothing is downloaded) is made
grayscale (`--image-mode gray`) or an edge map (`edges`: Sobel magnitude), centre-cropped to a square and resized
to `--size`, then scaled to 0..127, the fractals' ink level, so every system meets the trainer's recipe on the
same scale. Class k is a fixed random affine perturbation of it: the 2x2 matrix I + U(-Delta, Delta) per entry
and a shift of U(-Delta, Delta) x size/2 per axis, about the image centre. Every instance of a class is the same
image (there is no chaos game to vary); augmentation varies it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError

from fracgen.errors import FracgenError
from fracgen.rng import TAG_AFFINE, derive_seed, uniforms
from fracgen.settings import Settings
from fracgen.systems.base import Progress, System, image_of, register

MODES = ("gray", "edges")
INK = 127


def default_image() -> Path:
    """scikit-learn's china.jpg (BSD), the image the paper's ablation is rerun on; scikit-learn comes with the trainer
    (`fracgen[train]`), not with the renderer's base install."""
    try:
        import sklearn
    except ImportError:
        raise FracgenError("--system real without --image draws scikit-learn's sample image: pip install "
                           "scikit-learn, or give --image PATH") from None
    return Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg"


def source_image(path: Path, mode: str, size: int) -> np.ndarray:
    """The prepared source: `size` x `size` uint8 in 0..127."""
    try:
        with Image.open(path) as im:
            gray = im.convert("L")
    except FileNotFoundError:
        raise FracgenError(f"--image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise FracgenError(f"--image {path} is not an image Pillow can read: {e}") from None
    w, h = gray.size
    side = min(w, h)
    gray = gray.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    arr = np.asarray(gray.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    if mode == "edges":
        p = np.pad(arr, 1, mode="edge")
        gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
        gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
        arr = np.hypot(gx, gy)
        arr *= 255.0 / max(arr.max(), 1e-12)
    return np.rint(arr * (INK / 255.0)).astype(np.uint8)


def class_affine(s: Settings, k: int) -> tuple[list[float], list[float]]:
    """PIL's AFFINE data (output pixel -> source pixel) of class k, and the six offsets drawn for it."""
    d = s.delta * (2.0 * uniforms(derive_seed(s.seed, TAG_AFFINE, k), 6) - 1.0)
    a = np.eye(2) + d[:4].reshape(2, 2)
    c = s.size / 2.0
    t = d[4:] * c
    shift = np.array([c, c]) + t - a @ np.array([c, c])
    return [a[0, 0], a[0, 1], shift[0], a[1, 0], a[1, 1], shift[1]], d.tolist()


@register
class Real(System):
    name = "real"
    summary = "one real image (grayscale or edges), C classes each a random affine perturbation of it"
    uses = ("delta", "image", "image_mode")
    class_keys = ("affine",)

    def validate(self, s: Settings) -> None:
        if s.image_mode not in MODES:
            raise FracgenError(f"--image-mode must be one of {', '.join(MODES)}, got {s.image_mode!r}")

    def resolve(self, s: Settings, pool, progress: Progress | None) -> tuple[dict, list[dict], dict]:
        path = Path(s.image) if s.image else default_image()
        source = source_image(path, s.image_mode, s.size)  # also checks the file
        header = {"image": str(path) if s.image else "scikit-learn datasets/images/china.jpg",
                  "image_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "image_mode": s.image_mode,
                  "pillow": PIL.__version__, "source_sha256": hashlib.sha256(source.tobytes()).hexdigest()}
        classes = []
        for k in range(s.classes):
            affine, noise = class_affine(s, k)
            classes.append({"class": k, "affine": affine, "noise": noise})
        if progress:
            progress("classes", s.classes, s.classes)
        return header, classes, {}

    def prepare(self, s: Settings, header: dict) -> Image.Image:
        path = Path(s.image) if s.image else default_image()
        source = source_image(path, s.image_mode, s.size)
        if hashlib.sha256(source.tobytes()).hexdigest() != header["source_sha256"]:
            raise FracgenError(f"the image {header['image']} (or this Pillow) no longer gives the source this dataset "
                               "was drawn from; use --overwrite")
        return Image.fromarray(source, mode="L")

    def draw(self, s: Settings, header: dict, state: Image.Image, c: dict, k: int, m: int,
             rows: np.ndarray) -> dict:
        out = state.transform((s.size, s.size), Image.Transform.AFFINE, tuple(c["affine"]),
                              resample=Image.Resampling.BILINEAR, fillcolor=0)
        image_of(rows)[:] = np.asarray(out)
        return {"class": k, "instance": m, "delta": s.delta, "affine": c["affine"], "noise": c["noise"],
                "image_sha256": header["image_sha256"], "image_mode": s.image_mode}
