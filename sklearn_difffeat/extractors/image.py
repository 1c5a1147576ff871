"""DiTFeatureExtractor: intermediate DiT block features at chosen diffusion timesteps."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .._sklearn_compat import Interval, StrOptions
from ..backbones.dit import load_dit_backbone
from ..store import stable_hash
from ._base import BaseDiffusionFeatureExtractor
from ._engine import Batch, BatchResult, ExtraRows, TimestepFeatures, pool_tokens
from ._images import PREPROCESSING, ImageSamples, decode_batches, to_uint8_images
from ._inputs import as_list
from ._noise import normals, sample_seeds

__all__ = ["DiTFeatureExtractor", "to_uint8_images"]

DEFAULT_TIMESTEP = 100  # a middle-low DDPM step; see the class docstring for why
_NOISE_CHUNK = 1 << 18  # noise elements drawn at once on a CPU: float64 intermediates of 2 MiB stay in cache


class DiTFeatureExtractor(BaseDiffusionFeatureExtractor):
    """Features of a pre-trained DiT: pooled token states after a block, for a noised input at a timestep.

    Each image is resized (shorter side) and center-cropped to the model's resolution, scaled to [-1, 1],
    encoded by the VAE (posterior mean times the scaling factor; pixel-space models skip this), noised to step
    ``t`` with the scheduler's ``add_noise`` and passed through the Transformer up to the deepest requested
    block. The noise of an image is a pure function of its content key, ``random_state`` and the draw, and is
    the same at every timestep. Nothing is learned in ``fit``.

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
        Seeds the noise together with each image's content key (a hash of the file bytes, or of the array or
        PIL pixels as given), so an image always gets the same noise, whatever the batch, order, worker count
        or device, and the same noise at every timestep.
    batch_size : int, default=64
        Maximum batch; halved automatically on CUDA out-of-memory.
    num_workers : int or None, default=None
        Worker processes that decode and resize images (a torch ``DataLoader``) while the device computes; where
        processes cannot run (a daemon process such as a Dask worker, or a file-size limit below a batch), as
        many threads decode instead, with the same results. 0 decodes in the calling thread. ``None``: all cores
        but one, at most 16. Content keys are hashed by as many threads. Arrays already at the model's
        resolution (uint8) need no decoding.
    device : str, torch.device or None, default=None
        ``None`` picks CUDA when available, or the device of modules passed as ``model``. Modules passed as
        ``model`` are moved to an explicit ``device`` in place.
    dtype : {"auto", "float32", "bfloat16", "float16"}, default="auto"
        Precision the weights are cast to (once, at load): "auto" is bfloat16 on CUDA and float32 on CPU (or
        the dtype of modules passed as ``model``). Features are returned as float32.
    compile : bool, default=False
        ``torch.compile`` the Transformer blocks and the VAE encoder (worth it for large extractions on GPU).
    cache : str, path-like or None, default=None
        Folder of a :class:`~sklearn_difffeat.FeatureStore` for clean latents and features, shared across
        clones, folds, processes and machines. Keyed by each image's content (a file's bytes), so a fully
        stored run over file paths decodes nothing.
    cache_depth : int or None, default=None
        With a cache, run each pass at least to this block and store every block up to it, so that later
        requests for other blocks at the same timestep need no new pass (useful for searches).
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
        num_workers=None,
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
        self.num_workers = num_workers
        self.device = device
        self.dtype = dtype
        self.compile = compile
        self.cache = cache
        self.cache_depth = cache_depth
        self.verbose = verbose

    # ---- backbone -------------------------------------------------------------------------------------
    def _backbone_options(self):
        return (bool(self.compile),)

    def _in_memory_modules(self):
        model = self.model
        transformer = model.get("transformer") if isinstance(model, dict) else getattr(model, "transformer", None)
        if not isinstance(transformer, torch.nn.Module):
            raise ValueError("model must be a hub id, a folder, 'embedded:NAME', or modules given as "
                             "{'transformer': ..., 'scheduler': ..., 'vae': ...}; found no transformer module.")
        return [transformer]

    def _load_backbone(self, device, dtype):
        backbone = load_dit_backbone(self.model).to(device, dtype)
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

    def _label(self, backbone):
        return backbone.null_class if self.class_label is None else self.class_label

    def _namespace_description(self, backbone, timestep):
        return {**super()._namespace_description(backbone, timestep), "class_label": self._label(backbone),
                "preprocessing": PREPROCESSING, "resolution": backbone.resolution}

    def _x0_namespace(self, backbone):
        """Where clean inputs (VAE latents, or normalised pixels of a pixel-space model) are stored."""
        description = {"extractor": "dit-x0", "encoder": backbone.encoder_fingerprint, "preprocessing": PREPROCESSING,
                       "resolution": backbone.resolution, "channels": backbone.image_channels,
                       "dtype": str(backbone.dtype).replace("torch.", "")}
        return f"dit-x0-{stable_hash(description)}", description

    # ---- input ----------------------------------------------------------------------------------------
    def _samples(self, X, backbone, offset):
        return ImageSamples(X, backbone.resolution, backbone.image_channels, offset)

    def _batches(self, run, samples, backbone, todo):
        """Stored clean inputs first (no decoding), then images decoded in worker processes (or here)."""
        size = self.batch_size
        shape = backbone.latent_shape
        if run.store is not None:
            namespace, _ = self._x0_namespace(backbone)
            listed = todo[run.store.contains(namespace, run.keys[todo])]
            served = []
            for start in range(0, len(listed), size):
                rows = listed[start:start + size]
                values, found = run.store.read(namespace, run.keys[rows], width=math.prod(shape))
                if found.any():  # rows of a segment found damaged on reading are decoded below instead
                    x0 = torch.from_numpy(values[found]).view(-1, *shape)
                    yield Batch(rows[found], ("x0", self._pinned(run, x0)))
                    served.append(rows[found])
            if served:
                todo = todo[~np.isin(todo, np.concatenate(served))]
        if len(todo) == 0:
            return
        # Samples that cannot be read are left out of their batch: nothing of theirs is computed or stored. Files
        # are decoded from bytes that still hash to their keys.
        workers = self._workers()
        batches = decode_batches(samples, run.first[todo], size, workers, pin_memory=run.device.type == "cuda",
                                 keys=run.keys[todo])
        run.decoders = 0 if samples.ready else workers  # from here on they decode ahead, on this machine's cores
        try:
            for indices, pixels, errors in batches:
                for i, reason in errors.items():
                    run.fail(int(todo[i]), reason)
                if pixels is not None:
                    yield Batch(todo[indices], ("pixels", pixels))
        finally:
            run.decoders = 0

    @staticmethod
    def _pinned(run, tensor):
        return tensor.pin_memory() if run.device.type == "cuda" else tensor

    # ---- computation ----------------------------------------------------------------------------------
    def _compute(self, run, backbone, batch, plan):
        kind, data = batch.payload
        data = data.to(run.device, non_blocking=True)
        result = BatchResult()
        if kind == "pixels":
            with run.elementwise_threads():  # uint8 travels to the device (4x less than float), normalised there
                pixels = data.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
            x0 = torch.cat(run.in_chunks(len(pixels), lambda s: backbone.encode(pixels[s]).float()))
            if run.store is not None:
                namespace, description = self._x0_namespace(backbone)
                result.extra.append(ExtraRows(namespace, description, np.arange(len(batch.rows)),
                                              x0.reshape(len(x0), -1)))
        else:
            x0 = data.float()
        noises = self._noises(run, run.seed_words(batch.rows, run.device), backbone.latent_shape)
        need = run.missing[batch.rows]
        for ti, t in plan:
            local = np.flatnonzero(need[:, ti])
            result.features[ti] = self._features_at(run, backbone, x0, noises, local, t)
        return result

    def _noises(self, run, words, shape) -> list:
        """One noise per sample and draw, reused at every timestep (common random numbers).

        On a CPU they are drawn a few rows at a time: a whole batch's float64 intermediates (25 MB each at 128 px
        in pixel space, 200 MB at 256 px) miss every cache, and each operation pages them in afresh (measured
        2-7x slower). Every element is computed alone, so the numbers are the same either way."""
        rows = len(words) if run.device.type != "cpu" else max(1, _NOISE_CHUNK // math.prod(shape))

        def draw(d):
            parts = [normals(sample_seeds(words[i:i + rows], self.random_state, d), shape)
                     for i in range(0, len(words), rows)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        with run.elementwise_threads():
            return [draw(d) for d in range(self.n_noise_draws)]

    def _features_at(self, run, backbone, x0, noises, local, t) -> TimestepFeatures:
        """Pooled features of the batch rows ``local`` at timestep ``t``, averaged over the noise draws."""
        device = run.device
        index = torch.from_numpy(local).to(device)
        label = self._label(backbone)

        def one_pass(part):
            rows = index[part]
            steps = torch.full((len(rows),), t, dtype=torch.long, device=device)
            labels = torch.full((len(rows),), label, dtype=torch.long, device=device)
            pooled = {}
            for noise in noises:
                with run.elementwise_threads():
                    x_t = backbone.add_noise(x0[rows], noise[rows], steps)
                taps = backbone.hidden_states(x_t, steps, labels, blocks=run.computed_blocks)
                for b, hidden in taps.items():
                    feature = pool_tokens(hidden, self.pooling)
                    pooled[b] = feature if b not in pooled else pooled[b] + feature
            return {b: f / len(noises) for b, f in pooled.items()}

        parts = run.in_chunks(len(local), one_pass)
        return TimestepFeatures(local, {b: torch.cat([p[b] for p in parts]) for b in run.computed_blocks})
