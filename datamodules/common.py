"""What the data layer and every layer above it share: the error type for user mistakes, the preprocessing a
backbone expects, writing a file so that no reader sees it half-written, a short digest of anything (cache keys),
gathering lists across processes, and the progress line of a step that takes a while.

It imports nothing of the project (and neither torch nor Lightning at import), so anything may import it.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cores() -> int:
    """CPU cores this process may use: its affinity (a job pinned to 4 cores of a 64-core node gets 4), not the
    machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ConfigError(ValueError):
    """A config value, path or file the user gave is wrong; the message names it and says what to do. The CLI
    prints it alone, without a traceback, and exits with status 2."""


def check_range(
    key: str,
    value: Any,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    null: str | None = None,
) -> None:
    """A ConfigError naming `key`, its value and the allowed range when `value` is not a number in it: `[low,
    high]`, an end left out with `low_open` / `high_open`; `null` says what None means when None is allowed."""
    if value is None and null is not None:
        return
    number = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    if number and (value > low if low_open else value >= low) and (value < high if high_open else value <= high):
        return
    top = "inf)" if high == math.inf else f"{high:g}{')' if high_open else ']'}"
    allowed = f"{'(' if low_open else '['}{low:g}, {top}" + (f", or null ({null})" if null is not None else "")
    raise ConfigError(f"{key} is {value!r}: allowed {allowed}")


def close_names(name: str, candidates: list[str], n: int = 5) -> list[str]:
    """The candidates most similar to a misspelt name, best first."""
    import difflib

    return difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing a backbone expects: input size (C, H, W), normalisation, resize interpolation and crop."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with lists, safe for YAML configs and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Inverse of `to_dict`."""
        return cls(
            input_size=tuple(d["input_size"]),  # type: ignore[arg-type]
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=str(d.get("interpolation", "bilinear")),
            crop_pct=float(d.get("crop_pct", 1.0)),
            crop_mode=str(d.get("crop_mode", "center")),
        )

    def with_input(self, image_size: int | None, in_chans: int) -> DataConfig:
        """The same preprocessing at another resolution and channel count (grayscale averages mean and std)."""
        check_range("model.in_chans", in_chans, 1)
        size = image_size or self.input_size[1]
        mean, std = self.mean, self.std
        if in_chans != len(mean):
            mean = (sum(mean) / len(mean),) * in_chans
            std = (sum(std) / len(std),) * in_chans
        return DataConfig((in_chans, size, size), mean, std, self.interpolation, self.crop_pct, self.crop_mode)

    def describe(self) -> str:
        """One line: `3x224x224, bicubic, mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5), crop 0.875 center`."""
        size = "x".join(map(str, self.input_size))
        mean, std = (tuple(round(v, 3) for v in x) for x in (self.mean, self.std))
        return f"{size}, {self.interpolation}, mean {mean}, std {std}, crop {self.crop_pct:.3g} {self.crop_mode}"


@runtime_checkable
class Preprocessed(Protocol):
    """A model that says what preprocessing its inputs need (the FineTuneModule): a DataModule on its trainer
    takes it (`ImageClassificationDataModule.setup`)."""

    @property
    def data_config(self) -> DataConfig:
        """The backbone's preprocessing."""


def atomic_write(path: Path, write: Callable[[Path], Any], durable: bool = True, shared: bool = False) -> None:
    """Write `path` through `write(tmp)` on a hidden `.<name>.partial` beside it, flush it to disk, and rename it
    over `path` (then sync the folder): a reader, or a process killed mid-write, never sees a half-written file,
    and the previous file stays whole until the new one is.

    `durable=False` skips the two syncs (a file rewritten every step, whose loss in a power cut costs nothing);
    `shared=True` adds the process id to the partial name, for files that several processes may write at once.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial" if shared else f".{path.name}.partial")
    try:
        write(tmp)
    except BaseException:  # the writer failed (a kill leaves the partial file, which the next write replaces)
        tmp.unlink(missing_ok=True)
        raise
    if not durable:
        os.replace(tmp, path)
        return
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened (some platforms): the rename is still atomic
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def digest(*parts: Any) -> str:
    """A short hex digest of `parts` (bytes, or anything with a stable repr)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
    return h.hexdigest()


HAND_WRITTEN = "<!-- Written by hand below this line; the scripts that rewrite the part above keep it. -->"


def write_generated(path: Path, text: str) -> None:
    """Write a generated markdown page atomically, keeping whatever follows its `HAND_WRITTEN` line."""
    old = path.read_text() if path.is_file() else ""
    tail = old[old.index(HAND_WRITTEN) :] if HAND_WRITTEN in old else ""
    page = text.rstrip("\n") + "\n\n" + tail if tail else text
    atomic_write(path, lambda p: p.write_text(page))


def gather_lists(items: list[Any]) -> list[Any]:
    """The concatenation, in rank order, of every process's `items` (every process must call it; a no-op on one
    process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


_SHOWN: ContextVar[bool] = ContextVar("progress_shown", default=False)


@contextmanager
def progress_shown(shown: bool) -> Iterator[None]:
    """Within the block, `progress` lines whose caller does not decide are shown or not: a DataModule's setup
    decides for the header check of the datasets its subclass builds. Outside any block they are hidden."""
    token = _SHOWN.set(shown)
    try:
        yield
    finally:
        _SHOWN.reset(token)


def progress(
    desc: str, unit: str, total: int | None = None, iterable: Iterable[Any] | None = None, shown: bool | None = None
) -> Any:
    """A progress line on stderr for a step that can take more than a few seconds: `desc`, the `unit`s done of
    `total` and the rate, as `train features:  50%|#####     | 9000/18000 [02:06<02:06, 71.4image/s]`.

    A tqdm bar (Lightning's progress bar is tqdm too): iterate it over `iterable` (one unit per item), or call
    `update(n)`; use it as a context manager to close it. `shown`: None follows the enclosing `progress_shown`
    block (hidden outside one). Refreshed twice a second on a terminal, every 5 s into a file or a pipe (a log).
    """
    stream = sys.stderr
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        file=stream,
        disable=not (_SHOWN.get() if shown is None else shown),
        mininterval=0.5 if stream.isatty() else 5.0,
        dynamic_ncols=True,
    )


def say(message: str, file: TextIO | None = None) -> None:
    """Print a line (on stdout by default) without breaking a `progress` line on the terminal: the bars are
    cleared, the line written, the bars drawn again below it."""
    stream = file or sys.stdout
    with tqdm.external_write_mode(file=stream):
        print(message, file=stream, flush=True)
