"""Diff-Feat's fusion head: :class:`FusionClassifier`, its torch module, and the input handling beside it.

Layout: ``_classifier`` holds the estimator, ``_module`` the torch module, ``_modalities`` the resolution of the
``modalities`` parameter into column groups and the predict-time column checks, ``_targets`` the encoding of y,
``_callbacks`` the training guard.
"""

from ._classifier import FusionClassifier
from ._module import FusionModule

__all__ = ["FusionClassifier", "FusionModule"]
