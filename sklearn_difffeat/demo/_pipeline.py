"""The demo's pipeline: the two extractors in a ColumnTransformer, then FusionClassifier, and its search axes."""

from __future__ import annotations

IMAGE_MODEL = "embedded:fashion-dit"
TEXT_MODEL = "embedded:fashion-mdlm"
IMAGE_TIMESTEPS = (0, 50, 100, 200, 300, 500, 700, 900)
TEXT_TIMESTEPS = (0.0, 0.15, 0.3, 0.5, 0.7)
# The fusion head that scores search and heatmap candidates: narrower and shorter-trained than FusionClassifier's
# defaults, because the demo fits it some 330 times (candidates x folds) on 2 CPU cores. The held-out table's
# models use the defaults.
SEARCH_HEAD = {"projection_dim": 256, "max_epochs": 20}


def build_pipeline(cache, image=True, text=True, fusion_params=None, verbose=0):
    """ColumnTransformer of the extractors (either or both) -> FusionClassifier.

    The fusion head keeps the library's defaults (seeded) unless ``fusion_params`` overrides some of them.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    from .. import DiTFeatureExtractor, FusionClassifier, TextDiffusionFeatureExtractor

    branches = []
    if image:
        branches.append(
            (
                "image",
                DiTFeatureExtractor(
                    IMAGE_MODEL, block=6, timestep=100, cache=cache, cache_depth=-1, batch_size=128, verbose=verbose
                ),
                "image",
            )
        )
    if text:
        branches.append(
            (
                "text",
                TextDiffusionFeatureExtractor(
                    TEXT_MODEL, block=-1, timestep=0.0, cache=cache, cache_depth=-1, batch_size=128, verbose=verbose
                ),
                "text",
            )
        )
    features = ColumnTransformer(branches).set_output(transform="pandas")
    clf = FusionClassifier(**{"random_state": 0, **(fusion_params or {})})
    return Pipeline([("features", features), ("clf", clf)])


def search_axes(image_blocks=None, text_blocks=None, image_timesteps=IMAGE_TIMESTEPS, text_timesteps=TEXT_TIMESTEPS):
    """The pipeline's (block, timestep) parameter grid of each branch whose blocks are given."""
    axes = {}
    if image_blocks is not None:
        axes["features__image__block"] = list(image_blocks)
        axes["features__image__timestep"] = list(image_timesteps)
    if text_blocks is not None:
        axes["features__text__block"] = list(text_blocks)
        axes["features__text__timestep"] = list(text_timesteps)
    return axes


def branch_params(params, branch):
    """The pipeline parameters of one branch ("image" or "text") among ``params``."""
    return {k: v for k, v in params.items() if k.startswith(f"features__{branch}__")}


def head_params(pipeline):
    """The fusion head's plain-valued parameters, for the summary."""
    return {k: v for k, v in pipeline["clf"].get_params().items() if isinstance(v, (bool, int, float, str))}
