"""Image folders: `root/<class>/` (split by fractions) or `root/{train,val,test}/<class>/`.

Class folders are matched and ordered by `class_key` (Unicode NFC, case-folded), so `happy` and `Sad` sort as a
person expects, `Happy/` in one split is the same class as `happy/` in another (torchvision's ImageFolder sorts
`Sad` before `happy`), and `Café crème` written decomposed by a macOS archive is the same class as the one typed.
Hidden folders and `__pycache__` are ignored; non-image files are left out and counted in the data summary.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from datamodules.base import ImageClassificationDataModule
from datamodules.common import ConfigError
from datamodules.datasets import ImageFiles, LabeledDataset
from datamodules.images import list_images, skipped_folder

SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


def find_split_dirs(root: Path) -> dict[str, Path]:
    """The split folders of `root` (`train`, `val`/`valid`, `test`, any casing); empty if there is no `train`."""
    children = {class_key(p.name): p for p in root.iterdir() if p.is_dir() and not skipped_folder(p.name)}
    found = {split: children[n] for split, names in SPLIT_NAMES.items() for n in names if n in children}
    return found if "train" in found else {}


def class_key(name: str) -> str:
    """What a class name is compared by: Unicode NFC (macOS archives write names decomposed, NFD), case-folded
    (`Cat` and `cat` are one class; `Straße` and `STRASSE` too)."""
    return unicodedata.normalize("NFC", name).casefold()


def class_dirs(folder: Path) -> dict[str, Path]:
    """Class folders of `folder` keyed by `class_key` (hidden folders and `__pycache__` skipped: `skipped_folder`)."""
    dirs: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not skipped_folder(p.name):
            if class_key(p.name) in dirs:
                raise ConfigError(
                    f"{folder} has class folders {dirs[class_key(p.name)].name!r} and {p.name!r}: merge them"
                )
            dirs[class_key(p.name)] = p
    return dirs


def discover_classes(folder: Path) -> list[str]:
    """Class names as spelt on disk, ordered case-insensitively."""
    return sorted((p.name for p in class_dirs(folder).values()), key=class_key)


def folder_files(folder: Path, class_names: list[str]) -> ImageFiles:
    """Every image under `folder/<class>/`, labelled by the position of its class in `class_names`."""
    dirs = class_dirs(folder)
    others: Counter[str] = Counter()
    images = {key: list_images(path, others) for key, path in dirs.items()}
    wanted = {class_key(c) for c in class_names}
    dropped = sorted(dirs[key].name for key in set(dirs) - wanted if not images[key])
    if dropped:
        rank_zero_info(f"{folder}: empty folders {dropped} left out (not in data.init_args.class_names)")
    unknown = sorted(key for key in set(dirs) - wanted if images[key])
    if unknown:
        raise ConfigError(f"{folder} has folders {unknown} that are not among the classes {class_names}")
    empty = sorted(dirs[key].name for key in set(dirs) & wanted if not images[key])
    if empty:
        raise ConfigError(
            f"{folder} has class folders without images: {empty}. Add images, delete the folders, or list the "
            "classes to keep in data.init_args.class_names"
        )
    files = [(path, label) for label, name in enumerate(class_names) for path in images.get(class_key(name), [])]
    if not files:
        raise ConfigError(f"no images under {folder}/<class>/ for classes {class_names}")
    found = ImageFiles(files)
    found.others = others
    return found


def require_dir(path: Path, what: str, how: str) -> Path:
    """`path` if it is a folder, else a ConfigError naming it and how to get the data there."""
    if path.is_file():
        raise ConfigError(f"{what} {path.resolve()} is a file, not a folder. {how}")
    if not path.is_dir():
        raise ConfigError(f"{what} not found at {path.resolve()}. {how}")
    return path


class ImageFolderDataModule(ImageClassificationDataModule):
    """Any folder of class sub-folders, with or without split folders.

    Args:
        root: `root/<class>/*` (val and test carved by fractions) or `root/{train,val,test}/<class>/*`
            (`valid`/`validation` accepted; a missing val or test is carved from train).
        class_names: label order; default: the class folders of train, ordered case-insensitively.
    """

    # the model's hparams record the resolved class names (one home; Lightning refuses differing duplicates)
    hparams_ignore = ("class_names",)

    def __init__(self, root: str, class_names: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self._class_names = class_names

    def data_root(self) -> Path:
        """The folder that holds the classes or the split folders."""
        how = "Put images in <root>/<class>/ or <root>/{train,val,test}/<class>/ and set data.init_args.root."
        return require_dir(self.root, "image folder", how)

    @override
    @property
    def class_names(self) -> list[str]:
        """Given names, or the train split's class folders."""
        if self._class_names is None:
            root = self.data_root()
            train = find_split_dirs(root).get("train", root)
            found = discover_classes(train)
            if len(found) < 2:
                raise ConfigError(
                    f"{train} has {len(found)} class folder(s) {found}; a classifier needs at least two: put images "
                    "in <root>/<class>/ (or <root>/{train,val,test}/<class>/), one folder per class"
                )
            self._class_names = found
        return self._class_names

    @override
    def build_splits(self) -> dict[str, LabeledDataset]:
        """One ImageFiles per split folder, or the whole root as train."""
        root = self.data_root()
        dirs = find_split_dirs(root) or {"train": root}
        return {split: folder_files(folder, self.class_names) for split, folder in dirs.items()}
