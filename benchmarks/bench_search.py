"""Local search (BlockTimestepSearchCV) against an exhaustive GridSearchCV over the same space.

Run: python benchmarks/bench_search.py [--quick] [--cv 2] [--n-jobs 1] [--n-images 400] [--only SECTION]

Each section prints, for both searches: candidates evaluated, fits, wall time and best CV score, then the
ratios. Sections are listed in SECTIONS at the bottom; a section is a function of the parsed arguments.
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, KFold

from sklearn_difffeat.search import BlockTimestepSearchCV

# The synthetic landscapes are the search tests' own (tests/search_estimators.py), so both check the same thing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from search_estimators import GRID, PEAK, Branch, Landscape, landscape_max

# ----------------------------------------------------------------------------------------------------------
# Shared helpers


def timed(search, X, y):
    t0 = time.perf_counter()
    search.fit(X, y)
    return time.perf_counter() - t0


def report(name, search, seconds, n_evaluations):
    fits = n_evaluations * search.n_splits_
    print(f"  {name:<22} {n_evaluations:>8} cand {fits:>8} fits {seconds:>9.2f} s   best score "
          f"{search.best_score_:>9.4f}   {search.best_params_}")


def compare(title, estimator, grid, X, y, args, known_best=None):
    """Time both searches on one space; `known_best` (optional) is the true optimum value, for reference."""
    size = int(np.prod([len(v) for v in grid.values()]))
    cv = KFold(args.cv, shuffle=True, random_state=0)
    print(f"\n{title}: grid {' x '.join(str(len(v)) for v in grid.values())} = {size} candidates, cv={args.cv}")
    local = BlockTimestepSearchCV(estimator, grid, cv=cv, n_jobs=args.n_jobs)
    t_local = timed(local, X, y)
    report("local search", local, t_local, local.n_evaluations_)
    print(f"  {'':<22} stopped: {local.stopped_reason_} after {len(local.search_path_) - 1} moves")
    if args.skip_grid:
        return
    grid_search = GridSearchCV(estimator, grid, cv=cv, n_jobs=args.n_jobs)
    t_grid = timed(grid_search, X, y)
    report("exhaustive grid", grid_search, t_grid, size)
    if known_best is not None:
        print(f"  {'':<22} true optimum value {known_best:.4f}")
    print(f"  ratio grid/local: {size / local.n_evaluations_:.1f}x candidates, {t_grid / t_local:.1f}x wall time; "
          f"score gap {grid_search.best_score_ - local.best_score_:.4f}")


# ----------------------------------------------------------------------------------------------------------
# Section 1: synthetic landscape (known optimum; each fit does a small real Ridge fit to cost something)


class CostlyLandscape(Landscape):
    """The tests' landscape (known optimum), whose fit also does a small Ridge fit so that a fit costs something."""

    def fit(self, X, y=None):
        Ridge().fit(X, y)
        return super().fit(X, y)


def section_synthetic(args):
    grid = dict(GRID)
    if args.quick:  # fewer blocks, same timesteps: 12 x 10 x 7 x 6
        grid.update({"image__block": list(range(8, 20)), "text__block": list(range(6, 13))})
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 16))
    y = X @ rng.normal(size=16)
    unimodal = ((1.0, PEAK),)
    compare("synthetic, one peak", CostlyLandscape(Branch(), Branch(), unimodal), grid, X, y, args,
            known_best=landscape_max(unimodal, grid))
    # A second, higher peak far from the priors: local search is expected to stop at the lower one.
    two_peaks = ((1.0, PEAK), (5.0, (25, 0, 2, 0.5)))
    compare("synthetic, two peaks", CostlyLandscape(Branch(), Branch(), two_peaks), grid, X, y, args,
            known_best=landscape_max(two_peaks, grid))


# ----------------------------------------------------------------------------------------------------------
# Further sections (e.g. real extractors, with backbone pass counts) are appended here.

# ----------------------------------------------------------------------------------------------------------
# Section 2: the real image extractor (embedded DiT) on the embedded mosaics, each search on its own cache


def _image_pipeline(cache, cache_depth):
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    from sklearn_difffeat import DiTFeatureExtractor, FusionClassifier

    extractor = DiTFeatureExtractor(
        "embedded:fashion-dit", block=1, timestep=0, cache=cache, cache_depth=cache_depth, batch_size=256
    )
    return Pipeline(
        [
            ("features", ColumnTransformer([("image", extractor, "image")])),
            ("clf", FusionClassifier(lr=1e-3, max_epochs=30, early_stopping=5)),
        ]
    )


def _count_images_through_the_dit():
    """A counter of the images entering the embedded DiT's patch embedding (every search below shares it)."""
    counted = {"images": 0}
    backbone = _image_pipeline(None, None).named_steps["features"].transformers[0][1].get_backbone()
    backbone.transformer.pos_embed.register_forward_hook(
        lambda m, a, o: counted.__setitem__("images", counted["images"] + a[0].shape[0])
    )
    return counted


def section_extractors(args):
    import tempfile

    from sklearn_difffeat.datasets import load_fashion_mosaics
    from sklearn_difffeat.metrics import map_scorer

    data = load_fashion_mosaics(args.n_images, split="train", random_state=0)
    X, Y = data.data[["image"]], data.Y
    grid = {"features__image__block": list(range(1, 9)), "features__image__timestep": [0, 50, 100, 200, 400, 700]}
    size = int(np.prod([len(v) for v in grid.values()]))
    cv = KFold(args.cv, shuffle=True, random_state=0)
    counted = _count_images_through_the_dit()
    print(
        f"\nembedded DiT (8 blocks) on {len(X)} Fashion-MNIST mosaics, FusionClassifier(2048), mAP, cv={args.cv}: "
        f"grid 8 blocks x 6 timesteps = {size} candidates"
    )
    print(f"  without a cache every candidate and fold would push {size * args.cv * len(X)} images through the DiT")
    searches = (
        # GridSearchCV knows nothing of blocks: cache_depth=-1 makes each pass store every block.
        ("exhaustive grid",
         lambda c: GridSearchCV(_image_pipeline(c, -1), grid, cv=cv, scoring=map_scorer, n_jobs=args.n_jobs)),
        # The local search sets cache_depth itself for the block axis it climbs.
        ("local search",
         lambda c: BlockTimestepSearchCV(_image_pipeline(c, None), grid, cv=cv, n_jobs=args.n_jobs, random_state=0)),
    )
    rows = []
    for name, make in searches:
        with tempfile.TemporaryDirectory() as cache:
            counted["images"] = 0
            search = make(cache)
            seconds = timed(search, X, Y)
        evaluations = getattr(search, "n_evaluations_", size)
        rows.append((name, evaluations, counted["images"], seconds, search.best_score_, search.best_params_))
        print(
            f"  {name:<16} {evaluations:>4} cand  {counted['images']:>6} images through the DiT "
            f"({counted['images'] / len(X):.0f} passes over the data)  {seconds:7.1f} s  best mAP "
            f"{100 * search.best_score_:.2f}  {search.best_params_}"
        )
    (_, e_grid, i_grid, t_grid, s_grid, _), (_, e_loc, i_loc, t_loc, s_loc, _) = rows
    print(
        f"  ratio grid/local: {e_grid / e_loc:.1f}x candidates, {i_grid / max(i_loc, 1):.1f}x backbone images, "
        f"{t_grid / t_loc:.1f}x wall time; score gap {100 * (s_grid - s_loc):.2f} mAP points"
    )


SECTIONS = [("synthetic landscape", section_synthetic), ("real extractor, embedded DiT", section_extractors)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer block values (5,040 instead of 20,160 candidates)")
    parser.add_argument("--cv", type=int, default=2)
    parser.add_argument("--n-jobs", type=int, default=1)
    parser.add_argument("--skip-grid", action="store_true", help="run the local search only")
    parser.add_argument("--n-images", type=int, default=400, help="mosaics for the real-extractor section")
    parser.add_argument("--only", choices=[name for name, _ in SECTIONS], help="run one section")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; n_jobs={args.n_jobs}")
    for name, section in SECTIONS:
        if args.only and name != args.only:
            continue
        print(f"\n=== {name} ===")
        section(args)


if __name__ == "__main__":
    main()
