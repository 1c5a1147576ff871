"""On a CUDA machine: the same features as on the CPU, whatever the batch; skipped elsewhere."""

import numpy as np
import pytest
import torch

from sklearn_difffeat import DiTFeatureExtractor, TextDiffusionFeatureExtractor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TEXTS = ["a red shirt and a bag", "sandals", "a grey pullover next to an ankle boot", "trousers"] * 3


def cosine_rows(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_dit_on_cuda_matches_cpu(tiny_dit_dir, rgb_images):
    params = dict(block=[1, 3, 5], timestep=[0, 300])
    cpu = DiTFeatureExtractor(str(tiny_dit_dir), device="cpu", **params).fit(None).transform(rgb_images)
    gpu32 = DiTFeatureExtractor(str(tiny_dit_dir), device="cuda", dtype="float32", **params).fit(None)
    # cuDNN may use TF32 for the VAE's convolutions: float32 on CUDA agrees to about 1e-3, not 1e-6.
    np.testing.assert_allclose(gpu32.transform(rgb_images), cpu, rtol=1e-2, atol=1e-3)
    auto = DiTFeatureExtractor(str(tiny_dit_dir), **params).fit(None)  # device=None, dtype="auto": CUDA, bf16
    assert auto.get_backbone().dtype == torch.bfloat16
    assert cosine_rows(auto.transform(rgb_images), cpu).min() > 0.99


def test_batch_size_does_not_change_cuda_features(tiny_dit_dir, rgb_images):
    many = np.concatenate([rgb_images] * 10)
    one = DiTFeatureExtractor(str(tiny_dit_dir), block=4, timestep=200, batch_size=7).fit(None).transform(many)
    big = DiTFeatureExtractor(str(tiny_dit_dir), block=4, timestep=200, batch_size=64).fit(None).transform(many)
    np.testing.assert_allclose(one, big, rtol=1e-2, atol=1e-2)  # bf16 kernels may differ with the batch shape


def test_text_on_cuda_matches_cpu():
    params = dict(block=[2, -1], timestep=[0.0, 0.5])
    cpu = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", device="cpu", **params).fit(None).transform(TEXTS)
    gpu = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", device="cuda", dtype="float32", **params).fit(None)
    np.testing.assert_allclose(gpu.transform(TEXTS), cpu, rtol=1e-3, atol=1e-4)  # same masks on both devices


def test_modules_passed_in_memory_stay_where_they_are_unless_told(tiny_pixel_dit_dir, rgb_images):
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    transformer = DiTTransformer2DModel.from_pretrained(tiny_pixel_dit_dir, subfolder="transformer")
    scheduler = DDPMScheduler.from_pretrained(tiny_pixel_dit_dir, subfolder="scheduler")
    modules = {"transformer": transformer, "scheduler": scheduler}
    DiTFeatureExtractor(modules, block=2).fit(None).transform(rgb_images)
    assert next(transformer.parameters()).device.type == "cpu"
    DiTFeatureExtractor(modules, block=2, device="cuda").fit(None).transform(rgb_images)
    assert next(transformer.parameters()).device.type == "cuda"  # moved in place, as documented
