"""FusionClassifier defaults, previous against current, on the demo's features and on MULAN yeast.

Demo features: the embedded DiT (mean-pooled, ``--image-block``, ``--image-timestep``) and the embedded text
model (``--text-block``, ``--text-timestep``) on ``load_fashion_mosaics(n_train, split="train")`` and
``(n_test, split="test")``, computed through the public extractors and cached under ``--cache``, so the script
follows the embedded models when they change. Split 0 is the demo's; other ``--splits`` draw other mosaics
(``random_state``) to show the figures are not one draw's luck. For image only, text only and fused it prints
held-out mAP (x100, mean +- std over the classifier seeds ``--seeds``) of

* a logistic-regression probe (StandardScaler + OneVsRest(LogisticRegression), C=1), for reference;
* FusionClassifier with the previous defaults (``OLD_DEFAULTS``) and with the settings the demo used to pass
  (``OLD_DEMO``);
* FusionClassifier with the current defaults (``FusionClassifier()``),

* the current defaults with one change each (``VARIANTS``; ``--no-variants`` leaves them out),

each modality fed as its own dict entry, and the fusion gain: fused minus the better single modality, for
the same model. Then MULAN yeast, 5-fold mAP (mean +- std over the same seeds), the 103 features split
50 + 53 into two modalities.

    python benchmarks/bench_fusion_defaults.py [--splits 0 1 2] [--seeds 0 1 2] [--n-train 1000 --n-test 500]
        [--no-variants] [--skip-demo] [--skip-yeast] [--threads N]
"""

import argparse
import os
import platform
import tempfile
import time
import warnings

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from sklearn_difffeat import DiTFeatureExtractor, FusionClassifier, TextDiffusionFeatureExtractor
from sklearn_difffeat.datasets import load_fashion_mosaics
from sklearn_difffeat.metrics import mean_average_precision

# FusionClassifier's defaults before they were revised (constant learning rate, no schedule existed then).
OLD_DEFAULTS = dict(
    projection_dim=2048,
    standardize=True,
    dropout=0.0,
    lr=1e-4,
    lr_schedule="constant",
    weight_decay=1e-2,
    max_epochs=100,
    batch_size=128,
    early_stopping=10,
    validation_fraction=0.1,
)
# What the demo passed before it used the defaults (lr=1e-3, max_epochs=60, early_stopping=8): the run in which
# the fused model (60.8) lost to image only (62.8).
OLD_DEMO = {**OLD_DEFAULTS, "lr": 1e-3, "max_epochs": 60, "early_stopping": 8}
MODALITIES = {"image only": ("image",), "text only": ("text",), "fused": ("image", "text")}


def probe(seed):
    # The classifier seed does not change a convex fit; the probe is shown once per split.
    return make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=1.0, max_iter=5000)))


# One change each from the current defaults: the alternatives the defaults were chosen against.
VARIANTS = {
    "early_stopping=10": {"early_stopping": 10},
    "weight_decay=0.01": {"weight_decay": 0.01},
    "weight_decay=0.3": {"weight_decay": 0.3},
    "dropout=0.5": {"dropout": 0.5},
    "projection_dim=256": {"projection_dim": 256},
}


def fusion(params):
    return lambda seed: FusionClassifier(**params, random_state=seed)


def models(variants=True):
    rows = {
        "logistic-regression probe": (probe, False),
        "FusionClassifier, previous defaults": (fusion(OLD_DEFAULTS), True),
        "FusionClassifier, former demo settings": (fusion(OLD_DEMO), True),
        "FusionClassifier, current defaults": (fusion({}), True),
    }
    if variants:
        rows.update({f"  current, {name}": (fusion(params), True) for name, params in VARIANTS.items()})
    return rows


def demo_features(args, split_seed):
    train = load_fashion_mosaics(args.n_train, split="train", random_state=split_seed)
    test = load_fashion_mosaics(args.n_test, split="test", random_state=split_seed)
    image = DiTFeatureExtractor(
        "embedded:fashion-dit", block=args.image_block, timestep=args.image_timestep, cache=args.cache
    ).fit(None)
    text = TextDiffusionFeatureExtractor(
        "embedded:fashion-mdlm", block=args.text_block, timestep=args.text_timestep, cache=args.cache
    ).fit(None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*texts are longer than max_length")  # the demo says it once
        return [
            ({"image": image.transform(d.data["image"]), "text": text.transform(d.data["text"])}, d.Y)
            for d in (train, test)
        ]


def score(make, seed, uses_dict, X_train, Y_train, X_test, Y_test, keys):
    if uses_dict:
        X_train, X_test = {k: X_train[k] for k in keys}, {k: X_test[k] for k in keys}
    else:
        X_train, X_test = (np.hstack([X[k] for k in keys]) for X in (X_train, X_test))
    model = make(seed)
    t0 = time.perf_counter()
    model.fit(X_train, Y_train)
    seconds = time.perf_counter() - t0
    return 100 * mean_average_precision(Y_test, model.predict_proba(X_test)), seconds, getattr(model, "n_epochs_", 0)


def run_demo(args):
    print(
        f"\n== demo features: {args.n_train} train / {args.n_test} test mosaics; image block {args.image_block} "
        f"t={args.image_timestep}, text block {args.text_block} t={args.text_timestep}; held-out mAP, "
        f"mean +- std over classifier seeds {args.seeds}"
    )
    gains = {name: [] for name in models(args.variants)}
    for split in args.splits:
        (X_train, Y_train), (X_test, Y_test) = demo_features(args, split)
        widths = {k: v.shape[1] for k, v in X_train.items()}
        print(f"\nsplit {split}{' (the demo split)' if split == 0 else ''}: feature widths {widths}")
        print(
            f"{'model':<38} {'image only':>12} {'text only':>12} {'fused':>12} {'gain':>6} {'fit s':>6} {'epochs':>6}"
        )
        for name, (make, uses_dict) in models(args.variants).items():
            seeds = args.seeds if uses_dict else args.seeds[:1]
            cells, means, secs, epochs = [], {}, [], []
            for label, keys in MODALITIES.items():
                runs = [score(make, s, uses_dict, X_train, Y_train, X_test, Y_test, keys) for s in seeds]
                maps = [r[0] for r in runs]
                secs += [r[1] for r in runs]
                epochs += [r[2] for r in runs]
                means[label] = np.mean(maps)
                cells.append(f"{np.mean(maps):6.1f} +-{np.std(maps):4.1f}" if len(maps) > 1 else f"{maps[0]:12.1f}")
            gain = means["fused"] - max(means["image only"], means["text only"])
            gains[name].append(gain)
            epochs_shown = f"{np.mean(epochs):6.0f}" if uses_dict else f"{'':>6}"
            row = " ".join(f"{c:>12}" for c in cells)
            print(f"{name:<38} {row} {gain:+6.1f} {np.mean(secs):6.1f} {epochs_shown}")
    if len(args.splits) > 1:
        print("\nfusion gain over the better single modality, per split " + str(args.splits))
        for name, values in gains.items():
            print(f"{name:<38} " + " ".join(f"{g:+5.1f}" for g in values) + f"   mean {np.mean(values):+5.1f}")


def run_yeast(args):
    from bench_fusion_yeast import load_yeast  # the benchmarks folder is on sys.path when run as a script

    X, Y, folds = load_yeast()
    print(
        f"\n== MULAN yeast {X.shape[0]} x {X.shape[1]}, {Y.shape[1]} labels, 5-fold KFold(shuffle, random_state=0), "
        f"features split 50 + 53 into two modalities; mAP over the folds, mean +- std over seeds {args.seeds}"
    )
    print(f"{'model':<38} {'mAP':>14} {'fit s (5 folds)':>16}  epochs per fold (first seed)")
    for name, (make, uses_dict) in models(args.variants).items():
        per_seed, secs, epochs = [], [], []
        for seed in args.seeds if uses_dict else args.seeds[:1]:
            maps, t0 = [], time.perf_counter()
            for tr, te in folds:
                model = make(seed)
                if uses_dict:
                    model.set_params(modalities=[50, 53])
                model.fit(X[tr], Y[tr])
                maps.append(100 * mean_average_precision(Y[te], model.predict_proba(X[te])))
                if seed == args.seeds[0] and uses_dict:
                    epochs.append(model.n_epochs_)
            secs.append(time.perf_counter() - t0)  # includes the few predictions, negligible next to fitting
            per_seed.append(np.mean(maps))
        cell = f"{np.mean(per_seed):6.2f} +-{np.std(per_seed):5.2f}" if len(per_seed) > 1 else f"{per_seed[0]:14.2f}"
        print(f"{name:<38} {cell:>14} {np.mean(secs):16.1f}  {epochs if epochs else ''}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2], help="mosaic random_state values")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="classifier random_state values")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--image-block", type=int, default=8)
    parser.add_argument("--image-timestep", type=int, default=0)
    parser.add_argument("--text-block", type=int, default=4)
    parser.add_argument("--text-timestep", type=float, default=0.0)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "sklearn_difffeat_bench_cache"))
    parser.add_argument("--threads", type=int, default=None, help="torch and BLAS threads")
    parser.add_argument("--no-variants", dest="variants", action="store_false")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-yeast", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), CUDA available: {torch.cuda.is_available()}"
    )
    print(f"load average at start (1/5/15 min): {os.getloadavg()}")
    print(f"previous defaults: {OLD_DEFAULTS}")
    current = FusionClassifier().get_params()
    print(f"current defaults:  { {k: current[k] for k in OLD_DEFAULTS} }")
    if not args.skip_demo:
        run_demo(args)
    if not args.skip_yeast:
        run_yeast(args)


if __name__ == "__main__":
    main()
