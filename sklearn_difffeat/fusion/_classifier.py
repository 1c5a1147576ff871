"""FusionClassifier: Diff-Feat's fusion head as a scikit-learn classifier trained with skorch."""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from numpy.typing import ArrayLike
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data
from skorch import NeuralNet
from skorch.callbacks import EarlyStopping, LRScheduler
from skorch.dataset import ValidSplit
from torch import nn

from .._sklearn_compat import Interval, StrOptions
from ._callbacks import StopOnNonFiniteLoss
from ._modalities import check_frame_columns, is_modality_dict, resolve_modalities, stack_modality_dict
from ._module import FusionModule
from ._targets import encode_targets

__all__ = ["FusionClassifier"]

#: What the fit and predict methods take as X: a table, or one array per modality.
FusionInput = ArrayLike | pd.DataFrame | Mapping[str, ArrayLike]


class FusionClassifier(ClassifierMixin, BaseEstimator):
    """Diff-Feat fusion head: per-modality projections to a common width, added, then a linear head.

    Each modality's features are standardised, projected by their own ``Linear(d_m, projection_dim)``, the
    projections are added (:meth:`fuse`), and a linear head maps the sum to one logit per label (multi-label:
    binary cross-entropy) or per class (1-D labels: cross-entropy). Training is AdamW, by default with a cosine
    learning-rate decay over ``max_epochs``, run by skorch; the skorch net is built in ``fit`` and kept as ``net_``.
    A diverging fit raises ``FloatingPointError`` instead of leaving a model that predicts NaN.

    Parameters
    ----------
    modalities : "auto", list of int or dict, default="auto"
        How the columns of X split into modalities.

        * ``"auto"``: a DataFrame whose columns are named ``<modality>__<feature>`` (the output of
          ``ColumnTransformer(...).set_output(transform="pandas")``) is grouped by the prefix; unprefixed columns
          or a plain array form one modality; a dict of arrays (or ``skorch.helper.SliceDict``) uses its keys.
        * list of int: consecutive widths, which must add up to the number of features.
        * dict name -> slice, list of column positions or (DataFrames) list of column names; every column must
          belong to exactly one modality.
    projection_dim : int, default=2048
        Width of the common space. Diff-Feat reports gains up to 2048, where they plateau.
    standardize : bool, default=True
        Standardise every feature with its training mean and standard deviation before the projections.
        Diffusion features carry a few channels of huge magnitude that would otherwise dominate.
    dropout : float, default=0.0
        Dropout probability on the fused vector during training.
    lr : float, default=3e-3
        AdamW learning rate (the peak of the cosine schedule).
    lr_schedule : {"cosine", "constant"}, default="cosine"
        "cosine" decays the learning rate from ``lr`` towards zero along a half cosine over ``max_epochs``, so
        the last epochs make small steps and the weights settle; "constant" keeps ``lr`` throughout.
    weight_decay : float, default=1.0
        AdamW's decoupled weight decay, on every weight and bias: each step shrinks the weights by the factor
        ``1 - lr * weight_decay`` (at the scheduled lr), which keeps the wide projections from fitting noise in
        small or noisy data sets. Values up to ``1 / lr`` are meaningful.
    max_epochs : int, default=100
        Passes over the training data (fewer when early stopping ends training); the length of the cosine.
    batch_size : int, default=256
        Training mini-batch size; also the batch of prediction.
    early_stopping : int or None, default=None
        An int ``k`` holds out ``validation_fraction`` of the rows, stops when the validation loss has not
        improved for ``k`` epochs, and keeps the best epoch's weights. None trains on all rows for
        ``max_epochs``. Off by default: under the cosine schedule the validation loss improves mostly while the
        learning rate anneals, and it bottoms out before the ranking (mAP) does, so stopping on it ends training
        early (see docs/fusion_and_metrics.md).
    validation_fraction : float, default=0.1
        Share of the rows held out for early stopping (an unstratified shuffle split: indicator matrices cannot
        be stratified this way).
    threshold : float, default=0.5
        Multi-label ``predict`` is ``predict_proba >= threshold``.
    device : str, torch.device or None, default=None
        ``None`` picks CUDA when available.
    random_state : int, RandomState instance or None, default=0
        Seeds the initialisation, the shuffling, dropout and the validation split. Torch's global random state
        is restored after ``fit``.
    verbose : int, default=0
        skorch's per-epoch log when > 0.

    Attributes
    ----------
    classes_ : ndarray
        Multi-label: ``np.arange(n_labels)``. Single-label: the sorted unique labels.
    multilabel_ : bool
        Whether y was an indicator matrix.
    modalities_ : dict of str -> ndarray of int
        Column positions of each modality (in the fitted column order).
    n_features_in_ : int
        Number of features seen in ``fit``.
    feature_names_in_ : ndarray of str
        Column names seen in ``fit``, when X was a DataFrame.
    net_ : skorch.NeuralNet
        The fitted net; ``net_.module_`` is the :class:`FusionModule`.
    n_epochs_ : int
        Epochs run.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_difffeat import FusionClassifier
    >>> rng = np.random.default_rng(0)
    >>> X, Y = rng.normal(size=(200, 12)), rng.integers(0, 2, size=(200, 3))
    >>> clf = FusionClassifier(modalities=[8, 4], projection_dim=16, max_epochs=5).fit(X, Y)
    >>> clf.predict_proba(X).shape, clf.fuse(X).shape
    ((200, 3), (200, 16))
    """

    _parameter_constraints = {
        "modalities": "no_validation",  # checked against X in fit
        "projection_dim": [Interval(numbers.Integral, 1, None, closed="left")],
        "standardize": ["boolean"],
        "dropout": [Interval(numbers.Real, 0, 1, closed="left")],
        "lr": [Interval(numbers.Real, 0, None, closed="neither")],
        "lr_schedule": [StrOptions({"cosine", "constant"})],
        "weight_decay": [Interval(numbers.Real, 0, None, closed="left")],
        "max_epochs": [Interval(numbers.Integral, 1, None, closed="left")],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "early_stopping": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "threshold": [Interval(numbers.Real, 0, 1, closed="both")],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        modalities: str | list[int] | dict = "auto",
        projection_dim: int = 2048,
        standardize: bool = True,
        dropout: float = 0.0,
        lr: float = 3e-3,
        lr_schedule: str = "cosine",
        weight_decay: float = 1.0,
        max_epochs: int = 100,
        batch_size: int = 256,
        early_stopping: int | None = None,
        validation_fraction: float = 0.1,
        threshold: float = 0.5,
        device: str | torch.device | None = None,
        random_state: int | np.random.RandomState | None = 0,
        verbose: int = 0,
    ) -> None:
        self.modalities = modalities
        self.projection_dim = projection_dim
        self.standardize = standardize
        self.dropout = dropout
        self.lr = lr
        self.lr_schedule = lr_schedule
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.threshold = threshold
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _validate_X(self, X, reset):
        """X as a float32 (n, n_features) array in the fitted column order; sets the input attributes in fit."""
        if is_modality_dict(X):
            if reset and not (isinstance(self.modalities, str) and self.modalities == "auto"):
                raise ValueError("With a dict X the keys are the modalities; leave modalities='auto'.")
            X_arr, groups = stack_modality_dict(X, fitted=None if reset else self.modalities_)
            if reset:
                if hasattr(self, "feature_names_in_"):  # left over from an earlier fit on a DataFrame
                    del self.feature_names_in_
                self.n_features_in_, self.modalities_ = X_arr.shape[1], groups
            return X_arr
        if not reset and isinstance(X, pd.DataFrame) and hasattr(self, "feature_names_in_"):
            check_frame_columns(X.columns, self.feature_names_in_, self.modalities_)
        X_arr = validate_data(self, X, reset=reset, dtype=np.float32, accept_sparse=False)
        if reset:
            names = getattr(self, "feature_names_in_", None)
            names = None if names is None else [str(n) for n in names]
            self.modalities_ = resolve_modalities(self.modalities, X_arr.shape[1], names)
        # torch refuses read-only buffers (pandas' copy-on-write hands those out), so copy only then.
        return np.require(X_arr, dtype=np.float32, requirements=["C", "W"])

    def fit(self, X: FusionInput, y: ArrayLike) -> FusionClassifier:
        """Fit the head.

        Parameters
        ----------
        X : DataFrame, array-like of shape (n_samples, n_features) or dict of str -> array-like
            Features of all modalities (see ``modalities``). NaN and infinite values are rejected.
        y : array-like of shape (n_samples, n_labels) or (n_samples,)
            A 0/1 indicator matrix (multi-label) or class labels. Constant label columns get a warning.

        Returns
        -------
        self : FusionClassifier

        Raises
        ------
        FloatingPointError
            If the training loss becomes NaN or infinite (naming the epoch and batch).
        """
        self._validate_params()
        X_arr = self._validate_X(X, reset=True)
        if X_arr.shape[0] < 2:
            raise ValueError(f"FusionClassifier needs at least 2 samples; got n_samples = {X_arr.shape[0]}.")
        y_enc, self.classes_, self.multilabel_ = encode_targets(y, X_arr.shape[0])
        device = self.device if self.device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        seed = self.random_state
        if seed is not None and not isinstance(seed, numbers.Integral):
            seed = int(check_random_state(seed).randint(np.iinfo(np.int32).max))

        mean = scale = None
        if self.standardize:
            scaler = StandardScaler().fit(X_arr.astype(np.float64))  # scale_ is 1 for constant columns
            mean, scale = scaler.mean_, scaler.scale_
        callbacks = [("stop_on_non_finite_loss", StopOnNonFiniteLoss())]
        if self.lr_schedule == "cosine":
            schedule = LRScheduler(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=self.max_epochs)
            callbacks.append(("lr_schedule", schedule))
        train_split = None
        if self.early_stopping is not None:
            train_split = ValidSplit(self.validation_fraction, stratified=False, random_state=seed)
            callbacks.append(("early_stopping", EarlyStopping(patience=self.early_stopping, load_best=True)))
        net = NeuralNet(
            module=FusionModule,
            module__groups=list(self.modalities_.values()),
            module__projection_dim=self.projection_dim,
            module__n_outputs=len(self.classes_),
            module__mean=mean,
            module__scale=scale,
            module__dropout=self.dropout,
            criterion=nn.BCEWithLogitsLoss if self.multilabel_ else nn.CrossEntropyLoss,
            optimizer=torch.optim.AdamW,
            optimizer__weight_decay=self.weight_decay,
            lr=self.lr,
            max_epochs=self.max_epochs,
            batch_size=self.batch_size,
            iterator_train__shuffle=True,
            train_split=train_split,
            callbacks=callbacks,
            predict_nonlinearity=None,  # probabilities are computed here, see predict_proba
            device=str(device),
            verbose=self.verbose,
        )
        # Seed torch's global generators (initialisation, shuffling, dropout) for this fit only.
        cuda_devices = list(range(torch.cuda.device_count())) if str(device).startswith("cuda") else []
        with torch.random.fork_rng(devices=cuda_devices):
            if seed is not None:
                torch.manual_seed(seed)
            net.fit(X_arr, y_enc)
        self.net_, self.n_epochs_ = net, len(net.history)
        return self

    def fuse(self, X: FusionInput) -> np.ndarray:
        """The fused representation: the sum of the modalities' projections of the standardised features.

        This is the input of the linear head (before dropout, which acts in training only).

        Parameters
        ----------
        X : DataFrame, array-like of shape (n_samples, n_features) or dict of str -> array-like
            As in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples, projection_dim), float32
        """
        check_is_fitted(self, "net_")
        X_arr = self._validate_X(X, reset=False)
        module = self.net_.module_.eval()
        with torch.no_grad():
            parts = [
                module.fuse(torch.from_numpy(X_arr[i : i + self.batch_size]).to(self.net_.device)).cpu().numpy()
                for i in range(0, X_arr.shape[0], self.batch_size)
            ]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _logits(self, X):
        check_is_fitted(self, "net_")
        X_arr = self._validate_X(X, reset=False)
        with torch.no_grad():
            return self.net_.forward(X_arr, training=False).cpu().numpy().astype(np.float64)

    def decision_function(self, X: FusionInput) -> np.ndarray:
        """Logits: (n, L) multi-label, (n, K) multiclass, (n,) for two classes (the score of ``classes_[1]``)."""
        logits = self._logits(X)
        if not self.multilabel_ and len(self.classes_) == 2:
            return logits[:, 1] - logits[:, 0]
        return logits

    def predict_proba(self, X: FusionInput) -> np.ndarray:
        """(n, L) independent sigmoid probabilities (multi-label) or (n, K) softmax (single-label)."""
        logits = self._logits(X)
        return expit(logits) if self.multilabel_ else softmax(logits, axis=1)

    def predict(self, X: FusionInput) -> np.ndarray:
        """(n, L) 0/1 matrix (multi-label, ``predict_proba >= threshold``) or (n,) original class labels."""
        proba = self.predict_proba(X)
        if self.multilabel_:
            return (proba >= self.threshold).astype(np.int64)
        return self.classes_[np.argmax(proba, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        tags.input_tags.dict = True
        tags.input_tags.allow_nan = False
        return tags
