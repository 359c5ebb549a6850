"""TensorBoard beyond the scalars, each page also a file in the run folder: HParams that compare runs by their
real results, the recipe as text, what the network is fed, the val confusion matrix as it evolves, the val images
the best epoch got wrong, and the learning curves with the unfreezing marked."""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from datamodules.base import ImageClassificationDataModule
from datamodules.batches import Batch, Transformed
from datamodules.common import atomic_write, gather_lists
from datamodules.images import BadSample
from datamodules.transforms import eval_transform
from lightning_modules.finetuning.strategies import FinetuningStrategy
from lightning_modules.reporting.figures import (
    confusion_figure,
    denormalize,
    grid_figure,
    learning_curves_figure,
    tiles_figure,
)

# The HParams table's metric columns, the same for every run (TensorBoard takes the columns of one run for all):
# scalars written by `Dashboard` (hp/...) and by the test (test/...); a run not yet tested shows them empty.
METRICS = (
    "hp/best_val_acc",
    "hp/best_val_loss",
    "hp/best_epoch",
    "hp/epochs",
    "test/acc",
    "test/f1",
    "test/auroc",
    "test/loss",
)


class Dashboard(pl.Callback):
    """What a fit shows besides its scalars, on rank zero, in every TensorBoardLogger and in the run folder.

    - HParams: one session per run with the hyperparameters that tell runs apart (`run_hparams`: backbone,
      weights, image size, strategy and when it unfreezes, optimizer, lr, batch, augmentation, seed ...) and the
      `METRICS` columns, so that a sweep's runs sort by best val accuracy or test accuracy. Lightning's
      placeholder `hp_metric` is off in `defaults.yaml`.
    - Text `run/recipe` (and `recipe.md`): the model, what trains when at which rate, the optimizer and the data.
    - Image `train/batch` (`train_batch.png`), once per fit: its first training batch as the network gets it
      (augmented images; or, while the backbone is frozen and the feature cache serves features, the un-augmented
      images those features come from). Mixup and cutmix, applied in the step, are not shown.
    - Image `val/confusion_matrix` (`val_confusion_matrix.png`, the latest) every `confusion_every_n_epochs`.
    - At the end of the fit: `val/misclassified` (`val_misclassified.png`), the val images with the highest loss
      among those the best epoch got wrong, and `curves/learning` (`learning_curves.png`).

    Args:
        batch_images: images in the training-batch grid (0: none).
        confusion_every_n_epochs: draw the val confusion matrix every this many epochs (0: never).
        misclassified: images in the best epoch's misclassified grid (0: none).
    """

    def __init__(self, batch_images: int = 16, confusion_every_n_epochs: int = 1, misclassified: int = 16) -> None:
        self.batch_images = batch_images
        self.confusion_every = confusion_every_n_epochs
        self.misclassified = misclassified
        self.log_dir: Path | None = None
        self.history: dict[int, dict[str, float]] = {}  # epoch -> its numbers (kept in checkpoints: resume goes on)
        self.best: dict[str, Any] = {}  # the best epoch's val acc, loss, epoch and wrong samples
        self._val: list[tuple[int, int, int, float, float]] = []  # (index, true, predicted, probability, loss)
        self._batch_shown = True  # until a fit starts

    # ------------------------------------------------------------------------------------------ start of a run

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The HParams session, the recipe text and the training-batch grid."""
        log_dir = trainer.log_dir  # a collective under DDP: every process asks
        self.log_dir = Path(log_dir) if log_dir else None
        if not trainer.is_global_zero:
            return
        if not resumed_here(trainer, self.log_dir):  # a resumed fit's session is already there (the first counts)
            write_session(trainer, run_hparams(trainer, pl_module))
        recipe = recipe_text(trainer, pl_module)
        for writer in tensorboards(trainer):
            writer.add_text("run/recipe", recipe, global_step=trainer.global_step)
        if self.log_dir is not None:
            atomic_write(self.log_dir / "recipe.md", lambda p: p.write_text(recipe + "\n"))
        self._batch_shown = False

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A test in a run folder no fit wrote (a checkpoint from elsewhere): its own HParams session."""
        log_dir = trainer.log_dir  # a collective under DDP: every process asks
        here = resumed_here(trainer, Path(log_dir) if log_dir else None)
        self._test_session = trainer.is_global_zero and trainer.state.fn == "test" and not here
        if self._test_session:
            write_session(trainer, run_hparams(trainer, pl_module))

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """End the test's own session."""
        if getattr(self, "_test_session", False):
            write_session_end(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """The grid of the fit's first training batch, as the network gets it."""
        if self._batch_shown or not trainer.is_global_zero:
            return
        self._batch_shown = True
        if self.batch_images:
            self._show(trainer, "train/batch", "train_batch", self._batch_figure(trainer, batch))

    def _batch_figure(self, trainer: pl.Trainer, batch: Batch) -> Any:
        """The batch's images (after the training transform); for a batch of cached features, the images they were
        computed from (the evaluation transform: the frozen phase trains without augmentation)."""
        data = trainer.datamodule  # type: ignore[attr-defined]
        if not isinstance(data, ImageClassificationDataModule) or batch.size == 0:
            return None
        cfg, names, n = data.data_config, data.class_names, self.batch_images
        targets = batch.targets[:n].tolist()
        if batch.features:
            train = data.datasets["train"]
            plain = Transformed(train.dataset, eval_transform(cfg))
            samples = [plain[i] for i in batch.indices[:n].tolist()]
            good = [(s.image, s.target) for s in samples if not isinstance(s.image, BadSample)]
            images = torch.stack([image for image, _ in good]) if good else torch.empty(0)
            targets = [target for _, target in good]
            fed = "cached features of these un-augmented images"
        else:
            images, fed = batch.inputs[:n], f"augment: {data.augment}"
        return tiles_figure(
            list(denormalize(images, cfg.mean, cfg.std)),
            [names[t] for t in targets],
            ["black"] * len(targets),
            f"epoch {trainer.current_epoch}'s first training batch ({fed})",
        )

    # ------------------------------------------------------------------------------------------ validation

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start empty."""
        self._val = []

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep each sample's index, class, prediction, probability and loss (a few numbers, no image)."""
        if trainer.sanity_checking or not isinstance(outputs, dict) or "logits" not in outputs:
            return
        logits, targets = outputs["logits"].float().cpu(), batch.targets.cpu()
        probs = logits.softmax(1)
        conf, pred = probs.max(1)
        losses = F.cross_entropy(logits, targets, reduction="none")
        rows = zip(batch.indices.tolist(), targets.tolist(), pred.tolist(), conf.tolist(), losses.tolist(), strict=True)
        self._val += list(rows)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gather every process's rows (a collective: every process calls it); note the epoch's val numbers and
        the best epoch so far with its wrong samples (`hp/best_*`, logged beside `val/acc`); draw the confusion
        matrix (rank zero)."""
        metrics = trainer.callback_metrics
        if trainer.state.fn != "fit" or trainer.sanity_checking or "val/acc" not in metrics:
            return
        self._val = sorted(set(gather_lists(self._val)))  # each sample once (DDP's sampler repeats a few)
        epoch = trainer.current_epoch
        acc, loss = float(metrics["val/acc"]), float(metrics.get("val/loss", math.nan))
        self.history.setdefault(epoch, {"epoch": epoch}).update({"val_acc": acc, "val_loss": loss})
        if not self.best or (acc, -loss) > (self.best["acc"], -self.best["loss"]):  # BestCheckpoint's rule
            wrong = sorted((r for r in self._val if r[1] != r[2]), key=lambda r: -r[4])[: self.misclassified]
            self.best = {"acc": acc, "loss": loss, "epoch": epoch, "wrong": wrong}
        for key in ("acc", "loss", "epoch"):  # the same on every process: no sync needed
            pl_module.log(f"hp/best_val_{key}" if key != "epoch" else "hp/best_epoch", float(self.best[key]))
        if trainer.is_global_zero and self.confusion_every and epoch % self.confusion_every == 0 and self._val:
            names = list(getattr(pl_module, "class_names", []))
            matrix = np.zeros((len(names), len(names)), dtype=np.int64)
            for _, true, pred, _, _ in self._val:
                matrix[true, pred] += 1
            figure = confusion_figure(matrix, names, f"val confusion matrix, epoch {epoch}")
            self._show(trainer, "val/confusion_matrix", "val_confusion_matrix", figure)

    # ------------------------------------------------------------------------------------------ end of an epoch

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note the epoch's training loss and accuracy and how many parameters trained; `hp/epochs`."""
        metrics = trainer.callback_metrics
        row = self.history.setdefault(trainer.current_epoch, {"epoch": trainer.current_epoch})
        for key, name in (("train/loss_epoch", "train_loss"), ("train/acc", "train_acc")):
            if key in metrics:
                row[name] = float(metrics[key])
        row["trainable"] = float(sum(p.numel() for p in pl_module.parameters() if p.requires_grad))
        pl_module.log("hp/epochs", float(trainer.current_epoch + 1))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The best epoch's misclassified val images and the learning curves."""
        if trainer.is_global_zero:
            self._finish(trainer, pl_module)
            write_session_end(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """The same figures for the epochs done when a fit stops on an error or an interrupt."""
        if trainer.is_global_zero and trainer.state.fn == "fit" and self.history:
            self._finish(trainer, pl_module)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = [self.history[e] for e in sorted(self.history)]
        if rows:
            name = f"{getattr(pl_module, 'hparams', {}).get('backbone', type(pl_module).__name__)}: learning curves"
            self._show(trainer, "curves/learning", "learning_curves", learning_curves_figure(rows, name))
        data = trainer.datamodule  # type: ignore[attr-defined]
        if self.misclassified and self.best and isinstance(data, ImageClassificationDataModule):
            val, cfg, names = data.datasets.get("val"), data.data_config, data.class_names
            samples = []
            for index, true, pred, prob, loss in self.best["wrong"] if val is not None else []:
                image = val[index].image  # type: ignore[index]
                if not isinstance(image, BadSample):
                    samples.append((denormalize(image.unsqueeze(0), cfg.mean, cfg.std)[0], true, pred, prob, loss))
            title = f"val images misclassified at the best epoch ({self.best['epoch']}), highest loss first"
            self._show(trainer, "val/misclassified", "val_misclassified", grid_figure(samples, names, title))

    def _show(self, trainer: pl.Trainer, tag: str, file: str, figure: Any) -> None:
        """`figure` under `tag` in every TensorBoard and as `<file>.png` in the run folder (written whole)."""
        if figure is None:
            return
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.log_dir / f"{file}.png", partial(figure.savefig, dpi=100, format="png"))
        for writer in tensorboards(trainer):
            writer.add_figure(tag, figure, global_step=trainer.global_step, close=False)

    # ------------------------------------------------------------------------------------------ checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        """The epochs' numbers and the best epoch: a resumed fit draws its curves from the first epoch."""
        return {"history": dict(self.history), "best": dict(self.best)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore both."""
        self.history = {int(k): v for k, v in state_dict.get("history", {}).items()}
        self.best = dict(state_dict.get("best", {}))


def tensorboards(trainer: pl.Trainer) -> list[Any]:
    """The SummaryWriter of every TensorBoardLogger of the trainer."""
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def run_hparams(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """The hyperparameters that tell runs apart, flat and readable, the same keys for every run (a key that does
    not apply is `none`): what the HParams table shows. Paths, class lists and Lightning's internals are left
    out (they are in `config.yaml` and `hparams.yaml`)."""
    hp = dict(pl_module.hparams)
    data = trainer.datamodule  # type: ignore[attr-defined]
    backbone = getattr(pl_module, "backbone", None)
    strategy = next((c for c in trainer.callbacks if isinstance(c, FinetuningStrategy)), None)  # type: ignore[attr-defined]
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1000
    changes = strategy.schedule(backbone, epochs) if strategy is not None and backbone is not None else []
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    schedulers = trainer.lr_scheduler_configs
    size = backbone.data_config.input_size[-1] if backbone is not None else hp.get("image_size")
    flat: dict[str, Any] = {
        "backbone": hp.get("backbone", type(pl_module).__name__),
        "weights": hp.get("weights", "none"),
        "image_size": size,
        "head": "linear" if not hp.get("head_hidden") else f"mlp {hp['head_hidden']}, dropout {hp['head_dropout']}",
        "strategy": type(strategy).__name__ if strategy is not None else "none",
        "unfreeze_epochs": ",".join(str(e) for e, _ in changes) or "never",
        "stage_lr": (
            "none"
            if strategy is None
            else f"{strategy.lr:g}"
            if strategy.lr is not None
            else f"head x {strategy.lr_factor:g}"
        ),
        "optimizer": type(optimizer).__name__ if optimizer is not None else "none",
        "lr": float(optimizer.param_groups[0]["lr"]) if optimizer is not None else hp.get("lr"),
        "weight_decay": float(optimizer.param_groups[0].get("weight_decay", 0.0)) if optimizer is not None else None,
        "scheduler": type(schedulers[0].scheduler).__name__ if schedulers else "none",
        "label_smoothing": hp.get("label_smoothing"),
        "mixup": hp.get("mixup"),
        "cutmix": hp.get("cutmix"),
        "max_epochs": trainer.max_epochs,
        "seed": torch.initial_seed() % 2**53,
        "data": type(data).__name__ if data is not None else "none",
        "batch_size": getattr(data, "batch_size", None),
        "augment": getattr(data, "augment", "none"),
        "train_images": len(data.datasets["train"]) if isinstance(data, ImageClassificationDataModule) else None,
    }
    return {k: v for k, v in flat.items() if v is not None}


def resumed_here(trainer: pl.Trainer, log_dir: Path | None) -> bool:
    """Whether the trainer's checkpoint is one of its run folder `log_dir`'s (a resumed fit, a test of this run).
    `log_dir` is passed in: `trainer.log_dir` is a collective under DDP, and this runs on process zero alone."""
    return bool(trainer.ckpt_path and log_dir and Path(trainer.ckpt_path).parent.parent == log_dir)


def write_session(trainer: pl.Trainer, hparams: dict[str, Any]) -> None:
    """The HParams plugin's experiment and session-start records (TensorBoard's `hparams` summaries, as Lightning
    writes them) with `METRICS` as the columns; their values are the scalars of those names in the run."""
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    experiment, start, _ = hparams_summaries(hparams, dict.fromkeys(METRICS, 0.0))
    _add_summaries(trainer, experiment, start)


def write_session_end(trainer: pl.Trainer) -> None:
    """The session's end record, status success (a fit stopped by an error or a signal has none: TensorBoard shows
    its status as unknown, and the fit that resumes it writes this one)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    content = plugin_data_pb2.HParamsPluginData(session_end_info=end, version=metadata.PLUGIN_DATA_VERSION)
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    value = Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=SummaryMetadata(plugin_data=plugin))
    _add_summaries(trainer, Summary(value=[value]))


def _add_summaries(trainer: pl.Trainer, *summaries: Any) -> None:
    for writer in tensorboards(trainer):
        file_writer = writer._get_file_writer()  # SummaryWriter's own, as Lightning's log_hyperparams uses it
        for summary in summaries:
            file_writer.add_summary(summary, trainer.global_step)


def recipe_text(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
    """The run in short (markdown): the model, what trains when at which rate, the optimizer and the data."""
    hp = run_hparams(trainer, pl_module)
    backbone = getattr(pl_module, "backbone", None)
    strategy = next((c for c in trainer.callbacks if isinstance(c, FinetuningStrategy)), None)  # type: ignore[attr-defined]
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1000
    plan = strategy.describe(backbone, epochs) if strategy is not None and backbone is not None else "no strategy"
    data = trainer.datamodule  # type: ignore[attr-defined]
    summary = data.describe() if isinstance(data, ImageClassificationDataModule) and data.datasets else ""
    lr, decay = hp.get("lr"), hp.get("weight_decay", 0.0)
    lines = [
        f"**Model**: {hp['backbone']} ({hp['weights']} weights), {hp['image_size']} px, {hp['head']} head",
        f"**What trains when**: {plan}",
        f"**Optimizer**: {hp['optimizer']}, lr {lr if lr is None else f'{lr:g}'}, weight decay {decay:g}; "
        f"scheduler {hp['scheduler']}; label smoothing {hp.get('label_smoothing', 0)}, "
        f"mixup {hp.get('mixup', 0)}, cutmix {hp.get('cutmix', 0)}",
        f"**Training**: up to {hp['max_epochs']} epochs, batch {hp.get('batch_size')}, augment {hp['augment']}, "
        f"seed {hp['seed']}",
        f"**Data**: {hp['data']}. " + summary.replace("\n", "  \n"),
    ]
    return "  \n".join(lines)
