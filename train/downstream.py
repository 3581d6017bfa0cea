"""Fine-tuning data sets: scikit-learn digits (no download), local CIFAR-10/100, any ImageFolder, and few-shot splits.

Every data set comes back as (train pool, test set, class count); each yields (RGB PIL image, label). Data sets
with no official test split (digits, a single ImageFolder) are split here: the images not drawn for training are
the test set, as in docs/design.md section 9 (10 images per class of digits for training, tested on the rest).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from .runtime import TrainError

CIFAR = {
    "cifar10": (torchvision.datasets.CIFAR10, "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": (torchvision.datasets.CIFAR100, "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


class Digits(torch.utils.data.Dataset):
    """scikit-learn's 1797 8x8 handwritten digits (values 0..16) as RGB PIL images; the transform upsamples."""

    def __init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.images = (digits.images * (255 / 16)).round().astype(np.uint8)
        self.targets = [int(t) for t in digits.target]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i], "L").convert("RGB"), self.targets[i]


class Transformed(torch.utils.data.Dataset):
    """A subset of a (PIL image, label) data set with a transform applied to the image."""

    def __init__(self, base, indices, transform):
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, label = self.base[self.indices[i]]
        return self.transform(image), label  # the transform converts to RGB


def load(name: str, data_root: Path):
    """Returns (train_base, test_base or None, num_classes); None means "split train_base yourself"."""
    if name == "digits":
        return Digits(), None, 10
    if name in CIFAR:
        cls, url = CIFAR[name]
        try:
            train = cls(str(data_root), train=True, download=False)
            test = cls(str(data_root), train=False, download=False)
        except RuntimeError:
            raise TrainError(f"{name} not found in --data-root {data_root}: download {url} and extract it there "
                             f"(so that {Path(data_root) / cls.base_folder} exists)") from None
        return train, test, len(train.classes)
    path = Path(name)
    if not path.is_dir():
        if path.exists() or os.sep in name or name.startswith((".", "~")):
            raise TrainError(f"--dataset {name}: folder not found (an ImageFolder directory, or digits, cifar10, "
                             "cifar100)")
        raise TrainError(f"unknown --dataset {name!r}: use digits, cifar10, cifar100 or an ImageFolder directory")
    splits = {p.name: p for p in path.iterdir() if p.is_dir()}
    test_dir = splits.get("val") or splits.get("test")
    if "train" in splits and test_dir is not None:
        train = _image_folder(splits["train"])
        test = _image_folder(test_dir)
        if test.classes != train.classes:
            raise TrainError(f"{splits['train']} and {test_dir} have different class folders")
        return train, test, len(train.classes)
    folder = _image_folder(path)
    return folder, None, len(folder.classes)


def load_image(path: str) -> Image.Image:
    """ImageFolder's loader, but a file PIL cannot decode is one TrainError line naming it (a module function:
    loader workers pickle it)."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise TrainError(f"{path} is not an image this can read ({type(e).__name__}{': ' + reason if reason else ''}):"
                         " remove it or replace it") from None


def _image_folder(path: Path):
    try:
        folder = torchvision.datasets.ImageFolder(str(path), loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise TrainError(f"{path} is not an ImageFolder (one sub-folder of images per class): {e}") from None
    if len(folder.classes) < 2:
        raise TrainError(f"{path} has {len(folder.classes)} class folder(s): fine-tuning needs at least two classes "
                         "(one sub-folder of images per class)")
    return folder


def targets_of(dataset) -> np.ndarray:
    return np.asarray(dataset.targets)


def split(targets: np.ndarray, shots: int, fraction: float, seed: int, has_test: bool):
    """Training indices (K per class, or a stratified fraction, or all) and, without a test set, the rest.

    The split has its own seed so that every training seed of a comparison sees the same images.
    """
    rng = np.random.default_rng(seed)
    train = []
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        if shots:
            if shots >= len(members) + (0 if has_test else -1):
                raise TrainError(f"--shots {shots}: class {label} has only {len(members)} images")
            take = shots
        elif fraction:
            take = max(1, round(fraction * len(members)))
        else:
            take = len(members) if has_test else max(1, round(0.5 * len(members)))
        train.extend(members[:take].tolist())
    train = sorted(train)
    rest = None if has_test else sorted(set(range(len(targets))) - set(train))
    return train, rest
