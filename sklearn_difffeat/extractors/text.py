"""TextDiffusionFeatureExtractor: block features of a masked (absorbing-state) diffusion language model."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch

from .._sklearn_compat import Interval, StrOptions
from ..backbones.text import is_text_backbone, load_text_backbone, loglinear_sigma
from ._base import BaseDiffusionFeatureExtractor
from ._engine import Batch, BatchResult, TimestepFeatures, pool_tokens
from ._inputs import as_list, input_position
from ._multitext import TEXT_POOLINGS, text_lists, transform_lists
from ._noise import key_words, sample_seeds, uniforms
from ._runtime import prefetch
from ._texts import TextSamples, tokenize


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
    text_pooling : {"mean", "first", "join"}, default="mean"
        For a sample that is a list of texts (an image's captions): the mean of its texts' features, its first
        text's, or the feature of its texts joined with a space. Each text is computed and stored on its own
        (see docs/text.md). Plain string samples are not affected.
    max_length : int or None, default=None
        Texts longer than this many tokens (special tokens included) are truncated, with one warning counting
        them. ``None`` uses the model's number of positions (1024 for MDLM-OWT), or no limit if it has none.
    n_noise_draws : int, default=1
        Features are averaged over this many mask draws (only one pass at ``t = 0``).
    random_state : int, default=0
        Seeds the masks together with each text's content: a text always gets the same mask, whatever the
        batch, order or device, and the masks of one text are nested across timesteps (what is masked at
        t = 0.2 is also masked at t = 0.5).
    batch_size : int, default=32
        Maximum batch; halved automatically on CUDA out-of-memory. Texts are batched by length, so batches carry
        little padding (and none when their texts tokenize to the same length).
    num_workers : int or None, default=None
        0 tokenizes in the calling thread between batches; any other value tokenizes in a background thread
        two batches ahead of the device (the tokenizer itself uses all cores). ``None``: background.
    device : str, torch.device or None, default=None
        ``None`` picks CUDA when available, or the device of a backbone passed as ``model``. A backbone passed
        as ``model`` is moved to an explicit ``device`` in place.
    dtype : {"auto", "float32", "bfloat16", "float16"}, default="auto"
        Precision the weights are cast to (once, at load): "auto" is bfloat16 on CUDA and float32 on CPU (or
        the dtype of a backbone passed as ``model``). Features are returned as float32.
    cache : str, path-like or None, default=None
        Folder of a :class:`~sklearn_difffeat.FeatureStore`, shared across clones, folds, processes and
        machines; texts are keyed by their content.
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
    n_blocks_ : int
        Number of Transformer blocks of the model.
    feature_width_ : int
        Width of one pooled (block, timestep) feature.
    """

    _feature_prefix = "text"

    _parameter_constraints = {
        **BaseDiffusionFeatureExtractor._parameter_constraints,
        "model": "no_validation",
        "timestep": ["array-like", Interval(numbers.Real, 0, 1, closed="both")],
        "pooling": [StrOptions({"mean", "max", "first"})],
        "text_pooling": [StrOptions(set(TEXT_POOLINGS))],
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
        text_pooling="mean",
        max_length=None,
        n_noise_draws=1,
        random_state=0,
        batch_size=32,
        num_workers=None,
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
        self.text_pooling = text_pooling
        self.max_length = max_length
        self.n_noise_draws = n_noise_draws
        self.random_state = random_state
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        self.dtype = dtype
        self.cache = cache
        self.cache_depth = cache_depth
        self.trust_remote_code = trust_remote_code
        self.verbose = verbose

    # ---- backbone -------------------------------------------------------------------------------------
    def _backbone_options(self):
        return (bool(self.trust_remote_code),)

    def _in_memory_modules(self):
        if not is_text_backbone(self.model):
            raise TypeError(f"model must be a path, a hub id, 'embedded:NAME' or a text backbone, got "
                            f"{type(self.model).__name__}.")
        return self.model.modules

    def _load_backbone(self, device, dtype):
        return load_text_backbone(self.model, trust_remote_code=self.trust_remote_code).to(device, dtype)

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

    def _limit(self, backbone):
        """Token budget per text (special tokens included): max_length, capped by the model's positions."""
        limits = [v for v in (self.max_length, backbone.max_length) if v is not None]
        return min(limits) if limits else None

    def _namespace_description(self, backbone, timestep):
        # Keys hash the raw text: the tokenizer (in the model fingerprint) and the token budget decide the ids.
        return {**super()._namespace_description(backbone, timestep), "max_length": self._limit(backbone),
                "input": "text-v2"}

    # ---- input ----------------------------------------------------------------------------------------
    def transform_with_report(self, X, **options):
        """As :meth:`BaseDiffusionFeatureExtractor.transform_with_report`; a sample may also be a list of texts,
        pooled by ``text_pooling`` (see docs/text.md)."""
        samples = text_lists(X)
        if samples is None:
            return super().transform_with_report(X, **options)
        return transform_lists(self, samples, **options)

    def _samples(self, X, backbone, offset):
        return TextSamples(X, offset)

    def _batches(self, run, samples, backbone, todo):
        """Length-bucketed batches (texts of similar length together), tokenized ahead of the device."""
        lengths = np.fromiter((len(samples.texts[p]) for p in run.first[todo]), dtype=np.int64, count=len(todo))
        order = todo[np.argsort(lengths, kind="stable")]
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        limit = self._limit(backbone)
        truncated = [0, None]  # count, first input position

        def tokenized():
            for rows in chunks:
                texts = [samples.texts[p] for p in run.first[rows]]
                ids, special, lengths, cut = tokenize(backbone.tokenizer, texts, limit, backbone.pad_token_id)
                if cut.any():
                    truncated[0] += int(cut.sum())
                    first = input_position(samples.offset, int(run.first[rows][cut].min()))
                    truncated[1] = first if truncated[1] is None else min(truncated[1], first)
                # A text with nothing but special tokens fails alone: it is left out of its batch.
                keep = (~special & (np.arange(ids.shape[1]) < lengths[:, None])).any(axis=1)
                for i in np.flatnonzero(~keep):
                    run.fail(int(rows[i]), f"({texts[i][:40]!r}) gives no tokens besides special tokens.")
                if keep.any():
                    width = int(lengths[keep].max())
                    arrays = (ids[keep, :width], special[keep, :width], lengths[keep])
                    yield Batch(rows[keep], tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))

        source = tokenized() if self.num_workers == 0 else prefetch(tokenized(), depth=2)
        yield from source
        if truncated[0]:
            warnings.warn(
                f"{truncated[0]} of {len(todo)} texts are longer than max_length={limit} tokens and were "
                f"truncated (first: index {truncated[1]}).", UserWarning, stacklevel=4,
            )

    def token_masks(self, X, timestep, draw=0):
        """Which tokens of each text are masked at noise level ``timestep`` (a bool array per text).

        For inspection: these are exactly the masks :meth:`transform` applies (draw ``draw``). Special tokens
        added by the tokenizer (e.g. BERT's [CLS], [SEP]) are never masked.
        """
        backbone = self._backbone()
        samples = TextSamples(X)
        words = key_words(samples.keys(1))  # raises for a text that is not a valid, non-empty string
        _, special, lengths, _ = tokenize(backbone.tokenizer, samples.texts, self._limit(backbone),
                                          backbone.pad_token_id)
        masked = self._masks(torch.from_numpy(special), torch.from_numpy(lengths), words, float(timestep), draw)
        return [row[:n].numpy() for row, n in zip(masked, lengths)]

    def _masks(self, special, lengths, words, timestep, draw):
        # One uniform per (text, position) from the text's key: the same uniforms serve every timestep, so
        # masks are nested across t. u lies in [0, 1): t = 0 masks nothing, t = 1 every (non-special) token.
        u = uniforms(sample_seeds(words, self.random_state, draw), special.shape[1])
        real = torch.arange(special.shape[1], device=special.device)[None, :] < lengths[:, None]
        return (u < timestep) & real & ~special

    # ---- computation ----------------------------------------------------------------------------------
    def _compute(self, run, backbone, batch, plan):
        ids, special, lengths = (t.to(run.device, non_blocking=True) for t in batch.payload)
        tokens = (ids, special, lengths, batch.payload[2])
        words = run.seed_words(batch.rows, run.device)
        need = run.missing[batch.rows]
        result = BatchResult()
        for ti, t in plan:
            local = np.flatnonzero(need[:, ti])
            result.features[ti] = self._features_at(run, backbone, tokens, words, local, t)
        return result

    def _features_at(self, run, backbone, tokens, words, local, t) -> TimestepFeatures:
        """Pooled features of the batch rows ``local`` at noise level ``t``, averaged over the mask draws."""
        device = run.device
        ids, special, lengths, lengths_host = tokens
        index = torch.from_numpy(local).to(device)

        def one_pass(part):
            rows = index[part]
            width = int(lengths_host[local[part]].max())  # no padding beyond this chunk's longest text
            chunk_ids, chunk_special, chunk_lengths = ids[rows, :width], special[rows, :width], lengths[rows]
            uniform = bool((lengths_host[local[part]] == width).all())
            attention = None if uniform else (
                torch.arange(width, device=device)[None, :] < chunk_lengths[:, None]).long()
            sigma = (loglinear_sigma(torch.full((len(rows),), t)).to(device)
                     if backbone.time_conditioned else None)
            draws = self.n_noise_draws if t > 0 else 1  # no noise: every draw would be the same pass
            pooled = {}
            for draw in range(draws):
                noisy = chunk_ids
                if t > 0:
                    masked = self._masks(chunk_special, chunk_lengths, words[rows], t, draw)
                    noisy = chunk_ids.masked_fill(masked, backbone.mask_token_id)
                taps = backbone.hidden_states(noisy, attention, sigma, run.computed_blocks)
                for b, hidden in taps.items():
                    feature = pool_tokens(hidden, self.pooling, attention)
                    pooled[b] = feature if b not in pooled else pooled[b] + feature
            return {b: f / draws for b, f in pooled.items()}

        parts = run.in_chunks(len(local), one_pass)
        return TimestepFeatures(local, {b: torch.cat([p[b] for p in parts]) for b in run.computed_blocks})
