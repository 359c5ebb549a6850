"""The test report's numbers, from probabilities and targets alone, by the same torchmetrics definitions as the
logged `test/` metrics (`module.classification_metrics`): one definition of each number."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.functional.classification import (
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from lightning_modules.module import classification_metrics


def classification_report(probs: torch.Tensor, targets: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 (over the classes that occur in the targets or the predictions), AUROC
    (one-vs-rest over the classes in the targets), per-class figures and the confusion matrix, as plain numbers."""
    n = len(class_names)
    summary = classification_metrics(n, "", auroc=True, sync=False)  # rank 0 alone, on every process's predictions
    summary.update(probs, targets)
    overall = {key: float(value) for key, value in summary.compute().items()}
    per_class = {
        "precision": multiclass_precision(probs, targets, n, average=None, zero_division=0),
        "recall": multiclass_recall(probs, targets, n, average=None, zero_division=0),
        "f1": multiclass_f1_score(probs, targets, n, average=None, zero_division=0),
    }
    support = torch.bincount(targets, minlength=n)
    return {
        **{key: overall[key] for key in ("acc", "precision", "recall", "f1", "auroc")},
        "samples": len(targets),
        "per_class": {
            name: {
                **{key: float(values[i]) for key, values in per_class.items()},
                "acc": float(per_class["recall"][i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": multiclass_confusion_matrix(probs, targets, n).tolist(),
    }
