"""Feature caching: while the backbone is frozen, push each image through it once and train the head on the stored
features. The frozen epochs after the first then cost a pass of the head alone.

The cache is keyed by the backbone (name and a digest of its weights), the preprocessing (data config and the
transform), the split and a fingerprint of the data (file paths, sizes and times, or the pixels), so any change
to one of them computes new features. With `store: disk` it outlives the run (a grid search over heads reuses
it); `memory` keeps it for this fit only.

Train features are cached only when its inputs are the same every epoch: `augment: none`, or `force: true`, and
then the frozen phase trains on un-augmented images (a warning says so). Val features are always cacheable.
At the epoch a strategy first unfreezes a stage, the loaders go back to images, without a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from datamodules.base import ImageClassificationDataModule, epoch_starting
from datamodules.batches import Sample, SeededIndex
from datamodules.common import ConfigError, atomic_write, digest
from lightning_modules.console import notice
from lightning_modules.finetuning.strategies import FinetuningStrategy, backbone_of
from lightning_modules.speed.engines import ENGINES, frozen_pass

DEFAULT_DIR = Path.home() / ".cache" / "finetune-lab" / "features"


class FeatureSet(Dataset):
    """Backbone features (N, num_features) with their labels; files that could not be read are listed aside."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, bad: list[tuple[str, str]]) -> None:
        self.features = features
        self.targets = targets
        self.bad = bad

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: int | SeededIndex) -> Sample:
        """A position, or a `SeededIndex` from `EpochShuffle` (features are not augmented: its seed is not needed)."""
        position = key.position if isinstance(key, SeededIndex) else key
        return Sample(self.features[position], int(self.targets[position]), position)

    def state(self) -> dict[str, Any]:
        """Tensors and strings only: loads with `weights_only=True`."""
        return {"features": self.features, "targets": self.targets, "bad": self.bad}


class FeatureCache(pl.Callback):
    """Serve train and val batches from cached backbone features while a finetuning strategy keeps the backbone
    frozen.

    The DataModule asks (`ImageClassificationDataModule.feature_source`) each time the trainer asks it for a train
    or val loader; the cache answers for the epoch about to start, which Lightning has already restored on a
    resume. Features are computed at the first such request of a frozen epoch; at the first unfrozen one the
    answer is "images". While features are served the trainer rebuilds its loaders every epoch
    (`reload_dataloaders_every_n_epochs: 1`, Lightning's one switch for that), so the change takes effect
    without a restart; the user's setting is back one epoch after the unfreeze and at the end of the fit.

    Args:
        store: `memory` (this fit), `disk` (kept under `cache_dir`, reused by later runs) or `off` (YAML reads an
            unquoted `off` as false, which means the same; `true` means `memory`).
        cache_dir: folder of the disk store; default `~/.cache/finetune-lab/features`.
        force: cache the train split even when its augmentation is random; the frozen phase then trains on
            un-augmented images.
        engine: what runs the frozen backbone over the images: `torch`, `onnxruntime` (CPU; the backbone is
            exported once, kept under `cache_dir/onnx`, and used only if it matches torch within 1e-4), or `auto`
            (onnxruntime on CPU when installed). Measured here on batches of 32 at 224 px (2 cores):
            EfficientNet-Lite0 3.5x, MobileNetV2 4.0x, ResNet18 1.5x the images per second of torch.
    """

    def __init__(
        self, store: str | bool = "memory", cache_dir: str | None = None, force: bool = False, engine: str = "torch"
    ) -> None:
        if isinstance(store, bool):
            store = "memory" if store else "off"
        if store not in ("memory", "disk", "off"):
            raise ConfigError(f"FeatureCache store {store!r}: choose memory, disk or off")
        self.store = store
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_DIR
        self.force = force
        if engine not in ENGINES:
            raise ConfigError(f"feature_cache.engine {engine!r}: choose one of {list(ENGINES)}")
        self.engine = engine
        self.computed: list[str] = []  # splits computed by this callback (the rest came from disk)
        self.loaded: list[str] = []
        self._features: dict[str, FeatureSet | None] = {}  # per split, while the backbone is frozen
        self._fit: tuple[pl.Trainer, pl.LightningModule, ImageClassificationDataModule] | None = None
        self._reload: int | None = None  # the trainer's own reload setting, while features are served

    # ---------------------------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """For a fit, become the DataModule's feature source; a loud error when the data cannot take one."""
        if stage != "fit" or self.store == "off":
            return
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if not isinstance(datamodule, ImageClassificationDataModule):
            raise ConfigError(
                f"feature_cache needs an ImageClassificationDataModule (got {type(datamodule).__name__}); "
                "set feature_cache.store off"
            )
        self.computed, self.loaded, self._features = [], [], {}
        self._fit = (trainer, pl_module, datamodule)
        datamodule.feature_source = self

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At the end of the first unfrozen epoch both loaders serve images again: give back the reload setting."""
        if self._reload is not None and not self._frozen_at(trainer.current_epoch):
            set_reload(trainer, self._reload)
            self._reload = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Later test or predict calls read images; the trainer's reload setting is the user's again."""
        if self._fit is not None:
            self._fit[2].feature_source = None
            self._fit, self._features = None, {}
        if self._reload is not None:
            set_reload(trainer, self._reload)
            self._reload = None

    # ---------------------------------------------------------------------------------- the source

    def features_for(self, split: str) -> FeatureSet | None:
        """The features of `split` when the epoch about to start keeps the backbone frozen (computed or loaded
        at the first request), else None."""
        if self._fit is None:
            return None
        trainer, pl_module, datamodule = self._fit
        if not self._frozen_at(epoch_starting(trainer)):
            self._features = {}  # the frozen phase is over: images from now on
            return None
        if split not in self._features:
            self._features[split] = self._prepare(split, pl_module, datamodule)
        features = self._features[split]
        if features is not None and self._reload is None:  # rebuild the loaders every epoch until the unfreeze
            self._reload = set_reload(trainer, 1)
        return features

    def _frozen_at(self, epoch: int) -> bool:
        """Whether the one finetuning strategy keeps the whole backbone frozen at `epoch`."""
        if self._fit is None:
            return False
        trainer, pl_module, _ = self._fit
        strategies = [c for c in trainer.callbacks if isinstance(c, FinetuningStrategy)]  # type: ignore[attr-defined]
        if len(strategies) != 1:
            return False  # no strategy: the whole network trains (two are refused by the CLI)
        strategy = strategies[0]
        return not strategy.unfrozen and not strategy.trainable_stages(backbone_of(pl_module), epoch)

    def _prepare(
        self, split: str, pl_module: pl.LightningModule, datamodule: ImageClassificationDataModule
    ) -> FeatureSet | None:
        view = datamodule.deterministic_view(split, self.force)
        if view is None:
            notice(
                f"feature cache: train features not cached, augmentation {datamodule.augment!r} is random "
                "(set `force: true` to train the frozen phase on cached un-augmented images)"
            )
            return None
        if split == "train" and datamodule.augment != "none":
            notice(
                f"feature cache: the frozen phase trains on un-augmented images (augmentation "
                f"{datamodule.augment!r} starts at the first unfreeze)"
            )
        features = self._features_of(pl_module, view, split, datamodule)
        datamodule.report_unreadable(split, features.bad)
        return features

    def _features_of(
        self, pl_module: pl.LightningModule, view: Any, split: str, datamodule: ImageClassificationDataModule
    ) -> FeatureSet:
        backbone = backbone_of(pl_module)
        key = cache_key(backbone, view, split) if self.store == "disk" else None
        path = self.cache_dir / f"{key}.pt" if key is not None else None
        if path is not None and path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.loaded.append(split)
            return FeatureSet(state["features"], state["targets"], [tuple(b) for b in state["bad"]])
        loader = datamodule.loader(split, view, one_pass=True)
        features = compute_features(backbone, loader, pl_module.device, self.engine, self.cache_dir / "onnx")
        self.computed.append(split)
        if path is not None:
            state = features.state()
            atomic_write(path, lambda tmp: torch.save(state, tmp), shared=True)  # processes may write it at once
        return features


def set_reload(trainer: Any, every_n_epochs: int) -> int:
    """Set the trainer's `reload_dataloaders_every_n_epochs` (an attribute Lightning sets at init, untyped);
    the previous value."""
    previous = int(trainer.reload_dataloaders_every_n_epochs)
    trainer.reload_dataloaders_every_n_epochs = every_n_epochs
    return previous


def cache_key(backbone: Any, view: Any, split: str) -> str | None:
    """Digest of what the features depend on, or None when the data has no fingerprint."""
    data = view.dataset.fingerprint()
    if data is None:
        return None
    weights = digest(*(t.detach().cpu().contiguous().numpy().tobytes() for t in backbone.state_dict().values()))
    return digest(backbone.name, weights, backbone.data_config, repr(view.transform), split, data)


def compute_features(
    backbone: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    engine: str = "torch",
    onnx_dir: Path = DEFAULT_DIR,
) -> FeatureSet:
    """One pass of the backbone in eval mode over a loader of image `Batch`es, by `engine` (see `engines`);
    unreadable files are listed, not replaced."""
    was_training = backbone.training
    backbone.eval()
    features, targets, bad = [], [], []
    run = None
    for batch in loader:
        bad += [(b.path, b.reason) for b in batch.skipped]
        if batch.size:
            run = run or frozen_pass(backbone, device, engine, batch.inputs, onnx_dir)
            features.append(run(batch.inputs))
            targets.append(batch.targets)
    backbone.train(was_training)
    if not features:
        raise ConfigError("feature cache: no readable image in the split")
    return FeatureSet(torch.cat(features), torch.cat(targets), bad)
