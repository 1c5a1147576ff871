"""What fingerprinting every weight costs: the former strided-sample fingerprint against the full BLAKE2b hash of
every tensor's bytes, on DiT-XL/2 and the Stable Diffusion VAE, in one process.

Run: python benchmarks/bench_fingerprint.py [--rounds 3] [--out benchmarks/results/fingerprint_cpu.txt]

The models are the real architectures with random weights (no download): diffusers' DiTTransformer2DModel at
DiT-XL/2-256's size (28 blocks, width 1152; 675M parameters in the original checkpoint, 750M values in diffusers'
layout, where every block holds its own copy of the timestep and class embedders) and AutoencoderKL in
sd-vae-ft-ema's configuration (84M parameters), float32 on the CPU. For each, the former fingerprint (names,
shapes, dtypes and about 256 values per tensor, read at a stride) and the current one (every byte, on one thread
and on torch's threads) are timed in alternating rounds; the best round of each is printed with the throughput
and the ratio. Then the per-load cost as a DiT backbone pays it: ``DiTBackbone(transformer, scheduler, vae)``
fingerprints the transformer with its VAE and the VAE alone.
"""

import argparse
import hashlib
import os
import platform
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

from sklearn_difffeat.backbones import module_fingerprint
from sklearn_difffeat.backbones.dit import DiTBackbone


def sampled_fingerprint(*modules) -> str:
    """The former fingerprint, kept here as the baseline: about 256 strided values per tensor, cast to 64 bits."""
    digest = hashlib.blake2b(digest_size=10)
    for module in modules:
        if module is None:
            digest.update(b"<none>")
            continue
        digest.update(type(module).__name__.encode())
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            wide = torch.float64 if tensor.is_floating_point() else torch.int64
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(flat[::step].to("cpu", dtype=wide).numpy().tobytes())
    return digest.hexdigest()


def dit_xl():
    return DiTTransformer2DModel(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                 out_channels=8, patch_size=2, sample_size=32, num_embeds_ada_norm=1000)


def sd_vae():
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                         layers_per_block=2, latent_channels=4, sample_size=256, norm_num_groups=32)


def weight_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def best_seconds(functions: dict, rounds: int) -> dict:
    """The fastest of ``rounds`` timed calls of each function, the functions alternating within a round."""
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def one_thread(function):
    """``function`` run with torch (and so the fingerprint's hashing) on one thread."""

    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            function()
        finally:
            torch.set_num_threads(threads)

    return run


def compare(label: str, module, rounds: int) -> list[str]:
    size = weight_bytes(module)
    n_params = sum(t.numel() for t in module.state_dict().values())
    threads = torch.get_num_threads()
    best = best_seconds({"sampled": lambda: sampled_fingerprint(module),
                         "1 thread": one_thread(lambda: module_fingerprint(module)),
                         f"{threads} threads": lambda: module_fingerprint(module)}, rounds)
    sampled = best.pop("sampled")
    lines = [f"{label}: {n_params / 1e6:.1f}M values, {size / 1e9:.2f} GB of weights (float32)",
             f"  former, ~256 strided values per tensor       {sampled:8.3f} s"]
    for name, seconds in best.items():
        lines.append(f"  current, BLAKE2b of every byte, {name:<10}  {seconds:8.3f} s  {size / 1e9 / seconds:6.2f} GB/s"
                     f"  ({seconds / sampled:.0f}x the former's time)")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args()
    lines = [f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (load "
             f"average {os.getloadavg()[0]:.1f} at the start), Python {platform.python_version()}, torch "
             f"{torch.__version__} ({torch.get_num_threads()} threads); "
             f"{args.rounds} rounds, best round shown; the fingerprint hashes tensors on torch's threads"]
    torch.manual_seed(0)
    start = time.perf_counter()
    transformer, vae = dit_xl().eval(), sd_vae().eval()
    lines.append(f"building both models with random weights took {time.perf_counter() - start:.1f} s")
    print("\n".join(lines), flush=True)
    for label, module in (("DiT-XL/2 transformer", transformer), ("SD VAE (AutoencoderKL)", vae)):
        part = compare(label, module, args.rounds)
        print("\n".join(part), flush=True)
        lines += part
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    # A backbone takes the model's fingerprint (transformer and VAE) and the encoder's (VAE): the VAE is hashed once.
    seconds = best_seconds({"load": lambda: DiTBackbone(transformer, scheduler, vae),
                            "apart": lambda: (module_fingerprint(transformer, vae), module_fingerprint(vae))},
                           args.rounds)
    lines.append(f"per load, DiTBackbone(transformer, scheduler, vae) with both fingerprints: {seconds['load']:.3f} s; "
                 f"the same two fingerprints taken apart (the VAE hashed twice): {seconds['apart']:.3f} s "
                 f"({seconds['apart'] / seconds['load']:.2f}x)")
    print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
