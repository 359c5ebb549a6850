"""`ftlab`'s defaults for a plain `lightning.Trainer`, from the same `defaults.yaml` the CLI reads first.

    trainer = lightning.Trainer(**trainer_defaults(FreezeUnfreeze(unfreeze_at_epoch=1), name="cats", max_epochs=5))

gives the run what `ftlab fit` gives it: the best checkpoint on val/acc (ties broken by val/loss) and `last.ckpt`,
both written whole (`AtomicCheckpointIO`), early stopping, the feature cache while the backbone is frozen, the test
report, `predictions.csv`, TensorBoard with `metrics.csv` beside it under `runs/<name>/version_N`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping

from datamodules.common import ConfigError
from lightning_modules.console import CompactProgressBar
from lightning_modules.finetuning.strategies import FinetuningStrategy
from lightning_modules.reporting.run_logs import with_run_csv
from lightning_modules.speed.feature_cache import FeatureCache

DEFAULTS = Path(__file__).with_name("defaults.yaml")  # package data: an installed ftlab reads the same file


def read_defaults() -> dict[str, Any]:
    """The parsed `defaults.yaml` (a ConfigError when the installed package lacks it)."""
    if not DEFAULTS.is_file():
        raise ConfigError(f"{DEFAULTS} is missing from the installed package; reinstall finetune-lab")
    defaults: dict[str, Any] = yaml.safe_load(DEFAULTS.read_text())
    return defaults


def instantiate(spec: dict[str, Any], **overrides: Any) -> Any:
    """An object from a `{class_path, init_args}` entry of a config, with `overrides` on its init args."""
    module, _, name = str(spec["class_path"]).rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{**(spec.get("init_args") or {}), **overrides})


def default_callbacks(
    strategy: FinetuningStrategy | None = None,
    progress_bar: bool = True,
    early_stopping: dict[str, Any] | None = None,
    feature_cache: dict[str, Any] | None = None,
) -> list[Callback]:
    """The CLI's callbacks (checkpoints, progress log, non-finite loss stop, resume notice, test report,
    prediction writer), early stopping and the feature cache as `defaults.yaml` sets them (`early_stopping` and
    `feature_cache` change some of their arguments, as the YAML keys of those names do), the compact progress bar,
    and `strategy` (which backbone stages train when) if given."""
    defaults = read_defaults()
    callbacks = [instantiate(spec) for spec in defaults["trainer"]["callbacks"]]
    callbacks += [
        EarlyStopping(**{**defaults["early_stopping"], **(early_stopping or {})}),
        FeatureCache(**{**defaults["feature_cache"], **(feature_cache or {})}),
    ]
    callbacks += [CompactProgressBar()] if progress_bar else []
    return callbacks + ([strategy] if strategy is not None else [])


def default_loggers(save_dir: str = "runs", name: str | None = None, version: str | None = None) -> list[Any]:
    """TensorBoard under `<save_dir>/<name>/version_N` (`name` default: `defaults.yaml`'s) with a CSVLogger writing
    `metrics.csv` into the same folder."""
    spec = read_defaults()["trainer"]["logger"]
    name = name or spec["init_args"]["name"]
    logger = instantiate(spec, save_dir=save_dir, name=name, **({"version": version} if version else {}))
    loggers: list[Any] = with_run_csv(logger, None)
    return loggers


def trainer_defaults(
    strategy: FinetuningStrategy | None = None,
    save_dir: str = "runs",
    name: str | None = None,
    callbacks: Sequence[Callback] = (),
    early_stopping: dict[str, Any] | None = None,
    feature_cache: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Keyword arguments for `lightning.Trainer` with `ftlab fit`'s defaults: `defaults.yaml`'s trainer settings
    (epochs, logging interval, deterministic, the atomic checkpoint plugin), `default_loggers` and
    `default_callbacks` (plus `callbacks`); any Trainer argument in `trainer_kwargs` wins."""
    settings = dict(read_defaults()["trainer"])
    del settings["logger"], settings["callbacks"]
    settings["plugins"] = [instantiate(spec) for spec in settings.get("plugins") or []]
    settings["logger"] = default_loggers(save_dir, name)
    progress_bar = trainer_kwargs.get("enable_progress_bar") is not False
    settings["callbacks"] = [*default_callbacks(strategy, progress_bar, early_stopping, feature_cache), *callbacks]
    return {**settings, **trainer_kwargs}
