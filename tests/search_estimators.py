"""Synthetic estimators with known score landscapes, shared by the search tests and benchmarks/bench_search.py.

None of them loads a model: their scores are known functions of their parameters, so a search's answer can be
checked against a hand computation or an exhaustive `GridSearchCV`.
"""

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

# The paper-shaped grid: image block x image timestep x text block x text timestep = 28 x 10 x 12 x 6.
GRID = {
    "image__block": list(range(1, 29)),
    "image__timestep": [0, 50, 100, 200, 300, 400, 500, 600, 700, 900],
    "text__block": list(range(1, 13)),
    "text__timestep": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
}
SCALE = (1.0, 100.0, 1.0, 0.1)  # one grid step of each axis is about one unit of distance
PEAK = (14, 200, 10, 0.2)  # known argmax, away from the default start (12, 400, 12, 0.0)


class Branch(BaseEstimator):
    """Stands in for one extractor: only carries (block, timestep), so names read `image__block` etc."""

    def __init__(self, block=1, timestep=0):
        self.block = block
        self.timestep = timestep


class Landscape(RegressorMixin, BaseEstimator):
    """Its score is a known function of (image, text) x (block, timestep); X and y are ignored.

    The score is the highest of `height - squared scaled distance to center` over `peaks`: one peak is a smooth
    unimodal bowl, two peaks give a local optimum.
    """

    n_fits = 0  # class-level, counts every fit in this process (folds and refit)

    def __init__(self, image=None, text=None, peaks=((1.0, PEAK),)):
        self.image = image
        self.text = text
        self.peaks = peaks

    def value(self):
        x = np.array([self.image.block, self.image.timestep, self.text.block, self.text.timestep], float)
        return max(h - float(np.sum(((x - np.array(c, float)) / SCALE) ** 2)) for h, c in self.peaks)

    def fit(self, X, y=None):
        type(self).n_fits += 1
        self.fitted_value_ = self.value()
        return self

    def predict(self, X):
        return np.full(len(X), self.fitted_value_)

    def score(self, X, y=None):
        return self.value()


def landscape(**kw):
    return Landscape(image=Branch(), text=Branch(), **kw)


def landscape_max(peaks, grid):
    """The highest value a `Landscape` with `peaks` takes over `grid` (its four axes, in `GRID`'s order)."""
    points = np.stack(np.meshgrid(*[np.asarray(v, float) for v in grid.values()], indexing="ij"), -1)
    return max(float(np.max(h - np.sum(((points - np.asarray(c, float)) / SCALE) ** 2, -1))) for h, c in peaks)


class Table(RegressorMixin, BaseEstimator):
    """Score = table[x]; X and y are ignored."""

    def __init__(self, x=0, table=(0.0,)):
        self.x = x
        self.table = table

    def fit(self, X, y=None):
        return self

    def score(self, X, y=None):
        return self.table[self.x]


class Breaks(Table):
    """Score = table[x]; fitting an x listed in `broken` raises."""

    def __init__(self, x=0, table=(0.0,), broken=()):
        super().__init__(x=x, table=table)
        self.broken = broken

    def fit(self, X, y=None):
        if self.x in self.broken:
            raise ValueError(f"x={self.x} is broken")
        return self


class FoldSum(Table):
    """Score = table[x] + sum of the scored fold's X, so the second term tells which fold was scored."""

    def score(self, X, y=None):
        return self.table[self.x] + float(np.sum(X))


class NoisyMultiLabel(ClassifierMixin, BaseEstimator):
    """Multi-label scores = quality * labels + noise, with X = [labels, noise]; quality peaks at (block, t)."""

    def __init__(self, block=0, timestep=0, peak=(5, 300)):
        self.block = block
        self.timestep = timestep
        self.peak = peak

    def fit(self, X, y):
        self.classes_ = np.arange(np.shape(y)[1])
        return self

    def decision_function(self, X):
        q = np.exp(-(((self.block - self.peak[0]) / 3.0) ** 2) - ((self.timestep - self.peak[1]) / 300.0) ** 2)
        L = len(self.classes_)
        return 2.0 * q * X[:, :L] + X[:, L:]

    def predict_proba(self, X):
        return 1.0 / (1.0 + np.exp(-self.decision_function(X)))

    def predict(self, X):
        return (self.decision_function(X) > 0.5).astype(int)


class FakeExtractor(BaseEstimator):
    """Follows the extractors' contract without a model: `block` with the library's block convention, `cache`,
    `cache_depth`, `n_blocks_` after `fit`, and a ValueError for a block or cache depth the model of `depth`
    blocks does not have; `broken` makes loading the model fail."""

    def __init__(self, depth=8, block=1, timestep=0, cache=None, cache_depth=None, verbose=0, broken=False):
        self.depth = depth
        self.block = block
        self.timestep = timestep
        self.cache = cache
        self.cache_depth = cache_depth
        self.verbose = verbose
        self.broken = broken

    def _resolve(self, name, value):
        if not -(self.depth + 1) <= value <= self.depth:
            raise ValueError(f"{name}={value} is out of range for a model with {self.depth} blocks")
        return value + self.depth + 1 if value < 0 else value

    def fit(self, X=None, y=None):
        if self.broken:
            raise RuntimeError("weights not found")
        self.block_ = self._resolve("block", self.block)
        if self.cache_depth is not None:
            self._resolve("cache_depth", self.cache_depth)
        self.n_blocks_ = self.depth
        return self


class Model(RegressorMixin, BaseEstimator):
    """Score = -(image block - peak)^2 - (text block - text_peak)^2 over `FakeExtractor`s; X and y are ignored."""

    def __init__(self, image=None, text=None, peak=7, text_peak=3):
        self.image = image
        self.text = text
        self.peak = peak
        self.text_peak = text_peak

    def fit(self, X, y=None):
        self.image.fit()
        if self.text is not None:
            self.text.fit()
        return self

    def score(self, X, y=None):
        value = -float((self.image.block_ - self.peak) ** 2)
        if self.text is not None:
            value -= float((self.text.block_ - self.text_peak) ** 2)
        return value
