"""Linear probes of the embedded models' features on the demo's split (macro mAP on held-out mosaics).

The acceptance figures of the embedded models, on the demo's data (``load_fashion_mosaics(1000, split="train",
random_state=0)`` / ``(500, split="test", random_state=0)``):

- image: mean-pooled DiT features over the whole (block, timestep) grid of the demo, trained and at random
  initialisation (same architecture), against raw pixels;
- text: mean-pooled text-model features over (block, timestep), trained and untrained, against TF-IDF;
- the DiT's CV-chosen cell with every token kept and with a max over positions (what the mean loses);
- late fusion (averaged probabilities) of the image and text probes;
- for each text model, the mean norm of the token states at t = 0 (embedding, block 1, last block).

Probe: StandardScaler (no centring) + one-vs-rest LogisticRegression (C=0.1 for images, 1.0 for text). For each
model the (block, timestep) is chosen by 3-fold CV mAP on the train split, as the demo's search does, and the
held-out mAP at that choice is reported; the best held-out cell of the grid (chosen on the test set, so
optimistic) is shown beside it, with the whole held-out grid.

Run: python benchmarks/probe_embedded.py [--dit-model DIR] [--text-model DIR] [--threads 1]
Ablations (one model's held-out grid): ... --only text --text-model DIR --skip-untrained --no-cv
"""

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.model_selection import KFold

from sklearn_difffeat import DiTFeatureExtractor, TextDiffusionFeatureExtractor
from sklearn_difffeat.backbones import resolve_model_dir
from sklearn_difffeat.backbones.untrained import untrained_copy
from sklearn_difffeat.datasets import load_fashion_mosaics
from sklearn_difffeat.demo import PROBE_C, linear_probe
from sklearn_difffeat.metrics import mean_average_precision

IMAGE_TIMESTEPS = [0, 50, 100, 200, 300, 500, 700, 900]  # the demo's grid
TEXT_TIMESTEPS = [0.0, 0.15, 0.3, 0.5, 0.7]
C_IMAGE, C_TEXT = PROBE_C["image"], PROBE_C["text"]


def token_norms(folder, texts):
    """Mean L2 norm of the real tokens' states at t = 0: token embedding (block 0), block 1 and the last block."""
    from sklearn_difffeat.backbones.mdlm import DDiTModel, load_mdlm_tokenizer

    model, tok = DDiTModel.from_pretrained(folder).float().eval(), load_mdlm_tokenizer(folder)
    enc = tok(list(texts), padding=True, truncation=True, max_length=model.config.model_length, return_tensors="pt")
    last = model.config.n_blocks
    with torch.no_grad():
        states = model.block_outputs(enc["input_ids"], None, enc["attention_mask"], blocks=(0, 1, last))
    real = enc["attention_mask"].bool()
    return "  token-state norm at t 0 (mean over real tokens): " + ", ".join(
        f"{'embedding' if b == 0 else f'block {b}'} {states[b][real].norm(dim=-1).mean():.2f}" for b in (0, 1, last))


def cv_map(F, Y, C, folds=3):
    scores = []
    for fit, val in KFold(folds, shuffle=True, random_state=0).split(F):
        scores.append(mean_average_precision(Y[val], linear_probe(F[fit], Y[fit], F[val], C)))
    return float(np.mean(scores))


class Grid:
    """Probes of one model over a (block, timestep) grid: held-out mAP of each cell, CV-chosen cell."""

    def __init__(self, extractor, column, train, test, C, cv=True):
        blocks, timesteps = list(extractor.block), list(extractor.timestep)
        start = time.perf_counter()
        extractor.fit(None)
        shape = (len(blocks), len(timesteps), -1)
        F_train = extractor.transform(train.data[column]).reshape(len(train.Y), *shape)
        F_test = extractor.transform(test.data[column]).reshape(len(test.Y), *shape)
        self.seconds = time.perf_counter() - start
        self.blocks, self.timesteps = blocks, timesteps
        self.test_map, self.cv_map, self.proba = {}, {}, {}
        for i, b in enumerate(blocks):
            for j, t in enumerate(timesteps):
                self.proba[b, t] = linear_probe(F_train[:, i, j], train.Y, F_test[:, i, j], C)
                self.test_map[b, t] = 100 * mean_average_precision(test.Y, self.proba[b, t])
                if cv:
                    self.cv_map[b, t] = 100 * cv_map(F_train[:, i, j], train.Y, C)
        self.chosen = max(self.cv_map or self.test_map, key=(self.cv_map or self.test_map).get)
        self.best = max(self.test_map, key=self.test_map.get)

    def table(self, title):
        lines = [f"{title}: held-out mAP, block (rows) x timestep (columns)",
                 "  block " + "".join(f"{t:>7g}" for t in self.timesteps)]
        for b in self.blocks:
            cells = "".join(f"{self.test_map[b, t]:7.1f}" for t in self.timesteps)
            lines.append(f"  {b:>5d} {cells}")
        def interior(b, t):
            return (f"interior block: {'yes' if self.blocks[0] < b < self.blocks[-1] else 'no'}, interior timestep: "
                    f"{'yes' if self.timesteps[0] < t < self.timesteps[-1] else 'no'}")

        if self.cv_map:
            b, t = self.chosen
            lines.append(f"  CV-chosen (block {b}, t {t:g}): held-out {self.test_map[b, t]:.1f} "
                         f"(CV {self.cv_map[b, t]:.1f}); {interior(b, t)}")
        b, t = self.best
        lines.append(f"  best held-out cell (block {b}, t {t:g}): {self.test_map[b, t]:.1f}; {interior(b, t)}")
        lines.append(f"  features in {self.seconds:.0f} s")
        return "\n".join(lines)

    @property
    def score(self):
        return self.test_map[self.chosen]


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dit-model", default=str(resolve_model_dir("embedded:fashion-dit")),
                        help="DiT pipeline folder")
    parser.add_argument("--text-model", default=str(resolve_model_dir("embedded:fashion-mdlm")), help="MDLM folder")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-untrained", action="store_true", help="probe the trained models only")
    parser.add_argument("--only", choices=["image", "text"], default=None,
                        help="probe one model's grid only (ablations), no summary")
    parser.add_argument("--no-cv", action="store_true", help="held-out grid only, no CV choice (ablations)")
    args = parser.parse_args()
    if args.no_cv and not args.only:
        parser.error("--no-cv goes with --only (the summary reports CV-chosen cells)")
    return args


def _probe_grids(args, train, test):
    """{(kind, "trained" | "untrained"): Grid} over every (block, timestep) of each model probed."""
    kinds = [args.only] if args.only else ["image", "text"]
    grids = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for kind in kinds:
            source = args.dit_model if kind == "image" else args.text_model
            models[kind, "trained"] = source
            if not args.skip_untrained:
                models[kind, "untrained"] = untrained_copy(source, "dit" if kind == "image" else "mdlm",
                                                           Path(tmp) / kind)
        for (kind, which), model in models.items():
            if kind == "image":
                blocks = list(range(1, DiTFeatureExtractor(model, block=-1).fit(None).n_blocks_ + 1))
                ext = DiTFeatureExtractor(model, block=blocks, timestep=IMAGE_TIMESTEPS, pooling="mean",
                                          batch_size=250)
                grids[kind, which] = Grid(ext, "image", train, test, C_IMAGE, cv=not args.no_cv)
            else:
                blocks = list(range(1, TextDiffusionFeatureExtractor(model, block=-1).fit(None).n_blocks_ + 1))
                ext = TextDiffusionFeatureExtractor(model, block=blocks, timestep=TEXT_TIMESTEPS, pooling="mean",
                                                    batch_size=250)
                grids[kind, which] = Grid(ext, "text", train, test, C_TEXT, cv=not args.no_cv)
            print("\n" + grids[kind, which].table(f"{kind} model, {which}"), flush=True)
            if kind == "text":
                print(token_norms(model, test.data["text"]), flush=True)
    return grids


def _baselines(args, train, test):
    """Held-out probabilities of the raw-pixel and TF-IDF probes."""
    pixels = linear_probe(np.stack(train.data["image"]).reshape(args.n_train, -1) / 255.0, train.Y,
                          np.stack(test.data["image"]).reshape(args.n_test, -1) / 255.0, C_IMAGE)
    tfidf = TfidfVectorizer().fit(train.data["text"])
    text_baseline = linear_probe(tfidf.transform(train.data["text"]), train.Y, tfidf.transform(test.data["text"]),
                                 C_TEXT)
    return pixels, text_baseline


def _summary_rows(args, grids, train, test, raw, tf, text_baseline):
    image, text = grids["image", "trained"], grids["text", "trained"]
    last = (text.blocks[-1], 0.0)
    rows = [
        ("raw pixels (56x56x3)", raw),
        ("TF-IDF on captions", tf),
        (f"DiT trained, CV-chosen (block {image.chosen[0]}, t {image.chosen[1]:g})", image.score),
        (f"text trained, CV-chosen (block {text.chosen[0]}, t {text.chosen[1]:g})", text.score),
        ("text trained, last block, t 0", text.test_map[last]),
    ]
    if not args.skip_untrained:
        image_u, text_u = grids["image", "untrained"], grids["text", "untrained"]
        rows += [
            (f"DiT untrained, CV-chosen (block {image_u.chosen[0]}, t {image_u.chosen[1]:g})", image_u.score),
            (f"text untrained, CV-chosen (block {text_u.chosen[0]}, t {text_u.chosen[1]:g})", text_u.score),
            ("text untrained, last block, t 0", text_u.test_map[last]),
        ]
    # What the mean over positions loses: the same cell with every token kept, and with a max over positions.
    for pooling in ("none", "max"):
        ext = DiTFeatureExtractor(args.dit_model, block=image.chosen[0], timestep=image.chosen[1], pooling=pooling,
                                  batch_size=250).fit(None)
        proba = linear_probe(ext.transform(train.data["image"]), train.Y, ext.transform(test.data["image"]), C_IMAGE)
        rows.insert(3, (f"DiT trained, same cell, pooling={pooling}", 100 * mean_average_precision(test.Y, proba)))
    fused = (image.proba[image.chosen] + text.proba[text.chosen]) / 2
    rows.append(("late fusion: DiT and text (both CV-chosen)", 100 * mean_average_precision(test.Y, fused)))
    fused_tfidf = (image.proba[image.chosen] + text_baseline) / 2
    rows.append(("late fusion: DiT (CV-chosen) and TF-IDF", 100 * mean_average_precision(test.Y, fused_tfidf)))
    return rows


def _print_acceptance(args, grids, raw, tf):
    image, text = grids["image", "trained"], grids["text", "trained"]
    print("\nacceptance")
    checks = [(f"DiT mean-pooled (CV-chosen) >= raw pixels + 3 ({raw + 3:.1f})", image.score, raw + 3),
              (f"text trained (CV-chosen) >= TF-IDF - 3 ({tf - 3:.1f})", text.score, tf - 3)]
    if not args.skip_untrained:
        text_u = grids["text", "untrained"]
        checks.append((f"text trained (CV-chosen) >= text untrained (CV-chosen, {text_u.score:.1f})",
                       text.score, text_u.score))
    for name, value, bar in checks:
        print(f"  {name:<66s} {value:5.1f}  {'pass' if value >= bar else 'FAIL'}")


def main():
    args = _parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    train = load_fashion_mosaics(args.n_train, split="train", random_state=0)
    test = load_fashion_mosaics(args.n_test, split="test", random_state=0)
    print(
        f"linear probes (StandardScaler + one-vs-rest LogisticRegression), {args.n_train} train / {args.n_test} "
        f"test mosaics (the demo's split), held-out macro mAP; mean-pooled features; (block, t) chosen by "
        f"3-fold CV on the train split\nimage model: {args.dit_model}\ntext model: {args.text_model}\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        flush=True,
    )
    grids = _probe_grids(args, train, test)
    if args.only:
        return
    pixels, text_baseline = _baselines(args, train, test)
    raw, tf = (100 * mean_average_precision(test.Y, p) for p in (pixels, text_baseline))
    print("\nsummary (held-out macro mAP)")
    for name, value in _summary_rows(args, grids, train, test, raw, tf, text_baseline):
        print(f"  {name:<66s} {value:5.1f}")
    _print_acceptance(args, grids, raw, tf)


if __name__ == "__main__":
    main()
