"""`sklearn-difffeat reproduce` end to end on small COCO and VG500 folders in the official schemas, with the
embedded models: the table, the files, the rerun that computes nothing, the run resumed after extraction."""

import json

import numpy as np
import pytest
from PIL import Image
from test_benchmark_datasets import _write_coco

from sklearn_difffeat.__main__ import main
from sklearn_difffeat.extractors import clear_backbone_cache
from sklearn_difffeat.extractors import image as image_module
from sklearn_difffeat.extractors import text as text_module
from sklearn_difffeat.reproduce import METRICS, ReproduceSettings, grid_axes

MODELS = ["--image-model", "embedded:fashion-dit", "--text-model", "embedded:fashion-mdlm"]
# COCO ids run 1..90 with gaps; each category is named by a word the embedded text model knows.
CATEGORIES = [(1, "shirt"), (3, "bag"), (8, "dress"), (27, "coat"), (44, "sandal"), (90, "boot")]
COLOURS = np.array([[220, 30, 30], [30, 200, 40], [30, 40, 220], [230, 220, 30], [200, 40, 210], [20, 210, 220]])


def _labelled_images(n, seed):
    """``n`` (labels, captions, pixels): 1-3 labels per image, 2-5 captions naming them, a colour per label."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        labels = sorted(rng.choice(len(CATEGORIES), size=rng.integers(1, 4), replace=False).tolist())
        words = [CATEGORIES[c][1] for c in labels]
        captions = [f"a {' and a '.join(rng.permutation(words))}" + (" on a table" if k % 2 else "")
                    for k in range(rng.integers(2, 6))]
        pixels = np.zeros((24, 24, 3), dtype=np.uint8)
        for i, c in enumerate(labels):  # one vertical band per label
            pixels[:, 8 * i:8 * i + 8] = COLOURS[c]
        out.append((labels, captions, pixels))
    return out


def write_coco(root, n_train=40, n_test=40, seed=0):
    """A COCO 2014 folder (annotations/instances_*, captions_*, train2014/, val2014/) of tiny JPEGs."""
    for split, n, first_id in (("train2014", n_train, 10), ("val2014", n_test, 5000)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations, captions = [], [], []
        for k, (labels, texts, pixels) in enumerate(_labelled_images(n, seed + first_id)):
            image_id = first_id + 3 * k
            name = f"COCO_{split}_{image_id:012d}.jpg"
            Image.fromarray(pixels).save(root / split / name, "JPEG", quality=90)
            images.append({"id": image_id, "file_name": name, "height": 24, "width": 24})
            annotations += [{"id": 100 * image_id + j, "image_id": image_id, "category_id": CATEGORIES[c][0],
                             "iscrowd": 0, "area": 64.0, "bbox": [0, 0, 8, 8]} for j, c in enumerate(labels)]
            captions += [{"id": 100 * image_id + j, "image_id": image_id, "caption": t} for j, t in enumerate(texts)]
        categories = [{"id": i, "name": name, "supercategory": "thing"} for i, name in CATEGORIES]
        _write_coco(root, split, {"images": images, "annotations": annotations, "categories": categories},
                    {"images": images, "annotations": captions})
    return root


def write_vg500(root, n_train=16, n_test=12, seed=0, regions=True):
    """A VG500 folder (the two lists, the label index, VG_100K/, region_descriptions.json) of tiny JPEGs."""
    (root / "VG_100K").mkdir(parents=True, exist_ok=True)
    index, entries = {}, []
    for split, n, first_id in (("train", n_train, 100), ("test", n_test, 900)):
        names = []
        for k, (labels, texts, pixels) in enumerate(_labelled_images(n, seed + first_id)):
            name = f"{first_id + k}.jpg"
            Image.fromarray(pixels).save(root / "VG_100K" / name, "JPEG", quality=90)
            index[name] = [int(c) * 83 for c in labels]  # label indices spread over 0..499
            entries.append({"id": first_id + k, "regions": [{"region_id": 10 * k + j, "image_id": first_id + k,
                                                             "phrase": t, "x": 0, "y": 0, "width": 8, "height": 8}
                                                            for j, t in enumerate(texts)]})
            names.append(name)
        (root / f"{split}_list_500.txt").write_text("\n".join(names) + "\n")
    (root / "vg_category_500_labels_index.json").write_text(json.dumps(index))
    if regions:
        (root / "region_descriptions.json").write_text(json.dumps(entries))
    return root


def _reproduce(dataset, root, store, *extra):
    code = main(["reproduce", dataset, "--root", str(root), "--store", str(store), "--grid", "small",
                 "--num-workers", "0", "--quiet", *MODELS, *extra])
    assert code == 0
    return json.loads((store / f"reproduce-{dataset}" / "results.json").read_text())


def _check_table(summary, rows=("image only", "text only", "fused")):
    assert list(summary["results"]) == list(rows)
    for row in summary["results"].values():
        assert set(row["report"]) == set(METRICS)
        assert all(np.isfinite(row["report"][m]) and 0 <= row["report"][m] <= 1 for m in METRICS)


def test_grid_axes_resolve_every_block_of_each_model():
    axes = grid_axes("paper", 28, 12)
    assert axes["features__image__block"] == list(range(1, 29))
    assert axes["features__image__timestep"] == [0, 25, 50, 100, 200, 400, 600, 800]
    assert axes["features__text__block"] == list(range(1, 13))
    assert axes["features__text__timestep"] == [0.0, 0.1, 0.2, 0.3, 0.5]
    small = grid_axes("small", 8, 6)
    assert small["features__image__block"] == [2, 4, 6, 8] and small["features__text__block"] == [2, 4, 6]
    assert list(grid_axes("small", 8, None)) == ["features__image__block", "features__image__timestep"]


def test_settings_refuse_bad_values(tmp_path):
    for bad in ({"dataset": "imagenet"}, {"grid": "full"}, {"limit": 0}, {"val_fraction": 1.0},
                {"dtype": "int8"}, {"seed": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ReproduceSettings(**{"dataset": "coco", "root": tmp_path, "store": tmp_path, **bad})


@pytest.fixture(autouse=True)
def one_thread():
    """One torch and BLAS thread: on a shared 2-core machine each head fit is several times faster so."""
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(previous)


def test_extraction_at_the_deepest_block_stores_every_block_up_to_it(tmp_path, monkeypatch):
    """What the protocol's extraction relies on: cache_depth at the requested block stores blocks 0..depth."""
    from sklearn_difffeat import DiTFeatureExtractor

    images = np.stack([pixels for _, _, pixels in _labelled_images(6, seed=1)])
    params = dict(timestep=[0, 100], cache=str(tmp_path / "store"), num_workers=0)
    DiTFeatureExtractor("embedded:fashion-dit", block=8, cache_depth=8, **params).fit().transform(images)
    clear_backbone_cache()
    monkeypatch.setattr(image_module, "load_dit_backbone", _kill)
    shallower = DiTFeatureExtractor("embedded:fashion-dit", block=[0, 3, 7], **params).fit()
    features, report = shallower.transform_with_report(images)
    assert report.computed == 0 and report.stored == len(images) and np.isfinite(features).all()


def test_quick_end_to_end_coco_and_a_rerun_that_computes_nothing(tmp_path):
    root, store = write_coco(tmp_path / "coco", n_train=16, n_test=16), tmp_path / "store"
    summary = _reproduce("coco", root, store, "--limit", "12")
    _check_table(summary)
    assert summary["splits"]["train"]["n"] == 12 and summary["splits"]["test"]["n"] == 12
    assert all(c["computed"] > 0 and c["failed"] == 0 for c in summary["extraction"].values())
    page = (store / "reproduce-coco" / "results.md").read_text()
    assert "| fused |" in page and "98.6" in page and "MS-COCO-enhanced" in page
    assert "not defined in the paper's abstract" in page and "COCO 2014" in page
    again = _reproduce("coco", root, store, "--limit", "12")
    assert again["resumed_steps"] == ["extract", "search", "score"]
    assert {m: c["computed"] for m, c in again["extraction"].items()} == {"image": 0, "text": 0}
    assert again["results"] == summary["results"]


class Killed(Exception):
    """Stands for the process dying: raised by a patched step."""


def _kill(*args, **kwargs):
    raise Killed


def test_a_run_killed_after_extraction_resumes_at_the_search(tmp_path, monkeypatch):
    from sklearn_difffeat.reproduce import _run

    root, store = write_coco(tmp_path / "coco"), tmp_path / "store"
    state_file = store / "reproduce-coco" / "state.json"
    with monkeypatch.context() as patch:
        patch.setattr(_run, "search_cells", _kill)
        with pytest.raises(Killed):
            _reproduce("coco", root, store, "--limit", "40")
    recorded = json.loads(state_file.read_text())["steps"]
    assert list(recorded) == ["extract"]
    assert sum(r["computed"] for r in recorded["extract"]["result"]["image"].values()) > 0
    clear_backbone_cache()
    with monkeypatch.context() as patch:  # no extraction work, and no model even loaded: the store serves all
        patch.setattr(_run, "extract_features", _kill)
        patch.setattr(image_module, "load_dit_backbone", _kill)
        patch.setattr(text_module, "load_text_backbone", _kill)
        resumed = _reproduce("coco", root, store, "--limit", "40")
    assert resumed["resumed_steps"] == ["extract"]
    assert {m: c["computed"] for m, c in resumed["extraction"].items()} == {"image": 0, "text": 0}
    _check_table(resumed)
    assert resumed["splits"]["train"]["n"] == 40 and resumed["splits"]["test"]["n"] == 40

    # Without the state file every step reruns; the store serves every feature, and the results are the same.
    state_file.unlink()
    fresh = _reproduce("coco", root, store, "--limit", "40")
    assert fresh["resumed_steps"] == []
    assert {m: c["computed"] for m, c in fresh["extraction"].items()} == {"image": 0, "text": 0}
    assert all(c["already_stored"] > 0 for c in fresh["extraction"].values())
    assert fresh["search"] == resumed["search"] and fresh["results"] == resumed["results"]

    # A changed held-out fraction reruns the search and the heads, not the extraction.
    changed = _reproduce("coco", root, store, "--limit", "40", "--val-fraction", "0.25")
    assert changed["resumed_steps"] == ["extract"] and changed["search"]["n_val"] == 10


def test_vg500_with_region_phrases_and_an_unreadable_image(tmp_path):
    root, store = write_vg500(tmp_path / "vg", n_train=14, n_test=10), tmp_path / "store"
    (root / "VG_100K" / "103.jpg").write_bytes(b"not a jpeg")  # the 4th training image
    summary = _reproduce("vg500", root, store)
    _check_table(summary)
    assert summary["extraction"]["image"]["failed"] == 1 and summary["extraction"]["text"]["failed"] == 0
    assert summary["splits"]["train"] == {"name": "train", "n": 13, "dropped": {"unreadable": 1}}
    failures = (store / "reproduce-vg500" / "failures.tsv").read_text().splitlines()
    assert len(failures) == 2 and failures[1].startswith("train\timage\t3\t") and "103.jpg" in failures[1]
    assert "45.7" in (store / "reproduce-vg500" / "results.md").read_text()


def test_vg500_without_region_descriptions_runs_the_image_model_alone(tmp_path):
    root, store = write_vg500(tmp_path / "vg", n_train=10, n_test=8, regions=False), tmp_path / "store"
    with pytest.warns(UserWarning, match="no region descriptions"):
        summary = _reproduce("vg500", root, store)
    _check_table(summary, rows=("image only",))
    assert list(summary["extraction"]) == ["image"] and summary["models_used"]["text"] is None
    assert "only the image model ran" in (store / "reproduce-vg500" / "results.md").read_text()
