"""Linear probes of the embedded models' features on the embedded mosaics (macro mAP, held-out split).

Puts the demo's numbers in context: trained vs randomly initialised models (same architecture), raw pixels,
and a TF-IDF text baseline, plus late fusion (averaged probabilities) of the image and text probes.
Run: python benchmarks/probe_embedded.py [--n-train 800 --n-test 400]
"""

import argparse
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_difffeat import DiTFeatureExtractor, TextDiffusionFeatureExtractor
from sklearn_difffeat.backbones._hub import EMBEDDED_DIR
from sklearn_difffeat.datasets import load_fashion_mosaics
from sklearn_difffeat.metrics import mean_average_precision


def untrained_copy(name, folder):
    """The embedded model's folder with its weights replaced by a fresh seeded initialisation."""
    shutil.copytree(EMBEDDED_DIR / name, folder)
    torch.manual_seed(0)
    if name == "fashion-dit":
        from diffusers import DiTTransformer2DModel

        config = DiTTransformer2DModel.load_config(folder / "transformer")
        DiTTransformer2DModel.from_config(config).save_pretrained(folder / "transformer")
    else:
        from sklearn_difffeat.backbones.mdlm import DDiTModel

        DDiTModel(DDiTModel.from_pretrained(folder).config).save_pretrained(folder)
    return str(folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-test", type=int, default=400)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    train = load_fashion_mosaics(args.n_train, split="train", random_state=7)
    test = load_fashion_mosaics(args.n_test, split="test", random_state=7)

    def probe(F_train, F_test, C):
        clf = make_pipeline(StandardScaler(with_mean=False), OneVsRestClassifier(LogisticRegression(C=C, max_iter=500)))
        return clf.fit(F_train, train.Y).predict_proba(F_test)

    def features(extractor, column):
        extractor.fit(None)
        return extractor.transform(train.data[column]), extractor.transform(test.data[column])

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        dit_models = {"trained": "embedded:fashion-dit", "untrained": untrained_copy("fashion-dit", Path(tmp) / "dit")}
        text_models = {
            "trained": "embedded:fashion-mdlm",
            "untrained": untrained_copy("fashion-mdlm", Path(tmp) / "mdlm"),
        }
        for which, model in dit_models.items():
            for pooling in ("none", "mean"):
                ext = DiTFeatureExtractor(model, block=6, timestep=0, pooling=pooling)
                rows[f"DiT {which}, block 6, t=0, pooling={pooling}"] = probe(*features(ext, "image"), C=0.1)
        for which, model in text_models.items():
            ext = TextDiffusionFeatureExtractor(model, block=-1, timestep=0.0, pooling="mean")
            rows[f"text model {which}, last block, t=0, mean"] = probe(*features(ext, "text"), C=1.0)
    pixels = [
        np.stack(train.data["image"]).reshape(args.n_train, -1) / 255.0,
        np.stack(test.data["image"]).reshape(args.n_test, -1) / 255.0,
    ]
    rows["raw pixels"] = probe(*pixels, C=0.1)
    tfidf = TfidfVectorizer().fit(train.data["text"])
    rows["TF-IDF on captions"] = probe(tfidf.transform(train.data["text"]), tfidf.transform(test.data["text"]), C=1.0)
    image_best = rows["DiT trained, block 6, t=0, pooling=none"]
    rows["late fusion: mean of DiT (none) and TF-IDF probabilities"] = (image_best + rows["TF-IDF on captions"]) / 2
    rows["late fusion: mean of DiT (none) and trained text model"] = (
        image_best + rows["text model trained, last block, t=0, mean"]
    ) / 2

    print(
        f"linear probes (StandardScaler + OneVsRest LogisticRegression), {args.n_train} train / {args.n_test} "
        f"test mosaics, held-out macro mAP"
    )
    for name, proba in rows.items():
        print(f"  {name:<60s} {100 * mean_average_precision(test.Y, proba):5.1f}")


if __name__ == "__main__":
    main()
