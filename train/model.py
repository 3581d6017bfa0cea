"""Model construction only: a timm model from a name plus keyword arguments, and clean weight dicts.

A checkpoint stores `model_name` and `model_args`, so `timm.create_model(model_name, num_classes=C, **model_args)`
rebuilds exactly the trained network and `load_state_dict(..., strict=True)` accepts our weights.

Those three values are read from files other people publish, and timm.create_model takes far more than a network's
shape: `pretrained=True`, `pretrained_cfg_overlay` or `checkpoint_path` make it download or open whatever they name.
So the factory takes only a registered architecture name, a bounded class count and the shape arguments in
MODEL_ARGS (what fracgen itself writes), each of its type and within its bounds; and a network is sized on the meta
device (no memory) before it is built, so a file cannot ask for a model larger than MAX_PARAMS.
"""

from __future__ import annotations

import math

import timm
import torch

from fracgen.limits import MAX_CLASSES

from .runtime import TrainError

# name: (type, low, high) or (str, allowed values). Shape options of timm's ViTs; `--model-arg` takes these too.
MODEL_ARGS = {
    "img_size": (int, 8, 4096), "patch_size": (int, 1, 256), "depth": (int, 1, 96), "embed_dim": (int, 8, 8192),
    "num_heads": (int, 1, 256), "mlp_ratio": (float, 0.25, 16.0), "in_chans": (int, 1, 16),
    "reg_tokens": (int, 0, 64), "drop_rate": (float, 0.0, 1.0), "attn_drop_rate": (float, 0.0, 1.0),
    "class_token": (bool,), "qkv_bias": (bool,), "global_pool": (str, ("token", "avg", "max", "avgmax", "map", "")),
}
KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
MAX_PARAMS = 1_000_000_000  # ViT-g; 4 GB of float32 weights
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what weights may be stored as (read as float32)


def architecture_args(img_size=None, patch_size=None, depth=None, extra=None) -> dict:
    """The keyword arguments that define the network's shape; unset ones fall back to the timm model's defaults."""
    args = dict(extra or {})
    for key, value in (("img_size", img_size), ("patch_size", patch_size), ("depth", depth)):
        if value is not None:
            args[key] = value
    return args


def check_arg(key: str, value, where: str = "model argument"):
    """`value` if `key` is a MODEL_ARGS name and the value its type within its bounds, else one TrainError line."""
    rule = MODEL_ARGS.get(key)
    if rule is None:
        raise TrainError(f"{where} {key!r} is not one fracgen accepts (only {', '.join(MODEL_ARGS)}): refused, "
                         "nothing was built or fetched")
    kind = rule[0]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TrainError(f"{where} {key}={_short(value)} must be {KIND_NAMES[kind]}")
    if kind is str:
        if value not in rule[1]:
            raise TrainError(f"{where} {key}={_short(value)} must be one of {', '.join(map(repr, rule[1]))}")
    elif kind is not bool and not (rule[1] <= value <= rule[2] and math.isfinite(value)):
        raise TrainError(f"{where} {key}={_short(value)} must be in {rule[1]}..{rule[2]}")
    return value


def check_args(model_args, where: str = "model argument") -> dict:
    """The model arguments a file or a command line gives, each passed through check_arg."""
    if not isinstance(model_args, dict):
        raise TrainError(f"{where}s are not a JSON object")
    return {key: check_arg(str(key), value, where) for key, value in model_args.items()}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _build(name: str, num_classes: int, model_args: dict, drop_path_rate: float, where: str) -> torch.nn.Module:
    where = f"{where}: " if where else ""
    if not isinstance(name, str) or ":" in name or not timm.is_model(name):
        raise TrainError(f"{where}unknown timm model {_short(name)} (a registered name, see timm.list_models())")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise TrainError(f"{where}num_classes {_short(num_classes)} must be in 1..{MAX_CLASSES:,}")
    args = check_args(model_args, f"{where}model argument")
    try:
        return timm.create_model(name, num_classes=num_classes, drop_path_rate=drop_path_rate, **args)
    except Exception as e:  # timm's models assert, raise TypeError or ValueError on shapes they cannot take
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise TrainError(f"{where}timm model {name!r} cannot be built with {args}: {reason}") from None


def skeleton(name: str, num_classes: int, model_args: dict, where: str = "") -> torch.nn.Module:
    """The network on the meta device (shapes, no memory), refused above MAX_PARAMS parameters."""
    with torch.device("meta"):
        model = _build(name, num_classes, model_args, 0.0, where)
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMS:
        at = f"{where}: " if where else ""
        raise TrainError(f"{at}{name} {model_args} with {num_classes:,} classes has {n:,} parameters, more than "
                         f"the {MAX_PARAMS:,} fracgen builds")
    return model


def create(name: str, num_classes: int, model_args: dict, drop_path_rate: float = 0.0,
           where: str = "") -> torch.nn.Module:
    """The timm model, after the checks above (`where`, e.g. the file the values came from, begins their messages)."""
    skeleton(name, num_classes, model_args, where)
    return _build(name, num_classes, model_args, drop_path_rate, where)


def check_weights(skeleton_model: torch.nn.Module, state: dict, where: str) -> None:
    """`state` fits the network exactly (names and shapes), holds floating-point weights only where the network has
    them (float32, or float16/bfloat16 read as float32) and no NaN or infinity: checked before any memory is spent
    on the real model, each problem one line."""
    expected = skeleton_model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        what = (f"lacks {len(missing)} ({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''})" if missing
                else "") + ("; " if missing and extra else "") + \
               (f"has {len(extra)} unknown ({', '.join(extra[:3])}{'...' if len(extra) > 3 else ''})" if extra else "")
        raise TrainError(f"{where}: the weights do not fit the network they name: it {what} tensors")
    for key, want in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise TrainError(f"{where}: weight {key} has shape {shape}, the network needs {tuple(want.shape)}")
        if want.dtype.is_floating_point:
            if got.dtype not in FLOAT_DTYPES:
                raise TrainError(f"{where}: weight {key} is {str(got.dtype).removeprefix('torch.')}, not float32, "
                                 "float16 or bfloat16: not trained weights of this network")
            if not bool(torch.isfinite(got).all()):
                raise TrainError(f"{where}: weight {key} holds non-finite values (NaN or infinite): a diverged or "
                                 "damaged run")
        elif got.dtype != want.dtype:
            raise TrainError(f"{where}: weight {key} is {got.dtype}, the network needs {want.dtype}")


def load_weights(model: torch.nn.Module, state: dict, where: str) -> None:
    """load_state_dict(strict=True) with its multi-line mismatch report turned into one line."""
    try:
        model.load_state_dict(state, strict=True)  # strict: a silent partial load would look like "scratch"
    except RuntimeError as e:
        reason = " ".join(str(e).split())[:200]
        raise TrainError(f"{where}: the weights do not fit the network ({reason})") from None


def clean_state_dict(model: torch.nn.Module) -> dict:
    """Weights without the wrappers' prefixes: DDP adds `module.`, torch.compile adds `_orig_mod.`."""
    state = model.state_dict()
    clean = {}
    for key, value in state.items():
        # in any order and depth: torch.compile(DDP(model)) gives `_orig_mod.module.`, DDP(compile) the reverse
        while key.startswith(("module.", "_orig_mod.")):
            key = key.partition(".")[2]
        clean[key] = value
    return clean


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare timm model under DDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
