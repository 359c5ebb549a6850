"""Feature caching: while the backbone is frozen, push each image through it once and train the head on the stored
features. The frozen epochs after the first cost a pass of the head alone.

The cache is keyed by the backbone (name and a digest of its weights), the preprocessing (data config and the
transform), the split and a fingerprint of the data (file paths, sizes and times, or the pixels), so any change
to one of them computes new features. With `store: disk` it outlives the run (a grid search over heads reuses
it); `memory` keeps it for this fit only.

Train features are cached only when its inputs are the same every epoch: `augment: none`, or `force: true`, and
then the frozen phase trains on un-augmented images (a warning says so). Val features are always cacheable.
From the epoch a strategy first unfreezes a stage, the answer is "images", without a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from datamodules.base import ImageClassificationDataModule
from datamodules.batches import Sample, SeededIndex, Transformed
from datamodules.common import ConfigError, atomic_write, digest, progress
from datamodules.images import BadSample
from datamodules.loaders import FeatureRequest, FeatureSource
from lightning_modules.console import notice
from lightning_modules.finetuning.strategies import FinetuningStrategy, backbone_of
from lightning_modules.speed.engines import check_engine, chosen_engine, frozen_pass

DEFAULT_DIR = Path.home() / ".cache" / "finetune-lab" / "features"
LAYOUT = 2  # of the stored features, in the disk key: 2 holds every position of the split, unreadable ones too


class FeatureSet(Dataset):
    """Backbone features of each position of a split (N, num_features) with the labels; a position whose file
    could not be read yields its `BadSample`, as the split's images do."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, bad: dict[int, BadSample]) -> None:
        self.features = features
        self.targets = targets
        self.bad = bad

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: int | SeededIndex) -> Sample:
        """A position, or a `SeededIndex` from `EpochShuffle` (features are not augmented: its seed is not needed)."""
        position = key.position if isinstance(key, SeededIndex) else key
        if position in self.bad:
            return Sample(self.bad[position], -1, position)
        return Sample(self.features[position], int(self.targets[position]), position)

    def state(self) -> dict[str, Any]:
        """Tensors, numbers and strings only: loads with `weights_only=True`."""
        bad = [(position, b.path, b.reason) for position, b in sorted(self.bad.items())]
        return {"features": self.features, "targets": self.targets, "bad": bad}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FeatureSet:
        """The set `state()` described."""
        bad = {int(position): BadSample(path, reason) for position, path, reason in state["bad"]}
        return cls(state["features"], state["targets"], bad)


class FeatureCache(pl.Callback, FeatureSource):
    """Serve train and val batches from cached backbone features while a finetuning strategy keeps the backbone
    frozen.

    A `FeatureSource`: the DataModule's train and val loaders ask it at the start of every pass
    (`ImageClassificationDataModule.cached_features`), naming the epoch about to run, which Lightning has already
    restored on a resume. Features are computed (or loaded from disk) at the first request of a frozen epoch; from
    the first unfrozen epoch the answer is None, and the same loaders read images. The loaders are never rebuilt
    for it and no trainer setting changes; the cache never calls the DataModule.

    Args:
        store: `memory` (this fit), `disk` (kept under `cache_dir`, reused by later runs) or `off` (YAML reads an
            unquoted `off` as false, which means the same; `true` means `memory`).
        cache_dir: folder of the disk store; default `~/.cache/finetune-lab/features`.
        force: cache the train split even when its augmentation is random; the frozen phase then trains on
            un-augmented images.
        engine: what runs the frozen backbone over the images: `torch`, `onnxruntime` (CPU; the backbone is
            exported once, kept under `cache_dir/onnx`, and used only if it matches torch within 1e-4), or `auto`
            (the default: onnxruntime on CPU for the families it was measured faster on, `engines.auto_engine`;
            torch otherwise and on GPU). How much faster per backbone: docs/benchmark.md.
    """

    def __init__(
        self, store: str | bool = "memory", cache_dir: str | None = None, force: bool = False, engine: str = "auto"
    ) -> None:
        if isinstance(store, bool):
            store = "memory" if store else "off"
        if store not in ("memory", "disk", "off"):
            raise ConfigError(f"FeatureCache store {store!r}: choose memory, disk or off")
        self.store = store
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_DIR
        self.force = force
        self.engine = check_engine(engine, "feature_cache.engine")
        self.computed: list[str] = []  # splits computed by this callback (the rest came from disk)
        self.loaded: list[str] = []
        self._features: dict[str, FeatureSet | None] = {}  # per split, while the backbone is frozen
        self._fit: tuple[pl.Trainer, pl.LightningModule] | None = None

    # ---------------------------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """For a fit, answer the DataModule's requests; a loud error when the data would never ask."""
        if stage != "fit" or self.store == "off":
            return
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if not isinstance(datamodule, ImageClassificationDataModule):
            raise ConfigError(
                f"feature_cache needs an ImageClassificationDataModule (got {type(datamodule).__name__}); "
                "set feature_cache.store off"
            )
        self.computed, self.loaded, self._features = [], [], {}
        self._fit = (trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Later test, validate or predict calls read images."""
        self._fit, self._features = None, {}

    # ---------------------------------------------------------------------------------- the source

    @override
    def features_for(self, request: FeatureRequest) -> FeatureSet | None:
        """The features of `request.split` when `request.epoch` keeps the backbone frozen (computed or loaded at the
        first request), else None."""
        if self._fit is None or not self._frozen_at(request.epoch):
            self._features = {}  # not fitting, or the frozen phase is over: images from now on
            return None
        if request.split not in self._features:
            self._features[request.split] = self._prepare(request)
        return self._features[request.split]

    def _frozen_at(self, epoch: int) -> bool:
        """Whether the one finetuning strategy keeps the whole backbone frozen at `epoch`."""
        if self._fit is None:
            return False
        trainer, pl_module = self._fit
        strategies = [c for c in trainer.callbacks if isinstance(c, FinetuningStrategy)]  # type: ignore[attr-defined]
        if len(strategies) != 1:
            return False  # no strategy: the whole network trains (two are refused by the CLI)
        strategy = strategies[0]
        return not strategy.unfrozen and not strategy.trainable_stages(backbone_of(pl_module), epoch)

    def _prepare(self, request: FeatureRequest) -> FeatureSet | None:
        if request.augment is not None and not self.force:
            notice(
                f"feature cache: train features not cached, augmentation {request.augment!r} is random "
                "(set `force: true` to train the frozen phase on cached un-augmented images)"
            )
            return None
        if request.augment is not None:
            notice(
                f"feature cache: the frozen phase trains on un-augmented images (augmentation "
                f"{request.augment!r} starts at the first unfreeze)"
            )
        return self._features_of(request)

    def _features_of(self, request: FeatureRequest) -> FeatureSet:
        assert self._fit is not None
        trainer, pl_module = self._fit
        backbone = backbone_of(pl_module)
        key = cache_key(backbone, request.images, request.split) if self.store == "disk" else None
        path = self.cache_dir / f"{key}.pt" if key is not None else None
        if path is not None and path.is_file():
            self.loaded.append(request.split)
            return FeatureSet.from_state(torch.load(path, map_location="cpu", weights_only=True))
        shown = trainer.is_global_zero and trainer.progress_bar_callback is not None
        with progress(f"{request.split} features", "image", len(request.images), shown=shown) as bar:
            engine = chosen_engine(self.engine, backbone.name, pl_module.device, "feature pass")
            features = compute_features(
                backbone, request.batches, pl_module.device, engine, self.cache_dir / "onnx", bar.update
            )
        self.computed.append(request.split)
        if path is not None:
            state = features.state()
            atomic_write(path, lambda tmp: torch.save(state, tmp), shared=True)  # processes may write it at once
        return features


def cache_key(backbone: Any, images: Transformed, split: str) -> str | None:
    """Digest of what the features depend on, or None when the data has no fingerprint."""
    data = images.dataset.fingerprint()
    if data is None:
        return None
    weights = digest(*(t.detach().cpu().contiguous().numpy().tobytes() for t in backbone.state_dict().values()))
    return digest(LAYOUT, backbone.name, weights, backbone.data_config, repr(images.transform), split, data)


def compute_features(
    backbone: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    engine: str = "torch",
    onnx_dir: Path = DEFAULT_DIR,
    done: Callable[[int], Any] | None = None,
) -> FeatureSet:
    """One pass of the backbone in eval mode over a loader of image `Batch`es in dataset order, by `engine` (see
    `engines`): the features of every position; an unreadable file keeps its position and its `BadSample`.
    `done(n)` is told each batch's images, unreadable ones included (a progress line's `update`)."""
    was_training = backbone.training
    backbone.eval()
    rows, targets, positions = [], [], []
    bad: dict[int, BadSample] = {}
    end, run = 0, None
    for batch in loader:
        # the loader reads positions in order: this batch holds the next size + skipped ones, its readable ones
        # named by `indices`, its unreadable ones at the rest, in order
        span = range(end, end + batch.size + len(batch.skipped))
        end = span.stop
        readable = set(batch.indices.tolist())
        bad.update(zip([p for p in span if p not in readable], batch.skipped, strict=True))
        if batch.size:
            run = run or frozen_pass(backbone, device, engine, batch.inputs, onnx_dir)
            rows.append(run(batch.inputs))
            targets.append(batch.targets)
            positions.append(batch.indices)
        if done is not None:
            done(len(span))
    backbone.train(was_training)
    if not rows:
        raise ConfigError("feature cache: no readable image in the split")
    found = torch.cat(rows)
    features = torch.zeros(end, found.shape[1], dtype=found.dtype)
    labels = torch.full((end,), -1, dtype=torch.long)
    at = torch.cat(positions)
    features[at], labels[at] = found, torch.cat(targets)
    return FeatureSet(features, labels, bad)
