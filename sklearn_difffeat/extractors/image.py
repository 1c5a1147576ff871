"""DiTFeatureExtractor: intermediate DiT block features at chosen diffusion timesteps."""

from __future__ import annotations

import hashlib
import numbers
import os

import numpy as np
import torch
from PIL import Image
from sklearn.utils._param_validation import Interval, StrOptions

from ..backbones.dit import load_dit_backbone
from ..cache import FeatureCache, stable_hash
from ._base import BaseDiffusionFeatureExtractor, as_list, pool_tokens, sample_generator, single_column

DEFAULT_TIMESTEP = 100  # a middle-low DDPM step; see the class docstring for why


class DiTFeatureExtractor(BaseDiffusionFeatureExtractor):
    """Features of a pre-trained DiT: pooled token states after a block, for a noised input at a timestep.

    Each image is resized (shorter side) and center-cropped to the model's resolution, scaled to [-1, 1],
    encoded by the VAE (posterior mean times the scaling factor; pixel-space models skip this), noised to step
    ``t`` with the scheduler's ``add_noise`` and passed through the Transformer up to the deepest requested
    block. Nothing is learned in ``fit``.

    Parameters
    ----------
    model : str, dict or DiTBackbone, default="facebook/DiT-XL-2-256"
        A Hugging Face Hub id, a local folder in the diffusers pipeline layout (``transformer/``,
        ``scheduler/`` and, for latent models, ``vae/``), ``"embedded:NAME"`` for a model shipped with this
        package, or already-built modules as ``{"transformer": ..., "scheduler": ..., "vae": ...}``. Loaded on
        first use, once per process (clones share it).
    block : int or list of int, default=12
        ``k`` is the output of the k-th Transformer block (from 1), ``0`` the patch embedding (with position)
        that enters block 1, negatives count from the end (``-1`` = last block). The paper's best is 12 of 28.
    timestep : int or list of int, default=100
        DDPM step in ``[0, T-1]`` (T = 1000 for DiT). The paper finds a middle timestep best; linear probes of
        DiT-XL/2 peak around t = 80-120 on small images (DDAE), so the default is 100. Search it per dataset
        with :class:`BlockTimestepSearchCV`.
    class_label : int or None, default=None
        ``None`` feeds the null (classifier-free) class; an int feeds that class (ImageNet index for DiT-XL/2).
    pooling : {"mean", "max", "none"}, default="mean"
        "mean" / "max" over the tokens give ``width`` features per (block, timestep) (1152 for DiT-XL/2);
        "none" flattens all tokens: ``n_tokens * width`` (256 * 1152 = 294,912 for DiT-XL/2-256).
    n_noise_draws : int, default=1
        Features are averaged over this many noise draws.
    random_state : int, default=0
        Seeds the noise together with each image's content, so an image always gets the same noise, whatever
        the batch, order or device, and the same noise at every timestep.
    batch_size : int, default=64
        Maximum batch; halved automatically on CUDA out-of-memory.
    device : str, torch.device or None, default=None
        ``None`` picks CUDA when available.
    dtype : {"auto", "float32", "bfloat16", "float16"}, default="auto"
        Autocast precision; "auto" is bfloat16 on CUDA and float32 on CPU. Features are returned as float32.
    compile : bool, default=False
        ``torch.compile`` the Transformer blocks (worth it for large extractions on GPU).
    cache : str, path-like or None, default=None
        Folder of an on-disk cache for latents and features (see :class:`FeatureCache`), shared across clones,
        folds and processes.
    cache_depth : int or None, default=None
        With a cache, run each pass at least to this block and store every block up to it, so that later
        requests for other blocks at the same timestep need no new pass (useful for searches).
    verbose : int, default=0
        Show a progress bar when > 0.

    Attributes
    ----------
    n_features_out_ : int
        Number of output features.
    """

    _feature_prefix = "dit"

    _parameter_constraints = {
        **BaseDiffusionFeatureExtractor._parameter_constraints,
        "model": "no_validation",
        "timestep": ["array-like", Interval(numbers.Integral, 0, None, closed="left")],
        "class_label": [Interval(numbers.Integral, 0, None, closed="left"), None],
        "pooling": [StrOptions({"mean", "max", "none"})],
        "compile": ["boolean"],
    }

    def __init__(
        self,
        model="facebook/DiT-XL-2-256",
        *,
        block=12,
        timestep=DEFAULT_TIMESTEP,
        class_label=None,
        pooling="mean",
        n_noise_draws=1,
        random_state=0,
        batch_size=64,
        device=None,
        dtype="auto",
        compile=False,
        cache=None,
        cache_depth=None,
        verbose=0,
    ):
        self.model = model
        self.block = block
        self.timestep = timestep
        self.class_label = class_label
        self.pooling = pooling
        self.n_noise_draws = n_noise_draws
        self.random_state = random_state
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.compile = compile
        self.cache = cache
        self.cache_depth = cache_depth
        self.verbose = verbose

    # ---- backbone -------------------------------------------------------------------------------------
    def _backbone_options(self):
        return (bool(self.compile),)

    def _load_backbone(self, device):
        backbone = load_dit_backbone(self.model).to(device)
        return backbone.compile() if self.compile else backbone

    def _check_timesteps(self, backbone):
        timesteps = as_list(self.timestep)
        if not timesteps:
            raise ValueError("timestep is an empty list; give at least one DDPM step.")
        last = backbone.num_train_timesteps - 1
        for t in timesteps:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t <= last:
                raise ValueError(f"timestep={t!r} is not an integer DDPM step in [0, {last}] for this model.")
        if len(set(timesteps)) != len(timesteps):
            raise ValueError(f"timestep lists a step twice: {timesteps}.")
        return [int(t) for t in timesteps]

    def _check_model_params(self, backbone):
        if self.class_label is not None and self.class_label > backbone.null_class:
            raise ValueError(
                f"class_label={self.class_label} is out of range for this model: 0..{backbone.null_class - 1} are "
                f"classes, {backbone.null_class} (or None) is the null class."
            )

    def _feature_width(self, backbone):
        return backbone.width * (backbone.num_tokens if self.pooling == "none" else 1)

    def _cache_namespace_parts(self, backbone, timestep):
        label = backbone.null_class if self.class_label is None else self.class_label
        return (*super()._cache_namespace_parts(backbone, timestep), label)

    # ---- input ----------------------------------------------------------------------------------------
    def _prepare(self, X, backbone):
        images = to_uint8_images(X, backbone.resolution, backbone.image_channels)
        fingerprints = [hashlib.blake2b(image.tobytes(), digest_size=12).hexdigest() for image in images]
        return images, fingerprints

    # ---- computation ----------------------------------------------------------------------------------
    def _batch_features(self, backbone, items, fingerprints, timestep, blocks, state):
        device = backbone.transformer.device
        x0 = self._clean_inputs(backbone, items, fingerprints, state).to(device)
        batch = len(items)
        label = backbone.null_class if self.class_label is None else self.class_label
        labels = torch.full((batch,), label, dtype=torch.long, device=device)
        steps = torch.full((batch,), timestep, dtype=torch.long, device=device)
        pooled = {}
        for draw in range(self.n_noise_draws):
            noise = torch.stack(
                [
                    torch.randn(backbone.latent_shape, generator=sample_generator(self.random_state, fp, draw))
                    for fp in fingerprints
                ]
            ).to(device)
            x_t = backbone.add_noise(x0, noise, steps)
            with torch.inference_mode(), self._autocast(device):
                taps = backbone.hidden_states(x_t, steps, labels, blocks)
            for b, hidden in taps.items():
                feature = pool_tokens(hidden, self.pooling)
                pooled[b] = feature if draw == 0 else pooled[b] + feature
        return {b: f / self.n_noise_draws for b, f in pooled.items()}

    def _clean_inputs(self, backbone, items, fingerprints, state):
        """x0 for a batch: latents encoded once per image per call, and once ever with a cache."""
        latents = state.setdefault("latents", {})
        missing = [i for i, fp in enumerate(fingerprints) if fp not in latents]
        if missing:
            cache = FeatureCache(self.cache) if self.cache is not None else None
            namespace = stable_hash(backbone.encoder_fingerprint, "latents", backbone.resolution)
            to_encode = []
            for i in missing:
                stored = cache.load(namespace, fingerprints[i]) if cache is not None else None
                if stored is not None:
                    latents[fingerprints[i]] = torch.from_numpy(stored["latent"])
                else:
                    to_encode.append(i)
            if to_encode:
                device = backbone.transformer.device
                pixels = torch.from_numpy(np.stack([items[i] for i in to_encode])).to(device)
                # uint8 travels to the device (4x less than float) and is normalised there.
                pixels = pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
                with torch.inference_mode(), self._autocast(device):
                    encoded = backbone.encode(pixels).float().cpu()
                for row, i in enumerate(to_encode):
                    latents[fingerprints[i]] = encoded[row].clone()
                    if cache is not None:
                        cache.store(namespace, fingerprints[i], {"latent": encoded[row].numpy()})
        return torch.stack([latents[fp] for fp in fingerprints])


def to_uint8_images(X, resolution: int, channels: int = 3) -> list[np.ndarray]:
    """Validate images and bring each to a (resolution, resolution, channels) uint8 array.

    Accepts a (n, H, W[, C]) array (uint8, or float in [0, 1]), or a list / pandas Series / one-column
    DataFrame of PIL images, arrays or file paths. Shorter side resized (bicubic) to ``resolution``, then
    center-cropped. Float images are quantised to 8 bits. Errors name the offending sample.
    """
    X = single_column(X, "images")
    if isinstance(X, np.ndarray) and X.dtype != object:
        if X.ndim not in (3, 4):
            raise ValueError(
                f"An image array must have shape (n, H, W) or (n, H, W, C); got shape {X.shape}. "
                "Wrap a single image as X[None]."
            )
        samples = list(X)
    elif hasattr(X, "iloc"):
        samples = list(X.to_numpy())
    elif isinstance(X, (list, tuple, np.ndarray)):
        samples = list(X)
    else:
        raise ValueError(f"Images must be an array, list, pandas Series or DataFrame column; got {type(X).__name__}.")
    if not samples:
        raise ValueError("No images given (0 samples).")
    return [_one_image(sample, i, resolution, channels) for i, sample in enumerate(samples)]


def _one_image(sample, index, resolution, channels):
    if isinstance(sample, (str, os.PathLike)):
        try:
            with Image.open(sample) as opened:
                image = opened.convert("RGB")
        except Exception as exc:
            raise ValueError(f"Image {index}: cannot read file {os.fspath(sample)!r} ({exc}).") from exc
    elif isinstance(sample, Image.Image):
        image = sample.convert("RGB")
    elif isinstance(sample, np.ndarray):
        array = _array_to_uint8(sample, index)
        if channels == 3 and array.shape == (resolution, resolution, 3):
            return np.ascontiguousarray(array)  # already model-ready: skip PIL
        image = Image.fromarray(array).convert("RGB")
    else:
        raise ValueError(f"Image {index}: expected a PIL image, an array or a file path, got {type(sample).__name__}.")
    image = _resize_center_crop(image, resolution)
    array = np.asarray(image, dtype=np.uint8)
    if channels == 1:
        array = np.asarray(image.convert("L"), dtype=np.uint8)[..., None]
    return array


def _array_to_uint8(array, index):
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"Image {index}: expected shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}.")
    if array.size == 0:
        raise ValueError(f"Image {index}: empty array of shape {array.shape}.")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"Image {index}: contains NaN or infinite values.")
        if array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"Image {index}: float pixels must lie in [0, 1], found [{array.min():.3g}, {array.max():.3g}]."
            )
        return np.round(array * 255).astype(np.uint8)
    if array.dtype.kind in "iu":
        if array.min() < 0 or array.max() > 255:
            raise ValueError(
                f"Image {index}: integer pixels must lie in [0, 255], found [{array.min()}, {array.max()}]."
            )
        return array.astype(np.uint8)
    raise ValueError(f"Image {index}: unsupported dtype {array.dtype} (use uint8, or float in [0, 1]).")


def _resize_center_crop(image, size):
    if image.size == (size, size):
        return image
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))
