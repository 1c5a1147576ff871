"""Running the demo: its settings, the thread limits around it, and its steps in order."""

from __future__ import annotations

import contextlib
import json
import numbers
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import joblib
import numpy as np

from ._figures import HEATMAP_FILE, TSNE_FILE, heatmap, tsne
from ._pipeline import (
    IMAGE_MODEL,
    IMAGE_TIMESTEPS,
    SEARCH_HEAD,
    TEXT_MODEL,
    TEXT_TIMESTEPS,
    branch_params,
    build_pipeline,
    head_params,
    search_axes,
)
from ._probes import probe_scores
from ._report import print_table


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs on and how. The defaults are the documented demo (``python -m sklearn_difffeat demo``).

    Attributes
    ----------
    n_train, n_test : int, default=1000, 500
        Mosaics in the training and held-out splits.
    output : str or Path, default="demo_output"
        Folder for the fitted pipeline, the two figures, the summary and (unless ``cache`` is given) the
        feature cache.
    cv : int, default=3
        Folds of the search's and the heatmap grid's cross-validation.
    verbose : int, default=1
        0: only the results (the table, the files written). 1: also what the demo is doing and one progress
        bar for the search. 2: also the extractors' progress bars, the search's line per step and
        scikit-learn's messages.
    image_timesteps, text_timesteps : tuple, default=IMAGE_TIMESTEPS, TEXT_TIMESTEPS
        The timestep axes of the search (and of the heatmap); the block axes are every block of each model.
    max_evaluations : int or None, default=None
        Passed to BlockTimestepSearchCV; None lets the search run to its local optimum.
    search_fusion_params : dict or None, default=SEARCH_HEAD
        FusionClassifier parameters, over the library's defaults, of the head that scores the search's and the
        heatmap's candidates.
    fusion_params : dict or None, default=None
        FusionClassifier parameters, over the library's defaults, of the held-out table's models (None: the
        defaults).
    cache : str, Path or None, default=None
        Feature cache folder; None is ``output/cache``.
    n_threads : int or None, default=1
        CPU threads of torch and of the numerical libraries while the demo runs (restored afterwards); None
        leaves them as they are.
    """

    n_train: int = 1000
    n_test: int = 500
    output: str | Path = "demo_output"
    cv: int = 3
    verbose: int = 1
    image_timesteps: tuple = IMAGE_TIMESTEPS
    text_timesteps: tuple = TEXT_TIMESTEPS
    max_evaluations: int | None = None
    search_fusion_params: dict | None = field(default_factory=lambda: dict(SEARCH_HEAD))
    fusion_params: dict | None = None
    cache: str | Path | None = None
    n_threads: int | None = 1

    def __post_init__(self):
        for name, minimum in (("n_train", 1), ("n_test", 1), ("cv", 2), ("verbose", 0), ("n_threads", 1)):
            value = getattr(self, name)
            if name == "n_threads" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise ValueError(f"DemoSettings.{name} must be an int >= {minimum}, got {value!r}.")
        for name in ("image_timesteps", "text_timesteps"):
            if len(getattr(self, name)) == 0:
                raise ValueError(f"DemoSettings.{name} must hold at least one timestep.")


def run_demo(settings=None, **overrides):
    """Run the demo; return its summary dict (also written to ``settings.output/summary.json``).

    Parameters
    ----------
    settings : DemoSettings or None, default=None
        What to run; None is ``DemoSettings()``, the documented demo.
    **overrides
        Fields of :class:`DemoSettings` to change, e.g. ``run_demo(n_train=200, n_test=100)``.
    """
    import torch
    from threadpoolctl import threadpool_limits

    if settings is None:
        settings = DemoSettings()
    if not isinstance(settings, DemoSettings):
        raise TypeError(
            f"run_demo takes a DemoSettings (or keyword overrides of its fields), got {type(settings).__name__}."
        )
    unknown = sorted(set(overrides) - {f.name for f in fields(DemoSettings)})
    if unknown:
        raise TypeError(f"Unknown demo settings {unknown}; the settings are {[f.name for f in fields(DemoSettings)]}.")
    settings = replace(settings, **overrides)
    n_threads = settings.n_threads
    # One thread by default: the demo's work is some 400 small fits and batches, which gain little from threads,
    # while on cores shared with other processes each OpenMP thread waits for the others at every operation.
    # Measured on a 2-core machine with other work running: one 256-wide head fit took 0.2 s with 1 thread and
    # 5 s with 2; the whole demo took 213 s with 1 thread, while with 2 its search had done 22 of its 36
    # candidates after 8 minutes.
    previous = torch.get_num_threads()
    limits = threadpool_limits(n_threads) if n_threads is not None else contextlib.nullcontext()
    try:
        if n_threads is not None:
            torch.set_num_threads(n_threads)
        with warnings.catch_warnings(), limits:
            return _DemoRun(settings).run()
    finally:
        torch.set_num_threads(previous)


def truncated_captions(backbone, texts):
    """How many texts the text model will truncate (more tokens than its positions)."""
    if backbone.max_length is None:
        return 0
    # verbose=False: only the lengths are wanted here; otherwise transformers logs its own "sequence length is
    # longer than the specified maximum" warning for the first long text, ahead of the demo's own notice.
    ids = backbone.tokenizer(list(texts), verbose=False)["input_ids"]
    return sum(len(i) > backbone.max_length for i in ids)


def _silent(*args, **kwargs):
    pass


class _DemoRun:
    """One run of the demo: where it writes, how much it says, and its steps in order.

    The steps leave what later steps read: ``image_blocks`` and ``text_blocks`` (``load_data``), ``grid_size``
    (``search``) and ``model_path`` (``held_out``).
    """

    def __init__(self, settings):
        from sklearn.model_selection import KFold

        self.settings = settings
        self.output = Path(settings.output)
        self.cache = str(settings.cache if settings.cache is not None else self.output / "cache")
        self.image_timesteps, self.text_timesteps = list(settings.image_timesteps), list(settings.text_timesteps)
        self.say = print if settings.verbose >= 1 else _silent  # what the demo is doing; results always print
        self.extractor_verbose = 1 if settings.verbose >= 2 else 0  # their bars, one per fold and candidate
        self.folds = KFold(settings.cv, shuffle=True, random_state=0)

    def pipeline(self, fusion_params, image=True, text=True):
        """The demo's pipeline on this run's cache, with the given head."""
        return build_pipeline(self.cache, image=image, text=text, fusion_params=fusion_params,
                              verbose=self.extractor_verbose)

    def run(self):
        """Every step; writes the pipeline, the figures and ``summary.json``, prints the table."""
        s = self.settings
        start_time = time.perf_counter()
        self.output.mkdir(parents=True, exist_ok=True)
        train, test = self.load_data()
        search = self.search(train)
        best = search.best_params_
        fused, rows, identical = self.held_out(best, train, test)
        heat = self.image_grid(train)
        best_cell = np.unravel_index(np.nanargmax(heat), heat.shape)
        heatmap_path = heatmap(heat, self.image_blocks, self.image_timesteps, search, self.output / HEATMAP_FILE)

        self.say("t-SNE of the held-out features ...")
        tsne_path, colouring = tsne(fused, test, best, self.output / TSNE_FILE)

        self.say("linear probes of the features at the chosen (block, timestep) ...")
        probes = probe_scores(fused, train, test, best)

        summary = {
            "n_train": s.n_train,
            "n_test": s.n_test,
            "chosen": {k.replace("features__", ""): v for k, v in best.items()},
            "cv_map": search.best_score_,
            "evaluations": search.n_evaluations_,
            "grid_size": self.grid_size,
            "stopped": search.stopped_reason_,
            "image_grid_best": {
                "block": int(self.image_blocks[best_cell[0]]),
                "timestep": self.image_timesteps[best_cell[1]],
                "cv_map": float(heat[best_cell]),
            },
            "search_head": head_params(search.estimator),
            "held_out_head": head_params(fused),
            "held_out_head_is_default": not s.fusion_params,
            "held_out": rows,
            "reload_identical": identical,
            "figures": {"heatmap": str(heatmap_path), "tsne": str(tsne_path)},
            "tsne_colouring": colouring,
            "probes": probes,
            "seconds": time.perf_counter() - start_time,
        }
        (self.output / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        print_table(summary, self.model_path)
        if not identical:
            raise RuntimeError("The reloaded pipeline's predictions differ from the fitted one's.")
        return summary

    def load_data(self):
        """The two splits, and the two models' block axes (with a notice of the captions they truncate)."""
        from .. import DiTFeatureExtractor, TextDiffusionFeatureExtractor
        from ..datasets import load_fashion_mosaics

        s = self.settings
        train = load_fashion_mosaics(s.n_train, split="train", random_state=0)
        test = load_fashion_mosaics(s.n_test, split="test", random_state=0)
        self.say(
            f"data: {s.n_train} train / {s.n_test} test mosaics of real Fashion-MNIST items, "
            f"{len(train.label_names)} labels"
        )
        # Loaded through the extractors' process-wide registry, so the pipelines below reuse these weights.
        self.image_blocks = list(range(1, DiTFeatureExtractor(IMAGE_MODEL).get_backbone().num_blocks + 1))
        text_backbone = TextDiffusionFeatureExtractor(TEXT_MODEL).get_backbone()
        self.text_blocks = list(range(1, text_backbone.num_blocks + 1))
        captions = list(train.data["text"]) + list(test.data["text"])
        too_long = truncated_captions(text_backbone, captions)
        if too_long:
            self.say(
                f"{too_long} of {len(captions)} captions exceed the text model's {text_backbone.max_length} tokens "
                "and are truncated"
            )
        # Said once above: the extractor warns on every transform, i.e. for every candidate and fold.
        warnings.filterwarnings("ignore", message=r".*texts are longer than max_length")
        return train, test

    def search(self, train):
        """BlockTimestepSearchCV over both branches' (block, timestep) axes, scored by CV mAP."""
        from .. import BlockTimestepSearchCV
        from ..metrics import map_scorer

        s = self.settings
        axes = search_axes(self.image_blocks, self.text_blocks, self.image_timesteps, self.text_timesteps)
        self.grid_size = int(np.prod([len(v) for v in axes.values()]))
        self.say(
            f"local search over {' x '.join(str(len(v)) for v in axes.values())} = {self.grid_size} (block, "
            f"timestep) combinations, {s.cv}-fold CV mAP ..."
        )
        search = BlockTimestepSearchCV(
            self.pipeline(s.search_fusion_params),
            axes,
            cv=self.folds,
            scoring=map_scorer,
            random_state=0,
            max_evaluations=s.max_evaluations,
            refit=False,  # the table's fused model is trained below, with the table's head
            verbose=s.verbose,  # 1: the one bar; 2: a line per step and scikit-learn's messages
        )
        search.fit(train.data, train.Y)
        self.say(
            f"  {search.n_evaluations_} evaluations ({search.stopped_reason_}); best CV mAP "
            f"{100 * search.best_score_:.1f}"
        )
        return search

    def held_out(self, best, train, test):
        """Image only, text only and fused at the chosen (block, timestep) of each branch, scored on the held-out
        split; the fused pipeline saved and reloaded. Returns the fused pipeline, the table's rows, and whether
        the reloaded pipeline predicts identically."""
        from ..metrics import multilabel_report

        self.say("held-out split: image only, text only and fused, trained on the whole training split ...")
        head = self.settings.fusion_params
        models = {
            "image only": self.pipeline(head, text=False),
            "text only": self.pipeline(head, image=False),
            "fused": self.pipeline(head),
        }
        rows, probas = {}, {}
        for name, model in models.items():
            model.set_params(**(best if name == "fused" else branch_params(best, name.split()[0])))
            model.fit(train.data, train.Y)
            probas[name] = model.predict_proba(test.data)
            rows[name] = multilabel_report(test.Y, probas[name])
        fused = models["fused"]
        # Persistence: the fitted fused pipeline, reloaded, predicts identically.
        self.model_path = self.output / "diff_feat_pipeline.joblib"
        joblib.dump(fused, self.model_path)
        identical = bool(np.array_equal(joblib.load(self.model_path).predict_proba(test.data), probas["fused"]))
        return fused, rows, identical

    def image_grid(self, train):
        """CV mAP of the image branch alone over its whole (block, timestep) grid (blocks x timesteps), for the
        heatmap: cheap, the features come from the cache."""
        from sklearn.model_selection import GridSearchCV

        from ..metrics import map_scorer

        self.say("image branch: full (block, timestep) grid for the heatmap ...")
        grid = GridSearchCV(
            self.pipeline(self.settings.search_fusion_params, text=False),
            search_axes(self.image_blocks, image_timesteps=self.image_timesteps),
            cv=self.folds,
            scoring=map_scorer,
            refit=False,
            verbose=1 if self.settings.verbose >= 2 else 0,
        )
        grid.fit(train.data, train.Y)
        heat = np.full((len(self.image_blocks), len(self.image_timesteps)), np.nan)
        for params, score in zip(grid.cv_results_["params"], grid.cv_results_["mean_test_score"]):
            heat[
                self.image_blocks.index(params["features__image__block"]),
                self.image_timesteps.index(params["features__image__timestep"]),
            ] = score
        return heat
