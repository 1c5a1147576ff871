"""The protocol's steps as plain functions: model depths, extraction into the store, the search, the heads.

Every step reads and writes features through the same feature store, with extractors whose parameters differ only
in block, timestep and cache depth, so the namespaces the search and the heads read are those extraction filled:
over a filled store no step runs a model.
"""

from __future__ import annotations

import numpy as np

from ..extraction import extract
from ..manifest import default_manifest_path
from ..metrics import map_scorer, multilabel_report
from ..search_priors import DiffFeatPriors
from ._settings import ReproduceSettings

MODEL_NAMES = ("image only", "text only", "fused")


def branch_extractor(settings: ReproduceSettings, modality: str, dtype: str, **params):
    """The extractor of one branch ("image" or "text"), on the store, with the protocol's fixed parameters.

    Extraction, the search and the heads all build their extractors here, so their store namespaces agree."""
    from ..extractors import DiTFeatureExtractor, TextDiffusionFeatureExtractor

    common = dict(cache=str(settings.store), dtype=dtype, device=settings.device, batch_size=settings.batch_size,
                  num_workers=settings.num_workers, verbose=0)
    if modality == "image":
        return DiTFeatureExtractor(settings.image_model, **common, **params)
    # A sample is an image's list of captions (or region phrases): its feature is the mean of theirs.
    return TextDiffusionFeatureExtractor(settings.text_model, text_pooling="mean", **common, **params)


def model_depths(settings: ReproduceSettings, dtype: str, with_text: bool) -> tuple[int, int | None]:
    """(image blocks, text blocks or None): the models' depths, read from the store's record of each model when
    it has one (no load), else from the loaded model (which extraction then reuses)."""
    image = branch_extractor(settings, "image", dtype, block=-1).fit().n_blocks_
    text = branch_extractor(settings, "text", dtype, block=-1).fit().n_blocks_ if with_text else None
    return int(image), None if text is None else int(text)


def modalities(axes: dict) -> list[str]:
    return [m for m in ("image", "text") if f"features__{m}__block" in axes]


def extract_features(settings: ReproduceSettings, splits, axes: dict, dtype: str, *, client=None) -> dict:
    """Extract every feature the search and the heads can read into the store.

    Per modality one extractor over all the grid's timesteps, with ``cache_depth`` at the axis's deepest block:
    one pass per (sample, timestep) stores every block the search may visit. Samples already stored are skipped
    (an interrupted extraction resumes); unreadable ones are listed, not raised.

    Returns {modality: {split name: {"computed", "already_stored", "failed" ({position: reason}), "manifest"}}}.
    """
    done = {}
    for modality in modalities(axes):
        deepest = max(axes[f"features__{modality}__block"])
        extractor = branch_extractor(settings, modality, dtype, block=deepest, cache_depth=deepest,
                                     timestep=list(axes[f"features__{modality}__timestep"]))
        column = "image" if modality == "image" else "text"
        done[modality] = {}
        for split in splits:
            name = f"reproduce-{settings.dataset}-{split.name}-{modality}"
            result = extract(extractor, split.frame[column].tolist(), settings.store, client=client,
                             progress=settings.verbose > 0, manifest=default_manifest_path(settings.store, name))
            done[modality][split.name] = {
                "computed": int(result.computed), "already_stored": int(result.already_stored),
                "failed": {str(p): reason for p, reason in sorted(result.failed.items())},
                "manifest": str(result.manifest),
            }
    return done


def build_pipeline(settings: ReproduceSettings, dtype: str, axes: dict, branches, head: dict):
    """``ColumnTransformer`` of the ``branches`` -> ``FusionClassifier(projection_dim=2048)`` with ``head`` over it.

    Each extractor keeps ``cache_depth`` at its axis's deepest block: should a feature be missing from the store,
    its pass stores every block the search may visit, as extraction does."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    from ..fusion import FusionClassifier

    transformers = []
    for modality in branches:
        blocks = axes[f"features__{modality}__block"]
        extractor = branch_extractor(settings, modality, dtype, block=blocks[-1], cache_depth=max(blocks),
                                     timestep=axes[f"features__{modality}__timestep"][0])
        transformers.append((modality, extractor, modality))
    features = ColumnTransformer(transformers).set_output(transform="pandas")
    clf = FusionClassifier(**{"projection_dim": 2048, "random_state": settings.seed, "device": settings.device,
                              **head})
    return Pipeline([("features", features), ("clf", clf)])


class _AxisNamePriors(DiffFeatPriors):
    """Diff-Feat's start (image block 12, middle image timestep, deepest text block, text timestep 0), read from
    the axis names alone.

    The axes hold only blocks the models have (their depths come from the store's record), so the depth check
    that ``DiffFeatPriors`` makes by fitting a cache-less copy of each extractor, which loads the weights, is not
    needed: the search over a filled store then loads no model. Nothing is shared: the extractors carry their
    cache depth themselves.
    """

    def start(self, estimator, axes):
        from sklearn.base import BaseEstimator

        return super().start(BaseEstimator(), axes)  # an estimator without extractors: no depth to read

    def shared_params(self, estimator, axes):
        return {}


def search_cells(settings: ReproduceSettings, train, axes: dict, dtype: str) -> dict:
    """``BlockTimestepSearchCV`` over ``axes`` from the Diff-Feat priors, scored by mAP on a seeded held-out
    ``val_fraction`` of the training split (one ``PredefinedSplit`` fold). Returns the chosen cell and the
    search's course."""
    from sklearn.model_selection import PredefinedSplit

    from ..search import BlockTimestepSearchCV
    from ._data import holdout_fold

    pipeline = build_pipeline(settings, dtype, axes, modalities(axes), settings.candidate_head)
    fold = holdout_fold(len(train.frame), settings.val_fraction, settings.seed)
    search = BlockTimestepSearchCV(pipeline, axes, cv=PredefinedSplit(fold), scoring=map_scorer,
                                   priors=_AxisNamePriors(), refit=False, verbose=min(settings.verbose, 1))
    search.fit(train.frame[modalities(axes)], train.target)
    return {
        "best_params": {k: _plain(v) for k, v in search.best_params_.items()},
        "val_map": float(search.best_score_),
        "start": {k: _plain(v) for k, v in search.start_params_.items()},
        "n_evaluations": int(search.n_evaluations_),
        "grid_size": int(search.grid_size_),
        "stopped": search.stopped_reason_,
        "n_train": int((fold == -1).sum()),
        "n_val": int((fold == 0).sum()),
    }


def fit_and_score(settings: ReproduceSettings, train, test, axes: dict, best_params: dict, dtype: str) -> dict:
    """Fit image only, text only and fused heads on the whole training split at the chosen cells (each
    single-modality head at its branch's cell of the fused choice), and score the test split.

    Returns {model name: {"params", "report" (``multilabel_report``: fractions)}}; without text, image only."""
    rows = {}
    for name in MODEL_NAMES if "text" in modalities(axes) else MODEL_NAMES[:1]:
        branches = ["image", "text"] if name == "fused" else [name.split()[0]]
        params = {k: v for k, v in best_params.items() if any(k.startswith(f"features__{b}__") for b in branches)}
        model = build_pipeline(settings, dtype, axes, branches, settings.head).set_params(**params)
        model.fit(train.frame[branches], train.target)
        scores = model.predict_proba(test.frame[branches])
        rows[name] = {"params": params, "report": {k: float(v) for k, v in
                                                   multilabel_report(test.target, scores).items()}}
    return rows


def _plain(value):
    """A parameter value as a JSON number (numpy scalars included)."""
    return value.item() if isinstance(value, np.generic) else value
