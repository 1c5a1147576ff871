"""scikit-learn feature extractors over diffusion Transformers."""

from ._base import BaseDiffusionFeatureExtractor
from ._engine import FeatureLayout, TransformReport
from ._runtime import clear_backbone_cache, open_store
from .image import DiTFeatureExtractor

__all__ = [
    "BaseDiffusionFeatureExtractor", "DiTFeatureExtractor", "FeatureLayout", "TextDiffusionFeatureExtractor",
    "TransformReport", "clear_backbone_cache", "open_store",
]


def __getattr__(name):
    # The text extractor is imported on demand so that image-only users never import transformers.
    if name == "TextDiffusionFeatureExtractor":
        from .text import TextDiffusionFeatureExtractor

        return TextDiffusionFeatureExtractor
    raise AttributeError(name)
