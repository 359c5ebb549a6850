"""What a run leaves behind: checkpoints written whole, metrics.csv beside any logger, the test report, predictions,
and the callbacks that watch a fit (progress, non-finite loss, resume, Optuna pruning). The public names are
exported by `lightning_modules`; these two stay here for configs written before the sub-packages."""

from lightning_modules.reporting.predictions import PredictionWriter
from lightning_modules.reporting.report import TestReport

__all__ = ["PredictionWriter", "TestReport"]
