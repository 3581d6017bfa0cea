"""Model construction only: a timm model from a name plus keyword arguments, and clean weight dicts.

A checkpoint stores `model_name` and `model_args`, so `timm.create_model(model_name, num_classes=C, **model_args)`
rebuilds exactly the trained network and `load_state_dict(..., strict=True)` accepts our weights.
"""

from __future__ import annotations

import timm
import torch

from train.runtime import TrainError


def architecture_args(img_size=None, patch_size=None, depth=None, extra=None) -> dict:
    """The keyword arguments that define the network's shape; unset ones fall back to the timm model's defaults."""
    args = dict(extra or {})
    for key, value in (("img_size", img_size), ("patch_size", patch_size), ("depth", depth)):
        if value is not None:
            args[key] = value
    return args


def create(name: str, num_classes: int, model_args: dict, drop_path_rate: float = 0.0) -> torch.nn.Module:
    if not timm.is_model(name):
        raise TrainError(f"unknown timm model {name!r} (see timm.list_models())")
    try:
        return timm.create_model(name, num_classes=num_classes, drop_path_rate=drop_path_rate, **model_args)
    except TypeError as e:
        raise TrainError(f"timm model {name!r} does not accept these options {model_args}: {e}") from None


def clean_state_dict(model: torch.nn.Module) -> dict:
    """Weights without the wrappers' prefixes: DDP adds `module.`, torch.compile adds `_orig_mod.`."""
    state = model.state_dict()
    clean = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        clean[key] = value
    return clean


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare timm model under DDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
