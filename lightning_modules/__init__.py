"""finetune-lab's models: the FineTuneModule, its finetuning strategies and the callbacks a run uses.

The names below are the public API (docs/python-api.md); `ftlab` (`lightning_modules.cli`) is built from them.
"""

from lightning_modules.backbones import Backbone, build_backbone
from lightning_modules.finetuning import FinetuningStrategy, Freeze, FreezeUnfreeze, Milestones, NoFreeze
from lightning_modules.module import FineTuneModule
from lightning_modules.reporting.callbacks import (
    BestCheckpoint,
    PruneTrial,
    ResumeNotice,
    StopOnNonFiniteLoss,
    TrainingStateLogger,
)
from lightning_modules.reporting.checkpoint_io import AtomicCheckpointIO
from lightning_modules.reporting.report import PredictionWriter, TestReport
from lightning_modules.speed import FeatureCache

__all__ = [
    "AtomicCheckpointIO",
    "Backbone",
    "BestCheckpoint",
    "FeatureCache",
    "FineTuneModule",
    "FinetuningStrategy",
    "Freeze",
    "FreezeUnfreeze",
    "Milestones",
    "NoFreeze",
    "PredictionWriter",
    "PruneTrial",
    "ResumeNotice",
    "StopOnNonFiniteLoss",
    "TestReport",
    "TrainingStateLogger",
    "build_backbone",
]
