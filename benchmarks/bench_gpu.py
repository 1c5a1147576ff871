"""Every GPU figure of the engine in one run (a few minutes on one H100/H200), each against its naive baseline
measured in the same process, written to one results file.

Random-weight models of the real architectures (speed does not depend on weight values):

* DiT-XL/2-256 + SD-VAE, block 12, timestep 100:
  - naive: what one writes from the diffusers docs: float32, full forward of all 28 blocks with a hook on
    block 12, VAE encoded per batch of 32;
  - ours, uint8 arrays -> features, end to end (bfloat16 weights, channels-last VAE), eager and compiled;
  - ours, 640x480 JPEG paths -> features (decoded by DataLoader workers);
  - ours, from stored latents (a new timestep: only the truncated DiT runs);
* text: MDLM-size DDiT (12 blocks, width 768, vocabulary 50,258), 128 tokens, a byte-level BPE tokenizer
  trained here; naive float32 full forward with every hidden state vs ours, tokenization included.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu_h100.txt
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dit import build as build_dit
from bench_dit import naive_features

from sklearn_difffeat import DiTFeatureExtractor, TextDiffusionFeatureExtractor
from sklearn_difffeat.extractors import clear_backbone_cache

LINES: list[str] = []


def say(line: str, out: Path | None) -> None:
    print(line, flush=True)
    LINES.append(line)
    if out is not None:  # written as we go: a run cut short still leaves its figures
        out.write_text("\n".join(LINES) + "\n")


def rate(fn, n: int) -> tuple[float, float]:
    """(items/s, peak GiB of GPU memory) of one call."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start), (torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)


def _write_jpeg(args):
    path, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    # smooth colour fields plus mild noise: compresses like a photo (tens of KB), unlike pure noise
    y, x = np.mgrid[0:480, 0:640] / 640.0
    channels = [np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    image = (np.stack(channels, -1) * 100 + 128 + rng.normal(0, 8, (480, 640, 3))).clip(0, 255).astype(np.uint8)
    Image.fromarray(image).save(path, quality=90)


def image_section(args, out):
    transformer, vae, scheduler, resolution, block = build_dit(args.arch)
    device = torch.device(args.device)
    modules = {"transformer": transformer, "vae": vae, "scheduler": scheduler}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.n_images, resolution, resolution, 3), dtype=np.uint8)
    warm = rng.integers(0, 256, size=(2 * args.batch_size, resolution, resolution, 3), dtype=np.uint8)

    naive_features(transformer, vae, images[:32], block, 100, device)
    naive, naive_mem = rate(lambda: naive_features(transformer, vae, images[:args.n_naive], block, 100, device),
                            args.n_naive)
    say(f"naive DiT: float32, all 28 blocks + hook, batch 32          {naive:9.1f} img/s  peak {naive_mem:5.1f} GiB",
        out)

    common = dict(block=block, batch_size=args.batch_size, device=device, dtype=args.dtype)
    for compiled in (False, True):
        clear_backbone_cache()
        ext = DiTFeatureExtractor(modules, timestep=100, compile=compiled, **common).fit(None)
        started = time.perf_counter()
        ext.transform(warm)  # load, cast, compile and warm the allocator on other images
        setup = time.perf_counter() - started
        ours, mem = rate(lambda ext=ext: ext.transform(images), len(images))
        label = "compiled" if compiled else "eager   "
        say(f"ours DiT, uint8 arrays -> block 12, {label} bf16            {ours:9.1f} img/s  peak {mem:5.1f} GiB"
            f"  ({ours / naive:5.1f}x naive; warm-up {setup:.0f} s)", out)

    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        folder = Path(scratch) / "jpg"
        folder.mkdir()
        paths = [str(folder / f"{i:05d}.jpg") for i in range(args.n_jpeg)]
        with multiprocessing.get_context("fork").Pool() as pool:
            pool.map(_write_jpeg, [(p, i) for i, p in enumerate(paths)], chunksize=32)
        size_kb = np.mean([os.path.getsize(p) for p in paths[:64]]) / 1024
        ext = DiTFeatureExtractor(modules, timestep=100, compile=True, **common).fit(None)
        ext.transform(paths[:args.batch_size])
        ours, mem = rate(lambda: ext.transform(paths), len(paths))
        say(f"ours DiT, 640x480 JPEG paths -> block 12, compiled bf16     {ours:9.1f} img/s  peak {mem:5.1f} GiB"
            f"  ({ours / naive:5.1f}x naive; {size_kb:.0f} KB files, {min(16, os.cpu_count() - 1)} decoding workers)",
            out)

        store = str(Path(scratch) / "store")
        DiTFeatureExtractor(modules, timestep=100, compile=True, cache=store, **common).fit(None).transform(images)
        cached = DiTFeatureExtractor(modules, timestep=200, compile=True, cache=store, **common).fit(None)
        ours, mem = rate(lambda: cached.transform(images), len(images))
        say(f"ours DiT, stored latents -> block 12 at a new t, compiled   {ours:9.1f} img/s  peak {mem:5.1f} GiB"
            f"  ({ours / naive:5.1f}x naive)", out)

    clear_backbone_cache()
    torch.cuda.empty_cache()


def text_section(args, out):
    from bench_text import naive_run
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from sklearn_difffeat.backbones.mdlm import DDiTConfig, DDiTModel, MDLMBackbone

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9))) for _ in range(5000)]
    corpus = [" ".join(rng.choice(words, size=40)) for _ in range(4000)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=8192, special_tokens=["<pad>", "<mask>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", mask_token="<mask>")
    cfg = DDiTConfig(vocab_size=50258, model_length=1024, hidden_dim=768, cond_dim=128, n_blocks=12, n_heads=12)
    torch.manual_seed(0)
    model = DDiTModel(cfg)
    with torch.no_grad():
        for blk in model.blocks:
            blk.adaLN_modulation.weight.normal_(0, 0.02)
    backbone = MDLMBackbone(model, tokenizer)
    # Texts long enough that every one is cut at 128 tokens: the truncation is part of the work.
    texts = [" ".join(rng.choice(words, size=200)) for _ in range(args.n_texts)]
    ids = torch.tensor(tokenizer(texts, truncation=True, max_length=128)["input_ids"], device=args.device)
    model.to(args.device)
    naive_fn = naive_run(model, ids[:args.n_naive_text], 12, 256)
    naive_fn()
    naive, naive_mem = rate(naive_fn, args.n_naive_text)
    say(f"naive text: float32, all blocks + logits, ids given          {naive:9.1f} seq/s  peak {naive_mem:5.1f} GiB",
        out)
    ext = TextDiffusionFeatureExtractor(backbone, block=12, timestep=0.0, max_length=128, batch_size=512,
                                        device=args.device, dtype=args.dtype).fit(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every text is truncated on purpose
        ext.transform(texts[:1024])
        ours, mem = rate(lambda: ext.transform(texts), len(texts))
    say(f"ours text: 12 x 768, 128 tokens, tokenization included, bf16 {ours:9.1f} seq/s  peak {mem:5.1f} GiB"
        f"  ({ours / naive:5.1f}x naive)", out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="results file (written as figures come in)")
    parser.add_argument("--n-images", type=int, default=4096)
    parser.add_argument("--n-naive", type=int, default=256)
    parser.add_argument("--n-jpeg", type=int, default=2048)
    parser.add_argument("--n-texts", type=int, default=16384)
    parser.add_argument("--n-naive-text", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--scratch", default=None, help="folder for the JPEGs and the store (default: tmp)")
    parser.add_argument("--only", choices=["image", "text"], default=None)
    parser.add_argument("--arch", default="xl", help="xl (DiT-XL/2-256 + SD-VAE) or tiny (a CPU smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device (or --device cpu --arch tiny for a smoke test).")
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    name = (f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
            if args.device == "cuda" else "CPU")
    say(f"device: {name}, {len(os.sched_getaffinity(0))} CPU cores; torch {torch.__version__}", args.out)
    started = time.perf_counter()
    if args.only != "text":
        image_section(args, args.out)
    if args.only != "image":
        text_section(args, args.out)
    say(f"total {time.perf_counter() - started:.0f} s", args.out)


if __name__ == "__main__":
    main()
