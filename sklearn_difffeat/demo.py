"""The end-to-end Diff-Feat demo on embedded data and models: offline, on CPU, in a few minutes.

``python -m sklearn_difffeat demo`` loads the Fashion-MNIST mosaics, builds the pipeline
(ColumnTransformer of the two extractors -> FusionClassifier), runs BlockTimestepSearchCV over the image and
text (block, timestep) axes, scores image-only, text-only and fused models on the held-out split, saves and
reloads the fitted pipeline, and draws a heatmap of the image branch's score over (block, timestep).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import joblib
import numpy as np

IMAGE_MODEL = "embedded:fashion-dit"
TEXT_MODEL = "embedded:fashion-mdlm"
IMAGE_TIMESTEPS = [0, 50, 100, 200, 300, 500, 700, 900]
TEXT_TIMESTEPS = [0.0, 0.15, 0.3, 0.5, 0.7]


def build_pipeline(cache, image=True, text=True, projection_dim=2048, max_epochs=60, verbose=0):
    """ColumnTransformer of the extractors (either or both) -> FusionClassifier."""
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
    clf = FusionClassifier(
        projection_dim=projection_dim, max_epochs=max_epochs, lr=1e-3, early_stopping=8, random_state=0
    )
    return Pipeline([("features", features), ("clf", clf)])


def _axes(image=True, text=True, image_blocks=None, text_blocks=None):
    axes = {}
    if image:
        axes["features__image__block"] = list(image_blocks)
        axes["features__image__timestep"] = IMAGE_TIMESTEPS
    if text:
        axes["features__text__block"] = list(text_blocks)
        axes["features__text__timestep"] = TEXT_TIMESTEPS
    return axes


def _branch_params(params, branch):
    return {k: v for k, v in params.items() if k.startswith(f"features__{branch}__")}


def run_demo(n_train=1000, n_test=500, output="demo_output", cv=3, verbose=1):
    """Run the demo; return its summary dict (also written to ``output/summary.json``)."""
    with warnings.catch_warnings():
        return _run_demo(n_train, n_test, output, cv, verbose)


def _run_demo(n_train, n_test, output, cv, verbose):
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, KFold

    from . import BlockTimestepSearchCV, DiTFeatureExtractor, TextDiffusionFeatureExtractor
    from .datasets import load_fashion_mosaics
    from .metrics import map_scorer, multilabel_report

    start_time = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    cache = str(output / "cache")
    say = print if verbose else (lambda *a, **k: None)

    train = load_fashion_mosaics(n_train, split="train", random_state=0)
    test = load_fashion_mosaics(n_test, split="test", random_state=0)
    say(f"data: {n_train} train / {n_test} test mosaics of real Fashion-MNIST items, {len(train.label_names)} labels")
    # Loaded through the extractors' process-wide registry, so the pipelines below reuse these weights.
    image_blocks = range(1, DiTFeatureExtractor(IMAGE_MODEL)._backbone().num_blocks + 1)
    text_backbone = TextDiffusionFeatureExtractor(TEXT_MODEL)._backbone()
    text_blocks = range(1, text_backbone.num_blocks + 1)
    lengths = [
        len(ids) for ids in text_backbone.tokenizer(list(train.data["text"]) + list(test.data["text"]))["input_ids"]
    ]
    too_long = sum(n > text_backbone.max_length for n in lengths)
    if too_long:
        # Said once here: the extractor warns on every transform, i.e. for every candidate and fold.
        say(
            f"{too_long} of {len(lengths)} captions exceed the text model's {text_backbone.max_length} tokens "
            "and are truncated"
        )
        warnings.filterwarnings("ignore", message=r".*texts are longer than max_length")

    folds = KFold(cv, shuffle=True, random_state=0)
    axes = _axes(image_blocks=image_blocks, text_blocks=text_blocks)
    grid_size = int(np.prod([len(v) for v in axes.values()]))
    say(
        f"local search over {' x '.join(str(len(v)) for v in axes.values())} = {grid_size} (block, timestep) "
        f"combinations, {cv}-fold CV mAP ..."
    )
    search = BlockTimestepSearchCV(
        build_pipeline(cache, verbose=verbose), axes, cv=folds, scoring=map_scorer, random_state=0, verbose=verbose
    )
    search.fit(train.data, train.Y)
    best = search.best_params_
    say(f"  {search.n_evaluations_} evaluations ({search.stopped_reason_}); best CV mAP {100 * search.best_score_:.1f}")

    # Held-out comparison at the chosen (block, timestep) of each branch.
    rows = {}
    models = {
        "image only": clone(build_pipeline(cache, text=False)).set_params(**_branch_params(best, "image")),
        "text only": clone(build_pipeline(cache, image=False)).set_params(**_branch_params(best, "text")),
        "fused": search.best_estimator_,
    }
    for name, model in models.items():
        if name != "fused":
            model.fit(train.data, train.Y)
        rows[name] = multilabel_report(test.Y, model.predict_proba(test.data))

    # Persistence: the fitted fused pipeline, reloaded, predicts identically.
    model_path = output / "diff_feat_pipeline.joblib"
    joblib.dump(search.best_estimator_, model_path)
    reloaded = joblib.load(model_path)
    identical = bool(np.array_equal(reloaded.predict_proba(test.data), search.best_estimator_.predict_proba(test.data)))

    # The image branch's whole (block, timestep) grid, for the heatmap: cheap, features come from the cache.
    say("image branch: full (block, timestep) grid for the heatmap ...")
    image_axes = _axes(text=False, image_blocks=image_blocks)
    grid = GridSearchCV(build_pipeline(cache, text=False), image_axes, cv=folds, scoring=map_scorer, refit=False)
    grid.fit(train.data, train.Y)
    heat = np.full((len(image_blocks), len(IMAGE_TIMESTEPS)), np.nan)
    for params, score in zip(grid.cv_results_["params"], grid.cv_results_["mean_test_score"]):
        heat[
            list(image_blocks).index(params["features__image__block"]),
            IMAGE_TIMESTEPS.index(params["features__image__timestep"]),
        ] = score
    best_cell = np.unravel_index(np.nanargmax(heat), heat.shape)
    figure = _heatmap(heat, list(image_blocks), search, output / "image_block_timestep_map.png")

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
            "block": int(list(image_blocks)[best_cell[0]]),
            "timestep": IMAGE_TIMESTEPS[best_cell[1]],
            "cv_map": float(heat[best_cell]),
        },
        "held_out": rows,
        "reload_identical": identical,
        "seconds": elapsed,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    _print_table(summary, figure, model_path, say)
    if not identical:
        raise RuntimeError("The reloaded pipeline's predictions differ from the fitted one's.")
    return summary


def _print_table(summary, figure, model_path, say):
    chosen = summary["chosen"]
    say("")
    say("Diff-Feat on Fashion-MNIST mosaics (held-out test split, threshold 0.5)")
    say(f"{'model':<12} {'branch choice':<26} {'mAP':>6} {'CF1':>6} {'OF1':>6}")
    choice = {
        "image only": f"block {chosen['image__block']}, t={chosen['image__timestep']}",
        "text only": f"block {chosen['text__block']}, t={chosen['text__timestep']:g}",
        "fused": "both of the above",
    }
    for name, report in summary["held_out"].items():
        say(
            f"{name:<12} {choice[name]:<26} {100 * report['mAP']:6.1f} {100 * report['CF1']:6.1f} "
            f"{100 * report['OF1']:6.1f}"
        )
    say(
        f"local search: {summary['evaluations']} evaluations of {summary['grid_size']} grid points "
        f"({100 * summary['evaluations'] / summary['grid_size']:.1f}%), "
        f"stopped at a {summary['stopped'].replace('_', ' ')}"
    )
    g = summary["image_grid_best"]
    say(
        f"image grid optimum (for the heatmap, image only): block {g['block']}, t={g['timestep']}, "
        f"CV mAP {100 * g['cv_map']:.1f}"
    )
    say(f"saved {model_path}; reloaded predictions identical: {summary['reload_identical']}")
    say(f"heatmap: {figure}; summary: {Path(model_path).parent / 'summary.json'}; {summary['seconds']:.0f} s")


def _heatmap(heat, blocks, search, path):
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    image = ax.imshow(100 * heat, aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(IMAGE_TIMESTEPS)), [str(t) for t in IMAGE_TIMESTEPS])
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_xlabel("diffusion timestep t")
    ax.set_ylabel("DiT block")
    ax.set_title("Image branch alone: CV mAP over (block, timestep)")
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
            )
    # Where the joint local search went (its image coordinates), start to end.
    path_points = [
        (
            IMAGE_TIMESTEPS.index(p["params"]["features__image__timestep"]),
            blocks.index(p["params"]["features__image__block"]),
        )
        for p in search.search_path_
        if p.get("params")
    ]
    xs, ys = zip(*path_points)
    ax.plot(xs, ys, "-o", color="red", markersize=4, label="local search path (fused)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, frameon=False)
    fig.colorbar(image, ax=ax, label="mAP (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
