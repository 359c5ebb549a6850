"""Cats vs dogs: the HuggingFace dataset `microsoft/cats_vs_dogs`, or the same data already on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typing_extensions import override

from datamodules.common import ConfigError
from datamodules.datasets import LabeledDataset
from datamodules.folder import folder_files
from datamodules.hugging_face import HuggingFaceDataModule

HF_ID = "microsoft/cats_vs_dogs"
CLASSES = ["cat", "dog"]  # the PetImages folders' classes (the Hub set's ClassLabel names the same)


class CatsVsDogsDataModule(HuggingFaceDataModule):
    """25,000 photos of cats and dogs; a seeded, stratified 80/20 train/test split (as in the notebook) and a
    val split from train.

    Sources, by what `root` holds:
      - Microsoft's PetImages layout, `root/Cat/*.jpg` and `root/Dog/*.jpg` (or `root/PetImages/...`);
        its known-corrupt files are skipped and listed in the run's `bad_images.csv`;
      - a dataset written by `datasets.save_to_disk`, or parquet files (the Hub's own format), read as
        `HuggingFaceDataModule` reads any dataset (classes from its ClassLabel);
      - nothing (`root: null`): `datasets.load_dataset("microsoft/cats_vs_dogs")`, which needs network once.

    Args:
        root: a local copy in one of the formats above, or null to use the Hub.
    """

    path_key = "data.init_args.root"

    def __init__(self, root: str | None = None, **kwargs: Any) -> None:
        super().__init__(path=root or HF_ID, **kwargs)
        self.root = Path(root) if root else None

    def pet_images(self) -> Path | None:
        """The folder holding `Cat` and `Dog` (Microsoft's layout), if `root` is one."""
        if self.root is not None and not self.root.exists():
            raise ConfigError(f"cats vs dogs data not found at {self.root.resolve()}. {_HOW}")
        for folder in () if self.root is None else (self.root, self.root / "PetImages"):
            if folder.is_dir() and {p.name.lower() for p in folder.iterdir() if p.is_dir()} >= {"cat", "dog"}:
                return folder
        return None

    @override
    @property
    def class_names(self) -> list[str]:
        """cat, dog (a Hugging Face copy: its ClassLabel names)."""
        return list(CLASSES) if self.pet_images() else super().class_names

    @override
    def build_splits(self) -> dict[str, LabeledDataset]:
        """The PetImages folders as train, or the Hugging Face dataset's splits; the base class carves test (20%)
        and val from train."""
        folder = self.pet_images()
        return {"train": folder_files(folder, CLASSES)} if folder else super().build_splits()


_HOW = (
    "Put the data on this machine in one of three ways and set data.init_args.root to it: Microsoft's "
    "kagglecatsanddogs zip unpacked (PetImages/Cat, PetImages/Dog); `datasets.load_dataset('microsoft/cats_vs_dogs')"
    ".save_to_disk(path)` run on a machine with network; or the Hub repo's parquet files "
    "(`hf download microsoft/cats_vs_dogs --repo-type dataset --local-dir path`)."
)
