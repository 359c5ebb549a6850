"""Backbones: a network without its classifier, its stages and its preprocessing, built from `<source>/<model>`."""

from lightning_modules.backbones.backbone import Backbone, build_backbone, resolve_data_config
from lightning_modules.backbones.embedded import EMBEDDED
from lightning_modules.backbones.stages import CamLayer, Stage

__all__ = ["EMBEDDED", "Backbone", "CamLayer", "Stage", "build_backbone", "resolve_data_config"]
