"""`scratch/<mlp|simple_cnn>`: the exercises' from-scratch baselines (no pretrained weights; a file may be loaded),
at 32 px with mean = std = 0.5 unless `model.image_size` says otherwise."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from datamodules.common import ConfigError, DataConfig
from lightning_modules.backbones.stages import CamLayer, Stage, has_params, stages_from_blocks
from lightning_modules.backbones.weights import is_weights_file, load_state_dict_file, load_weights

OPTIONS: tuple[str, ...] = ()
MIN_IMAGE_SIZE = 4  # the baselines take small images (sklearn's digits are 8 px); the CNN's forward pass checks
EXAMPLE = "simple_cnn"


def data_config(arch: str, weights: str, in_chans: int) -> DataConfig:
    """32 px, mean = std = 0.5 per channel."""
    return DataConfig((in_chans, 32, 32), (0.5,) * in_chans, (0.5,) * in_chans, "bilinear", 1.0)


def build(arch: str, weights: str, data_config: DataConfig) -> tuple[nn.Module, list[Stage]]:
    """An MLP (two hidden layers) or the exercise's Keras CNN (two conv blocks and a dense layer)."""
    c, h, w = data_config.input_size
    if arch == "mlp":
        body = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Sequential(nn.Linear(c * h * w, 128), nn.ReLU(), nn.Dropout(0.2)),
                fc2=nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Dropout(0.2)),
            )
        )
    elif arch == "simple_cnn":
        # the exercise's Keras model: 3x3 convolutions with padding='same', each followed by 2x2 max-pooling
        conv1 = nn.Sequential(nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        conv2 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        with torch.no_grad():
            flat = conv2(conv1(torch.zeros(1, c, h, w))).numel()
        fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, 512), nn.ReLU())
        body = nn.Sequential(OrderedDict(conv1=conv1, conv2=conv2, fc=fc))
    else:
        raise ConfigError(f"unknown scratch model {arch!r}; choose 'scratch/mlp' or 'scratch/simple_cnn'")
    if weights == "pretrained" or weights == "embedded":
        raise ConfigError(f"scratch/{arch} has no pretrained weights; set model.weights to 'none' or a file")
    if is_weights_file(weights):
        load_weights(body, load_state_dict_file(weights), weights, optional=())
    return body, stages_from_blocks(body, [n for n, m in body.named_children() if has_params(m)])


def cam_layer(body: nn.Module) -> CamLayer | None:
    """The CNN's second convolution block; the MLP flattens the image first and has no spatial map."""
    return CamLayer("conv2") if "conv2" in dict(body.named_children()) else None
