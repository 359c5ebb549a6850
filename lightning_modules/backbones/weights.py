"""Weights from a local file: read a state dict safely and load it strictly, the old classifier excepted."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from datamodules.common import ConfigError

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def is_weights_file(weights: str) -> bool:
    """True when the weights spec names a local file rather than a keyword."""
    return weights.endswith(WEIGHT_SUFFIXES) or os.sep in weights


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file (with `weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist; set model.weights to a state dict file, or 'none'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, optional: Sequence[str]) -> None:
    """Load a state dict strictly, except for keys under `optional` prefixes (the old classifier, replaced anyway):
    they may be missing, or present with another class count."""
    is_optional = lambda k: any(k == p or k.startswith(p + ".") for p in optional)  # noqa: E731
    state_dict = {k: v for k, v in state_dict.items() if not is_optional(k)}
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise ConfigError(f"weights {source} do not fit {type(model).__name__}: wrong shapes {_preview(wrong)}")
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not is_optional(k)]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"weights {source} do not fit {type(model).__name__}: "
            f"missing keys {_preview(missing)}, unexpected keys {_preview(result.unexpected_keys)}"
        )


def _preview(keys: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n]) or "none"
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > n else ''}]"
