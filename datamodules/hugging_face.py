"""Any Hugging Face image-classification dataset, read by `datasets` itself: a Hub id (with `name` and `revision`),
a folder written by `save_to_disk`, parquet files, or a folder of class folders (`imagefolder`). Images are decoded
in the loader workers from the memory-mapped Arrow table; `datasets`' own cache serves the next run."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from typing_extensions import override

from datamodules.base import ImageClassificationDataModule
from datamodules.common import ConfigError, digest
from datamodules.datasets import LabeledDataset
from datamodules.images import DECODE_ERRORS, IMAGE_EXTENSIONS, BadSample, bad_reason, load_image, skipped_folder

# The names a split goes by on the Hub, for each of ours (the first one found is taken).
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes (a DatasetDict, a Dataset)
DATA_FILES = (".parquet", ".arrow", ".csv", ".json", ".jsonl")  # what `load_dataset` reads from a local folder


def load_hf(path: str, name: str | None, revision: str | None, data_dir: str | None, data_files: Any, key: str) -> Any:
    """A `DatasetDict` of every split of the dataset at `path` (`key`: the config key that named it, for errors):
    `load_from_disk` for a `save_to_disk` folder, else `load_dataset` (a Hub id, a local folder of parquet files or
    class folders, or a builder name such as `imagefolder` or `parquet` with `data_dir` / `data_files`)."""
    import datasets

    local = Path(path).expanduser()
    if local.is_dir() and any((local / marker).is_file() for marker in SAVED_MARKERS):
        loaded = datasets.load_from_disk(str(local))
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    if not local.exists() and path.startswith((".", "/", "~")):
        raise ConfigError(
            f"{key} {local}: no such folder; give a Hub id, a save_to_disk folder, or a folder of parquet files or "
            "of class folders"
        )
    if local.is_dir() and data_dir is None and data_files is None:
        require_dataset_files(local, key)
    try:
        return datasets.load_dataset(path, name, revision=revision, data_dir=data_dir, data_files=data_files)
    except (ConnectionError, FileNotFoundError) as err:  # not cached and not reachable (offline, or no such id)
        if local.is_dir():  # a local folder of files that datasets does not take as data (a stray JSON ...)
            require_dataset_files(local, key, found=True)
        why = "offline (HF_HUB_OFFLINE is set)" if datasets.config.HF_HUB_OFFLINE else _first_line(err)
        folder = Path(path).name
        raise ConfigError(
            f"{key} {path!r} is not in this machine's Hugging Face cache: {why}. On a machine with network run "
            f"`hf download {path} --repo-type dataset --local-dir {folder}`, copy {folder} here and set {key} to it"
        ) from None
    except ValueError as err:  # a config name missing or unknown, a revision that does not exist ...
        raise ConfigError(f"{key} {path!r}: {_first_line(err)}") from None
    except datasets.exceptions.DatasetGenerationError as err:  # a data file that its builder cannot parse
        cause = err.__cause__ or err.__context__ or err
        raise ConfigError(f"{key} {path!r}: datasets cannot read its files ({_first_line(cause)})") from None


def require_dataset_files(folder: Path, key: str, found: bool = False) -> None:
    """A ConfigError saying what `folder` lacks when it holds nothing `datasets` can load (or, `found`, when
    `datasets` found nothing to load in what it holds): no `save_to_disk` files (checked before), no parquet, arrow,
    CSV or JSON files, no images. The walk stops at the first file it can load."""
    others: Counter[str] = Counter()
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not skipped_folder(d)]
        for name in files:
            suffix = Path(name).suffix.lower()
            if not found and (suffix in DATA_FILES or suffix in IMAGE_EXTENSIONS):
                return
            others[suffix or "(none)"] += 1
    held = f"{sum(others.values())} file(s): {', '.join(sorted(others))}" if others else "it is empty"
    held = f"datasets finds no data in its {held}" if found else held
    raise ConfigError(
        f"{key} {folder} holds no dataset ({held}): it needs the files of `save_to_disk` ({', '.join(SAVED_MARKERS)}), "
        f"data files ({', '.join(DATA_FILES)}), or images in class folders (<folder>/<class>/*.jpg)"
    )


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def pick_column(dataset: Any, given: str | None, usual: tuple[str, ...], kind: str, key: str, source: str) -> str:
    """The column `given`, or the first of the `usual` names the dataset has, or its only column of feature type
    `kind` (`Image`, `ClassLabel`); a ConfigError naming the columns there are when there is none."""
    columns = list(dataset.column_names)
    if given is not None:
        if given not in columns:
            raise ConfigError(f"{key} {given!r} is not a column of {source}; its columns are {columns}")
        return given
    found = [c for c in usual if c in columns]
    if not found:
        found = [c for c, feature in dataset.features.items() if type(feature).__name__ == kind]
    if len(found) != 1 and not (found and found[0] in usual):
        what = f"{len(found)} columns of type {kind} ({found})" if found else f"no column named {' or '.join(usual)}"
        raise ConfigError(f"{source} has {what}; set {key} to one of its columns {columns}")
    return found[0]


class HFImages(LabeledDataset):
    """One split of a Hugging Face dataset as raw samples: the image column read undecoded (bytes or a file path)
    and decoded at `__getitem__`, in the loader worker, by the same readers as image files; a cell that cannot be
    decoded is a `BadSample` named by its path or `<source>[<index>]`."""

    def __init__(self, dataset: Any, source: str, image_column: str, targets: list[int]) -> None:
        import datasets

        self.fingerprint_of = getattr(dataset, "_fingerprint", None)  # the table's own, before the cast below
        self.dataset = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        self.source = source
        self.image_column = image_column
        self.targets = targets

    def __getitem__(self, index: int) -> tuple[Image.Image | Any, int]:
        cell = self.dataset[index][self.image_column] or {}
        data, path = cell.get("bytes"), cell.get("path")
        try:
            if data:
                return load_image(data), self.targets[index]
            if path and os.path.isfile(path):
                return load_image(path), self.targets[index]
            raise ValueError("the row holds no image (no bytes, no readable file)")
        except DECODE_ERRORS as err:
            return BadSample(str(self.sample_name(index)), bad_reason(err)), self.targets[index]

    @override
    def sample_name(self, index: int) -> str | None:
        """The image's file when the dataset keeps one, else `<source>[<index>]`."""
        cell = self.dataset[index][self.image_column] or {}
        return str(cell.get("path") or f"{self.source}[{index}]")

    @override
    def fingerprint(self) -> str | None:
        """The Hugging Face dataset's own fingerprint (it changes with any transformation of the data)."""
        own = self.fingerprint_of
        return None if own is None else digest(self.source, own, self.targets)


class HuggingFaceDataModule(ImageClassificationDataModule):
    """Any Hugging Face image-classification dataset.

    The dataset's own splits are used as they are (`train`; val: `validation`, `valid`, `val` or `dev`; `test`); a
    missing val or test is carved from train by the same seeded stratified rule as every DataModule. Class names
    come from the label column's `ClassLabel`; a label column of plain values (strings, integers) takes its sorted
    distinct values as the classes, and says so.

    Args:
        path: a Hub id (`beans`, `microsoft/cats_vs_dogs`), a folder written by `save_to_disk`, a folder of parquet
            files or of class folders, or a builder name (`imagefolder`, `parquet`) with `data_dir` or `data_files`.
        name: the dataset's configuration (Hub datasets with several).
        revision: a branch, tag or commit of the Hub repository.
        data_dir, data_files: as `datasets.load_dataset` takes them.
        image_column, label_column: default: `image` or `img`, and `label`, `labels` or `fine_label` (else the one
            column of type Image, or ClassLabel).
        train_split, val_split, test_split: the dataset's names for them (default: found by the usual names).
    """

    path_key = "data.init_args.path"  # how errors name the source

    def __init__(
        self,
        path: str,
        name: str | None = None,
        revision: str | None = None,
        data_dir: str | None = None,
        data_files: Any = None,
        image_column: str | None = None,
        label_column: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.path, self.name, self.revision = path, name, revision
        self.data_dir, self.data_files = data_dir, data_files
        self.image_column, self.label_column = image_column, label_column
        self.split_names = {"train": train_split, "val": val_split, "test": test_split}
        self._loaded: Any = None
        self._labels: tuple[list[str], dict[Any, int] | None] | None = None  # class names, plain value -> index

    def loaded(self) -> Any:
        """Every split of the dataset (loaded once)."""
        if self._loaded is None:
            self._loaded = load_hf(self.path, self.name, self.revision, self.data_dir, self.data_files, self.path_key)
        return self._loaded

    def splits(self) -> dict[str, str]:
        """Our split -> the dataset's split name, for the splits the dataset has."""
        available = list(self.loaded())
        found = {}
        for ours, given in self.split_names.items():
            if given is not None:
                if given not in available:
                    raise ConfigError(
                        f"data.init_args.{ours}_split {given!r}: {self.path} has no such split; its splits are "
                        f"{available}"
                    )
                found[ours] = given
            else:
                usual = [n for n in SPLIT_NAMES[ours] if n in available]
                if usual:
                    found[ours] = usual[0]
        if "train" not in found:
            raise ConfigError(
                f"{self.path} has no train split; its splits are {available}: set data.init_args.train_split"
            )
        return found

    def _columns(self) -> tuple[str, str]:
        train = self.loaded()[self.splits()["train"]]
        image = pick_column(train, self.image_column, IMAGE_COLUMNS, "Image", "data.init_args.image_column", self.path)
        label = pick_column(
            train, self.label_column, LABEL_COLUMNS, "ClassLabel", "data.init_args.label_column", self.path
        )
        return image, label

    def labels(self) -> tuple[list[str], dict[Any, int] | None]:
        """The class names, and for a label column of plain values the index of each value (None: a ClassLabel)."""
        if self._labels is None:
            train = self.loaded()[self.splits()["train"]]
            _, column = self._columns()
            feature = train.features[column]
            if type(feature).__name__ == "ClassLabel":
                self._labels = (list(feature.names), None)
            else:
                values = sorted(set(train[column]))
                self._labels = ([str(v) for v in values], {v: i for i, v in enumerate(values)})
                shown = ", ".join(map(str, values[:10])) + (" ..." if len(values) > 10 else "")
                rank_zero_warn(
                    f"{self.path}: label column {column!r} is a {feature}, not a ClassLabel; its {len(values)} "
                    f"distinct values, sorted, are the classes: {shown}"
                )
        return self._labels

    @override
    @property
    def class_names(self) -> list[str]:
        """The label column's ClassLabel names (or its sorted distinct values)."""
        return self.labels()[0]

    @override
    def build_splits(self) -> dict[str, LabeledDataset]:
        """The dataset's train, and val and test where it has them."""
        image, column = self._columns()
        names, index = self.labels()
        out: dict[str, LabeledDataset] = {}
        for ours, theirs in self.splits().items():
            split = self.loaded()[theirs]
            if column not in split.column_names or image not in split.column_names:
                raise ConfigError(
                    f"split {theirs!r} of {self.path} lacks column {column!r} or {image!r}: {split.column_names}"
                )
            values = split[column]
            if ours != "train" and index is None and values and set(values) == {-1}:  # the Hub's unlabelled test sets
                rank_zero_warn(f"split {theirs!r} of {self.path} has no labels (all -1): {ours} is carved from train")
                continue
            if index is None:
                targets = [int(v) for v in values]
            else:
                unknown = sorted({str(v) for v in values if v not in index})
                if unknown:
                    raise ConfigError(
                        f"split {theirs!r} of {self.path} has labels the train split lacks: {unknown[:10]}"
                    )
                targets = [index[v] for v in values]
            if targets and not 0 <= min(targets) <= max(targets) < len(names):
                raise ConfigError(
                    f"split {theirs!r} of {self.path}: labels {min(targets)}..{max(targets)} outside the "
                    f"{len(names)} classes {names}"
                )
            out[ours] = HFImages(split, f"{self.path}:{theirs}", image, targets)
        return out
