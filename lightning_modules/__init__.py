"""finetune-lab's models: the FineTuneModule, its finetuning strategies and the callbacks a run uses.

The names below are the public API (docs/python-api.md): the module, the finetuning strategies, the callbacks a
run uses, `trainer_defaults` (a plain `lightning.Trainer` with `ftlab`'s defaults) and the `Predictor`.
"""

from lightning_modules.backbones import Backbone, build_backbone
from lightning_modules.defaults import default_callbacks, default_loggers, trainer_defaults
from lightning_modules.finetuning import FinetuningStrategy, Freeze, FreezeUnfreeze, Milestones, NoFreeze
from lightning_modules.module import FineTuneModule
from lightning_modules.predictor import Explanation, Prediction, Predictor
from lightning_modules.reporting.callbacks import (
    BestCheckpoint,
    PruneTrial,
    ResumeNotice,
    StopOnNonFiniteLoss,
    TrainingStateLogger,
)
from lightning_modules.reporting.checkpoint_io import AtomicCheckpointIO
from lightning_modules.reporting.dashboard import Dashboard
from lightning_modules.reporting.predictions import PredictionWriter
from lightning_modules.reporting.report import TestReport
from lightning_modules.speed import FeatureCache

__all__ = [
    "AtomicCheckpointIO",
    "Backbone",
    "BestCheckpoint",
    "Dashboard",
    "Explanation",
    "FeatureCache",
    "FineTuneModule",
    "FinetuningStrategy",
    "Freeze",
    "FreezeUnfreeze",
    "Milestones",
    "NoFreeze",
    "Prediction",
    "PredictionWriter",
    "Predictor",
    "PruneTrial",
    "ResumeNotice",
    "StopOnNonFiniteLoss",
    "TestReport",
    "TrainingStateLogger",
    "build_backbone",
    "default_callbacks",
    "default_loggers",
    "trainer_defaults",
]
