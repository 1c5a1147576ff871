"""skorch callbacks of the fusion head."""

from __future__ import annotations

import math

import torch
from skorch import NeuralNet
from skorch.callbacks import Callback

__all__ = ["StopOnNonFiniteLoss"]

_CAUSES = (
    "The learning rate (lr={lr:g}) is likely too high for this data; lower it. Features of extreme magnitude "
    "fed with standardize=False are the other usual cause."
)


class StopOnNonFiniteLoss(Callback):
    """Raise ``FloatingPointError`` when training diverges, instead of leaving a model that predicts NaN.

    Checks every training batch's loss (already read as a float by skorch, so the check is free) and, at the
    end of training, the weights (the last optimizer step comes after the last loss). The message names the
    epoch and batch, the learning rate and the usual causes.
    """

    def on_batch_end(self, net: NeuralNet, batch=None, training: bool = False, **kwargs) -> None:
        if not training:
            return
        loss = net.history[-1, "batches", -1, "train_loss"]
        if not math.isfinite(loss):
            epoch, n_batch = len(net.history), len(net.history[-1, "batches"])
            raise FloatingPointError(
                f"The training loss became {loss} at epoch {epoch}, batch {n_batch}. " + _CAUSES.format(lr=net.lr)
            )

    def on_train_end(self, net: NeuralNet, **kwargs) -> None:
        if not all(torch.isfinite(p).all() for p in net.module_.parameters()):
            raise FloatingPointError(
                f"The weights became non-finite in the last step of training (epoch {len(net.history)}). "
                + _CAUSES.format(lr=net.lr)
            )
