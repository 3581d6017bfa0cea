"""Linear probe: a readout of frozen features that no fine-tuning hyper-parameter can move.

The network (a pre-trained checkpoint, or the same architecture freshly initialised: "scratch") is frozen; each
image becomes its class token and its mean patch token, concatenated; a logistic regression (scikit-learn,
standardised features) is trained on the few-shot split and tested on the rest, for each split seed.

    fracgen-train probe --checkpoint runs/cpu-seed4/ckpt.pt
    fracgen-train probe --checkpoint none            # the same architecture, randomly initialised
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fracgen.untrusted import printable, redact

from . import data, downstream
from . import model as model_lib
from .finetune import Config as FinetuneConfig
from .finetune import load_pretrained
from .runtime import TrainError, atomic_write_json, run_cli, seed_everything


def features(model: torch.nn.Module, dataset, batch: int = 256) -> np.ndarray:
    """Class token and mean patch token of the last block (after the final norm), per image."""
    model.eval()
    out = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    prefix = getattr(model, "num_prefix_tokens", 1)
    with torch.no_grad():
        for x, _ in loader:
            tokens = model.forward_features(x)
            out.append(torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=1).float().numpy())
    return np.concatenate(out)


def probe(checkpoint: str = "none", dataset: str = "digits", shots: int = 10, seeds: tuple[int, ...] = (0, 1, 2),
          init_seed: int = 0, out: str = "", cache_dir: str = "") -> dict:
    """Top-1 (%) of a linear probe on frozen features, one split per seed."""
    pretrained = None if checkpoint.lower() == "none" else load_pretrained(checkpoint, cache_dir)
    if pretrained is None:
        cfg = FinetuneConfig()
        seed_everything(init_seed)
        name, args = cfg.model, model_lib.architecture_args(cfg.img_size, cfg.patch_size, cfg.depth)
        model = model_lib.create(name, 10, args)
    else:
        name, args, pretext_classes, state = pretrained
        model = model_lib.create(name, pretext_classes, args)
        model_lib.load_weights(model, state, "--checkpoint")
    img_size = args.get("img_size", FinetuneConfig.img_size)
    base, test_base, _ = downstream.load(dataset, Path("data"))
    if test_base is not None:
        raise TrainError("the probe splits one pool into shots and rest; use digits or a single ImageFolder")
    tf = data.eval_transform(img_size, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD)
    every = downstream.Transformed(base, range(len(base)), tf)
    feats = features(model, every)
    targets = downstream.targets_of(base)
    accuracies = []
    for seed in seeds:
        train_idx, rest_idx = downstream.split(targets, shots, 0.0, seed, has_test=False)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        clf.fit(feats[train_idx], targets[train_idx])
        accuracies.append(100 * float((clf.predict(feats[rest_idx]) == targets[rest_idx]).mean()))
    result = {"checkpoint": redact(checkpoint), "dataset": dataset, "shots": shots, "features": int(feats.shape[1]),
              "top1": dict(zip(map(str, seeds), accuracies, strict=True)),
              "top1_mean": statistics.mean(accuracies),
              "top1_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0}
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(result, Path(out) / "probe.json")
    return result


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    checkpoint: Annotated[str, typer.Option(help="A pretrain run folder, its model.safetensors or ckpt.pt, a "
                                                 "published folder's http(s):// URL or hf://ORG/NAME\\[@REVISION], or "
                                                 "none (random init).")] = "none",
    cache_dir: Annotated[str, typer.Option(help="Download cache for a published --checkpoint.")] = "",
    dataset: Annotated[str, typer.Option(help="digits, or an ImageFolder path (split here).")] = "digits",
    shots: Annotated[int, typer.Option(help="Training images per class.")] = 10,
    seeds: Annotated[str, typer.Option(help="Split seeds, comma-separated.")] = "0,1,2",
    out: Annotated[str, typer.Option(help="Folder for probe.json.")] = "",
):
    """Linear probe of frozen features on a few-shot split."""
    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise TrainError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    if shots < 1:
        raise TrainError(f"--shots must be at least 1, got {shots}")
    r = probe(checkpoint, dataset, shots, seed_list, out=out, cache_dir=cache_dir)
    print(f"linear probe: top-1 {r['top1_mean']:.1f} +- {r['top1_std']:.1f} % over {len(seed_list)} split(s) "
          f"on {dataset} ({printable(checkpoint)}, {r['features']} features)")


if __name__ == "__main__":
    run_cli(app)
