"""Decoding one image: encoded bytes, a file, a PIL image or an array to model-ready uint8 pixels.

Files are read once (regular files only, see ``_files``) and decoded from those bytes, so that the pixels come
from the very content the key was hashed from. Encoded bytes in memory decode as the file holding them. High
bit-depth images are brought to 8 bits by their true range; the image is then resized (shorter side, bicubic) and
center-cropped. Errors are ``ValueError`` s whose text is the reason alone: the caller names the input.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from ._files import ENCODED, content_key, read_file, unwrap_image_dict


def decode_image(item, resolution: int, channels: int, key: bytes | None = None) -> np.ndarray:
    """One sample as a (resolution, resolution, channels) uint8 array; ``ValueError`` with the reason alone.

    A file is read once, checked against its content ``key`` when one is given (so that features are stored under
    the key of the bytes they came from), and decoded from those bytes. Encoded bytes decode as the file holding
    them."""
    item = unwrap_image_dict(item)
    if isinstance(item, ENCODED):
        what = f"the {len(item)} image bytes given"
        return _finish(_open_encoded(bytes(item), resolution, channels, what), resolution, channels)
    if isinstance(item, (str, os.PathLike)):
        data = read_file(item)
        if key is not None and content_key(data) != key:
            raise ValueError("cannot read file: its content changed after it was hashed (rewritten during the run?)")
        image = _open_encoded(data, resolution, channels)
    elif isinstance(item, Image.Image):
        try:
            image = _to_8bit(item)
            image.load()
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"cannot read the PIL image ({decode_error(exc)})") from exc
    else:
        array = _array_to_uint8(np.asarray(item))
        if array.shape[:2] == (resolution, resolution) and channels == 3 and array.ndim == 3 and array.shape[2] == 3:
            return np.ascontiguousarray(array)  # already model-ready: skip PIL
        image = Image.fromarray(array)
    return _finish(image, resolution, channels)


def _finish(image: Image.Image, resolution: int, channels: int) -> np.ndarray:
    image = image.convert("RGB" if channels == 3 else "L")
    array = np.asarray(_resize_center_crop(image, resolution), dtype=np.uint8)
    return array if channels == 3 else array[..., None]


def _open_encoded(data: bytes, resolution: int, channels: int, what: str = "file") -> Image.Image:
    """Decode an encoded image (PNG, JPEG, ...) held in memory, at 8 bits."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.format == "JPEG":
                # Decode at the smallest 1/2, 1/4 or 1/8 scale that still covers the target: much faster for large
                # photos, and the bicubic resize does the rest.
                opened.draft("RGB" if channels == 3 else "L", (resolution, resolution))
            image = _to_8bit(opened)
            image.load()
            return image
    except ValueError:
        raise
    except Exception as exc:  # Pillow raises many kinds: unidentified, truncated, decompression bomb ...
        raise ValueError(f"cannot read {what} as an image ({decode_error(exc)})") from exc


def decode_error(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):  # its text names the in-memory buffer, which says nothing
        return "not an image format Pillow knows"
    return f"{type(exc).__name__}: {exc}"


def _to_8bit(image: Image.Image) -> Image.Image:
    """Bring high-bit-depth modes to 8 bits by their true range instead of letting convert() clip them."""
    if image.mode.startswith("I;16"):  # 16-bit grayscale (PNG, TIFF): 0..65535 -> 0..255
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.round(values / 257.0).astype(np.uint8))
    if image.mode == "F":  # 32-bit float: accepted when it is a [0, 1] image, like float arrays
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise ValueError(f"a floating-point image (mode F) must hold values in [0, 1]; found "
                             f"[{np.nanmin(values):.3g}, {np.nanmax(values):.3g}]. Scale it to [0, 1] or to 8 bits.")
        return Image.fromarray(np.round(values * 255).astype(np.uint8))
    if image.mode in ("I", "I;32"):
        raise ValueError(f"32-bit integer images (mode {image.mode}) have no defined value range; convert them to "
                         "8 bits, or to a float array in [0, 1].")
    return image


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"expected shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}.")
    if array.size == 0:
        raise ValueError(f"empty array of shape {array.shape}.")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError("contains NaN or infinite values.")
        if array.min() < 0 or array.max() > 1:
            raise ValueError(f"float pixels must lie in [0, 1], found [{array.min():.3g}, {array.max():.3g}].")
        return np.round(array * 255).astype(np.uint8)
    if array.dtype.kind in "iu":
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"integer pixels must lie in [0, 255], found [{array.min()}, {array.max()}].")
        return array.astype(np.uint8)
    raise ValueError(f"unsupported dtype {array.dtype} (use uint8, or float in [0, 1]).")


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    if image.size == (size, size):
        return image
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))
