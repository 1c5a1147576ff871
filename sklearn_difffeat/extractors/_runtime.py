"""Process-wide state and settings shared by every extractor: loaded backbones, open stores, devices, workers.

Loaded backbones are cached per process, so clones made by GridSearchCV, or ``set_params`` between fits, reuse
the weights instead of reading them again; open stores are cached so that their loaded segment indexes and
memory maps serve every transform. Both caches are guarded by locks: extractors may run in several threads
(joblib's threading backend, a Dask worker with threads), and two threads asking for the same model load it once.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict

import torch

from .._cores import usable_cores
from ..store import FeatureStore

# Small, because each entry may hold GBs of weights.
_MAX_BACKBONES = 2
_BACKBONES: OrderedDict = OrderedDict()  # key -> (keepalive, backbone), least recently used first
_LOADING: dict = {}  # key -> lock held by the thread loading that key
_BACKBONES_LOCK = threading.Lock()  # guards _BACKBONES and _LOADING, never held during a load
_STORES: dict = {}
_STORES_LOCK = threading.Lock()


def cached_backbone(key, load, keepalive=None):
    """Return the backbone stored under ``key``, loading it with ``load()`` on a miss (LRU of 2).

    Threads that ask for the same key while it loads wait for that load instead of starting their own; loads of
    different keys run side by side. ``keepalive`` is held with the entry: when a key contains ``id(obj)``,
    holding ``obj`` stops Python from reusing that id for another object while the entry exists.
    """
    with _BACKBONES_LOCK:
        if key in _BACKBONES:
            _BACKBONES.move_to_end(key)
            return _BACKBONES[key][1]
        loading = _LOADING.setdefault(key, threading.Lock())
    with loading:
        with _BACKBONES_LOCK:
            if key in _BACKBONES:  # another thread loaded it while this one waited
                _BACKBONES.move_to_end(key)
                return _BACKBONES[key][1]
        try:
            backbone = load()
            with _BACKBONES_LOCK:
                _BACKBONES[key] = (keepalive, backbone)
                while len(_BACKBONES) > _MAX_BACKBONES:
                    _BACKBONES.popitem(last=False)
        finally:
            with _BACKBONES_LOCK:
                if _LOADING.get(key) is loading:
                    del _LOADING[key]
    return backbone


def clear_backbone_cache() -> None:
    """Drop every loaded backbone of this process (frees their memory; the next use reloads them).

    Extractors share loaded weights across clones and ``set_params``; call this to free them, or to make the
    next transform load the model afresh, as a new process would.
    """
    with _BACKBONES_LOCK:
        _BACKBONES.clear()


def open_store(directory) -> FeatureStore:
    """The process's :class:`~sklearn_difffeat.FeatureStore` for ``directory`` (opened once, then shared)."""
    path = os.path.abspath(os.fspath(directory))
    with _STORES_LOCK:
        if path not in _STORES:
            _STORES[path] = FeatureStore(path)
        return _STORES[path]


def clear_store_cache() -> None:
    """Forget the open stores: the next use opens each store afresh and reads its indexes again."""
    with _STORES_LOCK:
        _STORES.clear()


def prefetch(iterator, depth: int):
    """Run ``iterator`` in a background thread, ``depth`` items ahead; re-raise its errors here."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                items.put(item)
            items.put(done)
        except BaseException as exc:  # handed to the consumer, which raises it
            items.put(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def default_workers() -> int:
    """All cores but one (the one that drives the device), at most 16."""
    return max(1, min(16, usable_cores() - 1))


def resolve_device(device, model_device: torch.device | None = None) -> torch.device:
    """``device`` as a torch.device; None means the given modules' device, else CUDA when available."""
    if device is None:
        if model_device is not None:
            return model_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device={device!r} is not a device torch knows ({exc}).") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={str(device)!r} was requested, but PyTorch sees no CUDA device "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False). Use device=None "
                             "(CUDA when available, else CPU) or device='cpu'.")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device={str(device)!r} was requested, but only {count} CUDA device(s) are visible.")
    return device


def resolve_dtype(dtype, device: torch.device, model_dtype: torch.dtype | None = None) -> torch.dtype:
    """``"auto"``: the given modules' dtype, else bfloat16 on CUDA and float32 elsewhere."""
    if dtype == "auto":
        if model_dtype is not None:
            return model_dtype
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
