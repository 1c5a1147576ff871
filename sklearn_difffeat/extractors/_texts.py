"""Text inputs: validation, content keys and tokenization.

A text collection is validated as a container up front (a list, array, Series or one-column DataFrame of texts).
Each text is checked when it is keyed: a missing, non-string, empty or invalid (a lone surrogate cannot be UTF-8
encoded) text fails alone, raised or recorded with its reason, as an unreadable image file does. Keys hash the
text's UTF-8 bytes. Messages name a text by its position in the whole input (``offset`` is the position of a
shard's first text).

Tokenization may run in several threads over one tokenizer: the extractors of a process share a loaded backbone,
and so its tokenizer. A fast tokenizer's truncation is a setting of its Rust backend, which the Hugging Face call
sets and then encodes with: two steps, between which another thread may set its own length. So texts are
encoded here by a private copy of the backend for each token budget, configured once and never changed after;
a slow (Python) tokenizer takes truncation as an argument of each call, which is safe as it is.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import weakref

import numpy as np

from ..store import KEY_LENGTH
from ._inputs import input_position, single_column

_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {token budget: backend copy}
_ENCODERS_LOCK = threading.Lock()


class TextSamples:
    """Texts with content keys (a hash of the UTF-8 text); each text is checked when keyed."""

    def __init__(self, X, offset: int = 0):
        self.texts = _text_list(X)
        self.offset = offset

    def __len__(self):
        return len(self.texts)

    def failure(self, position: int, reason: str) -> str:
        """The message for the text at ``position`` failing for ``reason``, named by its position in the input."""
        return f"Text {input_position(self.offset, position)} {reason}"

    def keys(self, workers, errors: dict | None = None) -> np.ndarray:
        """(n,) ASCII hex content keys. A text that is not a valid, non-empty string raises, or, when an ``errors``
        dict is given, is recorded there as {position: reason} and gets a key no text can have."""
        keys = np.empty(len(self.texts), dtype=f"S{KEY_LENGTH}")
        for i, text in enumerate(self.texts):
            try:
                keys[i] = hashlib.sha256(b"text:" + _utf8(text)).hexdigest()[:KEY_LENGTH].encode()
            except ValueError as exc:
                if errors is None:
                    raise ValueError(self.failure(i, str(exc))) from None
                errors[i] = str(exc)
                keys[i] = hashlib.sha256(f"unreadable-text:{i}".encode()).hexdigest()[:KEY_LENGTH].encode()
        return keys


def _utf8(text) -> bytes:
    """The UTF-8 bytes of a valid text; ``ValueError`` with the reason (completing "Text <i> ...") otherwise."""
    if not isinstance(text, str):
        missing = text is None or (isinstance(text, float) and np.isnan(text)) or type(text).__name__ == "NAType"
        raise ValueError("is missing (None/NaN)." if missing else f"is a {type(text).__name__}, not a string.")
    if not text.strip():
        raise ValueError("is empty.")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid Unicode: it holds a lone surrogate ({text[exc.start]!r}) at character "
                         f"{exc.start}, which has no UTF-8 encoding.") from None


def _text_list(X) -> list:
    """The items of a list, array, Series or one-column DataFrame of texts (checked one by one when keyed)."""
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
    return [str(t) if isinstance(t, str) else t for t in samples]  # numpy's str_ as plain str


def tokenize(tokenizer, texts, limit, pad_id):
    """Token ids of a batch of texts, padded with ``pad_id``: ``(ids, special, lengths, truncated)``.

    Texts longer than ``limit`` tokens (None: no limit) are cut by the tokenizer's own truncation, which keeps
    closing special tokens; ``truncated`` marks them. Safe to call from several threads with different limits (see
    the module docstring). Padding is built with array operations, not per text.
    """
    encoder = _encoder(tokenizer, limit)
    if encoder is not None:
        encodings = encoder.encode_batch(list(texts), add_special_tokens=True)
        ids, special = [e.ids for e in encodings], [e.special_tokens_mask for e in encodings]
        truncated = np.fromiter((len(e.overflowing) > 0 for e in encodings), dtype=bool, count=len(encodings))
    else:
        options = dict(truncation=True, max_length=limit) if limit is not None else {}
        encoded = tokenizer(list(texts), add_special_tokens=True, return_special_tokens_mask=True, **options)
        ids, special = encoded["input_ids"], encoded["special_tokens_mask"]
        truncated = np.zeros(len(ids), dtype=bool)
        if limit is not None:  # a slow tokenizer keeps nothing of what it cut: look one token further
            full = [i for i in range(len(ids)) if len(ids[i]) == limit]
            longer = tokenizer([texts[i] for i in full], add_special_tokens=True, truncation=True,
                               max_length=limit + 1)["input_ids"] if full else []
            truncated[[i for i, more in zip(full, longer) if len(more) > limit]] = True
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    width = int(lengths.max())
    real = np.arange(width)[None, :] < lengths[:, None]
    padded = np.full((len(ids), width), pad_id, dtype=np.int64)
    padded[real] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    flags = np.zeros((len(ids), width), dtype=bool)
    flags[real] = np.fromiter(itertools.chain.from_iterable(special), dtype=bool, count=int(lengths.sum()))
    return padded, flags, lengths, truncated


def _encoder(tokenizer, limit):
    """This module's own copy of a fast tokenizer's Rust backend, truncating at ``limit`` tokens (None: never),
    without padding; None for a slow tokenizer. Built once per (tokenizer, limit), then only read."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    with _ENCODERS_LOCK:
        encoders = _ENCODERS.setdefault(tokenizer, {})
        if limit not in encoders:
            from tokenizers import Tokenizer

            encoder = Tokenizer.from_str(backend.to_str())
            encoder.no_padding()
            if limit is None:
                encoder.no_truncation()
            else:  # what the Hugging Face call sets for truncation=True, max_length=limit
                encoder.enable_truncation(limit, stride=0, strategy="longest_first",
                                          direction=getattr(tokenizer, "truncation_side", "right"))
            encoder.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
            encoders[limit] = encoder
        return encoders[limit]
