"""FineTuneModule: a backbone plus a classification head, one shared step, metrics per stage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.utilities import dim_zero_cat
from typing_extensions import override

from datamodules.base import ImageClassificationDataModule
from datamodules.batches import Batch
from datamodules.common import ConfigError, DataConfig, check_range
from lightning_modules.backbones.backbone import build_backbone
from lightning_modules.finetuning.batch_augment import TTA_MODES, BatchMixer, averaged_log_probabilities, tta_views
from lightning_modules.finetuning.strategies import FinetuningStrategy
from lightning_modules.speed.engines import ONNX_DIR, BatchRunner, check_engine, chosen_engine, frozen_pass
from lightning_modules.speed.memory import keep_freed_memory

STAGES = ("train", "val", "test")


def build_head(in_features: int, num_classes: int, hidden: Sequence[int] = (), dropout: float = 0.0) -> nn.Sequential:
    """A linear head, or an MLP (Linear, ReLU, Dropout per hidden size) ending in a linear classifier."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = h
    if dropout and not hidden:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def world_size(module: LightningModule) -> int:
    """The number of processes of the module's Trainer; 1 without one (scripts/benchmark.py calls `configure_model`
    itself)."""
    try:
        return module.trainer.world_size
    except RuntimeError:  # "not attached to a `Trainer`"
        return 1


class PresentClassesAUROC(MulticlassAUROC):
    """Macro one-vs-rest AUROC over the classes that occur in the targets, as the test report computes it:
    torchmetrics' macro counts a class without samples (no ROC curve) as 0 and pulls the mean down."""

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, average="none", **kwargs)

    @override
    def compute(self) -> torch.Tensor:  # type: ignore[override]  # MulticlassAUROC's own is typed so too
        """The mean of the per-class AUROCs of the classes present; NaN with fewer than two."""
        present = torch.bincount(dim_zero_cat(self.target), minlength=self.num_classes) > 0
        if int(present.sum()) < 2:
            return torch.tensor(float("nan"))
        return super().compute()[present].mean()


def classification_metrics(num_classes: int, prefix: str, auroc: bool = False, sync: bool = True) -> MetricCollection:
    """Accuracy (micro) and macro precision, recall and F1 (and macro one-vs-rest AUROC), keyed `<prefix>acc`...;
    `sync=False`: computed from this process's updates alone (no collective: for numbers one process computes)."""
    kw: dict[str, Any] = {"num_classes": num_classes, "sync_on_compute": sync}
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(average="micro", **kw),
        "precision": MulticlassPrecision(average="macro", **kw),
        "recall": MulticlassRecall(average="macro", **kw),
        "f1": MulticlassF1Score(average="macro", **kw),
    }
    if auroc:
        metrics["auroc"] = PresentClassesAUROC(num_classes, sync_on_compute=sync)
    return MetricCollection(metrics, prefix=prefix)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """BatchNorm layers to SyncBatchNorm, keeping the activation that timm fuses into its BatchNormAct layers."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(module)


class FineTuneModule(LightningModule):
    """Image classifier for transfer learning: `backbone` features -> `head` logits.

    Args:
        backbone: `timm/<model>`, `torchvision/<model>` or `scratch/<mlp|simple_cnn>`.
        weights: `pretrained`, `none`, `embedded`, a torchvision weights name, or a state dict file.
        image_size: input resolution; default: the backbone's pretrained size.
        in_chans: input channels (3 for pretrained backbones; 1 for a grayscale scratch model).
        num_classes: linked from the DataModule.
        class_names: linked from the DataModule.
        head_hidden: hidden sizes of an MLP head; empty for a linear head.
        head_dropout: dropout before each head layer that follows a hidden layer (or before a linear head).
        label_smoothing: cross-entropy label smoothing.
        optimizer: optimizer factory; receives only the trainable parameters, as named groups. Default (null):
            AdamW with its own defaults (lr 1e-3, weight_decay 0.01). Null rather than AdamW so that a config
            naming another class (`class_path: torch.optim.Adam`) gets that class's defaults: jsonargparse keeps
            the init_args two classes share, and a default AdamW would hand Adam a coupled L2 of 0.01.
        lr_scheduler: optional scheduler factory.
        scheduler_monitor: metric that ReduceLROnPlateau watches.
        sync_batchnorm: under DDP, make BatchNorm layers use the statistics of the global batch (timm's fused
            BatchNormAct keeps its activation; Lightning's `trainer.sync_batchnorm` would drop it).
        lr: when set, the starting learning rate of the groups the optimizer is built with (what
            `ftlab fit --lr_find apply` sets); otherwise the optimizer's own `lr`.
        channels_last: NHWC memory format for the backbone and its inputs. On by default: measured with
            `scripts/benchmark.py` on this project's CPU, EfficientNet-Lite0 steps take 0.6 of the time, ResNets
            the same; on recent GPUs it is the layout mixed-precision convolutions want.
        compile: `torch.compile` the backbone (in place: checkpoints and stage names are unchanged); `true` or
            a mode such as `max-autotune`. The first steps pay the compilation.
        inference_engine: what runs the model in `ftlab test` and `ftlab predict`: `torch`, `onnxruntime` (CPU;
            exported once under `~/.cache/finetune-lab/onnx`, used only if it matches torch within 1e-4 on the
            first batch) or `auto` (the default: onnxruntime on CPU for the families it was measured faster on and
            a pass of at least 1,000 images, else torch); see `lightning_modules/speed/engines.py`.
        drop_path_rate: stochastic depth of a timm backbone (the rate of its last block; timm scales the others).
        mixup: MixUp's alpha on training image batches (soft targets; train metrics count the larger of the two
            classes as the label); 0: off. Cached features (the frozen epochs' cache) are never mixed.
        cutmix: CutMix's alpha, likewise; with both on, each batch gets one of the two.
        tta: test-time augmentation in `ftlab test` and `predict`: `none`, `flip` (the mirror image too) or
            `flip_crops` (and four corner crops); the views' class probabilities are averaged.
    """

    def __init__(
        self,
        backbone: str = "timm/efficientnet_lite0",
        weights: str = "pretrained",
        image_size: int | None = None,
        in_chans: int = 3,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        head_hidden: list[int] | None = None,
        head_dropout: float = 0.0,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_monitor: str = "val/loss",
        lr: float | None = None,
        sync_batchnorm: bool = False,
        channels_last: bool = True,
        compile: bool | str = False,
        inference_engine: str = "auto",
        drop_path_rate: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        tta: str = "none",
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        check_range("model.lr", lr, 0, low_open=True, null="the optimizer's own")
        for key, value in (("label_smoothing", label_smoothing), ("head_dropout", head_dropout)):
            check_range(f"model.{key}", value, 0, 1, high_open=True)
        for key, value in (("mixup", mixup), ("cutmix", cutmix)):
            check_range(f"model.{key}", value, 0)  # the Beta distribution's alpha; 0: off
        check_engine(inference_engine, "model.inference_engine")
        if tta not in TTA_MODES:
            raise ConfigError(f"model.tta {tta!r}: choose one of {list(TTA_MODES)}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "load_weights"])
        self._inference: BatchRunner | None = None  # the test or predict engine, built at the first batch
        self._engine: str | None = None  # its name (torch: the module itself runs)
        self.pass_images: int | None = 0  # images of a pass outside a trainer, for `auto` (None: no end, a server)
        self.backbone = build_backbone(backbone, weights, image_size, in_chans, drop_path_rate, load_weights)
        self._run_seed = 0  # the run's seed (torch's at the start of the fit): mixing draws from it and the step
        self.lr = lr
        self.optimizer_factory: Any = optimizer or torch.optim.AdamW
        self.scheduler_factory: Any = lr_scheduler
        self.class_names: list[str] = []
        if num_classes is not None:
            self._build_classes(num_classes, class_names)
        elif class_names is not None:
            self._build_classes(len(class_names), class_names)

    def _build_classes(self, num_classes: int, class_names: list[str] | None) -> None:
        """The head, the mixer and the metrics for `num_classes` classes (at init, or at setup from the data)."""
        if num_classes < 2:
            raise ConfigError(
                f"model.num_classes is {num_classes} (classes {class_names}): a classifier needs at least two; "
                "check the data's classes (data.init_args.class_names, or one folder per class)"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"model.class_names has {len(class_names)} names for {num_classes} classes")
        self.hparams["num_classes"], self.hparams["class_names"] = num_classes, class_names
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.mixer = BatchMixer(num_classes, self.hparams["mixup"], self.hparams["cutmix"])
        hidden, dropout = self.hparams["head_hidden"] or (), self.hparams["head_dropout"]
        self.head = build_head(self.backbone.num_features, num_classes, hidden, dropout)
        self.metrics = nn.ModuleDict(
            {f"{s}_metrics": classification_metrics(num_classes, f"{s}/", auroc=s != "train") for s in STAGES}
        )
        self.per_class = nn.ModuleDict({s: MulticlassAccuracy(num_classes, average=None) for s in ("val", "test")})

    @property
    def data_config(self) -> DataConfig:
        """The preprocessing the backbone expects (a DataModule built without one takes it at setup)."""
        return self.backbone.data_config

    @override
    def setup(self, stage: str) -> None:
        """Take the classes from the trainer's DataModule when the model was built without them; a ConfigError
        when they differ (count or names) from those it was built for."""
        data = getattr(self.trainer, "datamodule", None)  # Lightning sets it at fit/test/predict (untyped)
        data_names = list(data.class_names) if isinstance(data, ImageClassificationDataModule) else None
        if not self.class_names:
            if data_names is None:
                raise ConfigError(
                    "FineTuneModule(num_classes=...) is needed without a DataModule that names its classes"
                )
            self._build_classes(len(data_names), data_names)
            self.head.to(self.device)
            self.metrics.to(self.device)
            self.per_class.to(self.device)
            return
        if data_names is None or stage == "predict":
            return
        if len(data_names) != len(self.class_names):
            raise ConfigError(
                f"the model has {len(self.class_names)} classes ({_shown(self.class_names)}) and the data "
                f"{len(data_names)} ({_shown(data_names)}): build FineTuneModule without num_classes and "
                "class_names (it takes them from the data), or with the data's"
            )
        if self.hparams["class_names"] is None:
            self.hparams["class_names"], self.class_names = data_names, data_names
        elif self.class_names != data_names:
            raise ConfigError(
                f"the model's class names {_shown(self.class_names)} differ from the data's {_shown(data_names)} "
                "(same count, another order or spelling): a label would mean another class"
            )

    @override
    def configure_model(self) -> None:
        """SyncBatchNorm when asked and running on more than one process; channels-last and compilation; glibc told
        to keep freed memory for the next step (`speed.memory`)."""
        keep_freed_memory()
        if self.hparams["sync_batchnorm"] and world_size(self) > 1:
            self.backbone.body = sync_batchnorm(self.backbone.body)
        if self.hparams["channels_last"]:
            self.backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        mode = self.hparams["compile"]
        if mode and not getattr(self, "_compiled", False):
            self.backbone.body.compile(mode=None if mode is True else str(mode))
            self._compiled = True

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, num_classes) of images (batch, channels, height, width)."""
        if self.hparams["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(x))

    def logits(self, batch: Batch) -> torch.Tensor:
        """A batch's logits: through the whole network, or through the head alone when its inputs are cached
        backbone features (`batch.features`, the feature cache)."""
        return self.head(batch.inputs) if batch.features else self(batch.inputs)

    def inference_logits(self, batch: Batch) -> torch.Tensor:
        """`logits` for test and predict, by `inference_engine` (built at the first batch of the run); with `tta`,
        the log of the views' mean probabilities."""
        if batch.features:
            return self.logits(batch)
        run: Any = self
        if self._engine is None:  # the first batch of this test or predict run
            configured = self.hparams.get("inference_engine", "auto")
            name = str(self.hparams["backbone"])
            self._engine = chosen_engine(configured, name, self.device, "test and predict", self._pass_images())
            if self._engine != "torch":
                self._inference = frozen_pass(self, self.device, self._engine, batch.inputs, ONNX_DIR)
        if self._inference is not None:
            run = lambda x: self._inference(x).to(self.device)  # noqa: E731
        tta = self.hparams.get("tta", "none")
        if tta == "none":
            return run(batch.inputs)
        return averaged_log_probabilities(run, tta_views(batch.inputs, tta))

    @property
    def engine(self) -> str | None:
        """What runs test and predict (`torch`, `onnxruntime`), chosen at the first batch of the run; None before."""
        return self._engine

    def _pass_images(self) -> int | None:
        """The images of the test or predict pass under way (outside a trainer's: `pass_images`)."""
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a trainer
            return self.pass_images
        loaders = trainer.test_dataloaders if trainer.testing else trainer.predict_dataloaders
        listed = loaders if isinstance(loaders, list | tuple) else [loaders]
        return sum(len(loader.dataset) for loader in listed if loader is not None and hasattr(loader, "dataset"))

    @override
    def on_fit_start(self) -> None:
        """Note the run's seed for mixing (the same on resume: the CLI seeds before the fit); warn when no
        finetuning strategy says what a pretrained backbone does."""
        self._run_seed = torch.initial_seed()
        pretrained = self.hparams["weights"] != "none"
        if pretrained and not any(isinstance(c, FinetuningStrategy) for c in self.trainer.callbacks):  # type: ignore[attr-defined]
            trainable = sum(p.numel() for p in self.backbone.parameters() if p.requires_grad)
            rank_zero_warn(
                f"no finetuning strategy among the trainer's callbacks: all {trainable:,} parameters of the pretrained "
                "backbone train "
                "from the first step. Add one to say what the backbone does: Freeze(), FreezeUnfreeze(...), "
                "Milestones(...), or NoFreeze() to train it all (and silence this)"
            )

    @override
    def on_test_start(self) -> None:
        """A fresh engine for this run (the weights may have changed since the last)."""
        self._inference, self._engine = None, None

    @override
    def on_predict_start(self) -> None:
        """A fresh engine for this run."""
        self._inference, self._engine = None, None

    def _shared_step(
        self, batch: Batch, stage: str, mix_seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Loss and logits, with the stage's metrics updated and logged; None when no file of the batch could be
        read (they are reported as bad images). With `mix_seed` (training, mixup or cutmix on, images not cached
        features) the batch is mixed first: the loss reads the soft targets, the metrics their larger class."""
        if batch.size == 0:
            return None
        y = batch.targets
        target: torch.Tensor = y
        if mix_seed is not None and self.mixer.active and not batch.features:
            inputs, target = self.mixer(batch.inputs, y, mix_seed)
            logits = self(inputs)
            y = target.argmax(dim=1)
        else:
            logits = self.inference_logits(batch) if stage == "test" else self.logits(batch)
        loss = F.cross_entropy(logits, target, label_smoothing=self.hparams["label_smoothing"])
        metrics: MetricCollection = self.metrics[f"{stage}_metrics"]  # type: ignore[assignment]
        metrics.update(logits, y)
        if stage in self.per_class:
            self.per_class[stage].update(logits, y)  # type: ignore[operator]
        on_step = stage == "train"
        sync = stage != "train"  # epoch-level val/test loss is averaged over processes: schedulers agree under DDP
        self.log(
            f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=sync
        )
        for name, metric in metrics.items():  # the bar shows the loss and the accuracy; the loggers get all
            shown = name == f"{stage}/acc" and stage != "train"
            self.log(name, metric, on_step=False, on_epoch=True, prog_bar=shown, batch_size=len(y))
        return loss, logits

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """Cross-entropy on one batch; updates train metrics."""
        seed = hash((self._run_seed, self.current_epoch, batch_idx)) & 0x7FFF_FFFF_FFFF_FFFF
        step = self._shared_step(batch, "train", mix_seed=seed)
        if step is None:  # a zero loss that still touches every trainable parameter: DDP's all-reduce matches
            return sum((p.sum() for p in self.parameters() if p.requires_grad), torch.zeros(())) * 0.0
        return step[0]

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor] | None:
        """Updates val loss and metrics; returns the logits for the dashboard's val pictures."""
        step = self._shared_step(batch, "val")
        return None if step is None else {"loss": step[0], "logits": step[1].detach()}

    @override
    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor] | None:
        """Updates test loss and metrics; returns the logits for the test report."""
        step = self._shared_step(batch, "test")
        return None if step is None else {"loss": step[0], "logits": step[1].detach()}

    def _log_per_class(self, stage: str) -> None:
        metric: Any = self.per_class[stage]
        if metric.update_called:
            values = metric.compute()
            for name, value in zip(self.class_names, values, strict=True):
                self.log(f"{stage}/acc_{name}", value, sync_dist=True)  # already global: torchmetrics syncs
        metric.reset()

    @override
    def on_validation_epoch_end(self) -> None:
        """Per-class validation accuracy, `val/acc_<class>`."""
        self._log_per_class("val")

    @override
    def on_test_epoch_end(self) -> None:
        """Per-class test accuracy, `test/acc_<class>`."""
        self._log_per_class("test")

    @override
    def on_train_epoch_end(self) -> None:
        """The overfitting gap: this epoch's train accuracy minus its validation accuracy, `gap/train_val_acc`."""
        train_acc = self.metrics["train_metrics"]["acc"]  # type: ignore[index]
        val_acc = self.trainer.callback_metrics.get("val/acc")
        if train_acc.update_called and val_acc is not None:
            self.log("gap/train_val_acc", train_acc.compute() - val_acc, sync_dist=True)

    @override
    def predict_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """Class probabilities of shape (batch, num_classes); none when no file of the batch could be read (they
        become error rows)."""
        if batch.size == 0:
            return torch.empty(0, self.hparams["num_classes"], device=self.device)
        return self.inference_logits(batch).softmax(dim=1)

    def trainable_param_groups(self) -> list[dict[str, Any]]:
        """Named groups of the parameters that train now: `head`, then `backbone` if any of it is trainable."""
        groups = [
            {"name": "head", "params": [p for p in self.head.parameters() if p.requires_grad]},
            {"name": "backbone", "params": [p for p in self.backbone.parameters() if p.requires_grad]},
        ]
        return [g for g in groups if g["params"]]

    @override
    def configure_optimizers(self) -> Any:
        """The injected optimizer over trainable parameters only, and the scheduler if one is configured."""
        optimizer = self.optimizer_factory(self.trainable_param_groups())
        if self.lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = self.lr
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.hparams["scheduler_monitor"]
        return {"optimizer": optimizer, "lr_scheduler": config}

    @classmethod
    @override
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> FineTuneModule:
        """Lightning's loader, without fetching the backbone's weights: the checkpoint holds every weight, so the
        network is built empty (`load_weights=False`: no download, no file read; works offline)."""
        kwargs.setdefault("load_weights", False)
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, **kwargs)


def _shown(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")
