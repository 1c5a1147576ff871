"""The embedded models through the public API, and the end-to-end demo on a small sample."""

import contextlib
import dataclasses
import functools
import json
import re

import joblib
import numpy as np
import pytest
from PIL import Image

from sklearn_difffeat import DiTFeatureExtractor, TextDiffusionFeatureExtractor
from sklearn_difffeat.backbones._hub import EMBEDDED_DIR, embedded_models
from sklearn_difffeat.datasets import load_fashion_mosaics
from sklearn_difffeat.extractors import clear_backbone_cache
from sklearn_difffeat.metrics import multilabel_report


@pytest.fixture(scope="module")
def mosaics():
    return load_fashion_mosaics(12, split="test", random_state=3).data


def test_embedded_models_are_listed():
    assert {"fashion-dit", "fashion-mdlm"} <= set(embedded_models())


@pytest.mark.parametrize("cls, name, column, params", [
    (DiTFeatureExtractor, "fashion-dit", "image", dict(block=[3, -1], timestep=[0, 200])),
    (TextDiffusionFeatureExtractor, "fashion-mdlm", "text", dict(block=[2, -1], timestep=[0.0, 0.4])),
])
def test_embedded_models_load_by_name_like_a_folder_and_are_deterministic(mosaics, cls, name, column, params):
    by_name = cls(f"embedded:{name}", **params).fit(None).transform(mosaics[column])
    clear_backbone_cache()  # a fresh load, as in another process
    again = cls(f"embedded:{name}", **params).fit(None).transform(mosaics[column])
    by_path = cls(str(EMBEDDED_DIR / name), **params).fit(None).transform(mosaics[column])
    np.testing.assert_array_equal(by_name, again)
    np.testing.assert_array_equal(by_name, by_path)
    assert np.isfinite(by_name).all() and by_name.std(axis=0).mean() > 1e-3  # not a constant feature


def test_unknown_embedded_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="fashion-dit"):
        DiTFeatureExtractor("embedded:nope").fit(None)


# A small sample and a small grid, so the whole demo runs in seconds: 2 timesteps per modality (every block of each
# model), 3 candidates, 32-wide heads trained for 5 epochs. 60 training mosaics leave every label present in each
# 30-row training fold.
SMALL = dict(
    image_timesteps=(0, 500), text_timesteps=(0.0, 0.5), max_evaluations=3,
    search_fusion_params=dict(projection_dim=32, max_epochs=5), fusion_params=dict(projection_dim=32, max_epochs=5),
)
SIZE = ["--n-train", "60", "--n-test", "30", "--cv", "2"]
ROWS = ("image only", "text only", "fused")


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """One feature cache for the demo runs of this module: the first run extracts, later runs read it."""
    return tmp_path_factory.mktemp("demo_cache")


def _demo(monkeypatch, cache, *argv):
    """``python -m sklearn_difffeat demo ARGV`` on the small grid; the command line's own options pass through."""
    from sklearn_difffeat import __main__, demo

    monkeypatch.setattr(demo, "run_demo", functools.partial(demo.run_demo, **SMALL, cache=cache))
    assert __main__.main(["demo", *argv]) == 0


@contextlib.contextmanager
def _threads(n):
    """Torch and the numerical libraries on ``n`` CPU threads, as the demo runs them (``--threads``), then as before.

    Float reductions split over another number of threads add in another order, so a refit must run on the
    demo's thread count to reproduce its predictions bit for bit.
    """
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(previous)


def _table(out):
    """{row: (mAP, CF1, OF1)} as printed, in percent."""
    rows = {}
    for line in out.splitlines():
        for name in ROWS:
            if line.startswith(name + " "):
                rows[name] = tuple(float(v) for v in line.split()[-3:])
    return rows


def _bars(err):
    """The descriptions of the tqdm bars drawn on stderr."""
    return {m.group(1) for m in re.finditer(r"(?:^|[\r\n])([A-Za-z]\w*): +\d+%\|", err)}


@pytest.mark.slow
def test_demo_end_to_end_on_a_small_sample(tmp_path, monkeypatch, capfd, demo_cache):
    import torch

    threads = torch.get_num_threads()
    _demo(monkeypatch, demo_cache, *SIZE, "--output", str(tmp_path))
    out, err = capfd.readouterr()
    assert torch.get_num_threads() == threads  # the demo's one thread is given back
    summary = json.loads((tmp_path / "summary.json").read_text())

    # The table: its three rows, with the numbers of the summary file.
    printed = _table(out)
    assert set(printed) == set(ROWS) == set(summary["held_out"])
    for name, values in printed.items():
        report = summary["held_out"][name]
        np.testing.assert_allclose(values, [100 * report[k] for k in ("mAP", "CF1", "OF1")], atol=0.05 + 1e-9)
    # The grid holds every block of the two models at the small grid's timesteps.
    n_image = DiTFeatureExtractor("embedded:fashion-dit", block=-1).fit(None).n_blocks_
    n_text = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", block=-1).fit(None).n_blocks_
    assert summary["grid_size"] == n_image * 2 * n_text * 2
    assert 1 <= summary["evaluations"] <= 3
    assert f"local search: {summary['evaluations']} evaluations of {summary['grid_size']} grid points" in out
    assert f"reloaded predictions identical: {summary['reload_identical']}" in out
    probes = {k: 100 * v for k, v in summary["probes"].items()}
    assert (f"linear probes, held-out mAP: image features {probes['image']:.1f} (raw pixels "
            f"{probes['raw pixels']:.1f}); text features {probes['text']:.1f} (untrained copy "
            f"{probes['text, untrained copy']:.1f}, TF-IDF {probes['TF-IDF']:.1f})") in out
    assert all(0 < v <= 100 for v in probes.values())

    # The saved pipeline predicts the held-out split as the table says, and as the same pipeline refitted here
    # from the chosen parameters (training is seeded and runs on the demo's one thread, so the two must agree
    # exactly).
    from sklearn_difffeat.demo import build_pipeline

    test = load_fashion_mosaics(30, split="test", random_state=0)
    train = load_fashion_mosaics(60, split="train", random_state=0)
    reloaded = joblib.load(tmp_path / "diff_feat_pipeline.joblib")
    proba = reloaded.predict_proba(test.data)
    assert multilabel_report(test.Y, proba)["mAP"] == pytest.approx(summary["held_out"]["fused"]["mAP"])
    chosen = {f"features__{k}": v for k, v in summary["chosen"].items()}
    refit = build_pipeline(str(demo_cache), fusion_params=SMALL["fusion_params"]).set_params(**chosen)
    with _threads(1):  # the demo's default (no --threads above)
        refitted = refit.fit(train.data, train.Y).predict_proba(test.data)
    np.testing.assert_array_equal(refitted, proba)
    assert summary["reload_identical"] is True

    # The two figures: real PNGs at their documented sizes (7 x 5 in at 120 dpi, 12 x 4.6 in at 100 dpi).
    for name, size in (("image_block_timestep_map.png", (840, 600)), ("tsne_image_text_fused.png", (1200, 460))):
        with Image.open(tmp_path / name) as png:
            assert png.format == "PNG" and png.size == size
            png.verify()
        assert f"{tmp_path / name}" in out
    colouring = summary["tsne_colouring"]
    assert colouring["single_class"] == int((test.Y.sum(axis=1) == 1).sum())
    assert colouring["single_class"] + colouring["several_classes"] == 30

    # What a newcomer sees by default: the steps, one bar (the search's), no scikit-learn or library chatter.
    assert out.startswith("data: 60 train / 30 test mosaics")
    assert _bars(err) == {"BlockTimestepSearchCV"}
    assert "Fitting" not in out + err and "Warning" not in err


def test_demo_settings_defaults_overrides_and_bad_values(monkeypatch):
    from sklearn_difffeat import __main__, demo

    # The documented demo (README, the command line's defaults).
    assert dataclasses.asdict(demo.DemoSettings()) == dict(
        n_train=1000, n_test=500, output="demo_output", cv=3, verbose=1,
        image_timesteps=(0, 50, 100, 200, 300, 500, 700, 900), text_timesteps=(0.0, 0.15, 0.3, 0.5, 0.7),
        max_evaluations=None, search_fusion_params={"projection_dim": 256, "max_epochs": 20}, fusion_params=None,
        cache=None, n_threads=1,
    )

    # The command line builds the settings from its options (--threads 0: the libraries' own thread count).
    seen = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    assert __main__.main(["demo", "--n-train", "7", "--cv", "4", "--output", "out", "--threads", "0", "--quiet"]) == 0
    assert seen == [demo.DemoSettings(n_train=7, cv=4, output="out", verbose=0, n_threads=None)]
    assert __main__.main(["demo", "--verbose"]) == 0
    assert seen[1] == demo.DemoSettings(verbose=2)

    for bad, match in ((dict(n_train=0), "n_train must be an int >= 1, got 0"), (dict(cv=1), "cv must be an int >= 2"),
                       (dict(n_threads=1.5), "n_threads"), (dict(verbose=-1), "verbose"),
                       (dict(text_timesteps=()), "text_timesteps must hold at least one")):
        with pytest.raises(ValueError, match=match):
            demo.DemoSettings(**bad)
    monkeypatch.undo()
    with pytest.raises(TypeError, match=r"Unknown demo settings \['n_trian'\]"):
        demo.run_demo(n_trian=5)
    with pytest.raises(TypeError, match="run_demo takes a DemoSettings"):
        demo.run_demo(1000)
    with pytest.raises(ValueError, match="n_test"):
        demo.run_demo(demo.DemoSettings(), n_test=-3)


@pytest.mark.slow
def test_demo_quiet_prints_the_results_only_and_verbose_the_detail(tmp_path, monkeypatch, capfd, demo_cache):
    _demo(monkeypatch, demo_cache, *SIZE, "--output", str(tmp_path / "quiet"), "--quiet")
    out, err = capfd.readouterr()
    assert out.startswith("\nDiff-Feat on Fashion-MNIST mosaics")  # the table first: no progress before it
    assert set(_table(out)) == set(ROWS) and "reloaded predictions identical: True" in out
    assert err == ""

    # One held-out mosaic more than the cache holds, so the extractors have work to show a bar for.
    size = [*SIZE[:2], "--n-test", "31", *SIZE[4:]]
    _demo(monkeypatch, demo_cache, *size, "--output", str(tmp_path / "verbose"), "--verbose")
    out, err = capfd.readouterr()
    assert set(_table(out)) == set(ROWS)
    assert {"DiTFeatureExtractor", "TextDiffusionFeatureExtractor"} <= _bars(err)
    assert "BlockTimestepSearchCV" not in _bars(err)  # its per-step lines replace the bar
    assert "[BlockTimestepSearchCV] step 1:" in out and "Fitting 2 folds for each of" in out


def test_untrained_copy_is_a_fresh_model_whose_blocks_start_as_the_identity(tmp_path):
    # DDiT's adaLN gates start at zero, so every block of a freshly initialised model passes its input through:
    # the copy's features are the same at every block, and differ from the trained model's.
    from sklearn_difffeat.backbones.untrained import untrained_copy

    texts = ["a sneaker and a bag", "two dresses", "a coat"]
    copy = untrained_copy(EMBEDDED_DIR / "fashion-mdlm", "mdlm", tmp_path / "copy")
    first, last = (TextDiffusionFeatureExtractor(copy, block=b, timestep=0.0).fit(None).transform(texts)
                   for b in (1, -1))
    np.testing.assert_allclose(first, last, rtol=1e-5, atol=1e-6)
    trained = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", block=1, timestep=0.0).fit(None).transform(texts)
    assert not np.allclose(first, trained, atol=1e-3)


def test_untrained_copy_rejects_an_unknown_kind_before_copying(tmp_path):
    from sklearn_difffeat.backbones.untrained import untrained_copy

    with pytest.raises(ValueError, match=r"kind must be one of \('dit', 'mdlm'\), got 'bert'"):
        untrained_copy(EMBEDDED_DIR / "fashion-mdlm", "bert", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_demo_counts_long_captions_without_the_tokenizers_warning():
    import logging

    from transformers.utils import logging as hf_logging

    from sklearn_difffeat.demo._run import truncated_captions

    # Held-out caption 183 (random_state=0) is the split's one caption over the text model's 64 tokens.
    texts = load_fashion_mosaics(184, split="test", random_state=0).data["text"].tolist()[180:]
    clear_backbone_cache()  # a fresh tokenizer: transformers warns once per tokenizer
    backbone = TextDiffusionFeatureExtractor("embedded:fashion-mdlm").get_backbone()
    # Caught on transformers' own logger, wherever its handler writes, at its default level.
    records = []
    catcher = logging.Handler()
    catcher.emit = records.append
    hf_root = logging.getLogger("transformers")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_root.addHandler(catcher)
    try:
        assert truncated_captions(backbone, texts) == 1
        assert not any("sequence length is longer" in r.getMessage() for r in records)
        backbone.tokenizer(texts)  # the same texts as transformers tokenizes them by default: it warns
        assert any("sequence length is longer" in r.getMessage() for r in records)
    finally:
        hf_root.removeHandler(catcher)
        hf_logging.set_verbosity(level)
