"""Seeded, stratified splits by index, with copies of one image kept together (groups), and the same splits of
labeled datasets.

A folder of photos often holds copies: `aug-3-012.jpg` beside `012.jpg` (the pet expressions set is 70% such
copies), `photo (1).jpg`, `photo - Copy.jpg`, Roboflow's `img_jpg.rf.<hash>.jpg`. A carved val or test split that
gets a copy while train gets its original is not held out, and its figure is inflated, silently. A group is the
files of one class whose names are equal once the copy markers (`GROUP_PATTERN`, or the user's own) are removed;
every split here keeps a group whole.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.common import ConfigError
from datamodules.datasets import LabeledDataset, Subset

# What a copy adds to a file's name (without its extension), removed to find the name of its original: a prefix
# `aug-<k>-` or `aug_<k>_` (Kaggle sets such as the pet expressions), a browser's ` (1)`, Windows' ` - Copy (2)`,
# macOS' ` copy 2`, a suffix `_aug3`/`-flip`/`_copy`/`_rot90`, Roboflow's `_jpg.rf.<hash>`.
GROUP_PATTERN = (
    r"^aug[-_]\d+[-_]|"
    r"( \(\d+\)| - copy( \(\d+\))?| copy( \d+)?|[-_](aug|augmented|flip|flipped|copy|dup|rot)[-_]?\d*"
    r"|(_jpe?g|_png)?\.rf\.[0-9a-f]{6,})$"
)


def group_names(paths: Sequence[str], targets: Sequence[int], pattern: str) -> list[str]:
    """Each file's group: its class and its name with every match of `pattern` removed (case-insensitive,
    repeated until nothing changes, so `aug-1-x (2)` becomes `x`)."""
    try:
        marker = re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        raise ConfigError(f"data.init_args.group {pattern!r} is not a regular expression: {err}") from None
    names = []
    for path, target in zip(paths, targets, strict=True):
        stem, previous = Path(path).stem, None
        while stem != previous:
            previous, stem = stem, marker.sub("", stem)
        names.append(f"{target}/{stem or Path(path).stem}")
    return names


def has_copies(groups: Sequence[str] | None) -> bool:
    """True when some group holds more than one file."""
    return groups is not None and len(set(groups)) < len(groups)


def carve(
    targets: Sequence[int],
    fraction: float,
    seed: int,
    groups: Sequence[str] | None = None,
    what: str = "the carved split",
    names: Sequence[str] | None = None,
) -> tuple[list[int], list[int]]:
    """Indices (rest, part): `part` is about `fraction` of the samples, class proportions kept, the same seed
    giving the same split, and never without a class: it holds at least one sample of each (more than `fraction`
    when the classes outnumber it, with a warning). A class of one sample cannot be in both: a ConfigError naming
    it (`what` names the part, `names` the classes). With copies in `groups`, whole groups move: `part` is one fold
    of a seeded stratified group k-fold with k = round(1 / fraction), so its size is the nearest 1/k."""
    if not 0 < fraction < 1:
        raise ConfigError(f"split fraction must be between 0 and 1, got {fraction}")
    counts = Counter(int(t) for t in targets)
    single = [names[c] if names else str(c) for c in sorted(c for c, n in counts.items() if n < 2)]
    if single:
        raise ConfigError(
            f"cannot carve {what} from train: class(es) {single[:10]} have a single image left, and each class needs "
            f"one in train and one in {what}. Add images (3 per class when val and test are both carved), or give "
            f"{what} its own folder (root/{{train,val,test}}/<class>/)"
        )
    indices = np.arange(len(targets))
    if has_copies(groups):
        rest, part = _group_folds(targets, max(2, round(1 / fraction)), seed, groups)[0]
        return sorted(rest.tolist()), sorted(part.tolist())
    size = math.ceil(fraction * len(targets))  # what train_test_split makes of the fraction
    if size < len(counts):
        warnings.warn(
            f"{what}: {fraction:g} of {len(targets)} images is {size}, fewer than the {len(counts)} classes; {what} "
            f"gets one image of each class instead ({len(counts)})",
            stacklevel=2,
        )
        size = len(counts)
    from sklearn.model_selection import train_test_split  # sklearn brings pandas: when a split is carved

    rest, part = train_test_split(indices, test_size=size, random_state=seed, stratify=list(targets))
    return sorted(rest.tolist()), sorted(part.tolist())


def kfold(
    targets: Sequence[int], num_folds: int, fold: int, seed: int, groups: Sequence[str] | None = None
) -> tuple[list[int], list[int]]:
    """Indices (train, val) of fold `fold` of a seeded stratified k-fold (by groups when there are copies)."""
    from sklearn.model_selection import StratifiedKFold

    try:
        if has_copies(groups):
            train, val = _group_folds(targets, num_folds, seed, groups)[fold]
        else:
            folds = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
            train, val = list(folds.split(np.zeros(len(targets)), list(targets)))[fold]
    except ValueError as err:  # more folds than samples (or groups) of every class
        raise ConfigError(f"data.init_args.num_folds {num_folds}: {err}") from None
    return train.tolist(), val.tolist()


def _group_folds(
    targets: Sequence[int], k: int, seed: int, groups: Sequence[str] | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedGroupKFold

    folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(folds.split(np.zeros(len(targets)), list(targets), groups=list(groups or [])))


def stratified_sample(targets: Sequence[int], size: float, seed: int) -> list[int]:
    """Indices of a seeded subset keeping class proportions: `size` is a fraction (0 < size < 1) of each class, or
    a number of samples per class (a class with fewer keeps all of them)."""
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        count = max(1, round(len(members) * size)) if size < 1 else min(int(size), len(members))
        chosen += rng.choice(members, size=count, replace=False).tolist()
    return sorted(chosen)


def stratified_split(
    dataset: LabeledDataset,
    fraction: float,
    seed: int,
    groups: Sequence[str] | None = None,
    what: str = "the carved split",
    names: Sequence[str] | None = None,
) -> tuple[LabeledDataset, LabeledDataset]:
    """Split into (rest, fraction) keeping class proportions and every group whole (`carve`)."""
    rest, part = carve(dataset.targets, fraction, seed, groups, what, names)
    return Subset(dataset, rest), Subset(dataset, part)


def stratified_subset(dataset: LabeledDataset, size: float, seed: int) -> LabeledDataset:
    """A seeded subset keeping class proportions (`stratified_sample`)."""
    return Subset(dataset, stratified_sample(dataset.targets, size, seed))


def kfold_split(
    pool: LabeledDataset, num_folds: int, fold: int, seed: int, groups: Sequence[str] | None = None
) -> tuple[LabeledDataset, LabeledDataset]:
    """(train, val) of fold `fold` of a seeded stratified k-fold of `pool` (`kfold`): fold i is the val part."""
    train, val = kfold(pool.targets, num_folds, fold, seed, groups)
    return Subset(pool, train), Subset(pool, val)
