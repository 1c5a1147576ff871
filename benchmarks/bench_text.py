"""Text feature extraction speed: our truncated, padding-masked path against a naive full forward.

Both run the same random-weight DDiT (MDLM architecture) on the same 128-token sequences in one process:

- naive: the whole model in float32 (every block and the 50k-vocabulary output layer), keeping every hidden
  state (what ``output_hidden_states=True`` does), then the mean of the requested block;
- ours: ``TextDiffusionFeatureExtractor.transform`` end to end (tokenize, mask, batch, truncated pass to the
  requested block, pooling), bf16 autocast on CUDA, float32 on CPU.

Usage::

    python benchmarks/bench_text.py            # CPU: a small DDiT (4 blocks, width 256), ~1 minute
    python benchmarks/bench_text.py --full     # MDLM-OWT size (12 blocks, width 768); default on CUDA

Prints sequences/s for each path and the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch


def build(full: bool, seq_len: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sklearn_difffeat.backbones.mdlm import DDiTConfig, DDiTModel, MDLMBackbone

    if full:
        cfg = DDiTConfig(vocab_size=50258, model_length=1024, hidden_dim=768, cond_dim=128, n_blocks=12, n_heads=12)
    else:
        cfg = DDiTConfig(vocab_size=50258, model_length=1024, hidden_dim=256, cond_dim=128, n_blocks=4, n_heads=4)
    torch.manual_seed(0)
    model = DDiTModel(cfg)
    with torch.no_grad():  # non-zero modulation so every op does real work
        for block in model.blocks:
            block.adaLN_modulation.weight.normal_(0, 0.02)
    words = [f"w{i}" for i in range(2000)]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[MASK]", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", mask_token="[MASK]",
                                        unk_token="[UNK]")
    rng = np.random.default_rng(0)
    texts = lambda n: [" ".join(rng.choice(words, size=seq_len)) for _ in range(n)]  # noqa: E731
    return MDLMBackbone(model, tokenizer), texts, cfg


def naive_run(model, ids, block, batch_size):
    """What a user would write: the full float32 forward (every block and the vocabulary logits), a forward hook on
    each block keeping every hidden state, then the mean of ``block`` (0 = the token embedding)."""

    def run():
        feats, hidden = [], []
        keep = lambda module, args, out: hidden.append(out)  # noqa: E731
        hooks = [model.vocab_embed.register_forward_hook(keep)]
        hooks += [blk.register_forward_hook(keep) for blk in model.blocks]
        try:
            for start in range(0, len(ids), batch_size):
                hidden.clear()
                with torch.no_grad():
                    model(ids[start:start + batch_size])
                feats.append(hidden[block].mean(1).cpu())
        finally:
            for hook in hooks:
                hook.remove()
        return torch.cat(feats)

    return run


def rates(fns, n, repeats):
    """Best-of-``repeats`` sequences/s of each function, timed alternately so load changes hit both alike."""
    for fn in fns:
        fn()  # warm-up (allocator, kernels)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            best[i] = min(best[i], time.perf_counter() - start)
    return [n / b for b in best]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="MDLM-OWT size (default on CUDA)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--n", type=int, default=None, help="sequences per timing (default 32 CPU, 4096 CUDA)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from sklearn_difffeat.extractors import clear_backbone_cache
    from sklearn_difffeat.extractors.text import TextDiffusionFeatureExtractor

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full = args.full or device.type == "cuda"
    n = args.n or (4096 if device.type == "cuda" else 32)
    batch_size = args.batch_size or (256 if device.type == "cuda" else 16)
    backbone, make_texts, cfg = build(full, args.seq_len)
    backbone.module.to(device)
    texts = make_texts(n)
    ids = torch.tensor(backbone.tokenizer(texts)["input_ids"], device=device)
    assert ids.shape == (n, args.seq_len)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, {torch.get_num_threads()} torch threads, "
          f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"model: DDiT {cfg.n_blocks} blocks, width {cfg.hidden_dim}, {cfg.n_heads} heads, vocab {cfg.vocab_size}; "
          f"{n} sequences x {args.seq_len} tokens, batch {batch_size}, best of {args.repeats}")
    dtype = "bf16 autocast" if device.type == "cuda" else "float32"
    for block in (cfg.n_blocks, cfg.n_blocks // 2):
        clear_backbone_cache()
        ext = TextDiffusionFeatureExtractor(backbone, block=block, timestep=0.0, batch_size=batch_size,
                                            device=device).fit(texts[:1])
        baseline = naive_run(backbone.module, ids, block, batch_size)
        # Both compute the same feature: the mean of the block's states over the (unpadded) tokens.
        gap = float((baseline().float() - torch.from_numpy(ext.transform(texts))).abs().max())
        naive, ours = rates([baseline, lambda ext=ext: ext.transform(texts)], n, args.repeats)
        print(f"block {block:2d}: naive full fp32 forward {naive:9.1f} seq/s | ours ({dtype}, truncated, "
              f"end to end) {ours:9.1f} seq/s | ratio {ours / naive:5.2f}x | max feature difference {gap:.1e}")


if __name__ == "__main__":
    main()
