"""The benchmark's two splits as the protocol uses them: loaded, limited, and the rows it cannot use set apart."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ._settings import SPLITS


@dataclass
class Split:
    """One split of the benchmark, as the protocol reads it.

    Attributes
    ----------
    name : str
        The loader's split name (``train2014``, ``val2014``, ``train``, ``test``).
    frame : DataFrame
        ``image`` (path), ``text`` (list of str; absent without text) and ``image_id``, one row per image kept.
    target : (n, L) uint8
    dropped : dict
        {reason: number of images set apart}, e.g. images without any text.
    """

    name: str
    frame: pd.DataFrame
    target: np.ndarray
    dropped: dict = field(default_factory=dict)

    @property
    def has_text(self) -> bool:
        return "text" in self.frame.columns

    def drop(self, rows: np.ndarray, reason: str) -> Split:
        """A copy without the boolean-marked ``rows``, counted under ``reason``."""
        rows = np.asarray(rows, dtype=bool)
        if not rows.any():
            return self
        keep = ~rows
        dropped = {**self.dropped, reason: self.dropped.get(reason, 0) + int(rows.sum())}
        return Split(self.name, self.frame[keep].reset_index(drop=True), self.target[keep], dropped)


def load_splits(dataset: str, root, limit: int | None = None) -> tuple[Split, Split, list]:
    """The training and test splits of ``dataset`` ("coco": train2014 / val2014; "vg500": train / test).

    ``limit`` keeps the first ``limit`` images of each split. Images without any text (an image the captions
    file does not mention, a Visual Genome image without regions) are set apart when the split has text at all:
    the text and fused models need a text for every image, and the three models are scored on the same images.
    Returns (train, test, label names).
    """
    from ..datasets import load_coco, load_vg500

    names = SPLITS[dataset]
    splits, target_names = [], None
    for name in names:
        # The loaders' own warnings (images without text, VG500 without its region file) reach the user.
        bunch = load_coco(root, name) if dataset == "coco" else load_vg500(root, name)
        frame, target = bunch.frame, np.asarray(bunch.target, dtype=np.uint8)
        if limit is not None:
            frame, target = frame.iloc[:limit].reset_index(drop=True), target[:limit]
        split = Split(name, frame, target)
        if split.has_text:
            split = split.drop(np.array([len(texts) == 0 for texts in frame["text"]], dtype=bool), "no text")
        if len(split.frame) == 0:
            raise ValueError(f"The {dataset} split {name!r} under {root} has no usable image"
                             f"{' (none has a text)' if split.dropped else ''}.")
        splits.append(split)
        target_names = list(bunch.target_names)
    train, test = splits
    if train.has_text != test.has_text:
        raise ValueError(f"Only one of the {dataset} splits has text ({'train' if train.has_text else 'test'}); "
                         "the protocol needs text for both or neither.")
    return train, test, target_names


def holdout_fold(n: int, fraction: float, seed: int) -> np.ndarray:
    """A ``PredefinedSplit`` test fold: a seeded ``fraction`` of ``n`` rows held out (0), the rest trained on (-1)."""
    n_val = round(n * fraction)
    if n_val < 1 or n_val >= n:
        raise ValueError(f"val_fraction={fraction} of {n} training images holds out {n_val}: the search needs at "
                         "least one image to train on and one to score.")
    fold = np.full(n, -1, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)[:n_val]] = 0
    return fold
