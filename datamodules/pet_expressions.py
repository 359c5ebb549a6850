"""The Kaggle pet facial-expression set: `Master Folder/{train,valid,test}/{Angry,happy,Sad,Other}`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typing_extensions import override

from datamodules.common import ConfigError
from datamodules.folder import ImageFolderDataModule, require_dir

KAGGLE_ID = "anshtanwar/pets-facial-expression-dataset"
# Stable label map, whatever the folder casing on disk (the set ships a lowercase `happy`).
CLASSES = ["angry", "happy", "other", "sad"]


class PetExpressionsDataModule(ImageFolderDataModule):
    """Dogs' and cats' faces in four expressions, with the set's own train / valid / test split.

    Labels: angry 0, happy 1, other 2, sad 3. The data is read from `root` (the folder holding
    `Master Folder`, or `Master Folder` itself); when `root` holds no data and `download` is on, kagglehub
    fetches it (needs the `kagglehub` package, network and Kaggle credentials).

    Args:
        root: where the data is (or goes).
        download: try kagglehub when the data is not at `root`.
    """

    def __init__(self, root: str = "data/pet_expressions", download: bool = True, **kwargs: Any) -> None:
        super().__init__(root=root, class_names=list(CLASSES), **kwargs)
        self.download = download

    @override
    def data_root(self) -> Path:
        """`Master Folder` under root (or root itself), downloading it first if allowed and needed."""
        for candidate in (self.root / "Master Folder", self.root):
            if (candidate / "train").is_dir():
                return candidate
        if self.download:
            fetched = _kaggle_download()
            if fetched is not None:
                return require_dir(fetched / "Master Folder", "Master Folder in the kagglehub download", "")
        how = (
            f"Download the Kaggle dataset {KAGGLE_ID} (kaggle.com, or `pip install kagglehub` with network), "
            f"unzip it and set data.init_args.root to the folder that holds 'Master Folder/train'."
        )
        raise ConfigError(f"pet expressions data not found at {self.root.resolve()}. {how}")


def _kaggle_download() -> Path | None:
    """The kagglehub download folder, or None when kagglehub is missing or offline."""
    try:
        import kagglehub  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return Path(kagglehub.dataset_download(KAGGLE_ID))
    except Exception:  # offline, no credentials: the caller says how to get the data
        return None
