"""Where model weights come from: embedded names, local folders, Hugging Face Hub ids.

Every backbone goes through :func:`resolve_model_dir`, so hub models, local folders and the models shipped
inside this package load through one code path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"


def embedded_models() -> list[str]:
    """Names accepted as ``model="embedded:NAME"``."""
    if not EMBEDDED_DIR.is_dir():
        return []
    return sorted(p.name for p in EMBEDDED_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def resolve_model_dir(model: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """Return a local folder holding ``model``'s files.

    ``model`` is ``"embedded:NAME"`` (a model shipped in this package), an existing local folder, or a Hugging
    Face Hub id (``"owner/name"``), which is downloaded (only the files matching ``allow_patterns``) into the
    Hugging Face cache. Downloading is the only network access in the library and happens only here.
    """
    text = os.fspath(model)
    if text.startswith(EMBEDDED_PREFIX):
        name = text[len(EMBEDDED_PREFIX):]
        folder = EMBEDDED_DIR / name
        if not name or not folder.is_dir():
            raise ValueError(f"Unknown embedded model {name!r}; available: {embedded_models()}.")
        return folder
    folder = Path(text).expanduser()
    if folder.is_dir():
        return folder
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and " " not in text
    if not looks_like_hub_id:
        raise ValueError(f"Model folder {text!r} does not exist, and it is not a Hugging Face Hub id (owner/name).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=allow_patterns))
    except Exception as exc:  # network, auth, missing repo: say what to do instead
        raise OSError(
            f"Could not fetch {text!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). Offline, pass a "
            f"local folder in the same layout, or an embedded model ({embedded_models()})."
        ) from exc


def module_fingerprint(*modules) -> str:
    """A short content hash of the modules' weights (names, shapes, dtypes and a strided sample of values).

    Cheap even for billion-parameter models, and stable across processes and machines, so it keys the on-disk
    feature cache: a different checkpoint never reuses another checkpoint's features.
    """
    digest = hashlib.blake2b(digest_size=10)
    for module in modules:
        if module is None:
            digest.update(b"<none>")
            continue
        digest.update(type(module).__name__.encode())
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            sample = flat[::step].to("cpu", dtype=_float_like(tensor))
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _float_like(tensor):
    import torch

    return torch.float64 if tensor.is_floating_point() else torch.int64
