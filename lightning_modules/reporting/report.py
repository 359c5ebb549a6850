"""The test report: metrics.json, report.md, a confusion matrix, image grids and class activation maps in the run
directory and TensorBoard."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from datamodules.base import ImageClassificationDataModule
from datamodules.common import ConfigError, atomic_write, gather_lists
from lightning_modules.backbones.backbone import Backbone
from lightning_modules.console import notice
from lightning_modules.reporting.checkpoint_io import free_name
from lightning_modules.reporting.dashboard import tensorboards
from lightning_modules.reporting.explain import CamCandidates, cam_panels, check_method, normalize
from lightning_modules.reporting.figures import (
    confusion_figure,
    denormalize,
    first_layer_figures,
    grid_figure,
    pr_curves_figure,
    tiles_figure,
)
from lightning_modules.reporting.metrics import classification_report

GRID = 16  # images per grid
CAM_IMAGES = 6  # the CAM grid's confident mistakes, and as many unsure correct answers


@runtime_checkable
class ReportedModel(Protocol):
    """What the report and the prediction writer read from the model (FineTuneModule has it)."""

    backbone: Backbone
    head: torch.nn.Module
    class_names: list[str]


def reported(pl_module: pl.LightningModule) -> ReportedModel:
    """`pl_module` as a `ReportedModel`, or a ConfigError when it is not one."""
    if not isinstance(pl_module, ReportedModel):
        raise ConfigError(f"the test report needs a model with a backbone and class_names, got {type(pl_module)}")
    return pl_module


class TestReport(pl.Callback):
    """After `ftlab test`: metrics.json, report.md, confusion_matrix.png, image grids and precision-recall curves in
    the run directory, the same figures and each class's PR curve in TensorBoard.

    Args:
        grid_size: images per grid.
        layer_figures: also draw the first layer's kernels and its feature maps for one test image.
        cam_images: the class activation maps' grid (`cam.png`, `test/cam`): this many of the most confident
            mistakes and as many of the least confident correct answers, each with its CAM for the predicted class
            and for the true class (a correct answer's: the runner-up class); 0: no grid.
        cam_method: the CAM's method, a key of `explain.METHODS` (`gradcam`, `gradcam++`, `eigencam` ...).
    """

    def __init__(
        self,
        grid_size: int = GRID,
        layer_figures: bool = True,
        cam_images: int = CAM_IMAGES,
        cam_method: str = "gradcam",
    ) -> None:
        self.grid_size = grid_size
        self.layer_figures = layer_figures
        self.cam_images = cam_images
        self.cam_method = check_method(cam_method, "TestReport cam_method")
        self._reset()

    def _reset(self) -> None:
        self.probs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []  # each sample's index in the test set: the sampler's repeats show
        self.correct: list[tuple[torch.Tensor, int, int, float, float]] = []
        self.wrong: list[tuple[torch.Tensor, int, int, float, float]] = []
        self.top_losses: list[tuple[torch.Tensor, int, int, float, float]] = []
        self.step_seconds, self.step_images = 0.0, 0
        self.cam_candidates = CamCandidates(self.cam_images)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start empty."""
        self._reset()

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Start the clock of the test step (forward pass and metrics; data loading excluded)."""
        self._step_start = time.perf_counter()

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep probabilities and targets; keep a few images for the grids."""
        if not isinstance(outputs, dict) or "logits" not in outputs:
            return
        self.step_seconds += time.perf_counter() - self._step_start
        self.step_images += len(outputs["logits"])
        logits, y = outputs["logits"].float().cpu(), batch.targets.cpu()
        probs = logits.softmax(1)
        losses = F.cross_entropy(logits, y, reduction="none")
        self.probs.append(probs)
        self.targets.append(y)
        self.indices.append(batch.indices.cpu())
        cfg = reported(pl_module).backbone.data_config
        images = denormalize(batch.inputs, cfg.mean, cfg.std)
        self.cam_candidates.add(images, probs, y)
        conf, pred = probs.max(1)
        for i in range(len(y)):
            sample = (images[i].clone(), int(y[i]), int(pred[i]), float(conf[i]), float(losses[i]))
            bucket = self.correct if sample[1] == sample[2] else self.wrong
            if len(bucket) < self.grid_size:
                bucket.append(sample)
            self.top_losses.append(sample)
        self.top_losses = sorted(self.top_losses, key=lambda s: -s[4])[: self.grid_size]

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gather every process's predictions, then (rank 0) compute, draw and write the report."""
        gathered = self._gather(trainer, pl_module)
        wrong, right = self.cam_candidates.gathered(gather_lists)  # a collective too: rank zero draws them all
        log_dir = trainer.log_dir  # a collective under DDP: every process asks
        if gathered is None or not trainer.is_global_zero or not log_dir:
            return
        model = reported(pl_module)
        report = self._metrics(trainer, pl_module, *gathered)
        figures = self._figures(report, model, *gathered)
        figures |= self._cam_figure(report, model, wrong + right)
        written = self._write(Path(log_dir), report, figures, model.class_names)
        self._to_tensorboard(trainer, figures, model.class_names, *gathered)
        print(f"Test report: {written}")

    def _gather(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Probabilities and targets of every process (a collective: every process calls it), each test sample
        once (DDP's sampler repeats a few to even out the shards); None if empty."""
        num_classes = int(pl_module.hparams["num_classes"])
        local = (
            torch.cat(self.probs) if self.probs else torch.empty(0, num_classes),
            torch.cat(self.targets) if self.targets else torch.empty(0, dtype=torch.long),
            torch.cat(self.indices) if self.indices else torch.empty(0, dtype=torch.long),
        )
        parts = gather_lists([local])
        first: dict[int, int] = {}  # sample index -> its first row
        for row, index in enumerate(torch.cat([i for _, _, i in parts]).tolist()):
            first.setdefault(index, row)
        keep = list(first.values())
        if trainer.world_size > 1 and len(keep) < sum(len(i) for _, _, i in parts):
            rank_zero_warn(
                "test under DDP: the distributed sampler repeated a few samples to even out the shards; the "
                "logged test/ metrics count them, the report (metrics.json, report.md) counts each sample once"
            )
        targets = torch.cat([t for _, t, _ in parts])[keep]
        return (torch.cat([p for p, _, _ in parts])[keep], targets) if len(targets) else None

    def _metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, probs: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, Any]:
        """metrics.json: the classification report, the checkpoint, the model's size, speed and split sizes."""
        report = classification_report(probs, targets, reported(pl_module).class_names)
        ckpt = trainer.ckpt_path
        report["checkpoint"] = str(ckpt) if ckpt else None
        report["params_total"] = sum(p.numel() for p in pl_module.parameters())
        report["images_per_s"] = self.step_images / self.step_seconds if self.step_seconds else None  # this process
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        report["split_sizes"] = (
            datamodule.split_sizes() if isinstance(datamodule, ImageClassificationDataModule) else None
        )
        return report

    def _figures(
        self, report: dict[str, Any], model: ReportedModel, probs: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, Any]:
        """The confusion matrix, the image grids, the precision-recall curves and (with `layer_figures`) the first
        layer's kernels and maps."""
        names = model.class_names
        figures = {
            "confusion_matrix": confusion_figure(np.array(report["confusion_matrix"]), names),
            "correct": grid_figure(self.correct, names, "correct predictions"),
            "misclassified": grid_figure(self.wrong, names, "misclassified"),
            "top_losses": grid_figure(self.top_losses, names, "highest losses"),
            "pr_curves": pr_curves_figure(pr_curves(probs, targets, names)),
        }
        if self.layer_figures and self.correct + self.wrong:
            cfg = model.backbone.data_config
            first = normalize((self.correct + self.wrong)[0][0][None], cfg.mean, cfg.std)[0]
            figures |= first_layer_figures(model.backbone, first[: cfg.input_size[0]])
        return figures

    def _cam_figure(self, report: dict[str, Any], model: ReportedModel, candidates: list[Any]) -> dict[str, Any]:
        """The CAM grid as `cam` (its seconds in the report as `cam_seconds`); none when off, without candidates,
        or for a backbone without a spatial map (one line says so)."""
        if not candidates:
            return {}
        start = time.perf_counter()
        try:
            tiles = cam_panels(model.backbone, model.head, candidates, model.class_names, self.cam_method)
        except ConfigError as err:
            notice(f"test report: no CAM grid ({err})")
            return {}
        title = f"{self.cam_method}: confident mistakes, then unsure correct answers"
        figure = tiles_figure(*tiles, title, cols=6)
        report["cam_seconds"] = round(time.perf_counter() - start, 3)
        return {"cam": figure}

    @staticmethod
    def _write(run: Path, report: dict[str, Any], figures: dict[str, Any], class_names: list[str]) -> Path:
        """metrics.json, one PNG per figure and report.md, each written whole or not at all; a run tested before
        keeps its report: this one is `report_2.md`, `metrics_2.json`, `confusion_matrix_2.png` ... (as predictions
        are numbered). Returns the report's path."""
        suffix = free_name(run / "report.md", run / "metrics.json").stem.removeprefix("report")
        atomic_write(run / f"metrics{suffix}.json", lambda p: p.write_text(json.dumps(report, indent=2)))
        for name, fig in figures.items():
            atomic_write(run / f"{name}{suffix}.png", partial(fig.savefig, dpi=110, format="png"))
        markdown = render_markdown(report, class_names, run, suffix)
        atomic_write(run / f"report{suffix}.md", lambda p: p.write_text(markdown))
        return run / f"report{suffix}.md"

    @staticmethod
    def _to_tensorboard(
        trainer: pl.Trainer, figures: dict[str, Any], class_names: list[str], probs: torch.Tensor, targets: torch.Tensor
    ) -> None:
        """The figures under `test/<name>`, and TensorBoard's own PR curve of each class (`test/pr/<class>`). The
        test metrics reach its HParams table as the `test/` scalars Lightning logs into the run."""
        for writer in tensorboards(trainer):
            for name, fig in figures.items():
                writer.add_figure(f"test/{name}", fig, global_step=trainer.global_step, close=False)
            for i, name in enumerate(class_names):
                writer.add_pr_curve(f"test/pr/{name}", targets == i, probs[:, i], global_step=trainer.global_step)


def pr_curves(probs: torch.Tensor, targets: torch.Tensor, class_names: list[str]) -> list[tuple[str, Any, Any]]:
    """Each class's one-vs-rest precision-recall curve (torchmetrics), as `(class, precision, recall)` arrays; a
    class absent from the targets has none."""
    from torchmetrics.functional.classification import binary_precision_recall_curve

    curves = []
    for i, name in enumerate(class_names):
        positives = targets == i
        if positives.any():
            precision, recall, _ = binary_precision_recall_curve(probs[:, i], positives.long())
            curves.append((name, precision.numpy(), recall.numpy()))
    return curves


def absent_note(report: dict[str, Any]) -> list[str]:
    """report.md's lines on classes with no test image (none when every class is there)."""
    absent = [name for name, c in report["per_class"].items() if c["support"] == 0]
    if not absent:
        return []
    return [
        f"**Absent from the test split: {', '.join(absent)}.** Their recall and accuracy are not measured (0 above "
        "by convention); accuracy counts the other classes; the macro precision, recall and F1 average over the "
        "classes that occur in the targets or the predictions, AUROC over the classes in the targets.",
        "",
    ]


def render_markdown(report: dict[str, Any], class_names: list[str], run: Path, suffix: str = "") -> str:
    """report.md: headline metrics, a per-class table, the confusion matrix image, the config and checkpoint."""
    lines = [
        "# Test report",
        "",
        f"Checkpoint: `{report.get('checkpoint')}`  ",
        f"Samples: {report['samples']}",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {report[k]:.4f} |" for k in ("acc", "precision", "recall", "f1", "auroc")],
        "",
        "## Per class",
        "",
        "| class | precision | recall (= class accuracy) | f1 | support |",
        "|---|---|---|---|---|",
        *[
            f"| {n} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
            for n, c in report["per_class"].items()
        ],
        "",
        *absent_note(report),
        f"![confusion matrix](confusion_matrix{suffix}.png)",
        "",
        f"Misclassified: ![misclassified](misclassified{suffix}.png)  Highest losses: "
        f"![top losses](top_losses{suffix}.png)",
        "",
        f"![precision-recall per class](pr_curves{suffix}.png)",
        "",
    ]
    if "cam_seconds" in report:
        lines += [
            "## Where the model looked",
            "",
            "Class activation maps of the most confident mistakes and the least confident correct answers: each "
            "image, its map for the predicted class, then for the true class (a correct answer: the runner-up).",
            "",
            f"![class activation maps](cam{suffix}.png)",
            "",
        ]
    if (run / "learning_curves.png").is_file():  # drawn at the end of the fit that wrote this run
        lines += ["## Training", "", "![learning curves](learning_curves.png)", ""]
    config = run / "config.yaml"
    if config.is_file():
        lines += ["## Config", "", "```yaml", config.read_text().rstrip(), "```", ""]
    return "\n".join(lines)
