"""Cats vs dogs: the HuggingFace dataset `microsoft/cats_vs_dogs`, or the same data already on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image
from typing_extensions import override

from datamodules.base import ImageClassificationDataModule
from datamodules.common import ConfigError, digest
from datamodules.datasets import LabeledDataset
from datamodules.folder import folder_files
from datamodules.images import BadSample, bad_reason, to_rgb

HF_ID = "microsoft/cats_vs_dogs"
CLASSES = ["cat", "dog"]  # the HuggingFace labels: 0 cat, 1 dog


class HFImages(LabeledDataset):
    """A HuggingFace image dataset (an `image` column and a `labels` or `label` column)."""

    def __init__(self, dataset: Any, source: str) -> None:
        self.label_column = "labels" if "labels" in dataset.column_names else "label"
        if "image" not in dataset.column_names or self.label_column not in dataset.column_names:
            raise ConfigError(f"{source} needs 'image' and 'labels' columns; it has {dataset.column_names}")
        self.dataset = dataset
        self.source = source
        self.targets = [int(t) for t in dataset[self.label_column]]

    def __getitem__(self, index: int) -> tuple[Image.Image | BadSample, int]:
        try:
            return to_rgb(self.dataset[index]["image"]), self.targets[index]
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return BadSample(f"{self.source}[{index}]", bad_reason(err)), self.targets[index]

    @override
    def fingerprint(self) -> str | None:
        """The HuggingFace dataset's own fingerprint (it changes with any transformation of the data)."""
        own = getattr(self.dataset, "_fingerprint", None)
        return None if own is None else digest(self.source, own, self.targets)


class CatsVsDogsDataModule(ImageClassificationDataModule):
    """25,000 photos of cats and dogs; a seeded, stratified 80/20 train/test split (as in the notebook) and a
    val split from train.

    Sources, by what `root` holds:
      - Microsoft's PetImages layout, `root/Cat/*.jpg` and `root/Dog/*.jpg` (or `root/PetImages/...`);
        its known-corrupt files are skipped and listed in the run's `bad_images.csv`;
      - a dataset written by `datasets.save_to_disk`;
      - parquet files (the Hub's own format), anywhere under `root`;
      - nothing (`root: null`): `datasets.load_dataset("microsoft/cats_vs_dogs")`, which needs network once.

    Args:
        root: a local copy in one of the formats above, or null to use the Hub.
    """

    def __init__(self, root: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root) if root else None

    @override
    @property
    def class_names(self) -> list[str]:
        """cat, dog."""
        return list(CLASSES)

    @override
    def build_splits(self) -> dict[str, LabeledDataset]:
        """The whole set as train; the base class carves test (20%) and val from it."""
        return {"train": self._load()}

    def _load(self) -> LabeledDataset:
        import datasets

        if self.root is None:
            try:
                return HFImages(datasets.load_dataset(HF_ID, split="train"), HF_ID)
            except Exception as err:
                raise ConfigError(f"could not load {HF_ID} from the Hub ({err}). {_HOW}") from None
        root = self.root
        if not root.exists():
            raise ConfigError(f"cats vs dogs data not found at {root.resolve()}. {_HOW}")
        for folder in (root, root / "PetImages"):
            if folder.is_dir() and {p.name.lower() for p in folder.iterdir() if p.is_dir()} >= {"cat", "dog"}:
                return folder_files(folder, CLASSES)
        if any((root / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(root))
            return HFImages(loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded, str(root))
        parquet = sorted(str(p) for p in root.rglob("*.parquet"))
        if parquet:
            return HFImages(datasets.load_dataset("parquet", data_files=parquet, split="train"), str(root))
        raise ConfigError(f"{root.resolve()} holds no PetImages folders, saved dataset or parquet files. {_HOW}")


_HOW = (
    "Put the data on this machine in one of three ways and set data.init_args.root to it: Microsoft's "
    "kagglecatsanddogs zip unpacked (PetImages/Cat, PetImages/Dog); `datasets.load_dataset('microsoft/cats_vs_dogs')"
    ".save_to_disk(path)` run on a machine with network; or the Hub repo's parquet files "
    "(`huggingface-cli download microsoft/cats_vs_dogs --repo-type dataset --local-dir path`)."
)
