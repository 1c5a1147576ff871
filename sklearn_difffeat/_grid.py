"""Grids of ordered parameter axes: checking them, finding a value on an axis, and the neighbours of a point.

A point of the grid is a tuple of positions, one per axis; two points are neighbours when they differ by one
position along a single axis.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any


def index_of(values: Sequence[Any], value: Any) -> int | None:
    """Position of the first of `values` equal to `value`, or None.

    Equality tolerates values whose `==` is not a plain bool (arrays, estimators): those only match themselves.
    """
    for i, v in enumerate(values):
        if v is value:
            return i
        try:
            if bool(v == value):
                return i
        except (TypeError, ValueError):
            continue
    return None


def check_axes(param_grid: Mapping[str, Iterable[Any]]) -> list[tuple[str, list[Any]]]:
    """Return [(name, values)] in the given order, with clear errors naming the faulty axis."""
    if not isinstance(param_grid, Mapping) or len(param_grid) == 0:
        raise ValueError("param_grid must be a non-empty dict mapping parameter names to ordered values.")
    axes = []
    for name, values in param_grid.items():
        if not isinstance(name, str):
            raise ValueError(f"param_grid keys must be parameter names (str), got {name!r}.")
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
            raise ValueError(
                f"param_grid[{name!r}] must be an ordered sequence of values (list, tuple, range, 1-D array), "
                f"got {type(values).__name__}."
            )
        values = list(values)
        if not values:
            raise ValueError(f"param_grid[{name!r}] is empty: each axis needs at least one value.")
        for i, v in enumerate(values):
            j = index_of(values[:i], v)
            if j is not None:
                raise ValueError(f"param_grid[{name!r}] has the duplicate value {v!r} (positions {j} and {i}).")
        axes.append((name, values))
    return axes


def neighbours(point: tuple[int, ...], sizes: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """The points one step down, then one step up, along each axis in turn (axes of `sizes` values each)."""
    for k, size in enumerate(sizes):
        for i in (point[k] - 1, point[k] + 1):
            if 0 <= i < size:
                yield (*point[:k], i, *point[k + 1 :])
