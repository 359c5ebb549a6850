"""`ftlab`: LightningCLI with finetune-lab's links, checkpoint shortcuts and clear errors."""

from __future__ import annotations

import importlib
import inspect
import os
import runpy
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionYesNo, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from typing_extensions import override

from datamodules.base import ImageClassificationDataModule
from datamodules.common import ConfigError
from datamodules.folder import class_key
from lightning_modules.backbones.backbone import data_config_dict
from lightning_modules.cli.checkpoints import CKPT_SHORTCUTS, intact_instead, resolve_checkpoint
from lightning_modules.cli.lr_find import describe_lr_find, find_lr, show_lr_find
from lightning_modules.cli.parse_errors import OneLineErrorParser, check_config_files, check_numbers
from lightning_modules.cli.stops import StopNotice
from lightning_modules.console import CompactProgressBar, notice, setup_console
from lightning_modules.defaults import DEFAULTS, read_defaults
from lightning_modules.finetuning.strategies import FinetuningStrategy
from lightning_modules.module import FineTuneModule
from lightning_modules.reporting.callbacks import TrainingStopped
from lightning_modules.reporting.checkpoint_io import read_checkpoint
from lightning_modules.reporting.explain import check_method
from lightning_modules.reporting.predictions import PredictionWriter
from lightning_modules.reporting.report import TestReport
from lightning_modules.reporting.run_logs import with_run_csv
from lightning_modules.speed.feature_cache import FeatureCache

# the model hyperparameters that shape the weights: a checkpoint's own replace the config's (the rest, such as
# label_smoothing or compile, stay as configured)
ARCHITECTURE = ("backbone", "weights", "image_size", "in_chans", "head_hidden", "head_dropout")
# callbacks configured at the top level (`early_stopping.patience: 3`), not in trainer.callbacks: Lightning's
# `instantiate_trainer` adds them to the trainer's list itself
EXTRA_CALLBACKS = {"early_stopping": EarlyStopping, "feature_cache": FeatureCache}


def defaults_file() -> list[str]:
    """The shared defaults (`lightning_modules/defaults.yaml`), read before any --config."""
    read_defaults()  # a ConfigError when the installed package lacks it
    return [str(DEFAULTS)]


class RunConfigCallback(SaveConfigCallback):
    """Saves the resolved config into the run directory: `config.yaml` for fit, `config_<cmd>.yaml` otherwise."""

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Write the config once per run directory and subcommand (a resumed fit rewrites its own)."""
        if stage != "fit":
            self.config_filename = f"config_{getattr(stage, 'value', stage)}.yaml"
        super().setup(trainer, pl_module, stage)


class FinetuneCLI(LightningCLI):
    """LightningCLI for FineTuneModule and any ImageClassificationDataModule.

    Links: the DataModule's `num_classes` and `class_names` go to the model; the backbone's preprocessing
    (`resolve_data_config` of `model.backbone`, `weights`, `image_size`, `in_chans`) goes to `data.data_config`
    when the config leaves it out (it is recorded in the DataModule's hparams; config.yaml keeps it out).
    `--ckpt_path best|last` finds the checkpoint of the run the logger names (its newest version unless it names
    one: `cli.checkpoints`); testing or resuming from a checkpoint writes into that checkpoint's run directory
    instead of starting a new version.
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The extra options; link data -> model (classes) at instantiation."""
        for key, callback in EXTRA_CALLBACKS.items():  # `early_stopping.patience: 3`, `feature_cache: {store: disk}`
            parser.add_lightning_class_args(callback, key)
        parser.add_argument(
            "--lr_find",
            type=Literal["off", "print", "apply"],
            default="off",
            help="fit only: run Lightning's learning-rate finder first; print its suggestion, or apply it",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: then test the best checkpoint in the same process, writing what `ftlab test --ckpt_path "
            "best` writes into the run (one start-up instead of two)",
        )
        parser.add_argument(
            "--untrained",
            type=bool,
            default=False,
            help="predict only: allow predicting without --ckpt_path (configured weights, untrained head)",
        )
        parser.add_argument(
            "--explain", action=ActionYesNo, default=False, help="predict only: a class activation map per image"
        )
        parser.add_argument("--explain_method", type=str, default="gradcam", help="predict only: the CAM method")
        parser.add_argument(
            "--cam_images",
            type=int | None,
            default=None,
            help="the test report's CAM grid: this many confident mistakes and unsure right answers; 0: no grid",
        )
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        # The preprocessing goes model -> data in `before_instantiate_classes`, not by a parse-time link: jsonargparse
        # evaluates such a link while it reads the defaults, so `ftlab fit --help` would import timm to resolve the
        # default backbone's (docs/performance.md, "Start-up").

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then resolve `--ckpt_path best|last`, reuse its run directory, read the checkpoint safely, and
        build the model it was trained as (its ARCHITECTURE keys; every other hyperparameter stays as configured).
        For predict, the data class and the class names come from it too when the config does not give them:
        `ftlab predict --ckpt_path X --data.init_args.predict_root DIR` needs nothing else.

        Lightning then hands the path to its own (private) `_parse_ckpt_path`, which would `torch.load` the whole
        checkpoint again and re-apply every saved hyperparameter over the user's config, `lr` and
        `label_smoothing` included (upstream issues #20801 and #21455, PR #21116). So it is shown no path: the
        resolved one waits on `self` and `before_instantiate_classes` puts it back before anything is built."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if subcommand != "fit":  # the training callbacks' states in a checkpoint mean nothing to test or predict
            warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create")
        prepare_run_root(config.trainer)
        ckpt = config.get("ckpt_path")
        if not ckpt:
            if subcommand == "predict" and not config.get("untrained"):
                raise ConfigError(
                    "predict needs --ckpt_path (best, last or a .ckpt file): without one the head is untrained and "
                    "the predictions are noise. To predict with the untrained model anyway, add --untrained true"
                )
            return
        runs = run_root(config.trainer)
        ckpt_path = resolve_checkpoint(ckpt, runs) if ckpt in CKPT_SHORTCUTS else Path(ckpt)
        checkpoint = read_checkpoint(ckpt_path, intact_instead)
        run_dir = ckpt_path.parent.parent
        if (  # no run named, a checkpoint of a run folder: test, validate and predict write there
            subcommand != "fit"
            and runs is not None
            and runs[1] is not None
            and runs[1].get("name") == DEFAULT_RUN_NAME
            and run_dir.name.startswith("version_")
            and (run_dir / "hparams.yaml").is_file()
        ):
            runs[1].save_dir, runs[1].name = str(run_dir.parent.parent), run_dir.parent.name
            runs = (run_dir.parent, runs[1])
        if runs is not None and run_dir.parent == runs[0]:
            self._run_version = run_dir.name  # test, validate or resume into the checkpoint's run directory
            if runs[1] is not None:
                runs[1].version = run_dir.name
        saved = checkpoint.get("hyper_parameters") or {}
        self._trained_classes = (saved.get("num_classes"), saved.get("class_names"))
        self._trained_weights = checkpoint["state_dict"]  # memory-mapped: compared with the model once it is built
        model = {key: saved[key] for key in ARCHITECTURE if key in saved}
        unset = {k: p.default for k, p in inspect.signature(FineTuneModule.__init__).parameters.items()}
        changed = [
            f"model.{k} {config.model.get(k)!r} -> {v!r}"
            for k, v in model.items()
            if config.model.get(k) != v and config.model.get(k) != unset.get(k)  # only what the config or user set
        ]
        if changed:
            notice(f"the model is built as checkpoint {ckpt_path} was trained: {'; '.join(changed)}")
        updates: dict[str, Any] = {"model": model}
        if subcommand == "predict":
            updates["data"] = checkpoint_data(config.data, checkpoint.get("datamodule_hyper_parameters") or {})
            names = saved.get("class_names")
            init_args = updates["data"]["init_args"]
            if names and accepts(updates["data"]["class_path"], "class_names") and not init_args.get("class_names"):
                init_args["class_names"] = names  # a folder's classes: the checkpoint's, not its own folders'
        self.config = parser.parse_object({subcommand: updates}, self.config)
        self._ckpt_path = str(ckpt_path)
        self.config[subcommand].ckpt_path = None  # Lightning's `_parse_ckpt_path` runs next: show it no path

    @override
    def before_instantiate_classes(self) -> None:
        """Put back the checkpoint path `parse_arguments` held aside; one finetuning strategy at most; the
        model's preprocessing to the DataModule; skip pretrained downloads that a checkpoint overrides."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if getattr(self, "_ckpt_path", None):
            config.ckpt_path = self._ckpt_path  # what trainer.fit/test/predict and the saved config.yaml read
        check_one_strategy(config.trainer.get("callbacks") or [])
        check_numbers(config)
        data = config.data.init_args  # (holds the key when the class takes it: not a DataModule of its own signature)
        self._linked_preprocessing = "data_config" in data and not data.get("data_config")
        if self._linked_preprocessing:  # one given that differs from the model's is a ConfigError at setup
            model = config.model
            data.data_config = data_config_dict(model.backbone, model.weights, model.image_size, model.in_chans)
        if config.get("ckpt_path"):  # the checkpoint holds every weight: build the backbone empty, download nothing
            config.model.load_weights = False  # (the preprocessing still follows model.weights)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with a CSVLogger in the run directory beside whatever logger is configured, the compact
        progress bar unless the config names one, and the installed `StopNotice` (Lightning adds the
        `EXTRA_CALLBACKS` itself)."""
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        config = {**init["trainer"], **kwargs}
        logger = config.get("logger")
        if not config.get("fast_dev_run"):  # (a dry run logs nothing: Lightning swaps every logger for a dummy)
            logger = with_run_csv(logger, config.get("default_root_dir"), getattr(self, "_run_version", None))
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        configured = [*callbacks, *(init.get(key) for key in EXTRA_CALLBACKS)]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks.append(CompactProgressBar())
        if StopNotice.active is not None:  # `main` handles stop signals: the notice learns where the run is
            callbacks.append(StopNotice.active)
        cams = (self.config[self.subcommand] if self.subcommand else self.config).get("cam_images")
        for report in (c for c in callbacks if isinstance(c, TestReport) and cams is not None):
            report.cam_images = cams  # `--cam_images 0`: the report without its CAM grid
        return super().instantiate_trainer(**{**kwargs, "logger": logger, "callbacks": callbacks})

    @override
    def after_instantiate_classes(self) -> None:
        """Check the checkpoint against the data and the model built; undo the instantiation-only
        `load_weights: false` and linked `data_config` of `before_instantiate_classes` in the saved config (a later
        fit from it loads the weights and takes its model's preprocessing)."""
        super().after_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("ckpt_path"):
            check_checkpoint_classes(config.ckpt_path, *self._trained_classes, self.datamodule.class_names)
            check_checkpoint_fits(config.ckpt_path, self._trained_weights, self.model)
            config.model.load_weights = True
        if self._linked_preprocessing:  # config.yaml keeps following the model: a fit from it at 64 px takes 64 px
            config.data.init_args.data_config = None

    def before_fit(self) -> None:
        """`--lr_find print|apply`: run the learning-rate finder with the finetuning strategy in place, say what it
        ran and found, and show its figure (`lr_find.png` in the run, `lr_find` in TensorBoard)."""
        mode = self.config["fit"].get("lr_find", "off") if "fit" in self.config else "off"
        if mode == "off":
            return
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(
                callback, FinetuningStrategy
            ):  # the finder runs without callbacks: start frozen as they would
                callback.prepare(self.model, epoch=0)
        finder = find_lr(self.trainer, self.model, self.datamodule)
        suggestion = finder.suggestion() if finder is not None else None
        log_dir = self.trainer.log_dir  # a collective under DDP: every process asks
        if self.trainer.is_global_zero:
            if finder is not None and suggestion is not None:
                show_lr_find(finder, self.trainer, Path(log_dir) if log_dir else None)
            print(describe_lr_find(finder, suggestion, mode == "apply"))
        if mode == "apply" and suggestion is not None:
            self.model.lr = suggestion  # type: ignore[assignment]
            self.model.hparams["lr"] = suggestion

    def _print_run_dir(self) -> None:
        log_dir = self.trainer.log_dir  # a collective under DDP: every process asks
        if self.trainer.is_global_zero and log_dir:
            print(f"Run directory: {log_dir}")

    def after_fit(self) -> None:
        """Say where the run went: events, checkpoints, config; with `--test_after_fit`, test the best checkpoint
        (a fit that was stopped, or wrote no checkpoint, is not tested)."""
        best = str(getattr(self.trainer.checkpoint_callback, "best_model_path", ""))
        if self.trainer.is_global_zero and best:
            print(f"Best checkpoint: {best}")
        self._print_run_dir()
        if self.config["fit"].get("test_after_fit") and not self.trainer.interrupted:
            if not best and not self.trainer.fast_dev_run:  # type: ignore[attr-defined]
                notice("--test_after_fit: the fit wrote no best checkpoint; testing the weights it ended with")
            for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
                if isinstance(callback, RunConfigCallback):
                    callback.already_saved = False  # config_test.yaml, as `ftlab test` writes it
            # the path itself: "best" makes Lightning warn that the defaults hold two ModelCheckpoints (best, last)
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
            self._print_run_dir()

    def before_predict(self) -> None:
        """`--explain`: the prediction writer draws each image's class activation map (`--explain_method`)."""
        config = self.config["predict"]
        if config.get("explain"):
            method = check_method(config.get("explain_method") or "gradcam", "--explain_method")
            for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
                if isinstance(callback, PredictionWriter):
                    callback.explain = method

    after_validate = after_test = after_predict = _print_run_dir


def check_one_strategy(callbacks: list[Any]) -> None:
    """A ConfigError naming them when the callbacks hold two finetuning strategies (two stacked recipes)."""
    names = []
    for callback in callbacks:
        class_path = getattr(callback, "class_path", None)
        if class_path is None:
            continue
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name, None) if module else None
        if isinstance(cls, type) and issubclass(cls, FinetuningStrategy):
            names.append(name)
    if len(names) > 1:
        raise ConfigError(
            f"trainer.callbacks holds {len(names)} finetuning strategies ({', '.join(names)}): keep one. A recipe "
            f"that sets its own (e.g. experiments/data/image_folder.yaml) runs on its own, not stacked on another"
        )


RUN_LOGGERS = ("TensorBoardLogger", "CSVLogger")  # loggers whose folder is the run directory


DEFAULT_RUN_NAME = "default"  # the logger's name in defaults.yaml, when no experiment names its runs


def run_root(trainer_config: Namespace) -> tuple[Path, Namespace | None] | None:
    """Where the runs of this config live (`<save_dir>/<name>`, holding `version_*` folders), with the init args
    of the logger that names it; None when logging is off. For any other logger (MLflow, W&B ...) the runs are
    those of the CSVLogger `run_logs.with_run_csv` adds: `<default_root_dir>/lightning_logs`."""
    logger = trainer_config.get("logger")
    if logger is False:
        return None
    for entry in logger if isinstance(logger, list) else [logger]:
        if isinstance(entry, Namespace) and str(entry.get("class_path", "")).endswith(RUN_LOGGERS):
            args = entry.init_args
            return Path(args.save_dir) / (args.get("name") or "lightning_logs"), args
    return Path(trainer_config.get("default_root_dir") or ".") / "lightning_logs", None


def prepare_run_root(trainer_config: Namespace) -> None:
    """Anchor a relative logger `save_dir` at `trainer.default_root_dir` when that is given (Lightning would ignore
    it: the logger decides where runs go), and make sure the runs folder can be written, naming the key if not. It makes
    no folder: a command that fails before its run starts leaves none."""
    root_dir = trainer_config.get("default_root_dir")
    runs = run_root(trainer_config)
    if runs is None:
        return
    key = "trainer.default_root_dir"
    if runs[1] is not None:
        key = "trainer.logger.init_args.save_dir"
        if root_dir and not Path(runs[1].save_dir).is_absolute():
            runs[1].save_dir = str(Path(root_dir) / runs[1].save_dir)
            key = "trainer.default_root_dir"
            runs = run_root(trainer_config)
            assert runs is not None
    folder = runs[0]
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # nothing is made: a failed command leaves
    why = "" if existing.is_dir() else f"{existing} is not a folder"  # no empty run folder behind
    if not why and not os.access(existing, os.W_OK | os.X_OK):  # a read-only filesystem too (EROFS)
        why = f"{existing} is not writable"
    if why:
        raise ConfigError(f"{key}: cannot write runs to {folder} ({why}); choose a folder you can write")


def check_checkpoint_classes(
    ckpt_path: str, num_classes: int | None, class_names: list[str] | None, data_names: list[str]
) -> None:
    """A ConfigError when the checkpoint's head was trained on other classes than the data has (names compared
    as folders match them, case-insensitively; a checkpoint without names by their number)."""
    same = (
        [class_key(n) for n in class_names] == [class_key(n) for n in data_names]
        if class_names is not None
        else num_classes in (None, len(data_names))
    )
    if not same:
        trained = f"{len(class_names)} classes ({class_names})" if class_names is not None else f"{num_classes} classes"
        raise ConfigError(
            f"checkpoint {ckpt_path} was trained on {trained} but the data has {len(data_names)} ({data_names}); "
            "use the data it was trained on, or a "
            "checkpoint trained on this data (for predict: give only --data.init_args.predict_root)"
        )


def check_checkpoint_fits(ckpt_path: str, weights: dict[str, Any], model: Any) -> None:
    """A ConfigError when the checkpoint's weights do not fit the model (another backbone or head), before Lightning
    would fail with a wall of missing and unexpected keys."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in weights]
    unknown = [k for k in weights if k not in ours]
    reshaped = [k for k in ours if k in weights and tuple(weights[k].shape) != tuple(ours[k].shape)]
    if missing or unknown or reshaped:
        first = (missing or unknown or reshaped)[0]
        raise ConfigError(
            f"checkpoint {ckpt_path} does not fit model.backbone {model.hparams['backbone']}: {len(missing)} weights "
            f"missing, {len(unknown)} unknown, {len(reshaped)} of another shape (first: {first}); give the backbone "
            "and head it was trained with, or another checkpoint"
        )


def checkpoint_data(data: Namespace, saved: dict[str, Any]) -> dict[str, Any]:
    """`data` as a class path and init args: the config's, or, when it names no data class, the checkpoint's
    DataModule with any init arg the command line set on top."""
    given = data.get("init_args")
    given_args = given.as_dict() if isinstance(given, Namespace) else dict(given or {})
    class_path = data.get("class_path")
    if class_at(class_path) is not ImageClassificationDataModule or not saved.get("_class_path"):
        return {"class_path": class_path, "init_args": given_args}
    defaults = {k: p.default for k, p in inspect.signature(ImageClassificationDataModule.__init__).parameters.items()}
    init_args = {k: v for k, v in saved.items() if not k.startswith("_") and k != "data_config"}
    init_args.update({k: v for k, v in given_args.items() if k in defaults and v != defaults[k] and k != "data_config"})
    return {"class_path": saved["_class_path"], "init_args": init_args}


def class_at(class_path: str) -> Any:
    """The object a dotted class path names."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def accepts(class_path: str, argument: str) -> bool:
    """Whether the class at `class_path` takes `argument` in its constructor."""
    return argument in inspect.signature(class_at(class_path).__init__).parameters


def _with_defaults(run: bool) -> dict[str, Any]:
    """Parser kwargs that read `defaults_file()` first: per subcommand, or on the single parser when not running."""
    kwargs = {"default_config_files": defaults_file()}
    return {cmd: kwargs for cmd in ("fit", "validate", "test", "predict")} if run else kwargs


def cli_main(args: list[str] | None = None, run: bool = True) -> FinetuneCLI:
    """Build the CLI; `args` defaults to the command line."""
    setup_console()
    check_config_files(sys.argv[1:] if args is None else args)
    return FinetuneCLI(
        FineTuneModule,
        ImageClassificationDataModule,
        subclass_mode_data=True,
        parser_class=OneLineErrorParser,
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=_with_defaults(run),
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main() -> None:
    """Console entry point: user mistakes print one clear line, not a traceback; so do a stop signal and a write the
    disk refuses, which also name the checkpoint and the command that resumes (`cli.stops`)."""
    if sys.argv[1:2] == ["serve"]:  # not a Trainer command: `cli.serve` runs as `python -m` runs it, with its own
        del sys.argv[1]  # parser; LitServe's imports (0.25 s on top of Lightning's 4 s here) load for it alone
        runpy.run_module("lightning_modules.cli.serve", run_name="__main__", alter_sys=True)
    stops = StopNotice()
    with stops.installed():
        try:
            cli_main()
        except BaseException as err:
            ending = _ending(err, stops)
            if ending is None:
                raise
            if not stops.quiet:
                print(f"ftlab: {ending[0]}", file=sys.stderr)
            raise SystemExit(ending[1]) from None
    _destroy_process_group()


def _ending(err: BaseException, stops: StopNotice) -> tuple[str, int] | None:
    """The one line and the exit status for what ended the run: a stop signal (128 + its number), a NaN stop (1), a
    mistake (2), a write the disk refused (74); None for anything else."""
    interrupted = stops.interrupted(sys.argv[1:])
    if interrupted is not None:
        return interrupted
    if isinstance(err, TrainingStopped):
        return f"error: {err}", 1
    if not isinstance(err, Exception):  # SystemExit (--help, a parser's own exit)
        return None
    mistake = _config_error(err)
    return (f"error: {mistake}", 2) if mistake is not None else stops.refused(err, sys.argv[1:])


def _config_error(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind `err`, also when jsonargparse wrapped it (a class of `data:` failing to build); a
    Trainer setting this machine cannot run (Lightning's MisconfigurationException: `accelerator: gpu` without
    a GPU) reads as one too."""
    while err is not None and not isinstance(err, ConfigError | MisconfigurationException):
        err = err.__cause__ or err.__context__
    if isinstance(err, MisconfigurationException):
        return ConfigError(f"trainer: {' '.join(str(err).split())}")
    return err


def _destroy_process_group() -> None:
    """Leave DDP cleanly: a process group alive at interpreter exit can abort the process (gloo threads)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
