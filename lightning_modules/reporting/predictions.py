"""What `ftlab predict` leaves: predictions.csv (one row per file) and, with `--explain`, a class activation map
over each image."""

from __future__ import annotations

import csv
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from datamodules.common import atomic_write, gather_lists
from datamodules.images import PATH_ERRORS
from lightning_modules.reporting.checkpoint_io import free_name
from lightning_modules.reporting.explain import check_method, explain_images
from lightning_modules.reporting.report import reported


class PredictionWriter(pl.Callback):
    """`ftlab predict` writes `predictions.csv` in the run directory (`predictions_2.csv` ... when one is already
    there: nothing is overwritten): one row per file (or sample) with the predicted class and one probability column
    per class; files that could not be read are rows with an error.

    Args:
        explain: a CAM method (`gradcam`, ...: `explain.METHODS`) to draw each image's class activation map for its
            predicted class, over the image at its own size, into `predictions_cam/` beside the CSV (a `cam` column
            names each file); None: no maps.
    """

    def __init__(self, explain: str | None = None) -> None:
        self.explain = check_method(explain, "explain") if explain else None

    @override
    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start empty; name the CSV (and the maps' folder) now, the same on every process."""
        self.rows: list[list[Any]] = []
        log_dir = trainer.log_dir  # a collective under DDP: every process asks
        path = free_name(Path(log_dir) / "predictions.csv") if log_dir and trainer.is_global_zero else None
        self.path: Path | None = trainer.strategy.broadcast(path)
        dataset = getattr(trainer.datamodule, "predict_set", None)  # type: ignore[attr-defined]
        self.cam_names: list[str] = []
        if self.explain and dataset is not None:
            self.cam_names = cam_file_names([dataset.name(i) for i in range(len(dataset))])

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """One row per sample of the batch; with `explain`, its map written."""
        dataset = getattr(trainer.datamodule, "predict_set", None)  # type: ignore[attr-defined]
        if dataset is None or outputs is None:
            return
        names = reported(pl_module).class_names
        probabilities = outputs.float().cpu()
        cams = self._explain(pl_module, dataset, batch, probabilities.argmax(1).tolist()) if self.explain else {}
        rows = zip(batch.indices.tolist(), batch.targets.tolist(), probabilities.tolist(), strict=True)
        for index, label, probs in rows:
            true = names[label] if label >= 0 else ""  # -1: a file to predict, class unknown
            best = max(range(len(probs)), key=probs.__getitem__)
            extra = [cams.get(index, "")] if self.explain else []
            self.rows.append([dataset.name(index), true, names[best], *(f"{p:.6f}" for p in probs), "", *extra])

    def _explain(self, pl_module: pl.LightningModule, dataset: Any, batch: Any, predicted: list[int]) -> dict[int, str]:
        """Each image's map for its predicted class, over the decoded image, as a PNG in the maps' folder (each
        process writes its own images'); their names by sample index."""
        if self.path is None or not len(batch.indices):
            return {}
        model = reported(pl_module)
        indices = batch.indices.tolist()
        raws = [dataset.dataset[i][0] for i in indices]  # decoded again: the map is drawn at the image's own size
        explained = explain_images(
            model.backbone, model.head, batch.inputs, raws, predicted, dataset.transform, str(self.explain)
        )
        folder = self.path.with_name(f"{self.path.stem}_cam")
        written = {}
        for index, (_, image) in zip(indices, explained, strict=True):
            target = folder / self.cam_names[index]
            atomic_write(target, partial(image.save, format="png"))
            written[index] = f"{folder.name}/{target.name}"
        return written

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Add the unreadable files and write the CSV (rank 0)."""
        rows = gather_lists(getattr(self, "rows", []))  # every process's share (collectives first)
        skipped = gather_lists(sorted(getattr(trainer.datamodule, "skipped", set())))  # type: ignore[attr-defined]
        path = getattr(self, "path", None)
        if not trainer.is_global_zero or path is None:
            return
        names = reported(pl_module).class_names
        extra = ["cam"] if self.explain else []
        errors: list[list[Any]] = [
            [file, "", "", *([""] * len(names)), reason, *([""] * len(extra))]
            for split, file, reason in sorted({tuple(r) for r in skipped})
            if split == "predict"
        ]
        header = ["path", "true", "predicted", *(f"prob_{n}" for n in names), "error", *extra]

        def write(tmp: Path) -> None:
            with tmp.open("w", newline="", errors=PATH_ERRORS) as f:  # non-UTF-8 file names, byte for byte
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(sorted(rows + errors, key=lambda row: str(row[0])))  # type: ignore[index]

        atomic_write(path, write)
        source = f" by {trainer.ckpt_path}" if trainer.ckpt_path else " by the untrained model"
        maps = f"; class activation maps in {path.with_name(f'{path.stem}_cam')}" if self.explain else ""
        print(f"Predictions: {path} ({len(rows)} predicted, {len(errors)} unreadable){source}{maps}")


def cam_file_names(samples: list[str]) -> list[str]:
    """The map's file name of each sample (a path, or a position): its stem and `.png`, numbered `_2`, `_3` ... in
    order when stems repeat (`a/img.jpg`, `b/img.jpg`)."""
    stems = [Path(s).stem or str(i) for i, s in enumerate(samples)]
    repeated = {s for s, n in Counter(stems).items() if n > 1}
    seen: Counter[str] = Counter()
    names = []
    for stem in stems:
        seen[stem] += 1
        names.append(f"{stem}_{seen[stem]}.png" if stem in repeated and seen[stem] > 1 else f"{stem}.png")
    return names
