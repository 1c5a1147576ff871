"""The torch module of the fusion head: Diff-Feat's per-modality projections, their sum, and a linear head."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

__all__ = ["FusionModule"]


class FusionModule(nn.Module):
    """Standardise, project each modality to a common width, add the projections, apply a linear head.

    ``forward(X) = head(dropout(fuse(X)))`` with ``fuse(X) = sum_m projection_m(standardised X[:, groups[m]])``.

    Parameters
    ----------
    groups : list of array-like of int
        Column positions of each modality in X, one entry per modality.
    projection_dim : int
        Width of the common space.
    n_outputs : int
        Number of logits (labels or classes).
    mean, scale : array-like of shape (n_features,) or None, default=None
        Per-column training statistics; X is standardised as ``(X - mean) / scale`` inside the module, so that
        training and inference apply the same fixed transform (unlike BatchNorm, a batch of one is fine).
        None for no standardisation.
    dropout : float, default=0.0
        Dropout probability on the fused vector during training.
    """

    def __init__(
        self,
        groups: Sequence[ArrayLike],
        projection_dim: int,
        n_outputs: int,
        mean: ArrayLike | None = None,
        scale: ArrayLike | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self._n_groups = len(groups)
        for i, idx in enumerate(groups):
            self.register_buffer(f"index_{i}", torch.as_tensor(np.asarray(idx), dtype=torch.long))
        self.projections = nn.ModuleList(nn.Linear(len(idx), projection_dim) for idx in groups)
        self.standardize = mean is not None
        if self.standardize:
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(projection_dim, n_outputs)

    def fuse(self, X: torch.Tensor) -> torch.Tensor:
        """The fused representation ``(n, projection_dim)``: the sum of the modalities' projections."""
        if self.standardize:
            X = (X - self.mean) / self.scale
        fused = 0
        for i, projection in enumerate(self.projections):
            fused = fused + projection(X.index_select(1, getattr(self, f"index_{i}")))
        return fused

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.fuse(X)))
