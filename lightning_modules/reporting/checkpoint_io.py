"""Checkpoint files: read safely (tensors and plain values only, a damaged file named), written atomically."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from datamodules.common import ConfigError, atomic_write
from lightning_modules.module import FineTuneModule


class CheckpointNotWritten(OSError):
    """A checkpoint the filesystem refused (a full disk, a quota, a read-only folder ...): the system's errno and
    message, and the checkpoint's path as the filename. Nothing of the new file is left; the one it was to replace
    is whole."""


def os_error_in(err: BaseException | None) -> OSError | None:
    """The first OSError of `err` and the chain of causes and contexts a traceback would show, or None."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return err


CHECKPOINT_FILE = "a .ckpt file written by `ftlab fit` (runs/<name>/version_N/checkpoints/)"


def pass_a_checkpoint(path: Path) -> str:
    """What to do about an unusable checkpoint `path`, where no better one is known."""
    return f"pass {CHECKPOINT_FILE}"


def read_checkpoint(path: str | Path, instead: Callable[[Path], str] = pass_a_checkpoint) -> dict[str, Any]:
    """A Lightning checkpoint's contents (tensors memory-mapped), or a ConfigError naming the file, why it cannot
    be read, and what to pass instead (`instead(path)`). Only tensors and plain values are ever unpickled
    (`weights_only=True`), whoever made the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"checkpoint {path} is a folder, not a checkpoint file; {instead(path)}")
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; {instead(path)}")
    if path.stat().st_size == 0:
        raise ConfigError(f"checkpoint {path} is empty (0 bytes); {instead(path)}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # torch's message advises turning the safe mode off: wrong for an unknown file
        raise ConfigError(
            f"checkpoint {path} holds objects other than tensors and plain values, which finetune-lab never loads "
            f"(it reads checkpoints with weights_only=True); {instead(path)}"
        ) from None
    except Exception as err:  # torch raises RuntimeError, KeyError, EOFError ... for damaged files
        reason = str(err).split(". ")[0].split("\n")[0][:160] or type(err).__name__
        if "mmap" in reason or isinstance(err, KeyError):  # what torch says of a file not in its zip format
            reason = "not in PyTorch's zip format"
        raise ConfigError(
            f"checkpoint {path} cannot be read: it is truncated or not a PyTorch checkpoint ({reason}); {instead(path)}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(
            f"checkpoint {path} holds no state_dict: it is not a Lightning checkpoint of `ftlab fit`; {instead(path)}"
        )
    return checkpoint


def load_module(path: str | Path) -> FineTuneModule:
    """The FineTuneModule of a checkpoint file, on the CPU, nothing downloaded; a ConfigError naming the file when it
    is missing, a folder, damaged or not a checkpoint of `ftlab fit` (`read_checkpoint`)."""
    read_checkpoint(path)
    return FineTuneModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves each checkpoint to a hidden `.<name>.partial` in the same folder, syncs it, and renames it over the
    target, so a process killed while writing leaves the previous checkpoint whole; a write the filesystem refuses
    removes the partial file and raises `CheckpointNotWritten` with the system's errno. Loads with
    `weights_only=True` unless told otherwise.

    Lightning's own save writes into the system temp folder and moves the file, which is a rename only when that
    folder is on the same filesystem as the checkpoints (on clusters it often is not: the move becomes a copy).
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Write `checkpoint` to `path` atomically (remote URLs go through Lightning's fsspec writer)."""
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        partials: list[Path] = []

        def write(partial: Path) -> None:
            partials.append(partial)
            with partial.open("wb") as file:  # through Python's file, torch's writer keeps the system's OSError
                torch.save(checkpoint, file)  # (written to a path, it says `unexpected pos` and loses the errno)

        try:
            atomic_write(Path(path), write)
        except Exception as err:
            for partial in partials:  # a sync or a rename that failed after the write
                partial.unlink(missing_ok=True)
            refused = os_error_in(err)
            if refused is None:
                raise
            raise CheckpointNotWritten(refused.errno, refused.strerror or str(refused), str(path)) from err

    @override
    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load with `weights_only=True` by default: tensors and primitives only, never arbitrary objects."""
        weights_only = True if weights_only is None else weights_only
        if map_location is None:
            return super().load_checkpoint(path, weights_only=weights_only)
        return super().load_checkpoint(path, map_location, weights_only)


def free_name(path: Path, *companions: Path) -> Path:
    """`path`, or `<stem>_2<suffix>`, `_3` ... when it (or a `companion` numbered alike) exists: an earlier file
    (another checkpoint's predictions or report, perhaps) is never overwritten."""

    def numbered(file: Path, n: int) -> Path:
        return file if n == 1 else file.with_name(f"{file.stem}_{n}{file.suffix}")

    n = 1
    while any(numbered(f, n).exists() for f in (path, *companions)):
        n += 1
    return numbered(path, n)
