"""Where model weights come from: embedded names, local folders, Hugging Face Hub ids.

Every backbone goes through :func:`resolve_model_dir`, so hub models, local folders and the models shipped
inside this package load through one code path.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
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


# What module_fingerprint hashes, versioned: records that map a model to its fingerprint (the store's identity
# registry) name the version they were made with, so a change here never serves a stale fingerprint.
FINGERPRINT_VERSION = 2  # 1: a strided sample of each tensor; 2: every byte of every tensor


def module_fingerprint(*modules) -> str:
    """A short content hash of the modules' weights: every tensor's name, shape, dtype and all of its bytes.

    The bytes are the weights as loaded, before any cast (the dtype is part of the hash). It is stable across
    processes and machines and keys the on-disk feature cache, so it must see every weight: two checkpoints that
    differ in a single element never share stored features. Each tensor's bytes get their own BLAKE2b digest
    (tensors are hashed on ``torch.get_num_threads()`` threads: hashlib releases the GIL), and the digest of the
    names, shapes, dtypes and those digests is the fingerprint. It reads a model once per load, at about 1 GB/s
    per core (``benchmarks/bench_fingerprint.py``: 2.3 s for DiT-XL/2's 3 GB of float32 weights on one core).
    """
    return module_fingerprints(modules)[0]


def module_fingerprints(*groups) -> list[str]:
    """:func:`module_fingerprint` of each group (a sequence of modules, None allowed); a module that stands in
    several groups (the VAE in a DiT backbone's model and encoder fingerprints) has its bytes hashed once."""
    import torch

    distinct = {id(m): m for group in groups for m in group if m is not None}
    tensors = []
    entries = {}  # id(module) -> [(header, index of its tensor in `tensors`, or None)], in hashing order
    for key, module in distinct.items():
        entries[key] = [(type(module).__name__.encode(), None)]
        for name, t in sorted(module.state_dict().items()):
            entries[key].append((f"{name}:{tuple(t.shape)}:{t.dtype}".encode(), len(tensors)))
            tensors.append(t)
    workers = max(1, min(torch.get_num_threads(), len(tensors)))
    if workers == 1:
        leaves = [_bytes_digest(t) for t in tensors]
    else:
        with ThreadPoolExecutor(workers) as pool:
            leaves = list(pool.map(_bytes_digest, tensors))
    fingerprints = []
    for group in groups:
        digest = hashlib.blake2b(digest_size=10)
        for module in group:
            for header, leaf in [(b"<none>", None)] if module is None else entries[id(module)]:
                digest.update(header)
                if leaf is not None:
                    digest.update(leaves[leaf])
        fingerprints.append(digest.hexdigest())
    return fingerprints


_CHUNK_BYTES = 64 << 20  # an accelerator's tensor is copied to the CPU this much at a time


def _bytes_digest(tensor) -> bytes:
    """The BLAKE2b digest of ``tensor``'s raw bytes (native dtype and byte order, row-major)."""
    import torch

    digest = hashlib.blake2b(digest_size=32)
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.device.type == "cpu":
        digest.update(raw.numpy())  # read in place
    else:
        for start in range(0, raw.numel(), _CHUNK_BYTES):
            digest.update(raw[start : start + _CHUNK_BYTES].cpu().numpy())
    return digest.digest()
