"""Quick start, offline on CPU: Diff-Feat features from the embedded models, a fused classifier, persistence.

    python examples/quickstart.py

Swap the model names for "facebook/DiT-XL-2-256" and "kuleshov-group/mdlm-owt" (and device="cuda") to run
the paper's models; see docs/guide.md.
"""

import tempfile
from pathlib import Path

import joblib
import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import Pipeline

from sklearn_difffeat import DiTFeatureExtractor, FusionClassifier, TextDiffusionFeatureExtractor
from sklearn_difffeat.datasets import load_fashion_mosaics
from sklearn_difffeat.metrics import multilabel_report


def main(n_train=400, n_test=200):
    train = load_fashion_mosaics(n_train, split="train")
    test = load_fashion_mosaics(n_test, split="test")

    # 1. An extractor alone: images in, pooled block features out (one truncated pass for both blocks).
    dit = DiTFeatureExtractor("embedded:fashion-dit", block=[4, -1], timestep=50).fit(None)
    features = dit.transform(train.data["image"][:8])
    print(f"DiT features: {features.shape}, first names {list(dit.get_feature_names_out()[:2])}")

    # 2. The Diff-Feat pipeline: both extractors in a ColumnTransformer, fused by FusionClassifier.
    pipe = Pipeline([
        ("features", ColumnTransformer([
            ("image", DiTFeatureExtractor("embedded:fashion-dit", block=-1, timestep=0), "image"),
            ("text", TextDiffusionFeatureExtractor("embedded:fashion-mdlm", block=-1, timestep=0.0), "text"),
        ]).set_output(transform="pandas")),
        ("clf", FusionClassifier(projection_dim=2048, random_state=0)),
    ])
    pipe.fit(train.data, train.Y)
    report = multilabel_report(test.Y, pipe.predict_proba(test.data))
    print("held-out: " + ", ".join(f"{k} {100 * report[k]:.1f}" for k in ("mAP", "CF1", "OF1")))

    # 3. Persistence: the pickle holds the fitted head, not the backbone weights (they reload on first use).
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pipe.joblib"
        joblib.dump(pipe, path)
        restored = joblib.load(path)
        same = np.array_equal(restored.predict_proba(test.data), pipe.predict_proba(test.data))
        print(f"saved {path.stat().st_size / 1e6:.1f} MB; reloaded predictions identical: {same}")
    return report


if __name__ == "__main__":
    main()
