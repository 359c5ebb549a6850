"""The test report's numbers, from probabilities and targets alone (numpy and sklearn; no model, no files)."""

from __future__ import annotations

from typing import Any

import numpy as np


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
