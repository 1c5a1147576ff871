"""Local search (BlockTimestepSearchCV) against an exhaustive GridSearchCV over the same space.

Run: python benchmarks/bench_search.py [--quick] [--cv 2] [--n-jobs 1]

Each section prints, for both searches: candidates evaluated, fits, wall time and best CV score, then the
ratios. Sections are listed in SECTIONS at the bottom; a section is a function of the parsed arguments.
"""

import argparse
import os
import platform
import time

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, KFold

from sklearn_difffeat.search import BlockTimestepSearchCV

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

AXES = {
    "image__block": list(range(1, 29)),
    "image__timestep": [0, 50, 100, 200, 300, 400, 500, 600, 700, 900],
    "text__block": list(range(1, 13)),
    "text__timestep": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
}
SCALE = np.array([1.0, 100.0, 1.0, 0.1])


class Branch(BaseEstimator):
    def __init__(self, block=1, timestep=0):
        self.block = block
        self.timestep = timestep


class Landscape(RegressorMixin, BaseEstimator):
    """Score = max over peaks of (height - squared scaled distance); fit does a Ridge fit for realistic cost."""

    def __init__(self, image=None, text=None, peaks=((1.0, (14, 200, 10, 0.2)),)):
        self.image = image
        self.text = text
        self.peaks = peaks

    def value(self):
        x = np.array([self.image.block, self.image.timestep, self.text.block, self.text.timestep], float)
        return max(h - float(np.sum(((x - np.asarray(c, float)) / SCALE) ** 2)) for h, c in self.peaks)

    def fit(self, X, y):
        self.ridge_ = Ridge().fit(X, y)
        return self

    def predict(self, X):
        return self.ridge_.predict(X)

    def score(self, X, y):
        return self.value()


def true_max(peaks, grid):
    points = np.stack(np.meshgrid(*[np.asarray(v, float) for v in grid.values()], indexing="ij"), -1)
    return max(float(np.max(h - np.sum(((points - np.asarray(c, float)) / SCALE) ** 2, -1))) for h, c in peaks)


def section_synthetic(args):
    grid = dict(AXES)
    if args.quick:  # fewer blocks, same timesteps: 12 x 10 x 7 x 6
        grid.update({"image__block": list(range(8, 20)), "text__block": list(range(6, 13))})
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 16))
    y = X @ rng.normal(size=16)
    unimodal = ((1.0, (14, 200, 10, 0.2)),)
    compare("synthetic, one peak", Landscape(Branch(), Branch(), unimodal), grid, X, y, args,
            known_best=true_max(unimodal, grid))
    # A second, higher peak far from the priors: local search is expected to stop at the lower one.
    two_peaks = ((1.0, (14, 200, 10, 0.2)), (5.0, (25, 0, 2, 0.5)))
    compare("synthetic, two peaks", Landscape(Branch(), Branch(), two_peaks), grid, X, y, args,
            known_best=true_max(two_peaks, grid))


# ----------------------------------------------------------------------------------------------------------
# Further sections (e.g. real extractors, with backbone pass counts) are appended here.

SECTIONS = [("synthetic landscape", section_synthetic)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer block values (5,040 instead of 20,160 candidates)")
    parser.add_argument("--cv", type=int, default=2)
    parser.add_argument("--n-jobs", type=int, default=1)
    parser.add_argument("--skip-grid", action="store_true", help="run the local search only")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; "
          f"n_jobs={args.n_jobs}")
    for name, section in SECTIONS:
        print(f"\n=== {name} ===")
        section(args)


if __name__ == "__main__":
    main()
