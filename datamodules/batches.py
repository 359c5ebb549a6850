"""From raw samples to batches: the transform applied per sample, the seeded training order, and `collate` into a
`Batch`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset, RandomSampler, default_collate
from typing_extensions import override

from datamodules.datasets import LabeledDataset, Subset
from datamodules.images import BadSample


class Sample(NamedTuple):
    """One sample as a dataset of this package yields it: the image tensor (or backbone features), or the
    `BadSample` that says why the file could not be read; the class index (-1: unknown); the position."""

    image: Any
    target: int
    position: int


class SeededIndex(NamedTuple):
    """What `EpochShuffle` hands a dataset for one sample: its position, and the seed its augmentation draws from
    (derived from the run's seed, the epoch and the position, so a resumed epoch draws the same)."""

    position: int
    seed: int


class Transformed(Dataset):
    """Applies an image transform to a labeled dataset: yields `Sample`s."""

    def __init__(self, dataset: LabeledDataset, transform: Callable[[Any], torch.Tensor]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | SeededIndex) -> Sample:
        """A position, or a `SeededIndex` from `EpochShuffle`: the transform then draws from its seed alone."""
        index, seed = key if isinstance(key, SeededIndex) else (key, None)
        image, label = self.dataset[index]
        if isinstance(image, BadSample):
            return Sample(image, int(label), index)
        if seed is None:
            return Sample(self.transform(image), int(label), index)
        with torch.random.fork_rng(devices=[]):  # the global generator is left as it was
            torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators are not touched
            return Sample(self.transform(image), int(label), index)

    def name(self, index: int) -> str:
        """What names a sample (through any Subset): its file, or its position when the data is not files."""
        dataset: Any = self.dataset
        position = index
        while isinstance(dataset, Subset):
            position, dataset = dataset.indices[position], dataset.dataset
        name = dataset.sample_name(position) if isinstance(dataset, LabeledDataset) else None
        return str(index) if name is None else name


class EpochShuffle(RandomSampler):
    """Shuffles by (seed, epoch) and gives each sample an augmentation seed from (seed, epoch, index): a run
    resumed at epoch k sees the order and the augmented images an uninterrupted run sees at epoch k.

    A RandomSampler, so under DDP Lightning swaps in its shuffling DistributedSampler as usual (same order
    by epoch; augmentation then draws from the global generator).
    """

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source)  # type: ignore[arg-type]
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch
        self.generator = torch.Generator().manual_seed(self.seed + epoch)

    @override
    def __iter__(self) -> Iterator[SeededIndex]:  # type: ignore[override]
        for index in super().__iter__():
            yield SeededIndex(index, hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)


class Batch(NamedTuple):
    """What every loader of this package yields; made by `collate`, which knows its loader's split.

    The model reads `inputs` and `targets`. `features` says the inputs are cached backbone features (N, F), not
    images (N, C, H, W). `indices` are the samples' positions in their dataset (predictions name their files by
    them); `skipped` are the files of the batch that could not be read, left out of `inputs` and reported by the
    DataModule as the run's `bad_images.csv`.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor
    skipped: list[BadSample]
    split: str
    features: bool = False

    @property
    def size(self) -> int:
        """The number of samples in `inputs` (0 when every file of the batch was unreadable)."""
        return len(self.targets)


def collate(samples: list[Sample], split: str, features: bool = False) -> Batch:
    """A `Batch` of the readable samples; the unreadable ones ride along in `skipped`, never replaced."""
    good = [s for s in samples if not isinstance(s.image, BadSample)]
    skipped = [s.image for s in samples if isinstance(s.image, BadSample)]
    inputs = default_collate([s.image for s in good]) if good else torch.empty(0)  # shared memory in workers
    targets = torch.tensor([s.target for s in good], dtype=torch.long)
    indices = torch.tensor([s.position for s in good], dtype=torch.long)
    return Batch(inputs, targets, indices, skipped, split, features)
