"""`torchvision/<model>`: torchvision's classification models, their weights enums (`pretrained` is DEFAULT, or a
name such as `IMAGENET1K_V2`) and `weights.transforms()` as the preprocessing; stages by family rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from datamodules.common import ConfigError, DataConfig, close_names
from lightning_modules.backbones.stages import CamLayer, Stage, has_params, stages_from_blocks
from lightning_modules.backbones.weights import is_weights_file, load_state_dict_file, load_weights

OPTIONS: tuple[str, ...] = ()
EXAMPLE = "resnet18"


def data_config(arch: str, weights: str, in_chans: int) -> DataConfig:
    """The crop, resize ratio, mean, std and interpolation of the weights' `transforms()` (their DEFAULT when the
    weights are none or a file; timm's defaults for a model without weights)."""
    spec = "pretrained" if weights in ("none", "embedded") or is_weights_file(weights) else weights
    try:
        tv = _weights_enum(arch, spec)
    except (ConfigError, ValueError, KeyError):
        return DataConfig()
    t = tv.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    return DataConfig((3, crop, crop), tuple(t.mean), tuple(t.std), t.interpolation.value, crop / resize)


def build(arch: str, weights: str, data_config: DataConfig) -> tuple[nn.Module, list[Stage]]:
    """`torchvision.models.get_model` with its last `nn.Linear` replaced by an identity."""

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ConfigError(f"torchvision has no classification model {arch!r}; close names: {close_names(arch, names)}")
    if data_config.input_size[0] != 3:
        raise ConfigError(f"torchvision/{arch} takes 3-channel images; set model.in_chans: 3 (grayscale is repeated)")
    tv_weights = None if weights == "none" or is_weights_file(weights) else _weights_enum(arch, weights)
    try:
        model = torchvision.models.get_model(arch, weights=tv_weights)
    except OSError as err:  # offline: urllib's URLError is an OSError
        if tv_weights is None:
            raise
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise ConfigError(
            f"could not download torchvision/{arch} weights {tv_weights.name} ({err}). Put "
            f"{tv_weights.url.rsplit('/', 1)[-1]} (from {tv_weights.url}) into {cache}, or set model.weights to a "
            f"local state dict file"
        ) from None
    classifier = _last_linear(model, arch)
    if is_weights_file(weights):
        load_weights(model, load_state_dict_file(weights), weights, optional=(classifier,))
    _set_submodule(model, classifier, nn.Identity())
    return model, stages(model)


def stages(model: Any) -> list[Stage]:
    """Family rules: ResNet `layerN`; `features.N` (EfficientNet, MobileNet, ConvNeXt; VGG split at pooling);
    ViT encoder layers; otherwise the top-level children. Parameters outside those blocks form their own stages
    (`stem` before the first block, e.g. `classifier` after it)."""

    children = dict(model.named_children())
    if all(f"layer{i}" in children for i in range(1, 5)):
        blocks = [f"layer{i}" for i in range(1, 5)]
    elif isinstance(children.get("features"), nn.Sequential):
        feats = children["features"]
        if isinstance(model, torchvision.models.VGG):  # one stage per conv block, split at pooling
            conv_blocks: list[list[str]] = []
            group: list[str] = []
            for n, m in feats.named_children():
                group.append(f"features.{n}")
                if isinstance(m, nn.MaxPool2d):
                    conv_blocks.append(group)
                    group = []
            return stages_from_blocks(model, conv_blocks + ([group] if group else []))
        blocks = [f"features.{n}" for n, m in feats.named_children() if has_params(m)]
    elif hasattr(model, "encoder") and hasattr(model.encoder, "layers"):
        blocks = [f"encoder.layers.{n}" for n, _ in model.encoder.layers.named_children()]
    else:
        blocks = [n for n, m in children.items() if has_params(m)]
    return stages_from_blocks(model, blocks)


# torchvision families whose last spatial map is one named module (the rest: `layer4`, `features`, ViT's last layer)
NAMED_CAM_LAYERS = ("trunk_output", "conv5", "Mixed_7c", "inception5b")  # RegNet, ShuffleNet, Inception, GoogLeNet


def cam_layer(body: nn.Module) -> CamLayer | None:
    """ResNets' `layer4`; `features` (EfficientNet, MobileNet, VGG, DenseNet, ConvNeXt; NHWC for Swin); the last
    encoder layer of a ViT (tokens after the class token); RegNet, ShuffleNet, Inception and GoogLeNet by name;
    None for the others (MaxViT)."""
    children = dict(body.named_children())
    if "layer4" in children:
        return CamLayer("layer4")
    if isinstance(children.get("features"), nn.Sequential):
        swin = isinstance(body, torchvision.models.SwinTransformer)
        return CamLayer("features", "nhwc" if swin else "nchw")
    if isinstance(body, torchvision.models.VisionTransformer):
        last = list(body.encoder.layers.named_children())[-1][0]  # `encoder_layer_11`
        return CamLayer(f"encoder.layers.{last}", "tokens", 1)
    return next((CamLayer(name) for name in NAMED_CAM_LAYERS if name in children), None)


def _weights_enum(arch: str, weights: str) -> Any:

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        if weights == "pretrained":
            raise ConfigError(f"torchvision/{arch} has no pretrained weights; set model.weights: none") from None
        raise
    if weights == "pretrained":
        return enum.DEFAULT
    try:
        return enum[weights]
    except KeyError:
        raise ConfigError(
            f"model.weights {weights!r} is not a weights name of torchvision/{arch}; choose one of "
            f"{[w.name for w in enum]}, 'pretrained', 'none' or a file path"
        ) from None


def _last_linear(model: nn.Module, arch: str) -> str:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"torchvision/{arch} has no final nn.Linear classifier to replace; pick another backbone")
    return linears[-1]


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
