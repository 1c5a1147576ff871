"""scikit-learn feature extractors over diffusion Transformers."""

from ._runtime import clear_backbone_cache
from .image import DiTFeatureExtractor

__all__ = ["DiTFeatureExtractor", "TextDiffusionFeatureExtractor", "clear_backbone_cache"]


def __getattr__(name):
    # The text extractor is imported on demand so that image-only users never import transformers.
    if name == "TextDiffusionFeatureExtractor":
        from .text import TextDiffusionFeatureExtractor

        return TextDiffusionFeatureExtractor
    raise AttributeError(name)
