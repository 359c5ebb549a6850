"""Speed: cached backbone features while the backbone is frozen, and the inference engines (torch, ONNX Runtime)."""

from lightning_modules.speed.feature_cache import FeatureCache

__all__ = ["FeatureCache"]
