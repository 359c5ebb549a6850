"""Labeled datasets of raw samples: image files, images in memory, and the subsets and concatenations splits make."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from typing_extensions import override

from datamodules.common import digest, progress
from datamodules.images import DECODE_ERRORS, BadSample, bad_reason, check_header, load_image


class LabeledDataset(Dataset):
    """Raw samples (PIL image or uint8 tensor, label) with their `targets` known without loading images."""

    targets: Sequence[int]

    def __len__(self) -> int:
        return len(self.targets)

    def fingerprint(self) -> str | None:
        """A digest that changes when the samples or labels change (keys the feature cache on disk); None when
        the data cannot say, and then the cache is not kept on disk."""
        return None

    def files(self) -> list[str] | None:
        """Each sample's file, in order; None when the samples are not files."""
        return None

    def sample_name(self, index: int) -> str | None:
        """What names sample `index` in predictions and reports (its file); None when the samples have no names."""
        return None


class ImageFiles(LabeledDataset):
    """Image files with labels. Files failing the header check are left out at construction and listed in
    `rejected`; a file that fails to decode later comes back as a `BadSample`, never as another image. The check
    shows a progress line when the enclosing `progress_shown` block says so (a DataModule's setup)."""

    def __init__(self, files: Sequence[tuple[Path, int]]) -> None:
        self.others: Counter[str] = Counter()  # files beside them left out for their extension, by extension
        self.rejected: list[BadSample] = []
        self.paths: list[str] = []
        self.targets: list[int] = []
        for path, label in progress("checking image files", "file", iterable=files):
            reason = check_header(path)
            if reason is None:
                self.paths.append(str(path))
                self.targets.append(label)
            else:
                self.rejected.append(BadSample(str(path), reason))

    def __getitem__(self, index: int) -> tuple[Image.Image | torch.Tensor | BadSample, int]:
        path = self.paths[index]
        try:
            return load_image(path), self.targets[index]
        except DECODE_ERRORS as err:
            return BadSample(path, bad_reason(err)), self.targets[index]

    @override
    def files(self) -> list[str] | None:
        """The files' paths."""
        return list(self.paths)

    @override
    def sample_name(self, index: int) -> str:
        """The file's path."""
        return self.paths[index]

    @override
    def fingerprint(self) -> str | None:
        """Digest of each file's path, size and modification time, and the labels."""
        stats = [(p, st.st_size, st.st_mtime_ns) for p in self.paths for st in [os.stat(p)]]
        return digest(stats, self.targets)


class TensorImages(LabeledDataset):
    """Images held in memory as a uint8 tensor (N, C, H, W)."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int]) -> None:
        self.images = images
        self.targets = list(targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]

    @override
    def fingerprint(self) -> str | None:
        """Digest of the pixels and labels."""
        return digest(self.images.contiguous().numpy().tobytes(), self.targets)


class Subset(LabeledDataset):
    """The samples of `dataset` at `indices`."""

    def __init__(self, dataset: LabeledDataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.targets = [dataset.targets[i] for i in self.indices]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]

    @override
    def files(self) -> list[str] | None:
        """The parent's files at the chosen indices."""
        parent = self.dataset.files()
        return None if parent is None else [parent[i] for i in self.indices]

    @override
    def fingerprint(self) -> str | None:
        """The parent's digest and the chosen indices."""
        parent = self.dataset.fingerprint()
        return None if parent is None else digest(parent, self.indices)


class Concat(LabeledDataset):
    """The samples of several labeled datasets, one after another."""

    def __init__(self, parts: Sequence[LabeledDataset]) -> None:
        self.parts = list(parts)
        self.targets = [t for part in self.parts for t in part.targets]

    @override
    def files(self) -> list[str] | None:
        """The parts' files one after another, when every part is files."""
        parts = [part.files() for part in self.parts]
        return None if any(p is None for p in parts) else [f for p in parts for f in p or []]

    def __getitem__(self, index: int) -> Any:
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError(index)
