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

import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from datamodules.base import Draw, Sample, digest
from datamodules.common import ConfigError, atomic_write
from lightning_modules.console import notice
from lightning_modules.finetuning import FinetuningStrategy

SPLITS = ("train", "val")
DEFAULT_DIR = Path.home() / ".cache" / "finetune-lab" / "features"


class FeatureSet(Dataset):
    """Backbone features (N, num_features) with their labels; files that could not be read are listed aside."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, bad: list[tuple[str, str]]) -> None:
        self.features = features
        self.targets = targets
        self.bad = bad

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: int | Draw) -> Sample:
        """A position, or a `Draw` from `EpochShuffle` (features are not augmented: its seed is not needed)."""
        position = key.position if isinstance(key, Draw) else key
        return Sample(self.features[position], int(self.targets[position]), position)

    def state(self) -> dict[str, Any]:
        """Tensors and strings only: loads with `weights_only=True`."""
        return {"features": self.features, "targets": self.targets, "bad": self.bad}


class FeatureCache(pl.Callback):
    """Serve train and val batches from cached backbone features while a finetuning strategy keeps the backbone
    frozen.

    Args:
        store: `memory` (this fit), `disk` (kept under `cache_dir`, reused by later runs) or `off` (YAML reads an
            unquoted `off` as false, which means the same; `true` means `memory`).
        cache_dir: folder of the disk store; default `~/.cache/finetune-lab/features`.
        force: cache the train split even when its augmentation is random; the frozen phase then trains on
            un-augmented images.
    """

    def __init__(self, store: str | bool = "memory", cache_dir: str | None = None, force: bool = False) -> None:
        if isinstance(store, bool):
            store = "memory" if store else "off"
        if store not in ("memory", "disk", "off"):
            raise ConfigError(f"FeatureCache store {store!r}: choose memory, disk or off")
        self.store = store
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_DIR
        self.force = force
        self.computed: list[str] = []  # splits computed by this callback (the rest came from disk)
        self.loaded: list[str] = []
        self._reload: int | None = None  # the trainer's own reload setting, while the cache overrides it

    # ---------------------------------------------------------------------------------- hooks

    @override
    def on_fit_start(self, trainer: Any, pl_module: pl.LightningModule) -> None:
        """Compute or load the features when the first epoch has a frozen backbone."""
        first = first_epoch(trainer)
        if self.store == "off" or first is None or not self._frozen_at(trainer, pl_module, first):
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "use_features"):
            return
        used = False
        for split in SPLITS:
            view = datamodule.deterministic_view(split, self.force)
            if view is None:
                notice(
                    f"feature cache: train features not cached, augmentation {datamodule.augment!r} is random "
                    "(set `force: true` to train the frozen phase on cached un-augmented images)"
                )
                continue
            if split == "train" and datamodule.augment != "none":
                notice(
                    f"feature cache: the frozen phase trains on un-augmented images (augmentation "
                    f"{datamodule.augment!r} starts at the first unfreeze)"
                )
            features = self._features(pl_module, view, split, datamodule)
            datamodule.skipped |= {(split, path, reason) for path, reason in features.bad}
            datamodule.use_features(split, features)
            used = True
        if used:  # the loaders must be asked for again at the first unfreeze
            self._reload = trainer.reload_dataloaders_every_n_epochs
            trainer.reload_dataloaders_every_n_epochs = 1

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: pl.LightningModule) -> None:
        """After the last frozen epoch, switch the loaders back to images; one epoch later, restore the
        trainer's reload setting (both loaders have been rebuilt by then)."""
        if self._reload is None:
            return
        datamodule: Any = trainer.datamodule
        if datamodule.features and not self._frozen_at(trainer, pl_module, trainer.current_epoch + 1):
            for split in SPLITS:
                datamodule.use_features(split, None)
        elif not datamodule.features:
            trainer.reload_dataloaders_every_n_epochs, self._reload = self._reload, None

    @override
    def on_fit_end(self, trainer: Any, pl_module: pl.LightningModule) -> None:
        """Later test or predict calls read images."""
        datamodule: Any = trainer.datamodule
        if self._reload is not None and datamodule is not None:
            for split in SPLITS:
                datamodule.use_features(split, None)
            trainer.reload_dataloaders_every_n_epochs, self._reload = self._reload, None

    # ---------------------------------------------------------------------------------- helpers

    @staticmethod
    def _frozen_at(trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> bool:
        strategies = [c for c in trainer.callbacks if isinstance(c, FinetuningStrategy)]  # type: ignore[attr-defined]
        backbone = getattr(pl_module, "backbone", None)
        if len(strategies) != 1 or backbone is None:
            return False  # no strategy: the whole network trains
        strategy = strategies[0]
        return not strategy.unfrozen and not strategy.trainable_stages(backbone, epoch)

    def _features(self, pl_module: pl.LightningModule, view: Any, split: str, datamodule: Any) -> FeatureSet:
        backbone: Any = pl_module.backbone
        key = cache_key(backbone, view, split) if self.store == "disk" else None
        path = self.cache_dir / f"{key}.pt" if key is not None else None
        if path is not None and path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.loaded.append(split)
            return FeatureSet(state["features"], state["targets"], [tuple(b) for b in state["bad"]])
        features = compute_features(backbone, datamodule.loader(split, view), pl_module.device)
        self.computed.append(split)
        if path is not None:
            state = features.state()
            atomic_write(path, lambda tmp: torch.save(state, tmp), shared=True)  # processes may write it at once
        return features


def first_epoch(trainer: pl.Trainer) -> int | None:
    """The epoch this fit starts with: 0, or after the checkpoint it resumes (whose loop state is restored only
    after `on_fit_start`); None if the checkpoint cannot be read here."""
    if not trainer.ckpt_path:
        return 0
    try:
        checkpoint = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, pickle.UnpicklingError):
        return None
    return int(checkpoint.get("epoch", 0)) + 1  # a mid-epoch checkpoint errs towards not caching


def cache_key(backbone: Any, view: Any, split: str) -> str | None:
    """Digest of what the features depend on, or None when the data has no fingerprint."""
    data = view.dataset.fingerprint()
    if data is None:
        return None
    weights = digest(*(t.detach().cpu().contiguous().numpy().tobytes() for t in backbone.state_dict().values()))
    return digest(backbone.name, weights, backbone.data_config, repr(view.transform), split, data)


@torch.inference_mode()
def compute_features(backbone: torch.nn.Module, loader: DataLoader, device: torch.device) -> FeatureSet:
    """One pass of the backbone in eval mode over a loader of image `Batch`es; unreadable files are listed, not
    replaced."""
    was_training = backbone.training
    backbone.eval()
    features, targets, bad = [], [], []
    for batch in loader:
        bad += [(b.path, b.reason) for b in batch.skipped]
        if batch.size:
            features.append(backbone(batch.inputs.to(device)).float().cpu())
            targets.append(batch.targets)
    backbone.train(was_training)
    if not features:
        raise ConfigError("feature cache: no readable image in the split")
    return FeatureSet(torch.cat(features), torch.cat(targets), bad)
