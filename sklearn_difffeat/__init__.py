"""sklearn_difffeat: pre-trained diffusion Transformers as scikit-learn feature extractors (Diff-Feat)."""

__version__ = "0.1.0"

# Imports are lazy so that `import sklearn_difffeat` stays cheap and a missing optional part does not break
# the rest (e.g. the metrics work without torch being imported).
_EXPORTS = {
    "DiTFeatureExtractor": "sklearn_difffeat.extractors",
    "TextDiffusionFeatureExtractor": "sklearn_difffeat.extractors",
    "FusionClassifier": "sklearn_difffeat.fusion",
    "BlockTimestepSearchCV": "sklearn_difffeat.search",
    "FeatureStore": "sklearn_difffeat.store",
    "extract": "sklearn_difffeat.extraction",
    "ExtractionResult": "sklearn_difffeat.extraction",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sklearn_difffeat' has no attribute {name!r}")
