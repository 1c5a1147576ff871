"""DiT (diffusers ``DiTTransformer2DModel``) with its VAE and noise scheduler, run truncated.

Latent-space models (``facebook/DiT-XL-2-256``: ``transformer/``, ``vae/``, ``scheduler/``) and pixel-space
models (no ``vae/``; the transformer sees the image itself) load through the same code.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ._hub import module_fingerprints, resolve_model_dir
from .base import DiffusionBackbone

HUB_FILES = ["model_index.json", "transformer/*", "vae/*", "scheduler/*"]


class DiTBackbone(DiffusionBackbone):
    """A DiT, its optional VAE and the scheduler whose ``add_noise`` defines the forward process."""

    def __init__(self, transformer: nn.Module, scheduler, vae: nn.Module | None = None):
        self.transformer = transformer
        self.scheduler = scheduler
        self.vae = vae
        self._compiled_blocks = None
        self._encode = self._encode_eager
        # Training mode would randomly drop class labels in DiT's label embedding: features must not.
        for module in self.modules:
            module.eval().requires_grad_(False)
        # Fingerprints are taken before any cast, so the weights' identity does not depend on the compute
        # dtype (which keys the feature store separately). The noise schedule changes features as much as the
        # weights do.
        schedule = hashlib.blake2b(scheduler.alphas_cumprod.double().numpy().tobytes(), digest_size=6).hexdigest()
        model, self.encoder_fingerprint = module_fingerprints((transformer, vae), (vae,))
        self._fingerprint = f"{model}-{schedule}"
        self.num_blocks = len(transformer.transformer_blocks)
        self.width = transformer.inner_dim

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def modules(self) -> list[nn.Module]:
        return [self.transformer] + ([self.vae] if self.vae is not None else [])

    # ---- geometry -------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        size = self.transformer.config.sample_size
        return (size // self.transformer.config.patch_size) ** 2

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def null_class(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (1 for a pixel-space model)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale

    @property
    def image_channels(self) -> int:
        return self.vae.config.in_channels if self.vae is not None else self.transformer.config.in_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.transformer.config.sample_size
        return (self.transformer.config.in_channels, size, size)

    def to(self, device=None, dtype=None) -> DiTBackbone:
        super().to(device, dtype)
        if self.vae is not None and self.device.type == "cuda":
            # cuDNN's fast convolution kernels want NHWC; the input is converted to match in encode().
            self.vae.to(memory_format=torch.channels_last)
        return self

    def compile(self) -> DiTBackbone:
        """``torch.compile`` each block and the VAE encoder path (not the modules themselves: they stay as given).

        Blocks are compiled one by one: forward hooks and whole-model compile interact badly, and diffusers'
        ``compile_repeated_blocks()`` does not support DiT.
        """
        self._compiled_blocks = [torch.compile(block) for block in self.transformer.transformer_blocks]
        if self.vae is not None:
            self._encode = torch.compile(self._encode_eager)
        return self

    # ---- computation ----------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, C, H, W) -> the clean input x0 of the diffusion (posterior mean latents)."""
        if self.vae is None:
            return images
        if images.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        return self._encode(images.to(self.dtype))

    def _encode_eager(self, images):
        # The posterior mean, not a sample, so that a latent is a deterministic function of the image.
        return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``, exactly as the model's scheduler defines it."""
        return self.scheduler.add_noise(x0, noise, timesteps)

    def hidden_states(self, x_t, timesteps, class_labels, *, blocks) -> dict[int, torch.Tensor]:
        """Token states {k: (B, N, width)} after block k for each k in ``blocks`` (0 = patch embedding).

        Runs only the blocks up to the deepest one requested.
        """
        wanted = set(blocks)
        blocks_to_run = (self._compiled_blocks or self.transformer.transformer_blocks)[: max(wanted)]
        hidden = self.transformer.pos_embed(x_t.to(self.dtype))
        taps = {0: hidden} if 0 in wanted else {}
        for k, block in enumerate(blocks_to_run, start=1):
            hidden = block(hidden, timestep=timesteps, class_labels=class_labels)
            if k in wanted:
                taps[k] = hidden
        return taps


def load_dit_backbone(model) -> DiTBackbone:
    """Build a :class:`DiTBackbone` from a hub id, a local pipeline folder, ``"embedded:NAME"``, a dict of
    modules (``transformer``, ``scheduler``, optional ``vae``), a pipeline object with those attributes, or an
    existing :class:`DiTBackbone`."""
    if isinstance(model, DiTBackbone):
        return model
    if isinstance(model, dict) or hasattr(model, "transformer"):
        names = ("transformer", "scheduler", "vae")
        parts = model if isinstance(model, dict) else {k: getattr(model, k, None) for k in names}
        missing = [k for k in ("transformer", "scheduler") if parts.get(k) is None]
        if missing:
            raise ValueError(f"model is missing {missing}; give at least a transformer and a scheduler.")
        return DiTBackbone(parts["transformer"], _as_ddpm(parts["scheduler"]), parts.get("vae"))

    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    folder = resolve_model_dir(model, allow_patterns=HUB_FILES)
    for sub in ("transformer", "scheduler"):
        if not (folder / sub).is_dir():
            raise ValueError(
                f"{folder} is not a DiT pipeline folder: it has no {sub}/ subfolder (expected transformer/, "
                "scheduler/ and, for latent models, vae/)."
            )
    # low_cpu_mem_usage=False: the same loading diffusers falls back to without `accelerate`, minus its warning.
    transformer = DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer", low_cpu_mem_usage=False)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    vae = None
    if (folder / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", low_cpu_mem_usage=False)
    return DiTBackbone(transformer, scheduler, vae)


def _as_ddpm(scheduler):
    """Any diffusers noise scheduler -> a DDPMScheduler with the same betas (hub DiT ships a DDIM config).

    Only ``add_noise`` is used, and it depends on the training betas alone, which both share.
    """
    from diffusers import DDPMScheduler

    return scheduler if isinstance(scheduler, DDPMScheduler) else DDPMScheduler.from_config(scheduler.config)
