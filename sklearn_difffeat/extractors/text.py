"""TextDiffusionFeatureExtractor: block features of a masked (absorbing-state) diffusion language model."""

from __future__ import annotations

import hashlib
import numbers
import warnings

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions

from ..backbones.text import load_text_backbone, loglinear_sigma
from ._base import BaseDiffusionFeatureExtractor, as_list, pool_tokens, sample_generator, single_column


class TextDiffusionFeatureExtractor(BaseDiffusionFeatureExtractor):
    """Features of a text diffusion Transformer: pooled token states after a block, for text noised to level t.

    Each text is tokenized (over-long texts are truncated, with one warning), a fraction ``t`` of its tokens
    is replaced by the mask token (absorbing-state diffusion; a sigma-conditioned model also receives the
    matching log-linear sigma) and the sequence runs through the Transformer up to the deepest requested
    block, padding ignored by attention and pooling. Nothing is learned in ``fit``.

    Parameters
    ----------
    model : str or text backbone, default="kuleshov-group/mdlm-owt"
        A Hugging Face Hub id, a local folder, ``"embedded:NAME"`` for a model shipped with this package, or
        an already-built backbone (see :func:`sklearn_difffeat.backbones.text.load_text_backbone`). MDLM
        checkpoints run natively (no remote code, no flash-attn); other masked LMs load through
        transformers. Loaded on first use, once per process (clones share it).
    block : int or list of int, default=-1
        ``k`` is the output of the k-th block (from 1), ``0`` the token embedding, negatives count from the
        end. Diff-Feat finds the deepest block best for text.
    timestep : float or list of float, default=0.0
        Noise level in ``[0, 1]``: the probability that each token is masked. ``0`` (the paper's best for
        text) masks nothing; ``1`` masks every token.
    pooling : {"mean", "max", "first"}, default="mean"
        Mean or max over the text's tokens (never padding), or the first token's state.
    max_length : int or None, default=None
        Texts longer than this many tokens (special tokens included) are truncated, with one warning counting
        them. ``None`` uses the model's number of positions (1024 for MDLM-OWT), or no limit if it has none.
    n_noise_draws : int, default=1
        Features are averaged over this many mask draws (only one pass at ``t = 0``).
    random_state : int, default=0
        Seeds the masks together with each text's token ids: a text always gets the same mask, whatever the
        batch, order or device, and the masks of one text are nested across timesteps (what is masked at
        t = 0.2 is also masked at t = 0.5).
    batch_size : int, default=32
        Maximum batch; halved automatically on CUDA out-of-memory.
    device : str, torch.device or None, default=None
        ``None`` picks CUDA when available.
    dtype : {"auto", "float32", "bfloat16", "float16"}, default="auto"
        Autocast precision; "auto" is bfloat16 on CUDA and float32 on CPU. Features are returned as float32.
    cache : str, path-like or None, default=None
        Folder of an on-disk feature cache (see :class:`FeatureCache`), shared across clones, folds and
        processes.
    cache_depth : int or None, default=None
        With a cache, run each pass at least to this block and store every block up to it.
    trust_remote_code : bool, default=False
        Allow models whose code lives in their hub repository (LLaDA, Dream). Never turned on by itself.
    verbose : int, default=0
        Show a progress bar when > 0.

    Attributes
    ----------
    n_features_out_ : int
        Number of output features.
    """

    _feature_prefix = "text"

    _parameter_constraints = {
        **BaseDiffusionFeatureExtractor._parameter_constraints,
        "model": "no_validation",
        "timestep": ["array-like", Interval(numbers.Real, 0, 1, closed="both")],
        "pooling": [StrOptions({"mean", "max", "first"})],
        "max_length": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "trust_remote_code": ["boolean"],
    }

    def __init__(
        self,
        model="kuleshov-group/mdlm-owt",
        *,
        block=-1,
        timestep=0.0,
        pooling="mean",
        max_length=None,
        n_noise_draws=1,
        random_state=0,
        batch_size=32,
        device=None,
        dtype="auto",
        cache=None,
        cache_depth=None,
        trust_remote_code=False,
        verbose=0,
    ):
        self.model = model
        self.block = block
        self.timestep = timestep
        self.pooling = pooling
        self.max_length = max_length
        self.n_noise_draws = n_noise_draws
        self.random_state = random_state
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.cache = cache
        self.cache_depth = cache_depth
        self.trust_remote_code = trust_remote_code
        self.verbose = verbose

    # ---- backbone -------------------------------------------------------------------------------------
    def _backbone_options(self):
        return (bool(self.trust_remote_code),)

    def _load_backbone(self, device):
        backbone = load_text_backbone(self.model, trust_remote_code=self.trust_remote_code)
        backbone.module.to(device)
        return backbone

    def _check_timesteps(self, backbone):
        timesteps = as_list(self.timestep)
        if not timesteps:
            raise ValueError("timestep is an empty list; give at least one noise level in [0, 1].")
        for t in timesteps:
            if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 <= t <= 1:
                raise ValueError(f"timestep={t!r} is not a noise level (mask probability) in [0, 1].")
        if len(set(timesteps)) != len(timesteps):
            raise ValueError(f"timestep lists a level twice: {timesteps}.")
        if backbone.mask_token_id is None and any(t > 0 for t in timesteps):
            raise ValueError("This model's tokenizer has no mask token, so only timestep=0 is possible.")
        return [float(t) for t in timesteps]

    def _feature_width(self, backbone):
        return backbone.width

    def _cache_namespace_parts(self, backbone, timestep):
        # The token ids (the sample fingerprint) already reflect max_length and the tokenizer.
        return (*super()._cache_namespace_parts(backbone, timestep), "tokens-v1")

    # ---- input ----------------------------------------------------------------------------------------
    def _prepare(self, X, backbone):
        texts = _check_texts(X)
        tokenizer = backbone.tokenizer
        limit = self.max_length if self.max_length is not None else backbone.max_length
        if limit is not None and backbone.max_length is not None:
            limit = min(limit, backbone.max_length)
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # silence "sequence longer than the model's maximum": we warn once
        try:
            encoded = tokenizer(texts, add_special_tokens=True, return_special_tokens_mask=True)
            ids, special = encoded["input_ids"], encoded["special_tokens_mask"]
            too_long = [i for i, row in enumerate(ids) if limit is not None and len(row) > limit]
            if too_long:
                # Re-tokenize only those with the tokenizer's own truncation, which keeps its closing tokens.
                cut = tokenizer([texts[i] for i in too_long], add_special_tokens=True, truncation=True,
                                max_length=limit, return_special_tokens_mask=True)
                for j, i in enumerate(too_long):
                    ids[i], special[i] = cut["input_ids"][j], cut["special_tokens_mask"][j]
        finally:
            hf_logging.set_verbosity(level)
        if too_long:
            warnings.warn(
                f"{len(too_long)} of {len(texts)} texts are longer than max_length={limit} tokens and were "
                f"truncated (first: index {too_long[0]}).",
                UserWarning,
                stacklevel=3,
            )
        items, fingerprints = [], []
        for i, (row, spec) in enumerate(zip(ids, special)):
            if not any(s == 0 for s in spec):
                raise ValueError(f"Text {i} ({texts[i][:40]!r}) gives no tokens besides special tokens.")
            row = np.asarray(row, dtype=np.int64)
            items.append((row, np.asarray(spec, dtype=bool)))
            fingerprints.append(hashlib.blake2b(row.tobytes(), digest_size=12).hexdigest())
        return items, fingerprints

    def token_masks(self, X, timestep, draw=0):
        """Which tokens of each text are masked at noise level ``timestep`` (a bool array per text).

        For inspection: these are exactly the masks :meth:`transform` applies (draw ``draw``). Special tokens
        added by the tokenizer (e.g. BERT's [CLS], [SEP]) are never masked.
        """
        backbone = self._backbone()
        items, fingerprints = self._prepare(X, backbone)
        return [self._mask(len(row), spec, fp, float(timestep), draw).numpy() for (row, spec), fp in
                zip(items, fingerprints)]

    def _mask(self, n_tokens, special, fingerprint, timestep, draw):
        # One uniform per token from the text's own generator; the same uniforms serve every timestep, so
        # masks are nested across t. u lies in [0, 1): t = 0 masks nothing, t = 1 every (non-special) token.
        u = torch.rand(n_tokens, generator=sample_generator(self.random_state, fingerprint, draw))
        return (u < timestep) & ~torch.from_numpy(special)

    # ---- computation ----------------------------------------------------------------------------------
    def _batch_features(self, backbone, items, fingerprints, timestep, blocks, state):
        device = next(backbone.module.parameters()).device
        batch, length = len(items), max(len(row) for row, _ in items)
        ids = torch.full((batch, length), backbone.pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        for i, (row, _) in enumerate(items):
            ids[i, : len(row)] = torch.from_numpy(row)
            attention[i, : len(row)] = 1
        attention_dev = attention.to(device)
        sigma = loglinear_sigma(torch.full((batch,), timestep)).to(device) if backbone.time_conditioned else None
        draws = self.n_noise_draws if timestep > 0 else 1  # no noise: every draw would be the same pass
        pooled = {}
        for draw in range(draws):
            noisy = ids.clone()
            if timestep > 0:
                for i, ((row, special), fp) in enumerate(zip(items, fingerprints)):
                    mask = self._mask(len(row), special, fp, timestep, draw)
                    noisy[i, : len(row)][mask] = backbone.mask_token_id
            with torch.inference_mode(), self._autocast(device):
                taps = backbone.hidden_states(noisy.to(device), attention_dev, sigma, blocks)
            for b, hidden in taps.items():
                feature = pool_tokens(hidden, self.pooling, attention_dev)
                pooled[b] = feature if draw == 0 else pooled[b] + feature
        return {b: f / draws for b, f in pooled.items()}


def _check_texts(X) -> list[str]:
    """A list of non-empty strings from a list, array, Series or one-column DataFrame; errors name the index."""
    X = single_column(X, "texts")
    if isinstance(X, str):
        raise ValueError("Expected a list of texts, got a single string; wrap it as [text].")
    if hasattr(X, "iloc"):
        samples = list(X.to_numpy())
    elif isinstance(X, np.ndarray):
        if X.ndim == 2 and X.shape[1] == 1:
            X = X[:, 0]
        if X.ndim != 1:
            raise ValueError(f"Expected a 1-D array of texts, got shape {X.shape}.")
        samples = list(X)
    elif isinstance(X, (list, tuple)):
        samples = list(X)
    else:
        raise ValueError(f"Texts must be a list, array, pandas Series or DataFrame column; got {type(X).__name__}.")
    if not samples:
        raise ValueError("No texts given (0 samples).")
    for i, text in enumerate(samples):
        if not isinstance(text, str):
            what = "missing (None/NaN)" if text is None or (isinstance(text, float) and np.isnan(text)) else (
                f"a {type(text).__name__}, not a string")
            raise ValueError(f"Text {i} is {what}.")
        if not text.strip():
            raise ValueError(f"Text {i} is empty.")
    return [str(t) for t in samples]
