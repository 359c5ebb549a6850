"""The loader of a split, and what it asks at the start of a pass: whether cached backbone features stand in for the
split's images (`FeatureSource`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from datamodules.batches import Transformed, collate

if TYPE_CHECKING:
    from torch.utils.data.dataloader import _BaseDataLoaderIter  # DataLoader.__iter__'s return type


class FeatureRequest(NamedTuple):
    """What a train or val loader tells its `FeatureSource` at the start of a pass."""

    split: str  # train or val
    epoch: int  # the epoch about to run (restored from the checkpoint on a resume)
    images: Transformed  # the split under transforms that are the same every epoch: what features may stand for
    batches: DataLoader  # one pass over `images`, in order, not shuffled: what the features are computed from
    augment: str | None  # the split's random augmentation, which features would leave out; None: there is none


@runtime_checkable
class FeatureSource(Protocol):
    """Serves cached backbone features in place of a split's images (the FeatureCache callback). The DataModule
    finds it among the trainer's callbacks and asks it at the start of every train and val pass; it never calls
    the DataModule."""

    def features_for(self, request: FeatureRequest) -> Dataset | None:
        """The features of `request.images` position for position (a position whose file cannot be read yields its
        `BadSample`), to serve in `request.epoch`; or None: that pass reads the images."""


class SplitLoader(DataLoader):
    """A DataLoader of one split's `Transformed` images that yields `Batch`es (`collate` under the split's name).

    With `features`, asked at the start of every pass, a pass may read cached backbone features instead: from
    memory, without worker processes, in the batches of the loader's own sampler (so the order is the same, and
    under DDP each process reads its part: Lightning gives this loader its DistributedSampler, as it does any
    DataLoader a `*_dataloader()` hook returns). No trainer setting changes when a pass goes back to images.

    Args:
        dataset: the split's images.
        split: its name (`Batch.split`).
        features: the features to serve for the pass about to start (the same length as `dataset`), or None.
        **kwargs: DataLoader's (not `collate_fn`).
    """

    def __init__(
        self, dataset: Dataset, split: str, features: Callable[[], Dataset | None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, collate_fn=partial(collate, split=split), **kwargs)
        self.split = split
        self.features = features

    @override
    def __iter__(self) -> _BaseDataLoaderIter:
        cached = self.features() if self.features is not None else None
        if cached is None:
            return super().__iter__()
        sizes = len(cached), len(self.dataset)  # type: ignore[arg-type]  # map-style datasets, sized
        if sizes[0] != sizes[1]:
            raise ValueError(f"{self.split}: the features hold {sizes[0]} positions, the images {sizes[1]}")
        in_memory = DataLoader(
            cached,
            batch_sampler=self.batch_sampler,
            collate_fn=partial(collate, split=self.split, features=True),
            pin_memory=self.pin_memory,
        )
        return iter(in_memory)
