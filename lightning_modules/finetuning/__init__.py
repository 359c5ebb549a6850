"""Finetuning strategies (which stages train when, at what rate), their schedulers and DDP seam, batch mixing."""

from lightning_modules.finetuning.strategies import FinetuningStrategy, Freeze, FreezeUnfreeze, Milestones, NoFreeze

__all__ = ["FinetuningStrategy", "Freeze", "FreezeUnfreeze", "Milestones", "NoFreeze"]
