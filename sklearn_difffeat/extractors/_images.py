"""Image inputs: validation, content keys, decoding and resizing, without materialising a dataset.

An image collection is validated as a container up front (shape, dtype, value range of arrays; the type of each
item of a list), keyed by content, and decoded one sample at a time, in DataLoader worker processes or threads
when there are many (see ``_parallel``). Errors name the sample by its position in the whole input (``offset``
is the position of a shard's first sample) and, for a file, by its path; a sample that fails is reported with
the reason alone (``ValueError`` text), and :meth:`ImageSamples.failure` names it.

Keys hash each sample as given, with no decoding or resizing, so that a run whose features are all stored costs
only hashing: a file by its bytes (encoded image bytes in memory, and a Hugging Face ``{"bytes", "path"}`` image
dict, get the key of the file they hold), an array by its dtype, shape and bytes (a row of a stacked array and the
same array in a list are one sample), a PIL image by its mode, size and pixels. The same picture given in two forms
(a file and its pixels, uint8 and float) is two samples: the same model input, each with its own noise draw at
t > 0.
"""

from __future__ import annotations

import binascii
import hashlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from ..sources import lazy_column
from ..store import KEY_LENGTH
from ._decode import decode_error, decode_image
from ._files import ENCODED, content_key, file_key, unwrap_image_dict
from ._inputs import input_position, single_column
from ._parallel import loader_context, ordered_batches, processes_usable

# Bump when decoding or resizing changes: keys of file inputs are hashes of the file bytes, so the namespace
# of cached latents and features must name the preprocessing that turned those bytes into pixels.
PREPROCESSING = "pil-bicubic-centercrop-v2"


class ImageSamples:
    """A validated image collection: ``len``, content keys, and model-ready uint8 pixels on demand.

    ``ready`` is True for a uint8 ``(n, R, R, C)`` array already at the model's resolution and channel count:
    its samples need no decoding, so batches are plain slices.
    """

    def __init__(self, X, resolution: int, channels: int, offset: int = 0):
        self.resolution, self.channels, self.offset = resolution, channels, offset
        X = single_column(X, "images")
        lazy = lazy_column(X)  # a Hugging Face dataset column: read a chunk of rows at a time, never listed whole
        if lazy is not None:
            self.items, self.is_array = lazy, False
        elif isinstance(X, np.ndarray) and X.dtype != object:
            self.items = _check_image_array(X, offset)
            self.is_array = True
        else:
            if hasattr(X, "iloc"):
                X = X.to_numpy()
            if isinstance(X, np.ndarray):
                if X.ndim != 1:
                    raise ValueError(f"An object array of images must be 1-D, got shape {X.shape}.")
                X = X.tolist()
            if isinstance(X, (str, os.PathLike)) or not isinstance(X, (list, tuple)):
                raise ValueError(
                    f"Images must be an array, a list, a pandas Series or DataFrame column; got {type(X).__name__}."
                )
            for i, item in enumerate(X):
                if not isinstance(item, (str, os.PathLike, Image.Image, np.ndarray, *ENCODED, dict)):
                    raise ValueError(f"Image {input_position(offset, i)}: expected a PIL image, an array, a file path "
                                     f"or encoded image bytes, got {type(item).__name__}.")
            self.items = np.empty(len(X), dtype=object)  # an array, not a list: cheap to share with workers
            self.items[:] = list(X) if len(X) else []
            self.is_array = False
        if len(self.items) == 0:
            raise ValueError("No images given (0 samples).")
        self.ready = (self.is_array and self.items.dtype == np.uint8 and self.items.ndim == 4
                      and self.items.shape[1:] == (resolution, resolution, channels))

    def __len__(self):
        return len(self.items)

    def failure(self, position: int, reason: str) -> str:
        """The message for the sample at ``position`` failing for ``reason``: its position in the whole input and,
        for a file, its path."""
        item = None if self.is_array else self.items[position]
        return describe_failure(item, input_position(self.offset, position), reason)

    def keys(self, workers: int, errors: dict | None = None) -> np.ndarray:
        """(n,) ASCII hex content keys, hashed in ``workers`` threads (hashlib releases the GIL).

        A sample that cannot be read raises, or, when an ``errors`` dict is given, is recorded there as
        {position: reason} and gets a key of its own that no content can have.
        """
        n = len(self.items)
        keys = np.empty(n, dtype=f"S{KEY_LENGTH}")
        if self.is_array:
            return self._array_keys(workers)

        def run(start, stop):
            for i in range(start, stop):
                item = self.items[i]
                try:  # hashlib releases the GIL on large buffers: the threads hash in parallel
                    keys[i] = _item_key(item)
                except ValueError as exc:
                    if errors is None:
                        raise ValueError(self.failure(i, str(exc))) from None
                    errors[i] = str(exc)
                    keys[i] = hashlib.sha256(f"unreadable:{i}".encode()).hexdigest()[:KEY_LENGTH].encode()

        _in_threads(run, n, workers)
        return keys

    def _array_keys(self, workers: int) -> np.ndarray:
        """Keys of the rows of a stacked array: the same as :func:`_content_key` of each row, hashed straight
        from one buffer (no per-row array objects), in parallel threads."""
        X = np.ascontiguousarray(self.items)
        n, row_bytes = len(X), X[0].nbytes
        prefix = f"array:{X.dtype.str}:{X.shape[1:]}:".encode()
        flat = memoryview(X).cast("B")
        digests = [b""] * n

        def run(start, stop):
            for i in range(start, stop):
                digest = hashlib.sha256(prefix)
                digest.update(flat[i * row_bytes:(i + 1) * row_bytes])
                digests[i] = digest.digest()

        _in_threads(run, n, workers)
        hexed = binascii.hexlify(b"".join(digests))  # 64 hex characters a row, of which the key keeps the first
        return np.frombuffer(hexed, dtype="S64").astype(f"S{KEY_LENGTH}")

    def pixels(self, positions: np.ndarray) -> torch.Tensor:
        """(B, R, R, C) uint8 for a batch of positions of a ``ready`` array (no decoding)."""
        return torch.from_numpy(self.items[positions])

    def decode(self, position: int, key: bytes | None = None) -> np.ndarray:
        """The sample at ``position`` as model-ready pixels; ``ValueError`` with the reason if it cannot be read.

        A file is decoded from bytes that hash to ``key`` (when given), or not at all."""
        return decode_image(self.items[position], self.resolution, self.channels, key)


def _in_threads(run, n: int, workers: int) -> None:
    """``run(start, stop)`` over ``workers`` contiguous ranges of ``range(n)``, in threads; re-raises the first
    error (which names its sample)."""
    bounds = np.linspace(0, n, min(workers, n) + 1).astype(int) if workers > 1 else np.array([0, n])
    if len(bounds) == 2:
        run(0, n)
        return
    with ThreadPoolExecutor(len(bounds) - 1) as pool:
        for future in [pool.submit(run, a, b) for a, b in itertools.pairwise(bounds)]:
            future.result()


class ImageDataset(torch.utils.data.Dataset):
    """The samples at ``positions`` (with their content ``keys``, if known), decoded in DataLoader workers or
    threads; failures travel back as reasons."""

    def __init__(self, samples: ImageSamples, positions: np.ndarray, keys: np.ndarray | None = None):
        self.samples, self.positions, self.keys = samples, positions, keys

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, i):
        try:
            key = None if self.keys is None else self.keys[i]
            return i, self.samples.decode(int(self.positions[i]), key), None
        except ValueError as exc:
            return i, None, str(exc)


def collate_images(batch):
    """(indices of the good samples, their uint8 pixels, {index: reason} of the bad ones).

    Indices count within the dataset's ``positions``.
    """
    good = [(i, image) for i, image, error in batch if error is None]
    errors = {i: error for i, _, error in batch if error is not None}
    indices = np.array([i for i, _ in good], dtype=np.int64)
    pixels = torch.from_numpy(np.stack([image for _, image in good])) if good else None
    return indices, pixels, errors


def decode_batches(samples: ImageSamples, positions: np.ndarray, batch_size: int, workers: int,
                   pin_memory: bool = False, keys: np.ndarray | None = None):
    """Yield ``(indices, pixels, errors)`` over ``positions``, a batch at a time: the indices (into ``positions``)
    of the samples decoded, their (k, R, R, C) uint8 pixels (None when no sample of the batch could be read), and
    ``{index: reason}`` for the samples that could not be (:meth:`ImageSamples.failure` names them).

    Decoded in this process when ``workers`` is 0 or the samples need no decoding; else in ``workers`` DataLoader
    processes, or ``workers`` threads where processes cannot run (see ``_parallel``). Every path gives the same
    pixels and the same failures. ``keys`` (aligned with ``positions``): files must still hash to them.
    ``pin_memory`` pins the pixels for a fast copy to CUDA.
    """
    dataset = ImageDataset(samples, positions, keys)
    spans = [(start, min(len(positions), start + batch_size)) for start in range(0, len(positions), batch_size)]
    if samples.ready:
        batches = ((np.arange(a, b), samples.pixels(positions[a:b]), {}) for a, b in spans)
    elif workers == 0:
        batches = (collate_images([dataset[i] for i in range(a, b)]) for a, b in spans)
    else:
        loader = None
        if processes_usable(batch_size * samples.resolution ** 2 * samples.channels):
            try:
                loader = iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                                          collate_fn=collate_images, pin_memory=pin_memory,
                                                          prefetch_factor=4, multiprocessing_context=loader_context()))
            except OSError:  # no processes to be had here (fork refused, no shared memory): threads decode
                loader = None
        if loader is not None:
            yield from loader
            return
        batches = map(collate_images, ordered_batches(dataset.__getitem__, len(dataset), batch_size, workers))
    for indices, pixels, errors in batches:
        yield indices, (pixels.pin_memory() if pin_memory and pixels is not None else pixels), errors


def _check_image_array(X: np.ndarray, offset: int = 0) -> np.ndarray:
    """Validate a numeric (n, H, W[, C]) array as a whole; errors name the first offending sample."""
    if X.ndim >= 1 and len(X) == 0:
        raise ValueError("No images given (0 samples).")
    if X.ndim == 3 and X.shape[-1] in (3, 4):
        raise ValueError(
            f"An array of shape {X.shape} looks like one (H, W, C) image; pass a batch of one as X[None]. "
            "(For grayscale images of width 3 or 4, pass shape (n, H, W, 1).)"
        )
    if X.ndim not in (3, 4) or (X.ndim == 4 and X.shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"An image array must have shape (n, H, W) or (n, H, W, C) with C in 1, 3, 4; got shape {X.shape}. "
            "Wrap a single image as X[None]."
        )
    if X.size == 0:
        raise ValueError(f"The image array is empty (shape {X.shape}).")
    flat = X.reshape(len(X), -1)
    if X.dtype == np.uint8:
        return X
    if X.dtype.kind == "f":
        bad = ~np.isfinite(flat).all(axis=1)
        if bad.any():
            raise ValueError(f"Image {input_position(offset, int(np.argmax(bad)))}: contains NaN or infinite values.")
        bad = (flat.min(axis=1) < 0) | (flat.max(axis=1) > 1)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"Image {input_position(offset, i)}: float pixels must lie in [0, 1], found "
                             f"[{flat[i].min():.3g}, {flat[i].max():.3g}].")
        return X
    if X.dtype.kind in "iu":
        bad = (flat.min(axis=1) < 0) | (flat.max(axis=1) > 255)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"Image {input_position(offset, i)}: integer pixels must lie in [0, 255], found "
                             f"[{flat[i].min()}, {flat[i].max()}] (scale 16-bit images to 8 bits, or to floats in "
                             "[0, 1]).")
        return X
    raise ValueError(f"Unsupported image dtype {X.dtype} (use uint8, or float in [0, 1]).")


def _content_key(item) -> bytes:
    """Key of an in-memory image as given: an array's dtype, shape and bytes, or a PIL image's mode, size and
    pixels (the hex digest as ASCII bytes)."""
    if isinstance(item, Image.Image):
        digest = hashlib.sha256(f"pil:{item.mode}:{item.size}:".encode())
        try:  # a lazily opened image reads its file here
            digest.update(item.tobytes())
        except Exception as exc:
            raise ValueError(f"cannot read the PIL image ({decode_error(exc)})") from exc
    else:
        array = np.ascontiguousarray(item)
        digest = hashlib.sha256(f"array:{array.dtype.str}:{array.shape}:".encode())
        if array.size:  # an empty one is keyed by its shape alone; decoding then says what is wrong with it
            digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:KEY_LENGTH].encode("ascii")


def _item_key(item) -> bytes:
    item = unwrap_image_dict(item)
    if isinstance(item, (str, os.PathLike)):
        return file_key(item)
    if isinstance(item, ENCODED):  # the key of a file holding these bytes
        return content_key(bytes(item))
    return _content_key(item)


def describe_failure(item, index: int, reason: str) -> str:
    """``Image <index>: <reason>``, with the path after the index for a file input."""
    if isinstance(item, dict):  # a Hugging Face image dict: named by its path when it has one
        item = item.get("path")
    where = f" ({os.fspath(item)!r})" if isinstance(item, (str, os.PathLike)) else ""
    return f"Image {index}{where}: {reason}"


def load_image(item, index: int, resolution: int, channels: int) -> np.ndarray:
    """One sample as a (resolution, resolution, channels) uint8 array: decoded, resized (shorter side,
    bicubic) and center-cropped. A ``ValueError`` names the sample as input ``index``."""
    try:
        return decode_image(item, resolution, channels)
    except ValueError as exc:
        raise ValueError(describe_failure(item, index, str(exc))) from None


def to_uint8_images(X, resolution: int, channels: int = 3, *, num_workers: int = 0, batch_size: int = 64) -> np.ndarray:
    """``(n, resolution, resolution, channels)`` uint8: exactly the pixels the extractor feeds the model.

    Decoded as ``transform`` decodes them: in ``num_workers`` DataLoader processes (0: in this process), in
    batches of ``batch_size``. The first image that cannot be read raises a ``ValueError`` naming it.
    """
    samples = ImageSamples(X, resolution, channels)
    out = np.empty((len(samples), resolution, resolution, channels), dtype=np.uint8)
    for indices, pixels, errors in decode_batches(samples, np.arange(len(samples)), batch_size, num_workers):
        if errors:
            first = min(errors)
            raise ValueError(samples.failure(first, errors[first]))
        out[indices] = pixels.numpy()
    return out
