"""Train the tiny diffusion Transformers shipped in ``sklearn_difffeat/embedded/``.

    python tools/train_embedded.py dit     # -> sklearn_difffeat/embedded/fashion-dit/,  tools/logs/fashion-dit.txt
    python tools/train_embedded.py mdlm    # -> sklearn_difffeat/embedded/fashion-mdlm/, tools/logs/fashion-mdlm.txt

Both use only the *train* split of :func:`sklearn_difffeat.datasets.load_fashion_mosaics`, are seeded
(same code, library versions and thread count give the same weights) and run on one CPU thread in about
10-15 minutes each. The loss is logged every ``LOG_EVERY`` steps to stdout and to ``tools/logs/``.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "sklearn_difffeat" / "embedded"
LOGS = Path(__file__).resolve().parent / "logs"
SEED = 0
LOG_EVERY = 25

# ---- image: pixel-space DiT ---------------------------------------------------------------------------------
DIT_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, patch_size=4,  # 8 x 8 = 64 tokens
    num_layers=8, num_attention_heads=4, attention_head_dim=32,  # width 128
    num_embeds_ada_norm=10,  # labels are never given: always the null index 10
)
DIT_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2)
DIT_STEPS, DIT_BATCH, DIT_LR, DIT_WARMUP = 600, 64, 3e-4, 50

# ---- text: masked-diffusion DDiT ------------------------------------------------------------------------------
MDLM_CONFIG = dict(hidden_dim=128, cond_dim=64, n_blocks=6, n_heads=4, model_length=64, dropout=0.1,
                   time_conditioning=False)
MDLM_STEPS, MDLM_BATCH, MDLM_LR, MDLM_WARMUP = 1500, 64, 1e-3, 100
VOCAB_SIZE = 2000
SPECIAL = ["[PAD]", "[MASK]", "[UNK]"]


class Log:
    """Print to stdout and append to tools/logs/<name>.txt."""

    def __init__(self, name, out=None):
        # Runs into another folder (smoke tests) log there, leaving the shipped model's log alone.
        path = Path(out) / "train_log.txt" if out else LOGS / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w")  # noqa: SIM115 (open for the whole training run)

    def __call__(self, msg):
        print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()


def lr_at(step, total, peak, warmup):
    # Linear warm-up, then cosine decay to 10% of the peak: short runs need a high rate but a calm ending.
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def dit_preprocess(images):
    """(n, 56, 56, 3) uint8 mosaics -> (n, 3, 32, 32) float in [-1, 1], exactly as DiTFeatureExtractor does.

    RGB uint8 -> PIL bicubic resize of the shorter side to 32 (the mosaics are square, so no crop) -> /127.5 - 1.
    """
    out = np.stack([np.asarray(Image.fromarray(im, "RGB").resize((32, 32), Image.BICUBIC)) for im in images])
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def dit_loss(model, scheduler, x0, t, noise):
    """Epsilon-prediction MSE at timesteps t, the model fed the null label."""
    null = torch.full((x0.shape[0],), model.config.num_embeds_ada_norm, dtype=torch.long)
    x_t = scheduler.add_noise(x0, noise, t)
    eps = model(x_t, timestep=t, class_labels=null).sample
    return torch.mean((eps - noise) ** 2)


def train_dit(args):
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    from sklearn_difffeat.datasets import load_fashion_mosaics

    log = Log("fashion-dit", args.out)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    steps = args.steps or DIT_STEPS
    n_train = steps * DIT_BATCH  # one pass: every mosaic is seen once
    t0 = time.time()
    images = load_fashion_mosaics(n_train, split="train", random_state=SEED).data["image"].to_numpy()
    x_train = torch.cat([dit_preprocess(images[i : i + 1024]) for i in range(0, n_train, 1024)])
    test = load_fashion_mosaics(256, split="test", random_state=SEED).data["image"].to_numpy()
    x_test = dit_preprocess(test)
    log(f"data: {n_train} train mosaics, {len(x_test)} test mosaics, prepared in {time.time() - t0:.0f} s")

    model = DiTTransformer2DModel(**DIT_CONFIG)
    scheduler = DDPMScheduler(**DIT_SCHEDULER)
    log(f"DiT config {DIT_CONFIG}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    # Training mode only matters for label dropout, and every label is the null label anyway.
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=DIT_LR, weight_decay=0.0)

    test_noise = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(1))

    def test_loss(t):
        with torch.no_grad():
            steps_t = torch.full((len(x_test),), t, dtype=torch.long)
            return dit_loss(model, scheduler, x_test, steps_t, test_noise).item()

    log(f"init test loss: t=100 {test_loss(100):.4f}  t=500 {test_loss(500):.4f}  t=900 {test_loss(900):.4f}")
    order = torch.randperm(n_train, generator=gen)
    t0, window = time.time(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, DIT_LR, DIT_WARMUP)
        x0 = x_train[order[step * DIT_BATCH : (step + 1) * DIT_BATCH]]
        t = torch.randint(0, 1000, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = dit_loss(model, scheduler, x0, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(loss.item())
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            log(f"step {step + 1:5d}/{steps}  loss {np.mean(window):.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{time.time() - t0:.0f} s")
            window = []
    log(f"final test loss: t=100 {test_loss(100):.4f}  t=500 {test_loss(500):.4f}  t=900 {test_loss(900):.4f}")
    log(f"training wall time {time.time() - t0:.0f} s on {torch.get_num_threads()} thread(s)")

    out = Path(args.out or EMBEDDED / "fashion-dit")
    out.mkdir(parents=True, exist_ok=True)
    # fp16 halves the shipped size; diffusers loads it back as float32 unless told otherwise.
    model.to(torch.float16).save_pretrained(out / "transformer", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    import diffusers

    index = {"_class_name": "DiTPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DDPMScheduler"], "transformer": ["diffusers", "DiTTransformer2DModel"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    log(f"saved to {out}")


# ---- text ---------------------------------------------------------------------------------------------------
DEFINITION_TEMPLATES = ["{A} is {g}.", "{A}: {g}.", "By {a} we mean {g}.", "{A} is much like {b}.",
                        "{A}, also called {b}, is {g}.", "{A} or {b}: {g}."]


def definitions(n, rng):
    """n dictionary-style sentences tying each class's names to each other and to the class's glosses.

    Captions alone put every item name in the same templates, independent of its class, so a masked LM learns
    that "a sandal" and "a sneaker" are interchangeable. A real pre-trained LM knows from its corpus that an
    espadrille is a sandal; these sentences (WordNet-style definitions built from the shipped names and
    glosses) give the tiny model that knowledge. They never mix two classes.
    """
    from sklearn_difffeat.datasets._fashion import _text_resources

    vocab = _text_resources()
    out = []
    for _ in range(n):
        entry = vocab[rng.integers(len(vocab))]
        names = [x["phrase"] for x in entry["names"]]
        a, b = (names[i] for i in rng.choice(len(names), size=2, replace=False))
        g = entry["glosses"][rng.integers(len(entry["glosses"]))]["text"]
        template = DEFINITION_TEMPLATES[rng.integers(len(DEFINITION_TEMPLATES))]
        text = template.format(A=a[0].upper() + a[1:], a=a, b=b, g=g)
        out.append(text)
    return out


def text_corpus(n):
    """n training texts: 70% captions of train mosaics, 30% definitions, plus every name phrase and gloss."""
    from sklearn_difffeat.datasets import load_fashion_mosaics
    from sklearn_difffeat.datasets._fashion import _text_resources

    n_def = int(0.3 * n)
    texts = list(load_fashion_mosaics(n - n_def, split="train", random_state=SEED).data["text"])
    texts += definitions(n_def, np.random.default_rng(SEED))
    for entry in _text_resources():
        texts += [n["phrase"] for n in entry["names"]] + [g["text"] for g in entry["glosses"]]
    return texts


def train_tokenizer(texts, folder):
    """A lower-cased WordLevel tokenizer (words and punctuation) saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        mask_token="[MASK]",
        unk_token="[UNK]",
        model_max_length=MDLM_CONFIG["model_length"],
    )
    fast.save_pretrained(folder)
    # transformers 5 writes its new class name; the old alias loads in both 4.x and 5.x.
    config_file = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return fast


def mdlm_loss(model, ids, attn, mask_id, t, u):
    """MDLM objective: mask each real token with probability t, CE on masked tokens weighted by 1/t.

    Normalised by the number of real tokens (MDLM's per-token NELBO). t is clamped away from 0 so the weight
    stays bounded; sigma is not used (time_conditioning=False).
    """
    masked = (u < t[:, None]) & attn.bool()
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    logits = model(noisy, None, attention_mask=attn)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    loss = (ce * masked / t[:, None]).sum() / attn.sum()
    return loss, (ce * masked).sum() / masked.sum().clamp(min=1)


def train_mdlm(args):
    from sklearn_difffeat.backbones.mdlm import DDiTConfig, DDiTModel
    from sklearn_difffeat.datasets import load_fashion_mosaics

    log = Log("fashion-mdlm", args.out)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    steps = args.steps or MDLM_STEPS
    out = Path(args.out or EMBEDDED / "fashion-mdlm")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    texts = text_corpus(steps * MDLM_BATCH // 2)  # each caption seen about twice
    tok = train_tokenizer(texts, out)
    L = MDLM_CONFIG["model_length"]
    enc = tok(texts, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"]
    lengths = attn.sum(1).float()
    log(
        f"corpus: {len(texts)} texts, vocab {tok.vocab_size}, tokens/text mean {lengths.mean():.1f} "
        f"max {int(lengths.max())} (truncated at {L}: {(lengths >= L).sum().item()}), {time.time() - t0:.0f} s"
    )
    test_texts = list(load_fashion_mosaics(256, split="test", random_state=SEED).data["text"])
    tenc = tok(test_texts, padding="max_length", truncation=True, max_length=L, return_tensors="pt")

    config = DDiTConfig(vocab_size=len(tok), **MDLM_CONFIG)
    model = DDiTModel(config)
    mask_id = tok.mask_token_id
    log(
        f"DDiT config {config.to_dict()}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
        f"mask id {mask_id}"
    )
    tg = torch.Generator().manual_seed(1)
    t_fixed = torch.full((len(test_texts),), 0.5)
    u_fixed = torch.rand(tenc["input_ids"].shape, generator=tg)

    def test_loss():
        model.eval()
        with torch.no_grad():
            _, ce = mdlm_loss(model, tenc["input_ids"], tenc["attention_mask"], mask_id, t_fixed, u_fixed)
        model.train()
        return ce.item()

    log(f"init test CE on masked tokens at t=0.5: {test_loss():.4f}")
    opt = torch.optim.AdamW(model.parameters(), lr=MDLM_LR, weight_decay=0.01)
    model.train()
    t0, window, wce = time.time(), [], []
    order = torch.randperm(len(texts), generator=gen)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, MDLM_LR, MDLM_WARMUP)
        pos = (step * MDLM_BATCH) % len(texts)
        idx = order[pos : pos + MDLM_BATCH]
        t = torch.rand(len(idx), generator=gen).clamp(min=1e-3)
        u = torch.rand(ids[idx].shape, generator=gen)
        width = int(attn[idx].sum(1).max())  # pad only to the longest text of the batch: less compute
        loss, ce = mdlm_loss(model, ids[idx, :width], attn[idx, :width], mask_id, t, u[:, :width])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(loss.item())
        wce.append(ce.item())
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            log(
                f"step {step + 1:5d}/{steps}  loss {np.mean(window):.4f}  masked CE {np.mean(wce):.4f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - t0:.0f} s"
            )
            window, wce = [], []
    log(f"final test CE on masked tokens at t=0.5: {test_loss():.4f}")
    log(f"training wall time {time.time() - t0:.0f} s on {torch.get_num_threads()} thread(s)")
    # fp16 halves the shipped size; DDiTModel.from_pretrained copies the weights into float32 parameters.
    model.eval().half().save_pretrained(out)
    log(f"saved to {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["dit", "mdlm"])
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps (smoke runs)")
    parser.add_argument("--out", default=None, help="output folder (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"dit": train_dit, "mdlm": train_mdlm}[args.model](args)


if __name__ == "__main__":
    sys.exit(main())
