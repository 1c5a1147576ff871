"""Train the tiny diffusion Transformers shipped in ``sklearn_difffeat/embedded/``.

    python tools/train_embedded.py dit     # -> sklearn_difffeat/embedded/fashion-dit/,  tools/logs/fashion-dit.txt
    python tools/train_embedded.py mdlm    # -> sklearn_difffeat/embedded/fashion-mdlm/, tools/logs/fashion-mdlm.txt
    python tools/train_embedded.py dit --device cuda --out OUT/dit --steps 1300 --budget-s 50     # GPU runs,
    python tools/train_embedded.py mdlm --device cuda --out OUT/mdlm --steps 1300 --budget-s 45   # ~2 min both

Both use only the *train* split of the embedded Fashion-MNIST mosaics and are seeded (``--seed``; on CPU the
same code, library versions and thread count give the same weights; CUDA kernels are not bitwise
deterministic). ``--device`` defaults to CUDA when available (bf16 autocast, float32 weights and optimiser),
else CPU; each device has its own default recipe (``RECIPES``), which ``--steps``, ``--batch-size`` and ``--lr``
override; ``--budget-s`` fits the number of steps (at most ``--steps``) to a time budget of the training
loop, measured after the first steps. The loss is logged every ``LOG_EVERY`` steps to stdout and to
``tools/logs/`` (or to ``train_log.txt`` in ``--out``). Weights are saved in float16, as shipped.

Image model: mosaics are drawn on the fly by the recipe of ``load_fashion_mosaics`` (1-4 items in distinct
cells of a 2x2 grid, classes uniform, source images uniform within the class, train sources only) and resized
56 -> 32 exactly as ``DiTFeatureExtractor`` does (PIL bicubic, reproduced bit for bit as two separable matrix
products with uint8 rounding after each pass; checked against PIL at start-up), so a GPU never waits for PIL.

Text model: a pool of train-split captions and dictionary-style definitions, each drawn with a fresh mask at
every visit. The objective is MDLM's (masked tokens, cross-entropy weighted by 1/t) plus a cross-entropy on the
*unmasked* tokens (``unmasked_weight``): without it the last block's states at unmasked positions receive no
gradient at all (they only feed logits that the loss ignores), and t = 0 features, which are all unmasked
positions, are a by-product. Token embeddings start at N(0, 1) (``embed_std``) so that a word's own vector is
not drowned by the blocks' updates. The model cards hold the evidence for both.
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
EMBEDDED = ROOT / "sklearn_difffeat" / "embedded"
LOGS = Path(__file__).resolve().parent / "logs"
SEED = 0
LOG_EVERY = 25
CALIBRATE = (10, 40)  # steps timed to fit a --budget-s (the first steps are slower)

# ---- image: pixel-space DiT ---------------------------------------------------------------------------------
DIT_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, patch_size=4,  # 8 x 8 = 64 tokens
    num_layers=8, num_attention_heads=4, attention_head_dim=32,  # width 128
    num_embeds_ada_norm=10,  # labels are never given: always the null index 10
)
DIT_SCHEDULES = {  # DDPMScheduler arguments; the folder's scheduler/ records the one trained with
    "linear": dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2),  # DiT's
    "cosine": dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),  # improved DDPM's
}

# ---- text: masked-diffusion DDiT ------------------------------------------------------------------------------
MDLM_CONFIG = dict(hidden_dim=128, cond_dim=64, n_blocks=6, n_heads=4, model_length=64, dropout=0.1,
                   time_conditioning=False)
VOCAB_SIZE = 2000
SPECIAL = ["[PAD]", "[MASK]", "[UNK]"]

# Default recipes per (model, device). CPU: under 40 minutes of CPU time each (one thread); CUDA: about a minute
# each end to end on one H200 with the --budget-s of the commands above (launch-bound: ~40 ms per step).
RECIPES = {
    ("dit", "cpu"): dict(steps=2200, batch_size=64, lr=1e-3, warmup=100, ema=0.999, t_power=1.0, schedule="cosine"),
    ("dit", "cuda"): dict(steps=1300, batch_size=512, lr=1e-3, warmup=200, ema=0.9995, t_power=1.0, schedule="cosine"),
    ("mdlm", "cpu"): dict(steps=3000, batch_size=64, lr=1e-3, warmup=100, ema=0.0, texts=60000,
                          unmasked_weight=1.0, dropout=0.1, low_t_frac=0.0, embed_std=1.0),
    ("mdlm", "cuda"): dict(steps=1300, batch_size=512, lr=1e-3, warmup=200, ema=0.0, texts=40000,
                           unmasked_weight=1.0, dropout=0.1, low_t_frac=0.0, embed_std=1.0),
}


class Log:
    """Print to stdout and append to tools/logs/<name>.txt (or <out>/train_log.txt)."""

    def __init__(self, name, out=None):
        # Runs into another folder (GPU runs, smoke tests) log there, leaving the shipped model's log alone.
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


class Trainer:
    """AdamW with warm-up + cosine rate, gradient clipping, optional EMA of the weights, bf16 autocast on CUDA."""

    def __init__(self, model, device, steps, lr, warmup, weight_decay, ema, budget_s=None):
        self.model, self.device, self.steps, self.peak, self.warmup = model, device, steps, lr, warmup
        self.budget_s, self.max_steps, self.calibrated = budget_s, steps, budget_s is None
        self.params = [p for p in model.parameters() if p.requires_grad]
        kwargs = {"fused": True} if device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, **kwargs)
        self.ema_decay = ema
        self.ema = [p.detach().clone() for p in self.params] if ema else None

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def fit_budget(self, step, log):
        """With a time budget, fix the total number of steps (at most the recipe's) so that training ends within
        it: a first estimate from the time of steps CALIBRATE..40, the final one from steps 40..warm-up (the first
        steps are slow, and the rate schedule only depends on the total once the warm-up is over)."""
        if self.calibrated:
            return
        first, second = CALIBRATE
        if step not in (first, second, self.warmup):
            return
        self.sync()
        now = time.perf_counter()
        if step > first:
            per_step = (now - self.mark[1]) / (step - self.mark[0])
            fit = int(step + (self.budget_s - (now - self.start)) / per_step)
            self.calibrated = step >= max(second, self.warmup)
            # Before the final estimate, never stop short of it: the first steps' times are noisy.
            floor = step + 1 if self.calibrated else min(self.max_steps, max(second, self.warmup) + 1)
            self.steps = max(floor, min(self.max_steps, fit))
            log(f"budget {self.budget_s:.0f} s: {1000 * per_step:.1f} ms/step over steps {self.mark[0]}-{step}, "
                f"{now - self.start:.0f} s so far -> {self.steps} steps")
        self.mark = (step, now)

    def step(self, step, loss):
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, self.steps, self.peak, self.warmup)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        if self.ema is not None:
            decay = min(self.ema_decay, (1 + step) / (10 + step))  # short memory early on
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - decay)

    def finish(self, log, what, test_losses, seen, t0, t_start, cpu0):
        """Log the final test losses (switching to the EMA weights, which are saved, if any) and the compute used:
        training wall time since ``t0``, CPU time since ``cpu0`` on CPU, total time since ``t_start``."""
        log(f"final {what}: {test_losses()}")
        if self.ema is not None:
            self.use_ema()
            log(f"final {what}, EMA weights (saved): {test_losses()}")
        threads = (f" on {torch.get_num_threads()} thread(s), {time.process_time() - cpu0:.0f} s of CPU time"
                   if self.device.type == "cpu" else "")
        log(f"training wall time {time.time() - t0:.0f} s{threads}; {seen} seen; total {time.time() - t_start:.0f} s")

    def use_ema(self):
        """Copy the EMA weights into the model (at the end of training)."""
        if self.ema is not None:
            with torch.no_grad():
                for p, e in zip(self.params, self.ema):
                    p.copy_(e)

    @property
    def lr(self):
        return self.opt.param_groups[0]["lr"]


def resolve(args, model):
    """The device and the recipe: the device's defaults, overridden by the command line."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    recipe = dict(RECIPES[(model, "cuda" if device.type == "cuda" else "cpu")])
    for key in recipe:
        value = getattr(args, key, None)
        if value is not None:
            recipe[key] = value
    return device, recipe


def seed_everything(seed):
    torch.manual_seed(seed)  # weight initialisation; data, noise and masks come from seeded generators


# ---- image data ---------------------------------------------------------------------------------------------
def dit_preprocess(images):
    """(n, 56, 56, 3) uint8 mosaics -> (n, 3, 32, 32) float in [-1, 1], exactly as DiTFeatureExtractor does.

    RGB uint8 -> PIL bicubic resize of the shorter side to 32 (the mosaics are square, so no crop) -> /127.5 - 1.
    """
    out = np.stack([np.asarray(Image.fromarray(im, "RGB").resize((32, 32), Image.BICUBIC)) for im in images])
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pil_bicubic_matrix(size_in, size_out):
    """(size_out, size_in) float64 matrix of PIL's bicubic resampling weights along one axis."""
    matrix = np.zeros((size_out, size_in))
    for j in range(size_in):
        impulse = np.zeros((1, size_in), np.float32)
        impulse[0, j] = 1.0
        matrix[:, j] = np.asarray(Image.fromarray(impulse, "F").resize((size_out, 1), Image.BICUBIC))[0]
    return matrix


class MosaicStream:
    """Endless train-split mosaics, drawn on ``device`` by ``load_fashion_mosaics``' recipe and preprocessed as
    the extractor does: (n, 3, 32, 32) float32 in [-1, 1]."""

    def __init__(self, device, generator):
        from sklearn_difffeat.datasets import load_fashion_sources

        images, labels = load_fashion_sources("train")
        counts = np.bincount(labels, minlength=10)
        self.device, self.gen = device, generator
        self.images = torch.from_numpy(np.array(images)).to(device)
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.starts = torch.from_numpy(starts).to(device)
        self.counts = torch.from_numpy(counts).to(device)
        self.order = torch.from_numpy(order).to(device)
        self.resize = torch.from_numpy(pil_bicubic_matrix(56, 32)).float().to(device)

    def resize_like_pil(self, mosaics):
        """(n, 56, 56) uint8 -> (n, 32, 32) float32 holding PIL's uint8 bicubic result (two rounded passes)."""
        h = torch.floor(mosaics.float() @ self.resize.T + 0.5).clamp_(0, 255)  # horizontal pass, then uint8
        return torch.floor(self.resize @ h + 0.5).clamp_(0, 255)  # vertical pass

    def sample(self, n):
        g, dev = self.gen, self.device
        k = torch.randint(1, 5, (n, 1), generator=g, device=dev)  # number of items
        rank = torch.rand(n, 4, generator=g, device=dev).argsort(1).argsort(1)  # a random order of the 4 cells
        occupied = rank < k  # k distinct cells, uniformly
        classes = torch.randint(0, 10, (n, 4), generator=g, device=dev)
        within = (torch.rand(n, 4, generator=g, device=dev) * self.counts[classes]).long()
        source = self.order[self.starts[classes] + within]
        tiles = self.images[source] * occupied[..., None, None]  # (n, 4, 28, 28); empty cells black
        mosaics = tiles.view(n, 2, 2, 28, 28).permute(0, 1, 3, 2, 4).reshape(n, 56, 56)
        x = self.resize_like_pil(mosaics) / 127.5 - 1.0
        return x[:, None].expand(n, 3, 32, 32).contiguous()  # RGB, the gray value replicated


def dit_loss(model, abar, x0, t, noise):
    """Epsilon-prediction MSE at timesteps t, the model fed the null label; x_t as ``scheduler.add_noise``."""
    null = torch.full((x0.shape[0],), model.config.num_embeds_ada_norm, dtype=torch.long, device=x0.device)
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps = model(x_t, timestep=t, class_labels=null).sample
    return torch.mean((eps.float() - noise) ** 2)


def train_dit(args):
    import diffusers
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    from sklearn_difffeat.datasets import load_fashion_mosaics

    device, recipe = resolve(args, "dit")
    log = Log("fashion-dit", args.out)
    seed_everything(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t_start, cpu0 = time.time(), time.process_time()
    stream = MosaicStream(device, gen)
    test = load_fashion_mosaics(args.n_test, split="test", random_state=SEED).data["image"].to_numpy()
    x_test = dit_preprocess(test).to(device)
    # The on-device resize must reproduce the extractor's PIL preprocessing.
    fast = stream.resize_like_pil(torch.from_numpy(np.stack(test)[..., 0]).to(device)) / 127.5 - 1.0
    mismatch = (fast - x_test[:, 0]).abs().max().item()
    log(f"device {device}; recipe {recipe}; seed {args.seed}")
    log(f"data: mosaics drawn on the fly from {len(stream.images)} train sources; on-device resize vs PIL on "
        f"{len(test)} test mosaics: max difference {mismatch:.2e}; prepared in {time.time() - t_start:.1f} s")
    if mismatch > 1.5 / 127.5:  # more than one uint8 level: not the extractor's preprocessing
        raise RuntimeError("the on-device resize does not reproduce the extractor's preprocessing")

    config = dict(DIT_CONFIG)
    if args.width is not None:  # an experiment: same depth and heads, wider (the shipped model keeps DIT_CONFIG)
        config["attention_head_dim"] = args.width // config["num_attention_heads"]
    model = DiTTransformer2DModel(**config).to(device)
    scheduler = DDPMScheduler(**DIT_SCHEDULES[recipe["schedule"]])
    abar = scheduler.alphas_cumprod.float().to(device)
    log(f"DiT config {config}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    # Training mode only matters for label dropout, and every label is the null label anyway.
    model.train()
    steps, batch = recipe["steps"], recipe["batch_size"]
    trainer = Trainer(model, device, steps, recipe["lr"], recipe["warmup"], 0.0, recipe["ema"], args.budget_s)
    test_noise = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(1)).to(device)

    def test_loss(t):
        with torch.no_grad(), trainer.autocast():
            steps_t = torch.full((len(x_test),), t, dtype=torch.long, device=device)
            return dit_loss(model, abar, x_test, steps_t, test_noise).item()

    def test_losses():
        return "  ".join(f"t={t} {test_loss(t):.4f}" for t in (100, 500, 900))

    log(f"init test loss: {test_losses()}")
    t0, window = time.time(), []
    trainer.start, step = time.perf_counter(), 0
    while step < trainer.steps:
        trainer.fit_budget(step, log)
        x0 = stream.sample(batch)
        # t = floor(1000 u^p): p = 1 is uniform over the 1000 steps, p > 1 favours low noise.
        u = torch.rand(batch, generator=gen, device=device)
        t = (1000 * u ** recipe["t_power"]).long().clamp_(max=999)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        with trainer.autocast():
            loss = dit_loss(model, abar, x0, t, noise)
        trainer.step(step, loss)
        window.append(loss.detach())
        step += 1
        if step % LOG_EVERY == 0 or step == trainer.steps:
            log(f"step {step:5d}/{trainer.steps}  loss {torch.stack(window).mean().item():.4f}  "
                f"lr {trainer.lr:.2e}  {time.time() - t0:.0f} s")
            window = []
    trainer.finish(log, "test loss", test_losses, f"{trainer.steps * batch} mosaics", t0, t_start, cpu0)

    out = Path(args.out or EMBEDDED / "fashion-dit")
    out.mkdir(parents=True, exist_ok=True)
    # fp16 halves the shipped size; diffusers loads it back as float32 unless told otherwise.
    model.to("cpu", torch.float16).save_pretrained(out / "transformer", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
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
    from sklearn_difffeat.datasets import load_fashion_vocabulary

    vocab = load_fashion_vocabulary()
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


def text_corpus(n, seed=SEED):
    """n training texts: 70% captions of train mosaics, 30% definitions, plus every name phrase and gloss."""
    from sklearn_difffeat.datasets import load_fashion_mosaics, load_fashion_vocabulary

    n_def = int(0.3 * n)
    texts = list(load_fashion_mosaics(n - n_def, split="train", random_state=seed).data["text"])
    texts += definitions(n_def, np.random.default_rng(seed))
    for entry in load_fashion_vocabulary():
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


def mdlm_loss(model, ids, attn, mask_id, t, u, unmasked_weight=0.0):
    """MDLM objective plus an optional cross-entropy on the unmasked tokens.

    Each real token is masked with probability t; the cross-entropy on masked tokens is weighted by 1/t (the
    MDLM NELBO for the linear schedule) and normalised by the number of real tokens. MDLM's own
    parameterisation copies unmasked tokens through, so nothing trains the states at unmasked positions of the
    last block; ``unmasked_weight`` > 0 adds ``unmasked_weight`` x the cross-entropy of predicting each unmasked
    token itself (as BERT does for its kept tokens), same normalisation. t is clamped away from 0 so the
    weight stays bounded; sigma is not used (time_conditioning=False). Returns (loss, CE on masked tokens).
    """
    real = attn.bool()
    masked = (u < t[:, None]) & real
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    logits = model(noisy, None, attention_mask=attn)
    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")
    weight = masked / t[:, None] + unmasked_weight * (real & ~masked)
    loss = (ce * weight).sum() / attn.sum()
    return loss, (ce * masked).sum() / masked.sum().clamp(min=1)


def train_mdlm(args):
    from sklearn_difffeat.backbones.mdlm import DDiTConfig, DDiTModel
    from sklearn_difffeat.datasets import load_fashion_mosaics

    device, recipe = resolve(args, "mdlm")
    log = Log("fashion-mdlm", args.out)
    seed_everything(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = Path(args.out or EMBEDDED / "fashion-mdlm")
    out.mkdir(parents=True, exist_ok=True)
    t_start, cpu0 = time.time(), time.process_time()
    texts = text_corpus(recipe["texts"])
    tok = train_tokenizer(texts, out)
    L = MDLM_CONFIG["model_length"]
    enc = tok(texts, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    lengths = attn.sum(1).float()
    log(f"device {device}; recipe {recipe}; seed {args.seed}")
    log(
        f"corpus: {len(texts)} texts, vocab {tok.vocab_size}, tokens/text mean {lengths.mean():.1f} "
        f"max {int(lengths.max())} (truncated at {L}: {(lengths >= L).sum().item()}), "
        f"prepared in {time.time() - t_start:.1f} s"
    )
    test_texts = list(load_fashion_mosaics(args.n_test, split="test", random_state=SEED).data["text"])
    tenc = tok(test_texts, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    t_ids, t_attn = tenc["input_ids"].to(device), tenc["attention_mask"].to(device)

    config = DDiTConfig(vocab_size=len(tok), **{**MDLM_CONFIG, "dropout": recipe["dropout"]})
    model = DDiTModel(config)
    if recipe["embed_std"]:  # token embeddings drawn N(0, std^2) instead of the default small uniform
        torch.nn.init.normal_(model.vocab_embed.embedding, std=recipe["embed_std"])
    model = model.to(device)
    mask_id = tok.mask_token_id
    log(
        f"DDiT config {config.to_dict()}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
        f"mask id {mask_id}"
    )
    steps, batch = recipe["steps"], recipe["batch_size"]
    trainer = Trainer(model, device, steps, recipe["lr"], recipe["warmup"], 0.01, recipe["ema"], args.budget_s)
    u_fixed = torch.rand(t_ids.shape, generator=torch.Generator().manual_seed(1)).to(device)

    def test_loss(t):
        model.eval()
        with torch.no_grad(), trainer.autocast():
            t_fixed = torch.full((len(test_texts),), t, device=device)
            _, ce = mdlm_loss(model, t_ids, t_attn, mask_id, t_fixed, u_fixed)
        model.train()
        return ce.item()

    def test_losses():
        return "  ".join(f"t={t} {test_loss(t):.4f}" for t in (0.15, 0.5, 0.9))

    log(f"init test CE on masked tokens: {test_losses()}")
    model.train()
    t0, window, wce = time.time(), [], []
    n = len(texts)
    order = torch.randperm(n, generator=gen, device=device)
    trainer.start, step = time.perf_counter(), 0
    while step < trainer.steps:
        trainer.fit_budget(step, log)
        pos = (step * batch) % n
        if pos + batch > n:  # a new epoch: reshuffle (the tail of the old order is skipped)
            order, pos = torch.randperm(n, generator=gen, device=device), 0
        idx = order[pos : pos + batch]
        t = torch.rand(len(idx), generator=gen, device=device)
        if recipe["low_t_frac"]:  # part of the batch at low noise, close to the t = 0 inputs of feature extraction
            low = torch.rand(len(idx), generator=gen, device=device) < recipe["low_t_frac"]
            t = torch.where(low, 0.1 * t, t)
        t = t.clamp(min=1e-3)
        u = torch.rand((len(idx), L), generator=gen, device=device)
        width = int(attn[idx].sum(1).max())  # pad only to the longest text of the batch: less compute
        with trainer.autocast():
            loss, ce = mdlm_loss(model, ids[idx, :width], attn[idx, :width], mask_id, t, u[:, :width],
                                 recipe["unmasked_weight"])
        trainer.step(step, loss)
        window.append(loss.detach())
        wce.append(ce.detach())
        step += 1
        if step % LOG_EVERY == 0 or step == trainer.steps:
            log(
                f"step {step:5d}/{trainer.steps}  loss {torch.stack(window).mean().item():.4f}  "
                f"masked CE {torch.stack(wce).mean().item():.4f}  lr {trainer.lr:.2e}  {time.time() - t0:.0f} s"
            )
            window, wce = [], []
    trainer.finish(log, "test CE on masked tokens", test_losses, f"{trainer.steps * batch} texts", t0, t_start,
                   cpu0)
    # fp16 halves the shipped size; DDiTModel.from_pretrained copies the weights into float32 parameters.
    model.to("cpu").eval().half().save_pretrained(out)
    log(f"saved to {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["dit", "mdlm"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=None, help="output folder for the model and its log (default: shipped)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the device's recipe)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps")
    parser.add_argument("--ema", type=float, default=None, help="EMA decay of the saved weights (0: no EMA)")
    parser.add_argument("--schedule", choices=sorted(DIT_SCHEDULES), default=None,
                        help="image model: noise schedule (linear: DiT's betas 1e-4..2e-2; cosine: improved DDPM's)")
    parser.add_argument("--t-power", type=float, default=None,
                        help="image model: timesteps drawn as floor(1000 u^p), u ~ U(0, 1) (1: uniform)")
    parser.add_argument("--texts", type=int, default=None, help="text model: size of the training text pool")
    parser.add_argument("--unmasked-weight", type=float, default=None,
                        help="text model: weight of the cross-entropy on unmasked tokens (0: plain MDLM)")
    parser.add_argument("--dropout", type=float, default=None, help="text model: dropout")
    parser.add_argument("--embed-std", type=float, default=None,
                        help="text model: initialise token embeddings N(0, std^2) (0: the model's default)")
    parser.add_argument("--low-t-frac", type=float, default=None,
                        help="text model: fraction of each batch noised at t ~ U(0, 0.1) instead of U(0, 1)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time budget of the training loop in seconds: steps are timed early on and the total "
                             "(at most --steps) fitted to the budget; the default runs exactly --steps")
    parser.add_argument("--n-test", type=int, default=256, help="test mosaics for the logged test losses")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--width", type=int, default=None,
                        help="DiT: width (a multiple of its 4 heads) instead of the shipped 128")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = parser.parse_args(argv)
    heads = DIT_CONFIG["num_attention_heads"]
    if args.width is not None and (args.width <= 0 or args.width % heads):
        parser.error(f"--width must be a positive multiple of the DiT's {heads} heads, got {args.width}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:  # leave the caller's thread count and CPU random state alone (tests call main() in-process)
        with torch.random.fork_rng(devices=[]):
            {"dit": train_dit, "mdlm": train_mdlm}[args.model](args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
