"""FusionClassifier: Diff-Feat's fusion head as a scikit-learn classifier trained with skorch.

Each modality's features are (optionally) standardised, projected by their own ``Linear(d_m, projection_dim)``,
the projections are added, and a linear head maps the sum to one logit per label (multi-label, BCE with
logits) or per class (single-label, cross-entropy).

The sklearn estimator owns the parameters; the skorch ``NeuralNet`` is built in ``fit`` and stored as
``net_``. That keeps ``__init__``/``get_params``/``clone``/``GridSearchCV`` plain sklearn, and sidesteps the
skorch classifier classes whose argmax prediction, stratified split and target checks do not fit multi-label
problems.
"""

import numbers
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import DataConversionWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, validate_data
from skorch import NeuralNet
from skorch.callbacks import EarlyStopping
from skorch.dataset import ValidSplit
from torch import nn

__all__ = ["FusionClassifier"]


class FusionModule(nn.Module):
    """Per-modality linear projections, summed, then a linear head.

    ``groups`` is a list of column-index arrays into the concatenated input, one per modality. ``mean`` and
    ``scale`` are per-column statistics of the training set (diffusion features carry a few channels with
    huge magnitudes; standardising keeps them from dominating the projection). Fixed statistics are used
    rather than BatchNorm so that training and inference see the same transform and a batch of one is fine.
    """

    def __init__(self, groups, projection_dim, n_outputs, mean=None, scale=None, dropout=0.0):
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

    def forward(self, X):
        if self.standardize:
            X = (X - self.mean) / self.scale
        fused = 0
        for i, projection in enumerate(self.projections):
            fused = fused + projection(X.index_select(1, getattr(self, f"index_{i}")))
        return self.head(self.dropout(fused))


def _resolve_device(device):
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


class FusionClassifier(ClassifierMixin, BaseEstimator):
    """Diff-Feat fusion classifier: per-modality projections to a common width, added, then a linear head.

    Parameters
    ----------
    modalities : "auto", list of int, or dict
        How the columns of X split into modalities.

        * ``"auto"``: a pandas DataFrame whose columns are named ``<modality>__<feature>`` (the output of
          ``ColumnTransformer(...).set_output(transform="pandas")``) is grouped by the prefix; columns
          without any prefix form one modality; a plain array is one modality; a dict of arrays uses its keys.
        * list of int: consecutive widths, which must add up to the number of features.
        * dict name -> slice, list of column positions, or (for DataFrames) list of column names. Every column
          must belong to exactly one modality.
    projection_dim : int, width of the common space (Diff-Feat: gains plateau at 2048).
    standardize : bool, standardise every feature with the training mean and standard deviation.
    dropout : float, dropout on the fused projection during training.
    lr, weight_decay : AdamW learning rate and decoupled weight decay.
    max_epochs, batch_size : training length and mini-batch size (also used for prediction batches).
    early_stopping : int or None, patience in epochs on the validation loss; the best epoch's weights are
        kept. None trains for ``max_epochs`` on all of the data.
    validation_fraction : float, share of the training data held out for early stopping (an unstratified
        shuffle split, since multi-label targets cannot be stratified this way).
    threshold : float, multi-label ``predict`` is ``predict_proba >= threshold``.
    device : None, "cpu", "cuda", ...; None picks CUDA when available.
    random_state : int, RandomState or None; seeds initialisation, shuffling, dropout and the split.
    verbose : int, skorch's per-epoch log when > 0.

    Attributes
    ----------
    classes_ : multi-label: ``np.arange(n_labels)``; single-label: the sorted unique labels.
    modalities_ : dict name -> array of column positions (in the fitted column order).
    n_features_in_, feature_names_in_ : as in scikit-learn.
    net_ : the fitted ``skorch.NeuralNet``; ``n_epochs_`` epochs were run.
    """

    _parameter_constraints = {
        "modalities": "no_validation",  # checked against X in fit
        "projection_dim": [Interval(numbers.Integral, 1, None, closed="left")],
        "standardize": ["boolean"],
        "dropout": [Interval(numbers.Real, 0, 1, closed="left")],
        "lr": [Interval(numbers.Real, 0, None, closed="neither")],
        "max_epochs": [Interval(numbers.Integral, 1, None, closed="left")],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "weight_decay": [Interval(numbers.Real, 0, None, closed="left")],
        "early_stopping": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "threshold": [Interval(numbers.Real, 0, 1, closed="both")],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        modalities="auto",
        projection_dim=2048,
        standardize=True,
        dropout=0.0,
        lr=1e-4,
        max_epochs=100,
        batch_size=128,
        weight_decay=1e-2,
        early_stopping=10,
        validation_fraction=0.1,
        threshold=0.5,
        device=None,
        random_state=0,
        verbose=0,
    ):
        self.modalities = modalities
        self.projection_dim = projection_dim
        self.standardize = standardize
        self.dropout = dropout
        self.lr = lr
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.threshold = threshold
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ---------------------------------------------------------------------------------------------- inputs

    def _check_dict_X(self, X, reset):
        """Concatenate a dict of 2-D arrays into one float32 array; return it and its groups (fit only)."""
        if len(X) == 0:
            raise ValueError("X is an empty dict; expected one 2-D array per modality.")
        blocks = {}
        for name, value in X.items():
            try:
                blocks[name] = check_array(value, dtype=np.float32, input_name=f"X[{name!r}]")
            except ValueError as exc:
                raise ValueError(f"Modality {name!r}: {exc}") from None
        rows = {name: b.shape[0] for name, b in blocks.items()}
        if len(set(rows.values())) > 1:
            raise ValueError(f"The modalities of X have different numbers of rows: {rows}.")
        if reset:
            groups, start = {}, 0
            for name, b in blocks.items():
                groups[name] = np.arange(start, start + b.shape[1])
                start += b.shape[1]
            return np.hstack(list(blocks.values())), groups
        fitted = self.modalities_
        missing = [m for m in fitted if m not in blocks]
        if missing:
            raise ValueError(
                f"Modality {missing[0]!r} is missing at predict time; X has {list(blocks)}, "
                f"the model was fitted on {list(fitted)}."
            )
        extra = [m for m in blocks if m not in fitted]
        if extra:
            raise ValueError(f"X has modalities {extra} that were not seen at fit time ({list(fitted)}).")
        out = np.empty((rows[next(iter(rows))], self.n_features_in_), dtype=np.float32)
        for name, idx in fitted.items():
            if blocks[name].shape[1] != len(idx):
                raise ValueError(
                    f"Modality {name!r} has {blocks[name].shape[1]} features, but {len(idx)} at fit time."
                )
            out[:, idx] = blocks[name]
        return out, None

    def _check_frame_columns(self, X):
        """Name what differs between a DataFrame's columns and those seen at fit."""
        fitted = list(self.feature_names_in_)
        cols = [str(c) for c in X.columns]
        present = set(cols)
        for name, idx in self.modalities_.items():
            absent = [fitted[i] for i in idx if fitted[i] not in present]
            if len(absent) == len(idx):
                raise ValueError(
                    f"Modality {name!r} is missing at predict time: none of its {len(idx)} columns "
                    f"(e.g. {absent[0]!r}) is in X."
                )
            if absent:
                raise ValueError(f"Modality {name!r} lacks {len(absent)} columns seen at fit, e.g. {absent[0]!r}.")
        extra = [c for c in cols if c not in set(fitted)]
        if extra:
            raise ValueError(f"X has {len(extra)} columns not seen at fit time, e.g. {extra[0]!r}.")
        if cols != fitted:
            pos = next(i for i, (a, b) in enumerate(zip(cols, fitted)) if a != b)
            raise ValueError(
                f"The column order of X differs from fit: column {pos} is {cols[pos]!r}, expected "
                f"{fitted[pos]!r}. Select the columns in the fitted order (X[model.feature_names_in_])."
            )

    def _groups_from_spec(self, n_features, names):
        """Turn the ``modalities`` parameter into dict name -> column positions for a 2-D X."""
        spec = self.modalities
        if isinstance(spec, str):
            if spec != "auto":
                raise ValueError(f"modalities must be 'auto', a list of widths or a dict; got {spec!r}.")
            if names is None or not any("__" in n for n in names):
                return {"X": np.arange(n_features)}
            prefixes = [n.split("__", 1)[0] if "__" in n else None for n in names]
            if None in prefixes:
                bad = names[prefixes.index(None)]
                raise ValueError(
                    f"modalities='auto' groups columns by their '<modality>__' prefix, but column {bad!r} "
                    "has none; pass modalities explicitly."
                )
            groups = {}
            for i, p in enumerate(prefixes):
                groups.setdefault(p, []).append(i)
            return {k: np.asarray(v) for k, v in groups.items()}
        if isinstance(spec, dict):
            groups = {}
            for name, cols in spec.items():
                if isinstance(cols, slice):
                    idx = np.arange(n_features)[cols]
                else:
                    cols = list(np.atleast_1d(cols))
                    if cols and all(isinstance(c, str) for c in cols):
                        if names is None:
                            raise ValueError(f"Modality {name!r} names columns, but X has no column names.")
                        lookup = {n: i for i, n in enumerate(names)}
                        unknown = [c for c in cols if c not in lookup]
                        if unknown:
                            raise ValueError(f"Modality {name!r}: column {unknown[0]!r} is not in X.")
                        cols = [lookup[c] for c in cols]
                    idx = np.asarray(cols, dtype=np.int64)
                    if idx.size and (idx.min() < -n_features or idx.max() >= n_features):
                        raise ValueError(f"Modality {name!r} indexes columns outside 0..{n_features - 1}.")
                    idx = idx % n_features
                if idx.size == 0:
                    raise ValueError(f"Modality {name!r} selects no columns.")
                groups[name] = idx
            counts = np.bincount(np.concatenate(list(groups.values())), minlength=n_features)
            if (counts == 0).any():
                raise ValueError(
                    f"{int((counts == 0).sum())} of the {n_features} columns of X belong to no modality "
                    f"(first: column {int(np.argmax(counts == 0))})."
                )
            if (counts > 1).any():
                raise ValueError(f"Column {int(np.argmax(counts > 1))} belongs to more than one modality.")
            return groups
        if isinstance(spec, (list, tuple)) and all(isinstance(w, numbers.Integral) for w in spec) and spec:
            widths = [int(w) for w in spec]
            if min(widths) < 1:
                raise ValueError(f"Modality widths must be positive; got {widths}.")
            if sum(widths) != n_features:
                raise ValueError(
                    f"modalities widths {widths} add up to {sum(widths)}, but X has {n_features} features."
                )
            bounds = np.cumsum([0, *widths])
            return {f"m{i}": np.arange(bounds[i], bounds[i + 1]) for i in range(len(widths))}
        raise ValueError(
            f"modalities must be 'auto', a non-empty list of widths or a dict name -> columns; got {spec!r}."
        )

    def _prepare_X(self, X, reset):
        """Validate X and return a float32 (n, n_features) array in the fitted column order."""
        if isinstance(X, dict) and not sp.issparse(X):  # scipy's dok_matrix is a dict subclass
            if reset and not (isinstance(self.modalities, str) and self.modalities == "auto"):
                raise ValueError("With a dict X the keys are the modalities; leave modalities='auto'.")
            X_arr, groups = self._check_dict_X(X, reset)
            if reset:
                if hasattr(self, "feature_names_in_"):  # left over from an earlier fit on a DataFrame
                    del self.feature_names_in_
                self.n_features_in_ = X_arr.shape[1]
                self.modalities_ = groups
            return X_arr
        if not reset and isinstance(X, pd.DataFrame) and hasattr(self, "feature_names_in_"):
            self._check_frame_columns(X)
        X_arr = validate_data(self, X, reset=reset, dtype=np.float32, accept_sparse=False)
        if reset:
            names = [str(n) for n in self.feature_names_in_] if hasattr(self, "feature_names_in_") else None
            self.modalities_ = self._groups_from_spec(X_arr.shape[1], names)
        # torch refuses read-only buffers (pandas' copy-on-write hands those out), so copy only then.
        return np.require(X_arr, dtype=np.float32, requirements=["C", "W"])

    def _prepare_y(self, y, n_samples):
        if y is None:
            raise ValueError(
                "FusionClassifier requires y to be passed, but the target y is None "
                "(pass a 0/1 indicator matrix or 1-D class labels)."
            )
        if sp.issparse(y):
            y = y.toarray()
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            # sklearn's convention: a column vector is 1-D labels (one binary label is binary classification).
            warnings.warn(
                "A column-vector y was passed when a 1d array was expected; it is treated as 1-D class labels.",
                DataConversionWarning,
                stacklevel=3,
            )
            y = y.ravel()
        if y.ndim not in (1, 2):
            raise ValueError(f"y must be 1-D class labels or a 2-D 0/1 indicator matrix; got {y.ndim}-D.")
        if y.shape[0] != n_samples:
            raise ValueError(f"X has {n_samples} rows but y has {y.shape[0]}; they must match.")
        if y.dtype.kind in "fc" and not np.all(np.isfinite(y)):
            raise ValueError("y contains NaN or infinity.")
        if y.ndim == 2:
            if y.shape[1] == 0:
                raise ValueError("y has no label columns.")
            values = np.unique(y)
            if not np.all(np.isin(values, [0, 1])):
                raise ValueError(
                    f"A 2-D y must be a 0/1 indicator matrix (multi-label); found values {values[:10].tolist()}."
                )
            self.multilabel_ = True
            self.classes_ = np.arange(y.shape[1])
            return y.astype(np.float32)
        check_classification_targets(y)
        self.multilabel_ = False
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y has a single class ({self.classes_[0]!r}); at least two are needed.")
        return encoded.astype(np.int64)

    # ------------------------------------------------------------------------------------------------- fit

    def fit(self, X, y):
        """Fit on X (DataFrame, array or dict of arrays) and y ((n, L) 0/1 matrix or (n,) labels)."""
        self._validate_params()
        X_arr = self._prepare_X(X, reset=True)
        if X_arr.shape[0] < 2:
            raise ValueError(f"FusionClassifier needs at least 2 samples; got n_samples = {X_arr.shape[0]}.")
        y_t = self._prepare_y(y, X_arr.shape[0])
        self.device_ = _resolve_device(self.device)

        if self.random_state is None:
            seed = None
        elif isinstance(self.random_state, numbers.Integral):
            seed = int(self.random_state)
        else:
            seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

        mean = scale = None
        if self.standardize:
            mean = X_arr.mean(axis=0, dtype=np.float64)
            scale = X_arr.std(axis=0, dtype=np.float64)
            scale[scale < 1e-12] = 1.0  # constant columns: centre only
        n_outputs = len(self.classes_)

        callbacks = []
        train_split = None
        if self.early_stopping is not None:
            # Unstratified: ValidSplit's stratification cannot handle indicator matrices.
            train_split = ValidSplit(self.validation_fraction, stratified=False, random_state=seed)
            callbacks.append(
                ("early_stopping", EarlyStopping(monitor="valid_loss", patience=self.early_stopping, load_best=True))
            )

        net = NeuralNet(
            module=FusionModule,
            module__groups=list(self.modalities_.values()),
            module__projection_dim=self.projection_dim,
            module__n_outputs=n_outputs,
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
            predict_nonlinearity=None,  # the probabilities are computed here, see predict_proba
            device=self.device_,
            verbose=self.verbose,
        )
        # Seed torch's global generators (initialisation, shuffling, dropout) for this fit only.
        devices = list(range(torch.cuda.device_count())) if self.device_.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            net.fit(X_arr, y_t)
        self.net_ = net
        self.n_epochs_ = len(net.history)
        return self

    # --------------------------------------------------------------------------------------------- predict

    def _logits(self, X):
        check_is_fitted(self, "net_")
        X_arr = self._prepare_X(X, reset=False)
        with torch.no_grad():
            return self.net_.forward(X_arr, training=False).numpy().astype(np.float64)

    def decision_function(self, X):
        """Logits: (n, L) multi-label, (n, K) multiclass, (n,) for two classes (score of classes_[1])."""
        logits = self._logits(X)
        if not self.multilabel_ and len(self.classes_) == 2:
            return logits[:, 1] - logits[:, 0]
        return logits

    def predict_proba(self, X):
        """(n, L) independent sigmoid probabilities (multi-label) or (n, K) softmax (single-label)."""
        logits = self._logits(X)
        if self.multilabel_:
            return 1.0 / (1.0 + np.exp(-logits))
        logits -= logits.max(axis=1, keepdims=True)
        proba = np.exp(logits)
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, X):
        """(n, L) 0/1 matrix (multi-label, proba >= threshold) or (n,) original class labels."""
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
