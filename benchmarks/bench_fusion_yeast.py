"""FusionClassifier vs. OneVsRest logistic regression on MULAN yeast (2,417 x 103, 14 labels), 5-fold CV.

The 103 features are split into two modalities (50 + 53 columns) so the fusion path is exercised; the
classifier runs with its defaults (projection width Diff-Feat's 2048). Prints per-fold-mean mAP, CF1, OF1
(x100), the total fit wall time of each model over the five folds, and the ratio.

    python benchmarks/bench_fusion_yeast.py [--threads N] [--projection-dim D]
"""

import argparse
import os
import platform
import time

import numpy as np
import pandas as pd
import torch
from river import datasets
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from sklearn_difffeat.fusion import FusionClassifier
from sklearn_difffeat.metrics import multilabel_report


def load_yeast():
    """MULAN yeast (shipped inside the river wheel: no network): features, label matrix, the 5 shuffled folds."""
    labels = [f"Class{i}" for i in range(1, 15)]
    df = pd.read_csv(datasets.Yeast().path)
    X = df.drop(columns=labels).to_numpy(np.float32)
    Y = df[labels].to_numpy()
    return X, Y, list(KFold(5, shuffle=True, random_state=0).split(X))


def evaluate(make_model, X, Y, folds):
    scores, models, fit_s = [], [], 0.0
    for tr, te in folds:
        model = make_model()
        t0 = time.perf_counter()
        model.fit(X[tr], Y[tr])
        fit_s += time.perf_counter() - t0
        scores.append(multilabel_report(Y[te], model.predict_proba(X[te]), top_k=None))
        models.append(model)
    mean = {k: 100 * np.mean([s[k] for s in scores]) for k in ("mAP", "CF1", "OF1")}
    return mean, fit_s, models


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None, help="torch and BLAS threads (default: libraries' choice)")
    parser.add_argument("--projection-dim", type=int, default=2048)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)  # numpy/scipy BLAS used by the logistic regression baseline

    X, Y, folds = load_yeast()

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), CUDA available: {torch.cuda.is_available()}"
    )
    # Other processes share this machine's cores; the load average tells how comparable the timings are.
    print(f"load average at start (1/5/15 min): {os.getloadavg()}")
    print(f"data: yeast {X.shape[0]} x {X.shape[1]}, {Y.shape[1]} labels; 5-fold KFold(shuffle, random_state=0)")

    def baseline():
        return make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=1000)))

    def fusion():
        return FusionClassifier(modalities=[50, 53], projection_dim=args.projection_dim)

    print(f"fusion params: {fusion().get_params()}")

    ref, ref_s, _ = evaluate(baseline, X, Y, folds)
    ours, ours_s, fitted = evaluate(fusion, X, Y, folds)

    print(f"{'model':<44} {'mAP':>6} {'CF1':>6} {'OF1':>6} {'fit s (5 folds)':>16}")
    rows = [
        ("StandardScaler + OneVsRest(LogisticRegression)", ref, ref_s),
        (f"FusionClassifier(2 modalities, d={args.projection_dim})", ours, ours_s),
    ]
    for name, m, secs in rows:
        print(f"{name:<44} {m['mAP']:6.2f} {m['CF1']:6.2f} {m['OF1']:6.2f} {secs:16.2f}")
    print(f"mAP difference (fusion - baseline): {ours['mAP'] - ref['mAP']:+.2f} points")
    print(f"fit time ratio fusion / baseline: {ours_s / ref_s:.1f}x")
    print(f"epochs run per fold: {[m.n_epochs_ for m in fitted]}")


if __name__ == "__main__":
    main()
