"""Tiny random models with the real architectures, saved in the real folder layouts (no downloads)."""

import json
import os

import numpy as np
import pytest
import torch

TINY_DIT_LAYERS = 5

# scikit-learn estimator checks that do not feed numeric tables (which image and text extractors reject).
SKLEARN_CHECKS_WITHOUT_DATA = [
    "check_no_attributes_set_in_init", "check_parameters_default_constructible", "check_get_params_invariance",
    "check_set_params", "check_estimator_cloneable", "check_estimator_repr", "check_mixin_order",
    "check_valid_tag_types",
]


class PassCounter:
    """Counts DiT passes (patch-embedding calls), images through the DiT and the VAE, and blocks run."""

    def __init__(self, extractor):
        backbone = extractor.get_backbone()
        self.passes = self.encoded = self.rows = 0
        self.deepest = 0
        self._hooks = [
            backbone.transformer.pos_embed.register_forward_hook(self._on_pass),
            backbone.vae.encoder.register_forward_hook(self._on_encode),
        ]
        for k, block in enumerate(backbone.transformer.transformer_blocks, start=1):
            self._hooks.append(
                block.register_forward_hook(lambda *a, k=k: setattr(self, "deepest", max(self.deepest, k)))
            )

    def _on_pass(self, module, args, out):
        self.passes += 1
        self.rows += len(args[0])

    def _on_encode(self, module, args, out):
        self.encoded += args[0].shape[0]

    def close(self):
        for h in self._hooks:
            h.remove()


def build_tiny_dit_pipeline(folder, with_vae=True, seed=0, sample_size=8, patch_size=2, vae_channels=(4, 8)):
    """A DiT pipeline folder like facebook/DiT-XL-2-256 (transformer/, vae/, scheduler/), tiny and random."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    latent_channels = 4 if with_vae else 3
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=latent_channels,
        out_channels=2 * latent_channels,
        num_layers=TINY_DIT_LAYERS,
        sample_size=sample_size,
        patch_size=patch_size,
        num_embeds_ada_norm=10,
    )
    # adaLN-zero initialises the block modulations to zero, which would make every block the identity on
    # its input; random modulations make each block (and so the block choice) matter.
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "norm1.linear" in name or "norm1.emb" in name:
                param.normal_(0, 0.2)
    transformer.save_pretrained(folder / "transformer")
    # The hub ships a DDIM config; the extractor must derive add_noise from it.
    DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear").save_pretrained(
        folder / "scheduler"
    )
    index = {
        "_class_name": "DiTPipeline",
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    if with_vae:
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=list(vae_channels),
            layers_per_block=1,
            down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
            up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
            norm_num_groups=min(2, *vae_channels),
            sample_size=sample_size * 2 ** (len(vae_channels) - 1),
        )
        vae.save_pretrained(folder / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(autouse=True)
def _environment_restored():
    """Put back the environment variables a test changed. Starting a Dask LocalCluster sets the nanny's worker
    settings (``OMP_NUM_THREADS=1``, ``MALLOC_TRIM_THRESHOLD_``) in this process's own environment and leaves them,
    which would give every subprocess a later test starts one torch thread (and other float rounding)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory):
    return build_tiny_dit_pipeline(tmp_path_factory.mktemp("tiny-dit"))


@pytest.fixture(scope="session")
def tiny_pixel_dit_dir(tmp_path_factory):
    return build_tiny_dit_pipeline(tmp_path_factory.mktemp("tiny-pixel-dit"), with_vae=False, seed=1)


@pytest.fixture
def rgb_images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(7, 20, 24, 3), dtype=np.uint8)
