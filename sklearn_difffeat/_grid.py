"""Grids of ordered parameter axes: checking them and finding a value on an axis."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, ValuesView
from collections.abc import Set as AbstractSet
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
        values = _axis_values(name, values)
        if not values:
            raise ValueError(f"param_grid[{name!r}] is empty: each axis needs at least one value.")
        for i, v in enumerate(values):
            j = index_of(values[:i], v)
            if j is not None:
                raise ValueError(f"param_grid[{name!r}] has the duplicate value {v!r} (positions {j} and {i}).")
        axes.append((name, values))
    return axes


def _axis_values(name: str, values: Any) -> list[Any]:
    """The values of axis `name` as a list, refusing what has no order or is not one axis."""
    expected = "an ordered sequence of values (list, tuple, range, 1-D array)"
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise ValueError(f"param_grid[{name!r}] must be {expected}, got {type(values).__name__}.")
    if isinstance(values, (AbstractSet, ValuesView)):
        # A set's iteration order is arbitrary (it can change with the hash seed), and the climb's neighbours are
        # adjacent positions: give the order explicitly.
        raise ValueError(
            f"param_grid[{name!r}] is a {type(values).__name__}, which has no order; the search moves between "
            f"adjacent values, so it needs {expected}, e.g. sorted(...)."
        )
    ndim = getattr(values, "ndim", 1)
    if ndim != 1:
        raise ValueError(
            f"param_grid[{name!r}] is a {ndim}-D array of shape {tuple(values.shape)}; an axis must be {expected}."
        )
    return list(values)


def grid_point(axes: list[tuple[str, list[Any]]], choices: list[tuple[str, Mapping[str, Any]]]) -> tuple[int, ...]:
    """The point (a position per axis) with the values chosen by `choices`, a list of (source, {name: value}) in
    which later sources override earlier ones; axes no source names get their middle value, `values[len // 2]`.

    An error names the source and the axis when a name is not an axis or a value is not on its axis.
    """
    names = [name for name, _ in axes]
    point = [len(values) // 2 for _, values in axes]
    for source, chosen in choices:
        for name, value in chosen.items():
            if name not in names:
                raise ValueError(f"{source} names {name!r}, which is not an axis of param_grid; axes: {names}.")
            k = names.index(name)
            i = index_of(axes[k][1], value)
            if i is None:
                raise ValueError(f"{source}[{name!r}]={value!r} is not among param_grid[{name!r}]={axes[k][1]!r}.")
            point[k] = i
    return tuple(point)
