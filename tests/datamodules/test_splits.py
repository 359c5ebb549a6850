"""Group-aware splits: copies of one image (aug-<k>-<name>, name (1), ...) never cross a carved split or a fold."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from datamodules import ImageFolderDataModule
from datamodules.batches import Transformed
from datamodules.common import ConfigError
from datamodules.splits import GROUP_PATTERN, group_names
from tests.helpers.data import photo


def write_folder_with_copies(root: Path, originals: int = 12) -> dict[str, set[str]]:
    """`root/<class>/`: per class `originals` photos, each original k with k % 4 copies named in the usual ways
    (aug-<k>-, ' (1)', ' - Copy', '_aug2'); returns each group's files by the original's name."""
    copies = ["aug-1-{}.jpg", "{} (1).jpg", "{} - Copy.jpg", "{}_aug2.jpg", "aug-3-{} (2).jpg"]
    groups: dict[str, set[str]] = {}
    seed = 0
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for k in range(originals):
            names = [f"{k:03d}.jpg", *(c.format(f"{k:03d}") for c in copies[: k % 4 + 1 if k % 3 else 0])]
            for name in names:
                photo(seed).save(root / cls / name)
                seed += 1
            groups[f"{cls}/{k:03d}"] = {str(root / cls / n) for n in names}
    return groups


def split_files(dataset: Transformed) -> set[str]:
    files = dataset.dataset.files()
    assert files is not None
    return set(files)


def assert_groups_whole(groups: dict[str, set[str]], splits: dict[str, set[str]]) -> None:
    for name, members in groups.items():
        holding = [split for split, files in splits.items() if members & files]
        assert len(holding) == 1 and members <= splits[holding[0]], f"group {name} is cut: {holding}"


def test_the_usual_copy_markers_name_the_original() -> None:
    paths = [
        "a/012.jpg",
        "a/aug-3-012.jpg",
        "a/012 (1).jpg",
        "a/012 - Copy (2).jpg",
        "a/012 copy 2.png",
        "a/012_aug3.jpg",
        "a/012-flip.jpg",
        "a/012_jpg.rf.0a1b2c3d4e5f.jpg",
        "a/aug_1_012 (3).jpg",
    ]
    assert set(group_names(paths, [0] * len(paths), GROUP_PATTERN)) == {"0/012"}
    # a class is part of the group: the same name in two classes is two images (PetImages has Cat/0.jpg, Dog/0.jpg)
    assert group_names(["Cat/0.jpg", "Dog/0.jpg"], [0, 1], GROUP_PATTERN) == ["0/0", "1/0"]
    assert group_names(["a/copyright.jpg", "a/flipper.jpg"], [0, 0], GROUP_PATTERN) == ["0/copyright", "0/flipper"]


def test_carved_val_and_test_never_hold_a_copy_of_a_training_image(tmp_path: Path) -> None:
    groups = write_folder_with_copies(tmp_path / "pets")
    dm = ImageFolderDataModule(root=str(tmp_path / "pets"), num_workers=0, val_fraction=0.25, test_fraction=0.25)
    dm.setup("fit")
    splits = {split: split_files(dm.datasets[split]) for split in ("train", "val", "test")}
    assert sum(map(len, splits.values())) == sum(map(len, groups.values()))  # every file in one split
    assert_groups_whole(groups, splits)
    for split in ("val", "test"):  # stratified: both classes in each carved split
        assert set(Counter(dm.datasets[split].dataset.targets)) == {0, 1}
    assert "Splits: copies grouped: 64 files in 24 groups" in dm.describe()


def test_without_grouping_copies_do_cross_the_carve(tmp_path: Path) -> None:
    """What grouping prevents: the same folder and seed with `group: none` puts copies on both sides."""
    groups = write_folder_with_copies(tmp_path / "pets")
    dm = ImageFolderDataModule(root=str(tmp_path / "pets"), num_workers=0, val_fraction=0.25, group="none")
    dm.setup("fit")
    splits = {split: split_files(dm.datasets[split]) for split in ("train", "val", "test")}
    with pytest.raises(AssertionError, match="is cut"):
        assert_groups_whole(groups, splits)
    assert "copies grouped" not in dm.describe()


@pytest.mark.parametrize("fold", [0, 1, 2])
def test_kfold_keeps_every_group_in_one_fold(tmp_path: Path, fold: int) -> None:
    groups = write_folder_with_copies(tmp_path / "pets")
    dm = ImageFolderDataModule(root=str(tmp_path / "pets"), num_workers=0, num_folds=3, fold=fold)
    dm.setup("fit")
    splits = {split: split_files(dm.datasets[split]) for split in ("train", "val", "test")}
    assert_groups_whole(groups, splits)
    assert len(splits["val"]) > 0 and len(splits["train"]) > len(splits["val"])


def test_a_bad_group_pattern_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.init_args.group '\(aug' is not a regular expression"):
        ImageFolderDataModule(root=str(tmp_path), group="(aug")


def test_a_carved_split_holds_every_class_and_a_shipped_one_says_which_it_lacks(tmp_path: Path) -> None:
    from datamodules.splits import carve
    from tests.helpers.data import write_class_folders

    targets = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]  # 10% of 10 is one image, for three classes
    with pytest.warns(UserWarning, match=r"val: 0.1 of 10 images is 1, fewer than the 3 classes; val gets one image"):
        rest, part = carve(targets, 0.1, seed=0, what="val")
    assert sorted(targets[i] for i in part) == [0, 1, 2] and len(rest) == 7
    assert carve(targets, 0.3, seed=0) == carve(targets, 0.3, seed=0)  # seeded

    write_class_folders(tmp_path / "train", {"cat": 2, "dog": 10})  # 1 cat : 5 dogs, none in val or test
    write_class_folders(tmp_path / "val", {"dog": 3})
    write_class_folders(tmp_path / "test", {"dog": 3})
    config = {"input_size": [3, 16, 16], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    dm = ImageFolderDataModule(root=str(tmp_path), num_workers=0, data_config=config)
    dm.setup("fit")
    assert dm.absent_classes() == {"val": ["cat"], "test": ["cat"]}
    assert "Absent: val has no image of cat: their val accuracy is not measured" in dm.describe()
    assert "Absent: test has no image of cat" in dm.describe()
