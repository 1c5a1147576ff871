"""The source protocol, in-memory sequences as a source, and the helpers every source shares."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class ShardInputs(NamedTuple):
    """One shard read into memory.

    ``items`` are what an extractor's ``transform`` takes (image bytes, HF image dicts, paths, arrays or texts),
    ``None`` where the source itself could not produce a sample; ``ids`` name every input for people (a path,
    ``shard.tar/key``, ``table.parquet#row``, a row index); ``failed`` maps positions in the shard to the reason a
    sample could not be read.
    """

    items: Any
    ids: list
    failed: dict


class Shard:
    """A shard descriptor: small, picklable, and enough to read its samples anywhere (a Dask worker reads its own
    shard). ``start`` is the position of its first input in the whole input, ``size`` its number of inputs."""

    start: int
    size: int

    def read(self) -> ShardInputs:
        raise NotImplementedError

    def ids(self) -> list:
        """The shard's input ids, in shard order (``read().ids`` without the samples where a source can)."""
        return self.read().ids


class Source:
    """Inputs that split themselves into shards.

    A source has a length and ``shards(shard_size)``: descriptors of consecutive runs of at most ``shard_size``
    inputs, in input order, each read on its own with ``shard.read()``. ``modality`` is ``"images"`` or
    ``"texts"`` when the source yields only one kind, None when its items are whatever the extractor takes.
    """

    modality: str | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def shards(self, shard_size: int) -> list:
        raise NotImplementedError


@dataclass
class SequenceShard(Shard):
    """A slice of an in-memory sequence; it carries its items (a Dask task then ships them)."""

    start: int
    size: int
    items: Any
    modality: str | None = None

    def read(self) -> ShardInputs:
        # Items are passed as given: the extractor checks each one and lists those it cannot read.
        return ShardInputs(self.items, self.ids(), {})

    def ids(self) -> list:
        values = self.items.to_numpy() if hasattr(self.items, "iloc") else self.items
        paths = self.modality != "texts"
        return [os.fspath(item) if paths and isinstance(item, (str, os.PathLike)) else str(self.start + i)
                for i, item in enumerate(values)]


class SequenceSource(Source):
    """A list, tuple, array or pandas Series of samples. Ids are the paths of path items, else the positions.

    ``modality="texts"`` says strings are texts (ids are then positions).
    """

    def __init__(self, inputs, modality: str | None = None):
        if isinstance(inputs, (str, os.PathLike, bytes)) or not hasattr(inputs, "__len__"):
            raise ValueError(f"inputs must be a sequence of samples (a list, array or Series) or a source; got "
                             f"{type(inputs).__name__}.")
        if hasattr(inputs, "iloc") and getattr(inputs, "ndim", 1) == 2 and inputs.shape[1] == 1:
            inputs = inputs.iloc[:, 0]  # a one-column DataFrame (as a ColumnTransformer passes it): its column
        self.inputs, self.modality = inputs, modality

    def __len__(self) -> int:
        return len(self.inputs)

    def shards(self, shard_size: int) -> list:
        n = len(self.inputs)
        return [SequenceShard(start, min(n, start + shard_size) - start,
                              _slice(self.inputs, start, min(n, start + shard_size)), self.modality)
                for start in range(0, n, shard_size)]


def _slice(inputs, start, stop):
    if hasattr(inputs, "iloc"):
        return inputs.iloc[start:stop]
    return inputs[start:stop]


def as_source(inputs, modality: str | None = None) -> Source:
    """``inputs`` as a :class:`Source`: a source as it is, a Hugging Face dataset column as a
    :class:`HuggingFaceSource`, any other sequence as a :class:`SequenceSource`."""
    if isinstance(inputs, Source):
        return inputs
    if type(inputs).__module__.split(".")[0] == "datasets":
        from ._hf import HuggingFaceSource

        return HuggingFaceSource(inputs, modality=modality)
    return SequenceSource(inputs, modality)


def text_problem(value) -> str | None:
    """Why ``value`` is not a usable text, or None. A list of texts (a sample of several texts) is the text
    extractor's to check, item by item."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return None
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "missing text (None/NaN)"
    if not isinstance(value, str):
        return f"a {type(value).__name__}, not a text"
    if not value.strip():
        return "empty text"
    return None


def row_problems(values, modality: str) -> dict:
    """``{position: reason}`` for the rows of a table or dataset column that cannot be a sample: a text that is
    not usable (:func:`text_problem`), or an image that is null (None, or an image struct with neither bytes
    nor path)."""
    problems = {}
    for i, value in enumerate(values):
        if modality == "texts":
            problem = text_problem(value)
        elif value is None or (isinstance(value, dict) and value.get("bytes") is None and value.get("path") is None):
            problem = "no image (a null value)"
        else:
            problem = None
        if problem:
            problems[i] = problem
    return problems


def resolve_files(spec, suffix: str, what: str) -> list[str]:
    """Files named by ``spec``: a file, a brace pattern (``shards/{00000..00099}.tar``), a folder (its ``suffix``
    files, sorted, searched recursively) or a list of files. Every file must exist."""
    if isinstance(spec, (list, tuple)):
        files = [os.fspath(f) for f in spec]
    elif "{" in os.fspath(spec):
        from braceexpand import braceexpand

        files = list(braceexpand(os.fspath(spec)))
    elif Path(spec).is_dir():
        files = sorted(os.fspath(p) for p in Path(spec).rglob(f"*{suffix}") if p.is_file())
        if not files:
            raise ValueError(f"{os.fspath(spec)} holds no {suffix} {what}.")
    else:
        files = [os.fspath(spec)]
    if not files:
        raise ValueError(f"No {what} given.")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{what.capitalize()} not found: {missing[0]}{more}.")
    return files
