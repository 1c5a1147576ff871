"""Images/s of DiTFeatureExtractor against the naive baseline a user would write, in one process.

Measures, for a random-weight model of the chosen architecture:
  * ours, end to end: uint8 images -> pooled block-12 features (VAE encode + truncated DiT);
  * ours, from cached latents: the same at a new timestep with the latents already in the on-disk cache;
  * naive: diffusers' full forward of all blocks with a forward hook on block 12, float32, PyTorch defaults,
    batch 32, VAE encoded per batch (what one writes following the diffusers docs).
and prints each figure and the ratios. Examples:

    python benchmarks/bench_dit.py --arch tiny                 # CPU, seconds
    python benchmarks/bench_dit.py --arch xl --n 2048 --compile  # GPU: DiT-XL/2-256 + SD-VAE, random weights
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch

from sklearn_difffeat import DiTFeatureExtractor

ARCHS = {
    # DiT-XL/2-256 (facebook/DiT-XL-2-256) and the SD VAE it ships with
    "xl": dict(dit=dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32, patch_size=2,
                        num_embeds_ada_norm=1000),
               vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32), block=12),
    # a small model that runs in seconds on a laptop CPU
    "tiny": dict(dit=dict(num_attention_heads=4, attention_head_dim=32, num_layers=8, sample_size=16, patch_size=2,
                          num_embeds_ada_norm=10),
                 vae=dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8), block=4),
}


def build(arch):
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    spec = ARCHS[arch]
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(in_channels=4, out_channels=8, **spec["dit"])
    n_down = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * n_down,
        up_block_types=["UpDecoderBlock2D"] * n_down,
        **spec["vae"],
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    resolution = spec["dit"]["sample_size"] * 2 ** (n_down - 1)
    return transformer, vae, scheduler, resolution, spec["block"]


def naive_features(transformer, vae, images, block, timestep, device, batch_size=32):
    """What a user writes: full-precision full forward, hook on the block, batch 32."""
    transformer = transformer.to(device).float().eval()
    vae = vae.to(device).float().eval()
    captured = {}
    hook = transformer.transformer_blocks[block - 1].register_forward_hook(lambda m, a, o: captured.__setitem__("h", o))
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1
            latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
            t = torch.full((len(x),), timestep, device=device)
            noisy = latents + torch.randn_like(latents)  # noising cost is negligible either way
            transformer(
                noisy,
                timestep=t,
                class_labels=torch.full((len(x),), transformer.config.num_embeds_ada_norm, device=device),
            )
            out.append(captured["h"].mean(dim=1).cpu())
    hook.remove()
    return torch.cat(out).numpy()


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    parser.add_argument("--n", type=int, default=None, help="images to time (default: 256 on CPU, 2048 on GPU)")
    parser.add_argument("--naive-n", type=int, default=None, help="images for the naive baseline (default: n)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = args.n or (2048 if device.type == "cuda" else 256)
    naive_n = args.naive_n or n
    batch_size = args.batch_size or (256 if device.type == "cuda" else 32)
    transformer, vae, scheduler, resolution, block = build(args.arch)
    images = np.random.default_rng(0).integers(0, 256, size=(n, resolution, resolution, 3), dtype=np.uint8)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    print(f"device: {name}; arch: {args.arch} ({resolution}px, block {block}); n={n}; torch {torch.__version__}")

    modules = {"transformer": transformer, "vae": vae, "scheduler": scheduler}
    with tempfile.TemporaryDirectory() as cache:
        common = dict(block=block, batch_size=batch_size, device=device, dtype=args.dtype, compile=args.compile)
        warm = DiTFeatureExtractor(modules, timestep=50, **common).fit(None)
        warm.transform(images[: min(n, 2 * batch_size)])  # load, move, compile, allocator warm-up
        ext = DiTFeatureExtractor(modules, timestep=100, **common).fit(None)
        _, t_end = timed(lambda: ext.transform(images), device)
        # fill the latent cache, then time a new timestep: only the truncated DiT runs
        DiTFeatureExtractor(modules, timestep=200, cache=cache, **common).fit(None).transform(images)
        cached = DiTFeatureExtractor(modules, timestep=300, cache=cache, **common).fit(None)
        _, t_cached = timed(lambda: cached.transform(images), device)

    naive_features(transformer, vae, images[:32], block, 100, device)  # warm-up
    _, t_naive = timed(lambda: naive_features(transformer, vae, images[:naive_n], block, 100, device), device)

    rate_end, rate_cached, rate_naive = n / t_end, n / t_cached, naive_n / t_naive
    print(f"{'path':52s} {'images/s':>10s}")
    print(f"{'naive: full fp32 forward + hook, batch 32':52s} {rate_naive:10.1f}")
    print(f"{'ours: uint8 -> block feature, end to end':52s} {rate_end:10.1f}")
    print(f"{'ours: from cached latents':52s} {rate_cached:10.1f}")
    print(
        f"ratio end to end / naive: {rate_end / rate_naive:.2f}x; "
        f"cached latents / naive: {rate_cached / rate_naive:.2f}x"
    )


if __name__ == "__main__":
    main()
