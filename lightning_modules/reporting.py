"""The test report: metrics.json, report.md, a confusion matrix and image grids in the run directory and TensorBoard."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from typing_extensions import override

from datamodules.common import atomic_write, gather_lists
from datamodules.images import PATH_ERRORS

GRID = 16  # images per grid


def classification_report(probs: np.ndarray, targets: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, AUROC, per-class figures and the confusion matrix, as plain numbers."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    labels = list(range(len(class_names)))
    preds = probs.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, preds, labels=labels, average=None, zero_division=0
    )
    matrix = confusion_matrix(targets, preds, labels=labels)
    # macro averages over the classes that occur (in the targets or the predictions), as sklearn and torchmetrics do
    seen = sorted(set(targets.tolist()) | set(preds.tolist()))
    macro = precision_recall_fscore_support(targets, preds, labels=seen, average="macro", zero_division=0)
    # AUROC: one-vs-rest per class, averaged over the classes that occur in the targets (a class without samples
    # has no ROC curve); the same definition as the module's logged `test/auroc` (`PresentClassesAUROC`)
    present = sorted(set(targets.tolist()))
    per_class_auroc = [roc_auc_score(targets == c, probs[:, c]) for c in present] if len(present) > 1 else []
    auroc = float(np.mean(per_class_auroc)) if per_class_auroc else float("nan")
    return {
        "acc": float((preds == targets).mean()),
        "precision": float(macro[0]),
        "recall": float(macro[1]),
        "f1": float(macro[2]),
        "auroc": auroc,
        "samples": len(targets),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "acc": float(recall[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": matrix.tolist(),
    }


def _denormalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    out = (images.float().cpu() * s + m).clamp(0, 1)
    return out.expand(-1, 3, -1, -1) if out.shape[1] == 1 else out


def confusion_figure(matrix: np.ndarray, class_names: list[str]) -> Any:
    """Row-normalised confusion matrix with class names and the share in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix.sum(1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    size = max(4.0, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(
                j,
                i,
                f"{norm[i, j]:.2f}",
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_title("confusion matrix (rows sum to 1)")
    fig.tight_layout()
    return fig


def grid_figure(samples: list[tuple[torch.Tensor, int, int, float, float]], class_names: list[str], title: str) -> Any:
    """A grid of images titled `true -> predicted (probability)`; a loss is shown when it is what ranks them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = max(1, (len(samples) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, true, pred, prob, loss) in zip(axes.flat, samples, strict=False):
        ax.imshow(image.permute(1, 2, 0).numpy())
        color = "green" if true == pred else "red"
        ax.set_title(
            f"{class_names[true]} -> {class_names[pred]}\np={prob:.2f} loss={loss:.2f}", fontsize=8, color=color
        )
    fig.suptitle(title if samples else f"{title}: none")
    fig.tight_layout()
    return fig


def first_layer_figures(backbone: Any, image: torch.Tensor) -> dict[str, Any]:
    """The first convolution's kernels (as RGB tiles) and its feature maps for one image (the course figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv = next((m for m in backbone.body.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if conv is None:
        return {}
    weights = conv.weight.detach().float().cpu()[:32]
    kernels = (weights - weights.amin(dim=(1, 2, 3), keepdim=True)) / (
        weights.amax(dim=(1, 2, 3), keepdim=True) - weights.amin(dim=(1, 2, 3), keepdim=True) + 1e-8
    )
    with torch.no_grad():
        maps = conv(image.unsqueeze(0).to(conv.weight.device, conv.weight.dtype))[0, :16].float().cpu()
    figures = {}
    for name, tiles, title in (
        ("first_layer_kernels", kernels, f"first-layer kernels ({tuple(conv.weight.shape)})"),
        ("feature_maps", maps, "first-layer feature maps of one test image"),
    ):
        cols = 8
        rows = max(1, (len(tiles) + cols - 1) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.3), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, tile in zip(axes.flat, tiles, strict=False):
            if tile.dim() == 3 and tile.shape[0] == 3:  # an RGB kernel
                ax.imshow(tile.permute(1, 2, 0).numpy())
            else:  # a feature map, or a kernel over other channel counts
                ax.imshow((tile.mean(0) if tile.dim() == 3 else tile).numpy(), cmap="viridis")
        fig.suptitle(title)
        fig.tight_layout()
        figures[name] = fig
    return figures


class TestReport(pl.Callback):
    """After `ftlab test`: metrics.json, report.md, confusion_matrix.png and image grids in the run directory,
    the same figures in TensorBoard, and the hyperparameters with the final metrics in its HParams view.

    Args:
        grid_size: images per grid.
        layer_figures: also draw the first layer's kernels and its feature maps for one test image.
    """

    def __init__(self, grid_size: int = GRID, layer_figures: bool = True) -> None:
        self.grid_size = grid_size
        self.layer_figures = layer_figures
        self._reset()

    def _reset(self) -> None:
        self.probs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.correct: list[tuple[torch.Tensor, int, int, float, float]] = []
        self.wrong: list[tuple[torch.Tensor, int, int, float, float]] = []
        self.top_losses: list[tuple[torch.Tensor, int, int, float, float]] = []
        self.step_seconds, self.step_images = 0.0, 0

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
        cfg: Any = getattr(pl_module, "backbone").data_config  # noqa: B009
        images = _denormalize(batch.inputs, cfg.mean, cfg.std)
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
        """Write the report (rank 0) into the run directory; under DDP the predictions of every process."""
        num_classes = int(pl_module.hparams["num_classes"])
        local = (
            torch.cat(self.probs) if self.probs else torch.empty(0, num_classes),
            torch.cat(self.targets) if self.targets else torch.empty(0, dtype=torch.long),
        )
        parts = gather_lists([local])  # every process, before anyone returns (a collective under DDP)
        log_dir = trainer.log_dir  # also a collective
        if trainer.world_size > 1:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                "test report under DDP: the distributed sampler repeats a few samples to even out the "
                "shards; for exact figures run `ftlab test` with --trainer.devices 1"
            )
        probs = torch.cat([p for p, _ in parts])
        targets = torch.cat([t for _, t in parts])
        if not len(targets) or not trainer.is_global_zero or not log_dir:
            return
        class_names = list(pl_module.class_names)  # type: ignore[arg-type]
        report = classification_report(probs.numpy(), targets.numpy(), class_names)
        ckpt = getattr(trainer, "ckpt_path", None)
        run = Path(log_dir)
        report["checkpoint"] = str(ckpt) if ckpt else None
        report["params_total"] = sum(p.numel() for p in pl_module.parameters())
        report["images_per_s"] = self.step_images / self.step_seconds if self.step_seconds else None  # this process
        split_sizes = getattr(trainer.datamodule, "split_sizes", None)  # type: ignore[attr-defined]  # public API
        report["split_sizes"] = split_sizes() if callable(split_sizes) else None
        atomic_write(run / "metrics.json", lambda p: p.write_text(json.dumps(report, indent=2)))
        figures = {
            "confusion_matrix": confusion_figure(np.array(report["confusion_matrix"]), class_names),
            "correct": grid_figure(self.correct, class_names, "correct predictions"),
            "misclassified": grid_figure(self.wrong, class_names, "misclassified"),
            "top_losses": grid_figure(self.top_losses, class_names, "highest losses"),
        }
        if self.layer_figures and self.correct + self.wrong:
            cfg = getattr(pl_module, "backbone").data_config  # noqa: B009
            first = (self.correct + self.wrong)[0][0]
            normalized = (first - torch.tensor(cfg.mean).view(-1, 1, 1)[: first.shape[0]]) / torch.tensor(cfg.std).view(
                -1, 1, 1
            )[: first.shape[0]]
            figures |= first_layer_figures(getattr(pl_module, "backbone"), normalized[: cfg.input_size[0]])  # noqa: B009
        for name, fig in figures.items():
            atomic_write(run / f"{name}.png", partial(fig.savefig, dpi=110, format="png"))
        atomic_write(run / "report.md", lambda p: p.write_text(render_markdown(report, class_names, run)))
        self._to_tensorboard(trainer, pl_module, report, figures)
        import matplotlib.pyplot as plt

        for fig in figures.values():
            plt.close(fig)
        print(f"Test report: {run / 'report.md'}")

    @staticmethod
    def _to_tensorboard(
        trainer: pl.Trainer, pl_module: pl.LightningModule, report: dict[str, Any], figures: dict[str, Any]
    ) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for name, fig in figures.items():
                    logger.experiment.add_figure(f"test/{name}", fig, global_step=trainer.global_step)
                metrics = {f"test/{k}": report[k] for k in ("acc", "precision", "recall", "f1", "auroc")}
                logger.log_hyperparams(_flat_hparams(pl_module.hparams), metrics)


def _flat_hparams(hparams: Any) -> dict[str, Any]:
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in dict(hparams).items()}


def render_markdown(report: dict[str, Any], class_names: list[str], run: Path) -> str:
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
        "![confusion matrix](confusion_matrix.png)",
        "",
        "Misclassified: ![misclassified](misclassified.png)  Highest losses: ![top losses](top_losses.png)",
        "",
    ]
    config = run / "config.yaml"
    if config.is_file():
        lines += ["## Config", "", "```yaml", config.read_text().rstrip(), "```", ""]
    return "\n".join(lines)


class PredictionWriter(pl.Callback):
    """`ftlab predict` writes `predictions.csv` in the run directory (`predictions_2.csv` ... when one is already
    there: nothing is overwritten): one row per file (or sample) with the predicted class and one probability column
    per class; files that could not be read are rows with an error."""

    @override
    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start empty."""
        self.rows: list[list[Any]] = []

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
        """One row per sample of the batch."""
        dataset = getattr(trainer.datamodule, "predict_set", None)  # type: ignore[attr-defined]
        if dataset is None or outputs is None:
            return
        names = list(pl_module.class_names)  # type: ignore[arg-type]
        rows = zip(batch.indices.tolist(), batch.targets.tolist(), outputs.float().cpu().tolist(), strict=True)
        for index, label, probs in rows:
            true = names[label] if label >= 0 else ""  # -1: a file to predict, class unknown
            best = max(range(len(probs)), key=probs.__getitem__)
            self.rows.append([dataset.name(index), true, names[best], *(f"{p:.6f}" for p in probs), ""])

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Add the unreadable files and write the CSV (rank 0)."""
        import csv

        rows = gather_lists(getattr(self, "rows", []))  # every process's share (collectives first)
        skipped = gather_lists(sorted(getattr(trainer.datamodule, "skipped", set())))  # type: ignore[attr-defined]
        log_dir = trainer.log_dir
        if not trainer.is_global_zero or not log_dir:
            return
        names = list(pl_module.class_names)  # type: ignore[arg-type]
        errors: list[list[Any]] = [
            [path, "", "", *([""] * len(names)), reason]
            for split, path, reason in sorted({tuple(r) for r in skipped})
            if split == "predict"
        ]
        header = ["path", "true", "predicted", *(f"prob_{n}" for n in names), "error"]

        def write(tmp: Path) -> None:
            with tmp.open("w", newline="", errors=PATH_ERRORS) as f:  # non-UTF-8 file names, byte for byte
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(sorted(rows + errors, key=lambda row: str(row[0])))  # type: ignore[index]

        path = free_name(Path(log_dir) / "predictions.csv")
        atomic_write(path, write)
        source = f" by {trainer.ckpt_path}" if trainer.ckpt_path else " by the untrained model"
        print(f"Predictions: {path} ({len(rows)} predicted, {len(errors)} unreadable){source}")


def free_name(path: Path) -> Path:
    """`path`, or `<stem>_2<suffix>`, `_3` ... when it exists: an earlier file (another checkpoint's predictions,
    perhaps) is never overwritten."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate
