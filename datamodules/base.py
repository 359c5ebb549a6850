"""The one base DataModule: splits, transforms and loaders. Subclasses only say how to build a split."""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from datamodules.batches import Batch, EpochShuffle, Transformed
from datamodules.common import (
    ConfigError,
    DataConfig,
    Preprocessed,
    check_range,
    cores,
    gather_lists,
    progress_shown,
)
from datamodules.datasets import Concat, ImageFiles, LabeledDataset
from datamodules.images import IMAGE_EXTENSIONS, list_images, write_bad_images
from datamodules.loaders import FeatureRequest, FeatureSource, SplitLoader
from datamodules.splits import GROUP_PATTERN, group_names, has_copies, kfold_split, stratified_split, stratified_subset
from datamodules.transforms import CROP_SCALE, eval_transform, train_transform


class ImageClassificationDataModule(LightningDataModule):
    """Splits, transforms and loaders for image classification.

    Loaders yield `Batch`es (`batch.inputs`, `batch.targets` ...); the files a batch could not read ride along in
    `batch.skipped`, and the DataModule writes them to the run's `bad_images.csv`.

    Subclasses implement `class_names` and `build_splits`. A split the subclass does not provide is carved from
    its train split: `test` by `test_fraction`, then `val` by `val_fraction`, stratified and seeded. A val split
    carved from train uses evaluation transforms.

    Args:
        batch_size: samples per training batch (per device under DDP).
        eval_batch_size: samples per batch where no gradient flows (validation, test, predict, the feature cache's
            pass over a frozen backbone); default: `batch_size`. Inference keeps no activations for a backward
            pass, so a GPU usually takes about twice the training batch here.
        num_workers: loader processes; default: the CPU cores this process may use, at most 8.
        val_fraction: part of train (after any test carve) held out for validation when the data has no val split.
        test_fraction: part of train held out for testing when the data has no test split.
        split_seed: seed of every split, independent of the training seed.
        augment: training augmentation preset: none, basic, affine, notebook, randaugment, trivialaugment
            (`basic`: padded random crops and flips for small images, random resized crops and flips for photos).
        crop_scale: the smallest part of a photo's area that random resized crops keep (`basic`, `randaugment`,
            `trivialaugment`); torchvision's default 0.08 suits training from scratch on ImageNet.
        train_subset: train on part of the train split (after val and test are carved, so they do not change):
            a fraction (`0.1`) or a number of images per class (`500`), stratified and seeded by `split_seed`.
        data_config: the backbone's preprocessing, given from the model by the CLI; left out, taken at setup
            from the trainer's model. Given and different from the model's, it is a ConfigError.
        pin_memory: default: on when CUDA is available.
        predict_root: what `ftlab predict` predicts: a folder of images (any layout), one image file, or a list of
            files and folders; default: the test split.
        num_folds: stratified k-fold cross-validation: train + val (never test) are pooled and cut into this many
            folds, seeded by `split_seed`; `fold` is the val split, the others train. Default: no folds.
        fold: which fold (0 to num_folds - 1) is the val split.
        group: how copies of one image are recognised, so that a carved split or a fold never holds a copy of a
            training image: `auto` (the usual markers: `aug-<k>-<name>`, `name (1)`, `name - Copy`, `name_aug3`,
            Roboflow's `.rf.<hash>`; `datamodules.splits.GROUP_PATTERN`), a regular expression of your own whose
            matches are removed from a file's name to name its original, or `none`. Files of one class with the
            same name once the markers are removed form a group, and a group is never cut by a split.
    """

    hparams_ignore: tuple[str, ...] = ()

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 42,
        augment: str = "basic",
        crop_scale: float = CROP_SCALE[0],
        train_subset: float | None = None,
        data_config: dict[str, Any] | None = None,
        pin_memory: bool | None = None,
        predict_root: str | list[str] | None = None,
        num_folds: int | None = None,
        fold: int = 0,
        group: str | None = "auto",
    ) -> None:
        super().__init__()
        if num_folds is not None and not (num_folds >= 2 and 0 <= fold < num_folds):
            raise ConfigError(f"k-fold needs num_folds >= 2 and 0 <= fold < num_folds, got {num_folds=} and {fold=}")
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            check_range(f"data.init_args.{key}", value, 0, 1, low_open=True, high_open=True)
        check_range("data.init_args.batch_size", batch_size, 1)
        check_range("data.init_args.eval_batch_size", eval_batch_size, 1, null="batch_size")
        check_range("data.init_args.num_workers", num_workers, 0, null="one per CPU core, at most 8")
        check_range("data.init_args.crop_scale", crop_scale, 0, 1, low_open=True)
        self.save_hyperparameters(ignore=list(self.hparams_ignore))  # hparams.yaml and checkpoints
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = min(cores(), 8) if num_workers is None else num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.augment = augment
        self.crop_scale = crop_scale
        if train_subset is not None and not (0 < train_subset < 1 or (train_subset >= 1 and train_subset % 1 == 0)):
            raise ConfigError(
                f"data.init_args.train_subset must be a fraction in (0, 1) or a whole number of images per class, "
                f"got {train_subset}"
            )
        self.train_subset = train_subset
        self.data_config = DataConfig.from_dict(data_config) if data_config else DataConfig()
        self.data_config_given = bool(data_config)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        for entry in [predict_root] if isinstance(predict_root, str) else predict_root or []:
            if not Path(entry).exists():  # said now, before a checkpoint is read or a model built
                raise ConfigError(f"data.init_args.predict_root {entry}: no such file or folder")
        self.predict_root = predict_root
        self.num_folds, self.fold = num_folds, fold
        self.group = None if group in (None, "none") else GROUP_PATTERN if group == "auto" else group
        if self.group is not None:
            group_names([], [], self.group)  # a bad pattern fails now, not at setup
        self.grouping = ""  # the data summary's line on groups of copies (set at setup)
        self.predict_set: Transformed | None = None
        train_transform(self.data_config, augment, crop_scale)  # fail on a bad preset now, not at setup
        self.datasets: dict[str, Transformed] = {}
        self.skipped: set[tuple[str, str, str]] = set()  # (split, path, reason) of files that could not be read
        self.skipped_total = 0  # the files skipped on every process, as last written to bad_images.csv
        self.others: Counter[str] = Counter()  # files in the data folders left out for their extension

    # ------------------------------------------------------------------------------ what subclasses provide

    @property
    def class_names(self) -> list[str]:
        """Class names in label order."""
        raise NotImplementedError

    def build_splits(self) -> dict[str, LabeledDataset]:
        """Raw splits by name (`train` required; `val`, `test` when the data defines them)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ shared machinery

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Build the three splits once and attach transforms; predicting a `predict_root` needs none of them (nor
        the training data). The preprocessing is the trainer's model's (`link_preprocessing`). The header check of
        every file shows progress (`shows_progress`)."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        if isinstance(model, Preprocessed):
            self.link_preprocessing(model.data_config)
        if self.datasets or (stage == "predict" and self.predict_root is not None):
            return
        with progress_shown(self.shows_progress()):
            raw = self.build_splits()
        for split, dataset in raw.items():
            self.skipped |= {(split, b.path, b.reason) for b in getattr(dataset, "rejected", [])}
            self.others.update(getattr(dataset, "others", {}))
        train = raw["train"]
        self._require_every_class(train)
        if "test" not in raw:
            train, raw["test"] = stratified_split(
                train, self.test_fraction, self.split_seed, self.groups(train), "test", self.class_names
            )
        if self.num_folds:
            pool = Concat([train, raw["val"]]) if "val" in raw else train
            train, raw["val"] = kfold_split(pool, self.num_folds, self.fold, self.split_seed, self.groups(pool))
        elif "val" not in raw:
            train, raw["val"] = stratified_split(
                train, self.val_fraction, self.split_seed, self.groups(train), "val", self.class_names
            )
        if self.train_subset is not None:
            train = stratified_subset(train, self.train_subset, self.split_seed)
        evaluation = eval_transform(self.data_config)
        self.datasets = {
            "train": Transformed(train, train_transform(self.data_config, self.augment, self.crop_scale)),
            "val": Transformed(raw["val"], evaluation),
            "test": Transformed(raw["test"], evaluation),
        }
        rank_zero_info(self.describe(self._write_skipped()))

    def _require_every_class(self, train: LabeledDataset) -> None:
        """A ConfigError naming the classes without a single readable image in `train` (after the header check
        left out the unreadable files, which are written to `bad_images.csv` first): a class no image teaches."""
        present = set(train.targets)
        missing = [name for label, name in enumerate(self.class_names) if label not in present]
        if not missing:
            return
        listed = self._write_skipped()
        bad = sorted((path, reason) for split, path, reason in self.skipped if split == "train")
        why = ""
        if bad:  # without a trainer (a notebook) there is no run directory to list them in: the first is named
            where = f"listed with their reasons in {listed}" if listed else f"the first: {bad[0][0]} ({bad[0][1]})"
            why = f": {len(bad)} unreadable file(s) of train are left out, {where}"
        raise ConfigError(
            f"train has no readable image of class(es) {missing[:10]}{why}. Add readable images of each class, or "
            "list the classes to keep in data.init_args.class_names"
        )

    def shows_progress(self) -> bool:
        """Whether the long steps of this DataModule (the header check of every file) show a progress line on
        stderr: on a trainer, on its process zero when its progress bar is on (`trainer.enable_progress_bar`);
        without one (`setup()` called by hand, in a notebook), on process zero."""
        if self.trainer is None:
            return rank_zero_only.rank == 0  # type: ignore[attr-defined]  # set by Lightning from the environment
        return self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None

    def link_preprocessing(self, model_config: DataConfig) -> None:
        """Take the model's preprocessing (what the CLI gives before building the objects); a ConfigError when this
        DataModule was given another, or already built its splits with another."""
        if model_config == self.data_config:
            return
        if self.data_config_given or self.datasets:
            raise ConfigError(
                f"data_config of the DataModule ({self.data_config.describe()}) differs from the model's backbone "
                f"({model_config.describe()}): leave data_config out (the DataModule takes the model's at setup) or "
                "pass the model's (`data_config=model.data_config.to_dict()`)"
            )
        self.data_config = model_config

    def groups(self, dataset: LabeledDataset) -> list[str] | None:
        """The group of each sample of `dataset` (`data.init_args.group`); None when its samples are not files,
        grouping is off, or no group holds more than one file. Notes the summary's line on groups."""
        files = dataset.files() if self.group is not None else None
        groups = None if files is None or self.group is None else group_names(files, dataset.targets, self.group)
        if not has_copies(groups):
            return None
        assert groups is not None
        self.grouping = self.grouping or (  # the first split's pool: the whole train split
            f"copies grouped: {len(groups):,} files in {len(set(groups)):,} groups, each kept whole in one split "
            "(data.init_args.group)"
        )
        return groups

    def describe(self, bad_images: Path | None = None) -> str:
        """The console's block at setup: the classes, the images per split, the files skipped and where."""
        names = self.class_names
        shown = ", ".join(names[:10]) + (f" ... ({len(names)} in all)" if len(names) > 10 else "")
        sizes = ", ".join(f"{split} {n:,}" for split, n in self.split_sizes().items())
        lines = [f"Data: {len(names)} classes ({shown}); images: {sizes}"]
        if self.grouping:
            lines.append(f"Splits: {self.grouping}")
        for split, missing in self.absent_classes().items():
            lines.append(
                f"Absent: {split} has no image of {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}: "
                f"their {split} accuracy is not measured, and {split}'s macro averages count the other classes"
            )
        if self.others:
            ranked = sorted(self.others.items(), key=lambda item: (-item[1], item[0]))  # most first, then by name
            counts = ", ".join(f"{n:,} {ext}" for ext, n in ranked[:8])
            more = f" and {len(self.others) - 8} more extensions" if len(self.others) > 8 else ""
            lines.append(
                f"Not images: {sum(self.others.values()):,} file(s) left out for their extension ({counts}{more}); "
                f"read: {', '.join(IMAGE_EXTENSIONS)}"
            )
        count = max(len(self.skipped), self.skipped_total)
        if count:
            where = bad_images or "bad_images.csv in the run directory"
            lines.append(f"Skipped {count} unreadable file(s), each listed with its reason in {where}")
        return "\n".join(lines)

    def _write_skipped(self) -> Path | None:
        """Merge the files that could not be read into `bad_images.csv` in the run directory; its path."""
        rows = {tuple(r) for r in gather_lists(sorted(self.skipped))}
        log_dir = self.trainer.log_dir if self.trainer is not None else None  # a collective: every process asks
        self.skipped_total = len(rows)  # every process's
        if not rows or not log_dir or self.trainer is None:
            return None
        path = Path(log_dir) / "bad_images.csv"
        if self.trainer.is_global_zero:
            write_bad_images(path, sorted(rows))
        return path

    def absent_classes(self) -> dict[str, list[str]]:
        """The classes without any image in val or test (after setup), by split; empty when every class is there."""
        absent = {}
        for split in ("val", "test"):
            dataset = self.datasets.get(split)
            present = set(dataset.dataset.targets) if dataset is not None else set(range(self.num_classes))
            missing = [name for i, name in enumerate(self.class_names) if i not in present]
            if missing:
                absent[split] = missing
        return absent

    def split_sizes(self) -> dict[str, int]:
        """Images per split (after setup): what the run trained, validated and tested on."""
        return {split: len(dataset) for split, dataset in self.datasets.items()}

    def loader(
        self, split: str, dataset: Dataset | None = None, shuffle: bool = False, one_pass: bool = False
    ) -> SplitLoader:
        """Batches of `dataset`, or of `split`'s transformed images, shuffled by `EpochShuffle` for training. A train
        or val loader of the split's own images asks, at the start of every pass, for the features a `FeatureSource`
        serves in its place (`cached_features`). `one_pass`: worker processes end with the pass instead of
        persisting (a loader read once, such as the one the features are computed from)."""
        features = partial(self.cached_features, split) if dataset is None and split in ("train", "val") else None
        dataset = self.datasets[split] if dataset is None else dataset
        sampler = None
        if shuffle:
            sampler = EpochShuffle(dataset, torch.initial_seed())
            sampler.set_epoch(self._epoch_starting())
        return SplitLoader(
            dataset,
            split,
            features,
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0 and not one_pass,
            # a last training batch of one image breaks BatchNorm (one value per channel): it is left out
            drop_last=shuffle and len(dataset) % self.batch_size == 1,  # type: ignore[arg-type]
        )

    def cached_features(self, split: str) -> Dataset | None:
        """What the trainer's `FeatureSource` callback (the feature cache) serves in place of `split`'s images in the
        pass about to start, or None (no source, or it says: images). It is told the epoch, the split under
        transforms that are the same every epoch (evaluation transforms when training augments), and the
        augmentation that features would leave out."""
        callbacks = self.trainer.callbacks if self.trainer else []  # type: ignore[attr-defined]
        sources = [c for c in callbacks if isinstance(c, FeatureSource)]
        if not sources:
            return None
        if len(sources) > 1:
            raise ConfigError(f"one feature source at most, got {[type(s).__name__ for s in sources]}")
        images = self.datasets[split]
        augment = self.augment if split == "train" and self.augment != "none" else None
        if augment is not None:
            images = Transformed(images.dataset, eval_transform(self.data_config))
        batches = self.loader(split, images, one_pass=True)
        return sources[0].features_for(FeatureRequest(split, self._epoch_starting(), images, batches, augment))

    def _epoch_starting(self) -> int:
        """The epoch whose loaders the trainer asks for or iterates now (during its validation too), 0 without a
        trainer; on a resume, the epoch restored from the checkpoint (Lightning restores the loop first).

        Lightning (2.6, issue #21938) creates the first training iterator before it calls `set_epoch` on the
        sampler, and a loader with worker processes draws its first indices at once: a resumed run would replay
        epoch 0's order and augmentation. The sampler is therefore built at this epoch."""
        if self.trainer is None:
            return 0
        progress: Any = self.trainer.fit_loop.epoch_progress.current  # typed as the base tracker; it counts these
        return int(progress.processed)

    @override
    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Record the batch's unreadable files (for `bad_images.csv`) under the split its loader named."""
        self.skipped |= {(batch.split, b.path, b.reason) for b in batch.skipped}
        return batch

    @override
    def teardown(self, stage: str) -> None:
        """Write the files that could not be read (at setup or since) into `bad_images.csv`, and say so."""
        path = self._write_skipped()
        if path is not None:
            rank_zero_info(f"{self.skipped_total} unreadable file(s) skipped in all: {path}")

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self.loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        """Validation batches, in order."""
        return self.loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        """Test batches, in order."""
        return self.loader("test")

    def predict_files(self) -> list[Path]:
        """The files `predict_root` names: the images under a folder, one image file, or a list of either."""
        given = [self.predict_root] if isinstance(self.predict_root, str) else list(self.predict_root or [])
        files: list[Path] = []
        for entry in map(Path, given):
            files += list_images(entry) if entry.is_dir() else [entry]
        return files

    @override
    def predict_dataloader(self) -> DataLoader:
        """`predict_root`'s images (every file with an image extension; unreadable ones become error rows; their
        class is unknown, -1), or the test split."""
        if self.predict_root is not None:
            with progress_shown(self.shows_progress()):
                files = ImageFiles([(p, -1) for p in self.predict_files()])
            if not files.paths and not files.rejected:
                raise ConfigError(
                    f"data.init_args.predict_root {self.predict_root} holds no image files (searched its sub-folders "
                    "too; hidden files and other extensions are skipped)"
                )
            self.skipped |= {("predict", b.path, b.reason) for b in files.rejected}
            raw: LabeledDataset = files
        else:
            self.setup("predict")
            raw = self.datasets["test"].dataset
        self.predict_set = Transformed(raw, eval_transform(self.data_config))
        return self.loader("predict", self.predict_set)
