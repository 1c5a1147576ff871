"""The end-to-end Diff-Feat demo on embedded data and models: offline, on CPU, in a few minutes.

``python -m sklearn_difffeat demo`` loads the Fashion-MNIST mosaics, builds the pipeline
(ColumnTransformer of the two extractors -> FusionClassifier), runs BlockTimestepSearchCV over the image and
text (block, timestep) axes, scores image-only, text-only and fused models on the held-out split, saves and
reloads the fitted pipeline, and draws two figures: a heatmap of the image branch's score over (block,
timestep), and a t-SNE of the held-out image, text and fused features.
"""

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

IMAGE_MODEL = "embedded:fashion-dit"
TEXT_MODEL = "embedded:fashion-mdlm"
IMAGE_TIMESTEPS = (0, 50, 100, 200, 300, 500, 700, 900)
TEXT_TIMESTEPS = (0.0, 0.15, 0.3, 0.5, 0.7)
HEATMAP_FILE = "image_block_timestep_map.png"
TSNE_FILE = "tsne_image_text_fused.png"
# The fusion head that scores search and heatmap candidates: narrower and shorter-trained than FusionClassifier's
# defaults, because the demo fits it some 330 times (candidates x folds) on 2 CPU cores. The held-out table's
# models use the defaults.
SEARCH_HEAD = {"projection_dim": 256, "max_epochs": 20}
# Inverse regularisation of the linear probes (the model cards' probe): stronger for the wide image inputs.
PROBE_C = {"image": 0.1, "text": 1.0}


def build_pipeline(cache, image=True, text=True, fusion_params=None, verbose=0):
    """ColumnTransformer of the extractors (either or both) -> FusionClassifier.

    The fusion head keeps the library's defaults (seeded) unless ``fusion_params`` overrides some of them.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    from . import DiTFeatureExtractor, FusionClassifier, TextDiffusionFeatureExtractor

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


def _axes(image_blocks=None, text_blocks=None, image_timesteps=IMAGE_TIMESTEPS, text_timesteps=TEXT_TIMESTEPS):
    axes = {}
    if image_blocks is not None:
        axes["features__image__block"] = list(image_blocks)
        axes["features__image__timestep"] = list(image_timesteps)
    if text_blocks is not None:
        axes["features__text__block"] = list(text_blocks)
        axes["features__text__timestep"] = list(text_timesteps)
    return axes


def _branch_params(params, branch):
    return {k: v for k, v in params.items() if k.startswith(f"features__{branch}__")}


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
            return _run_demo(settings)
    finally:
        torch.set_num_threads(previous)


def _truncated_captions(backbone, texts):
    """How many texts the text model will truncate (more tokens than its positions)."""
    if backbone.max_length is None:
        return 0
    # verbose=False: only the lengths are wanted here; otherwise transformers logs its own "sequence length is
    # longer than the specified maximum" warning for the first long text, ahead of the demo's own notice.
    ids = backbone.tokenizer(list(texts), verbose=False)["input_ids"]
    return sum(len(i) > backbone.max_length for i in ids)


def _run_demo(settings):
    from sklearn.model_selection import GridSearchCV, KFold

    from . import BlockTimestepSearchCV, DiTFeatureExtractor, TextDiffusionFeatureExtractor
    from .datasets import load_fashion_mosaics
    from .metrics import map_scorer, multilabel_report

    n_train, n_test, cv, verbose = settings.n_train, settings.n_test, settings.cv, settings.verbose
    image_timesteps, text_timesteps = list(settings.image_timesteps), list(settings.text_timesteps)
    search_fusion_params, fusion_params = settings.search_fusion_params, settings.fusion_params
    output = Path(settings.output)
    cache = str(settings.cache if settings.cache is not None else output / "cache")
    start_time = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    say = print if verbose >= 1 else (lambda *a, **k: None)  # what the demo is doing; results always print
    extractor_verbose = 1 if verbose >= 2 else 0  # their bars, one per fold and candidate, only on request

    train = load_fashion_mosaics(n_train, split="train", random_state=0)
    test = load_fashion_mosaics(n_test, split="test", random_state=0)
    say(f"data: {n_train} train / {n_test} test mosaics of real Fashion-MNIST items, {len(train.label_names)} labels")
    # Loaded through the extractors' process-wide registry, so the pipelines below reuse these weights.
    image_blocks = list(range(1, DiTFeatureExtractor(IMAGE_MODEL).get_backbone().num_blocks + 1))
    text_backbone = TextDiffusionFeatureExtractor(TEXT_MODEL).get_backbone()
    text_blocks = list(range(1, text_backbone.num_blocks + 1))
    captions = list(train.data["text"]) + list(test.data["text"])
    too_long = _truncated_captions(text_backbone, captions)
    if too_long:
        say(
            f"{too_long} of {len(captions)} captions exceed the text model's {text_backbone.max_length} tokens "
            "and are truncated"
        )
    # Said once above: the extractor warns on every transform, i.e. for every candidate and fold.
    warnings.filterwarnings("ignore", message=r".*texts are longer than max_length")

    folds = KFold(cv, shuffle=True, random_state=0)
    axes = _axes(image_blocks, text_blocks, image_timesteps, text_timesteps)
    grid_size = int(np.prod([len(v) for v in axes.values()]))
    say(
        f"local search over {' x '.join(str(len(v)) for v in axes.values())} = {grid_size} (block, timestep) "
        f"combinations, {cv}-fold CV mAP ..."
    )
    search = BlockTimestepSearchCV(
        build_pipeline(cache, fusion_params=search_fusion_params, verbose=extractor_verbose),
        axes,
        cv=folds,
        scoring=map_scorer,
        random_state=0,
        max_evaluations=settings.max_evaluations,
        refit=False,  # the table's fused model is trained below, with the table's head
        verbose=verbose,  # 1: the one bar; 2: a line per step and scikit-learn's messages
    )
    search.fit(train.data, train.Y)
    best = search.best_params_
    say(f"  {search.n_evaluations_} evaluations ({search.stopped_reason_}); best CV mAP {100 * search.best_score_:.1f}")

    # Held-out comparison at the chosen (block, timestep) of each branch.
    say("held-out split: image only, text only and fused, trained on the whole training split ...")
    rows, probas = {}, {}
    models = {
        "image only": build_pipeline(cache, text=False, fusion_params=fusion_params, verbose=extractor_verbose),
        "text only": build_pipeline(cache, image=False, fusion_params=fusion_params, verbose=extractor_verbose),
        "fused": build_pipeline(cache, fusion_params=fusion_params, verbose=extractor_verbose),
    }
    for name, model in models.items():
        model.set_params(**(best if name == "fused" else _branch_params(best, name.split()[0])))
        model.fit(train.data, train.Y)
        probas[name] = model.predict_proba(test.data)
        rows[name] = multilabel_report(test.Y, probas[name])
    fused = models["fused"]

    # Persistence: the fitted fused pipeline, reloaded, predicts identically.
    model_path = output / "diff_feat_pipeline.joblib"
    joblib.dump(fused, model_path)
    identical = bool(np.array_equal(joblib.load(model_path).predict_proba(test.data), probas["fused"]))

    # The image branch's whole (block, timestep) grid, for the heatmap: cheap, features come from the cache.
    say("image branch: full (block, timestep) grid for the heatmap ...")
    grid = GridSearchCV(
        build_pipeline(cache, text=False, fusion_params=search_fusion_params, verbose=extractor_verbose),
        _axes(image_blocks, image_timesteps=image_timesteps),
        cv=folds,
        scoring=map_scorer,
        refit=False,
        verbose=1 if verbose >= 2 else 0,
    )
    grid.fit(train.data, train.Y)
    heat = np.full((len(image_blocks), len(image_timesteps)), np.nan)
    for params, score in zip(grid.cv_results_["params"], grid.cv_results_["mean_test_score"]):
        heat[
            image_blocks.index(params["features__image__block"]),
            image_timesteps.index(params["features__image__timestep"]),
        ] = score
    best_cell = np.unravel_index(np.nanargmax(heat), heat.shape)
    heatmap = _heatmap(heat, image_blocks, image_timesteps, search, output / HEATMAP_FILE)

    say("t-SNE of the held-out features ...")
    tsne, colouring = _tsne(fused, test, best, output / TSNE_FILE)

    say("linear probes of the features at the chosen (block, timestep) ...")
    probes = _probes(fused, train, test, best)

    elapsed = time.perf_counter() - start_time
    summary = {
        "n_train": n_train,
        "n_test": n_test,
        "chosen": {k.replace("features__", ""): v for k, v in best.items()},
        "cv_map": search.best_score_,
        "evaluations": search.n_evaluations_,
        "grid_size": grid_size,
        "stopped": search.stopped_reason_,
        "image_grid_best": {
            "block": int(image_blocks[best_cell[0]]),
            "timestep": image_timesteps[best_cell[1]],
            "cv_map": float(heat[best_cell]),
        },
        "search_head": _head(search.estimator),
        "held_out_head": _head(fused),
        "held_out_head_is_default": not fusion_params,
        "held_out": rows,
        "reload_identical": identical,
        "figures": {"heatmap": str(heatmap), "tsne": str(tsne)},
        "tsne_colouring": colouring,
        "probes": probes,
        "seconds": elapsed,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    _print_table(summary, model_path)
    if not identical:
        raise RuntimeError("The reloaded pipeline's predictions differ from the fitted one's.")
    return summary


def linear_probe(F_train, Y_train, F_test, C):
    """Held-out probabilities of a linear probe: scaling (no centring, so sparse inputs work) + one-vs-rest
    logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(with_mean=False), OneVsRestClassifier(LogisticRegression(C=C, max_iter=500)))
    return clf.fit(F_train, Y_train).predict_proba(F_test)


def _probes(model, train, test, best):
    """Held-out mAP of linear probes at the chosen (block, timestep): what the diffusion features carry,
    against raw pixels, TF-IDF and the text model's own untrained copy (how much its training added)."""
    import tempfile

    from sklearn.feature_extraction.text import TfidfVectorizer

    from . import TextDiffusionFeatureExtractor
    from .backbones import resolve_model_dir
    from .backbones.untrained import untrained_copy
    from .metrics import mean_average_precision

    def score(F_train, F_test, kind):
        return float(mean_average_precision(test.Y, linear_probe(F_train, train.Y, F_test, PROBE_C[kind])))

    features = model["features"]
    F_train, F_test = features.transform(train.data), features.transform(test.data)
    scores = {kind: score(F_train.filter(regex=f"^{kind}__").to_numpy(), F_test.filter(regex=f"^{kind}__").to_numpy(),
                          kind) for kind in ("image", "text")}
    pixels = [np.stack(split.data["image"]).reshape(len(split.Y), -1) / 255.0 for split in (train, test)]
    scores["raw pixels"] = score(*pixels, "image")
    tfidf = TfidfVectorizer().fit(train.data["text"])
    scores["TF-IDF"] = score(tfidf.transform(train.data["text"]), tfidf.transform(test.data["text"]), "text")
    with tempfile.TemporaryDirectory() as tmp:
        copy = untrained_copy(resolve_model_dir(TEXT_MODEL), "mdlm", Path(tmp) / "text")
        untrained = TextDiffusionFeatureExtractor(
            copy, block=best["features__text__block"], timestep=best["features__text__timestep"], batch_size=128
        ).fit(None)
        scores["text, untrained copy"] = score(untrained.transform(train.data["text"]),
                                               untrained.transform(test.data["text"]), "text")
    return scores


def _head(pipeline):
    """The fusion head's plain-valued parameters, for the summary."""
    return {k: v for k, v in pipeline["clf"].get_params().items() if isinstance(v, (bool, int, float, str))}


def _print_table(summary, model_path):
    chosen = summary["chosen"]
    print("")
    print("Diff-Feat on Fashion-MNIST mosaics (held-out test split, threshold 0.5)")
    print(f"{'model':<12} {'branch choice':<26} {'mAP':>6} {'CF1':>6} {'OF1':>6}")
    choice = {
        "image only": f"block {chosen['image__block']}, t={chosen['image__timestep']}",
        "text only": f"block {chosen['text__block']}, t={chosen['text__timestep']:g}",
        "fused": "both of the above",
    }
    for name, report in summary["held_out"].items():
        print(
            f"{name:<12} {choice[name]:<26} {100 * report['mAP']:6.1f} {100 * report['CF1']:6.1f} "
            f"{100 * report['OF1']:6.1f}"
        )
    print(
        f"local search: {summary['evaluations']} evaluations of {summary['grid_size']} grid points "
        f"({100 * summary['evaluations'] / summary['grid_size']:.1f}%), "
        f"stopped {'at a local optimum' if summary['stopped'] == 'local_optimum' else 'at max_evaluations'}"
    )
    probes = summary["probes"]
    print(
        f"linear probes, held-out mAP: image features {100 * probes['image']:.1f} (raw pixels "
        f"{100 * probes['raw pixels']:.1f}); text features {100 * probes['text']:.1f} (untrained copy "
        f"{100 * probes['text, untrained copy']:.1f}, TF-IDF {100 * probes['TF-IDF']:.1f})"
    )
    g = summary["image_grid_best"]
    print(
        f"image grid optimum (for the heatmap, image only): block {g['block']}, t={g['timestep']}, "
        f"CV mAP {100 * g['cv_map']:.1f}"
    )
    search_head, head = summary["search_head"], summary["held_out_head"]
    print(
        f"heads: held-out models FusionClassifier({'' if summary['held_out_head_is_default'] else '...'}) "
        f"({head['projection_dim']} wide, {head['max_epochs']} epochs); candidates "
        f"{search_head['projection_dim']} wide, {search_head['max_epochs']} epochs"
    )
    print(f"saved {model_path}; reloaded predictions identical: {summary['reload_identical']}")
    figures = summary["figures"]
    print(f"figures: {figures['heatmap']}, {figures['tsne']}")
    print(f"summary: {Path(model_path).parent / 'summary.json'}; {summary['seconds']:.0f} s")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _heatmap(heat, blocks, timesteps, search, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    image = ax.imshow(100 * heat, aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(timesteps)), [str(t) for t in timesteps])
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_xlabel("diffusion timestep t")
    ax.set_ylabel("DiT block")
    head = search.estimator["clf"]
    ax.set_title(
        f"Image branch alone: {search.n_splits_}-fold CV mAP over (block, timestep)\n"
        f"(head of the search's candidates: {head.projection_dim} wide, {head.max_epochs} epochs)",
        fontsize=10,
    )
    for i in range(heat.shape[0]):
        for j in range(heat.shape[1]):
            bright = heat[i, j] > np.nanmin(heat) + 0.6 * (np.nanmax(heat) - np.nanmin(heat))
            ax.text(
                j,
                i,
                f"{100 * heat[i, j]:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if bright else "white",
                zorder=3,  # above the search path, so every score stays readable
            )
    # Where the joint local search went (its image coordinates), start to end.
    path_points = [
        (
            timesteps.index(p["params"]["features__image__timestep"]),
            blocks.index(p["params"]["features__image__block"]),
        )
        for p in search.search_path_
        if p.get("params")
    ]
    xs, ys = zip(*path_points)
    ax.plot(xs, ys, "-o", color="red", alpha=0.7, markersize=4, zorder=2, label="local search path (fused)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, frameon=False)
    fig.colorbar(image, ax=ax, label="mAP (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _tsne(model, test, best, path):
    """Three t-SNE panels of the held-out samples: image features, text features, fused representation.

    A mosaic holds one to four items, so a sample has no single class to colour it by. Mosaics whose items are
    all of one class are coloured by that class; mosaics with items of several classes are drawn in grey,
    behind. Returns the counts of each kind.
    """
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    features = model["features"].transform(test.data)  # columns "image__..." and "text__..."
    image = features.filter(regex=r"^image__").to_numpy()
    text = features.filter(regex=r"^text__").to_numpy()
    fused = model["clf"].fuse(features)
    n = len(features)
    # t-SNE needs perplexity < n; 30 is its usual value, kept for samples large enough to allow it.
    perplexity = min(30.0, (n - 1) / 3)
    clf = model["clf"]

    def embed(Z):
        # One OpenMP thread: the Barnes-Hut gradient of a few hundred points is too small to gain from more, and
        # on busy cores each of its 1000 iterations waits at thread barriers (500 points on 2 shared cores: 45 s
        # with 2 threads, 6 s with 1).
        with threadpool_limits(1, user_api="openmp"):
            return TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(Z)

    # The image and text features are standardised as the fusion head standardises them before projecting;
    # the fused vectors are taken as the head sees them.
    panels = [
        (f"image features (DiT block {best['features__image__block']}, t={best['features__image__timestep']})",
         embed(StandardScaler().fit_transform(image))),
        (f"text features (block {best['features__text__block']}, t={best['features__text__timestep']:g})",
         embed(StandardScaler().fit_transform(text))),
        (f"fused representation ({clf.projection_dim}-d sum of projections)", embed(fused)),
    ]
    Y = np.asarray(test.Y)
    single = Y.sum(axis=1) == 1
    label = Y.argmax(axis=1)
    plt = _pyplot()
    # tab10, with its grey (Sneaker) made black so that no class looks like the grey of mixed mosaics.
    colours = [(0.0, 0.0, 0.0) if k == 7 else c for k, c in enumerate(plt.get_cmap("tab10").colors)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    for ax, (title, xy) in zip(axes, panels):
        ax.scatter(*xy[~single].T, s=6, color="0.8", linewidths=0, label="several classes")
        for k, name in enumerate(test.label_names):
            ax.scatter(*xy[single & (label == k)].T, s=12, color=colours[k % len(colours)], linewidths=0,
                       label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False, markerscale=1.5)
    fig.suptitle(
        f"t-SNE of {n} held-out mosaics. Colour: the class of the {int(single.sum())} mosaics whose items are all "
        f"of one class; grey: the {int((~single).sum())} with several classes",
        fontsize=10,
    )
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.13, wspace=0.04)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, {"single_class": int(single.sum()), "several_classes": int((~single).sum())}
