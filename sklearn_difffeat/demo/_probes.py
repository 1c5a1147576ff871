"""Linear probes: what the diffusion features carry, against raw pixels, TF-IDF and an untrained text model."""

from __future__ import annotations

import numpy as np

from ._pipeline import TEXT_MODEL

# Inverse regularisation of the linear probes (the model cards' probe): stronger for the wide image inputs.
PROBE_C = {"image": 0.1, "text": 1.0}


def linear_probe(F_train, Y_train, F_test, C):
    """Held-out probabilities of a linear probe: scaling (no centring, so sparse inputs work) + one-vs-rest
    logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(with_mean=False), OneVsRestClassifier(LogisticRegression(C=C, max_iter=500)))
    return clf.fit(F_train, Y_train).predict_proba(F_test)


def probe_scores(model, train, test, best):
    """Held-out mAP of linear probes at the chosen (block, timestep): what the diffusion features carry,
    against raw pixels, TF-IDF and the text model's own untrained copy (how much its training added)."""
    import tempfile
    from pathlib import Path

    from sklearn.feature_extraction.text import TfidfVectorizer

    from .. import TextDiffusionFeatureExtractor
    from ..backbones import resolve_model_dir
    from ..backbones.untrained import untrained_copy
    from ..metrics import mean_average_precision

    def score(F_train, F_test, kind):
        return float(mean_average_precision(test.Y, linear_probe(F_train, train.Y, F_test, PROBE_C[kind])))

    features = model["features"]
    F_train, F_test = features.transform(train.data), features.transform(test.data)
    scores = {kind: score(F_train.filter(regex=f"^{kind}__").to_numpy(), F_test.filter(regex=f"^{kind}__").to_numpy(),
                          kind) for kind in ("image", "text")}
    pixels = [np.stack(split.data["image"]).reshape(len(split.Y), -1) / 255.0 for split in (train, test)]
    scores["raw pixels"] = score(*pixels, "image")
    tfidf = TfidfVectorizer().fit(train.data["text"])
    scores["TF-IDF"] = score(tfidf.transform(train.data["text"]), tfidf.transform(test.data["text"]), "text")
    with tempfile.TemporaryDirectory() as tmp:
        copy = untrained_copy(resolve_model_dir(TEXT_MODEL), "mdlm", Path(tmp) / "text")
        untrained = TextDiffusionFeatureExtractor(
            copy, block=best["features__text__block"], timestep=best["features__text__timestep"], batch_size=128
        ).fit(None)
        scores["text, untrained copy"] = score(untrained.transform(train.data["text"]),
                                               untrained.transform(test.data["text"]), "text")
    return scores
