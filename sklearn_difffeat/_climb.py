"""The hill climb of `BlockTimestepSearchCV`, apart from scikit-learn: neighbours, the move rule, the running state
and the progress bar.

A point of the grid is a tuple of value positions, one per axis; two points are neighbours when they differ by one
position along a single axis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

# Why the climb stops (`stopped_reason_`), and its moves (`search_path_[i]["move"]`).
LOCAL_OPTIMUM = "local_optimum"
MAX_EVALUATIONS = "max_evaluations"
START, IMPROVE, PLATEAU = "start", "improve", "plateau"

Point = tuple[int, ...]


def neighbours(point: Point, sizes: Sequence[int]) -> Iterator[Point]:
    """The points one step down, then one step up, along each axis in turn (axes of `sizes` values each)."""
    for k, size in enumerate(sizes):
        for i in (point[k] - 1, point[k] + 1):
            if 0 <= i < size:
                yield (*point[:k], i, *point[k + 1 :])


def decide(score: float, best: float, *, tol: float, cut_short: bool, waited: int, patience: int) -> str:
    """The move onto the step's best neighbour, which scored `score`: IMPROVE, PLATEAU, or why the climb stops.

    A failed neighbour (score -inf) is never moved onto. When `max_evaluations` cut the batch short, an unevaluated
    neighbour might still have improved, so the climb stops instead of taking a plateau move.
    """
    if score > best + tol:
        return IMPROVE
    if cut_short:
        return MAX_EVALUATIONS
    if waited < patience and np.isfinite(score):
        return PLATEAU
    return LOCAL_OPTIMUM


class Progress:
    """The search's progress for `verbose=1`: one tqdm bar over candidates, whose total grows as steps are
    planned, with the step, the best score so far and the grid size after it. At other levels it does nothing."""

    def __init__(self, verbose: int, grid_size: int):
        self.show = verbose == 1
        self.grid_size = grid_size
        self.bar = None
        self.best = "nan"

    def _postfix(self, step):
        return f"step {step}, best {self.best}, grid {self.grid_size}"

    def plan(self, n: int, step: int) -> None:
        if not self.show:
            return
        if self.bar is None:
            from tqdm.auto import tqdm  # lazy: only a verbose search needs it

            # Made with the first step's size, so it never shows an empty total.
            self.bar = tqdm(total=n, desc="BlockTimestepSearchCV", unit="candidate", postfix=self._postfix(step))
        else:
            self.bar.total += n
            self.bar.set_postfix_str(self._postfix(step), refresh=True)

    def done(self, n: int, step: int, best: float) -> None:
        if self.bar is not None:
            self.best = f"{best:.4g}" if np.isfinite(best) else "nan"
            self.bar.set_postfix_str(self._postfix(step), refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Climb:
    """The running state of one climb: where it is, its best score, and every point it evaluated.

    `evaluate_candidates` is scikit-learn's callback of that name, kept here so that one object carries all a
    step needs.
    """

    def __init__(self, axes: list[tuple[str, list[Any]]], shared: dict[str, Any], start: Point, *, limit: int,
                 rng: np.random.RandomState | None, evaluate_candidates: Callable, progress: Progress):
        self.axes, self.shared, self.limit, self.rng = axes, shared, limit, rng
        self.evaluate_candidates, self.progress = evaluate_candidates, progress
        self.current, self.best = start, -np.inf
        self.step = 0
        self.waited = 0  # consecutive non-improving moves
        self.scores: dict[Point, float] = {}  # score of the climbed metric (-inf: failed or nan); the visited set
        self.path: list[dict[str, Any]] = []  # the entries of search_path_

    def params(self, point: Point) -> dict[str, Any]:
        """The axes' values at `point`."""
        return {name: values[i] for (name, values), i in zip(self.axes, point)}

    def candidate(self, point: Point) -> dict[str, Any]:
        """What the estimator gets at `point`: the axes' values and the shared parameters."""
        return {**self.params(point), **self.shared}

    def unvisited_neighbours(self) -> list[Point]:
        """The current point's neighbours not evaluated yet, in axis order, or shuffled when there is an `rng`."""
        found = [p for p in neighbours(self.current, [len(v) for _, v in self.axes]) if p not in self.scores]
        if self.rng is not None:
            found = [found[i] for i in self.rng.permutation(len(found))]
        return found

    def move_to(self, point: Point, score: float, move: str) -> None:
        """Make `point` (scoring `score`) the current point, by a START, IMPROVE or PLATEAU move."""
        if move == PLATEAU:
            self.waited += 1
        else:
            self.best, self.waited = score, 0
        self.current = point
        self.path.append({
            "step": self.step, "params": self.candidate(point), "score": np.nan if score == -np.inf else float(score),
            "move": move, "n_evaluations": len(self.scores), "stopped": None,
        })

    def check_some_score(self, first_error: str | None) -> None:
        """Raise when no evaluated point has a finite score, so that there is no best candidate; `first_error` is
        the first failed fit's error, if any fit failed."""
        if np.isfinite(list(self.scores.values())).any():
            return
        raise ValueError(
            f"None of the {len(self.scores)} evaluated candidates has a score to compare: "
            + (f"each failed or scored NaN; the first error: {first_error}." if first_error else "all scores were NaN.")
            + " Check that the scoring can score this estimator on this y (a scorer that raises gives NaN, with a "
            "'Scoring failed' warning) and that the estimator fits this data; error_score='raise' raises the first "
            "failure with its traceback."
        )
