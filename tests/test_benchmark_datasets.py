"""The MS-COCO and VG500 loaders on small folders written in the official schemas."""

import json
import os
import shutil
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from sklearn_difffeat.datasets import COCO_SPLITS, load_coco, load_vg500

# ----------------------------------------------------------------------------------------------------------- COCO

# File order is deliberately not id order, and the ids have gaps (COCO's run 1..90).
COCO_CATEGORIES = [(90, "toothbrush", "indoor"), (1, "person", "person"), (7, "train", "vehicle"),
                   (3, "car", "vehicle"), (44, "bottle", "kitchen"), (13, "stop sign", "outdoor")]
# image id -> [(category id, iscrowd), ...]; images listed in non-sorted order.
COCO_LABELS = {
    397133: [(1, 0), (3, 0), (1, 0), (3, 0)],
    37777: [(7, 1)],  # crowd only
    252219: [],  # unlabeled, captioned
    87038: [(90, 0), (13, 0)],  # no captions
    174482: [(44, 0), (1, 1), (1, 0)],
    403385: [],  # unlabeled, no captions
    6818: [(1, 0)],
}
# Captions in file order, interleaved between images.
COCO_CAPTIONS = [
    (6818, "Un café à Paris — ☕ on the table."),
    (397133, "A man next to a parked car."),
    (252219, "An empty room."),
    (6818, "東京の電車の中の人"),
    (397133, "Two cars and a person on a street."),
    (37777, "A crowd of trains at a station."),
    (174482, "A person holding a bottle."),
    (397133, "Cars parked along the road."),
    (6818, "Ein Mann läuft über die Straße."),
]


def _coco_docs():
    images = [{"id": i, "file_name": f"COCO_x_{i:012d}.jpg", "height": 4, "width": 6, "license": 1}
              for i in COCO_LABELS]
    annotations, ann_id = [], 1000
    for image_id, labels in COCO_LABELS.items():
        for category_id, crowd in labels:
            ann_id += 7
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": crowd,
                                "area": 12.0, "bbox": [0.0, 0.0, 3.0, 4.0], "segmentation": []})
    categories = [{"id": i, "name": n, "supercategory": s} for i, n, s in COCO_CATEGORIES]
    instances = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    captions = {"info": {}, "licenses": [], "images": images,
                "annotations": [{"id": 5000 + k, "image_id": i, "caption": c}
                                for k, (i, c) in enumerate(COCO_CAPTIONS)]}
    return instances, captions


def _write_coco(root, split, instances, captions, *, images=True):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    with open(root / "annotations" / f"instances_{split}.json", "w", encoding="utf-8") as f:
        json.dump(instances, f)
    with open(root / "annotations" / f"captions_{split}.json", "w", encoding="utf-8") as f:
        json.dump(captions, f, ensure_ascii=False)
    for image in instances["images"] if images else []:
        if not (root / split / image["file_name"]).exists():
            Image.new("RGB", (6, 4), (10, 200, 30)).save(root / split / image["file_name"], "JPEG")


@pytest.fixture
def coco(tmp_path):
    instances, captions = _coco_docs()
    _write_coco(tmp_path, "train2014", instances, captions)
    return tmp_path, instances, captions


def _coco_reference(root, split, drop_unlabeled):
    """Labels, captions and names from the raw files, with plain loops."""
    with open(root / "annotations" / f"instances_{split}.json", encoding="utf-8") as f:
        inst = json.load(f)
    with open(root / "annotations" / f"captions_{split}.json", encoding="utf-8") as f:
        caps = json.load(f)
    category_ids = sorted(c["id"] for c in inst["categories"])
    names = {c["id"]: c["name"] for c in inst["categories"]}
    labels = {im["id"]: set() for im in inst["images"]}
    files = {im["id"]: im["file_name"] for im in inst["images"]}
    for a in inst["annotations"]:
        labels[a["image_id"]].add(a["category_id"])
    texts = {im["id"]: [] for im in inst["images"]}
    for a in caps["annotations"]:
        texts[a["image_id"]].append(a["caption"])
    ids = sorted(i for i in labels if labels[i] or not drop_unlabeled)
    target = [[int(c in labels[i]) for c in category_ids] for i in ids]
    return {"ids": ids, "target": target, "texts": [texts[i] for i in ids], "category_ids": category_ids,
            "names": [names[c] for c in category_ids], "paths": [str(root / split / files[i]) for i in ids]}


@pytest.mark.parametrize("drop_unlabeled", [True, False])
def test_coco_matches_a_reference_from_the_raw_files(coco, drop_unlabeled):
    root, _, _ = coco
    with pytest.warns(UserWarning, match="no caption") as record:
        b = load_coco(root, "train2014", drop_unlabeled=drop_unlabeled)
    ref = _coco_reference(root, "train2014", drop_unlabeled)
    assert list(b.frame.columns) == ["image", "text", "image_id"]
    assert b.frame["image_id"].tolist() == ref["ids"]
    assert b.target.dtype == np.uint8 and b.target.tolist() == ref["target"]
    assert b.frame["text"].tolist() == ref["texts"]
    assert b.frame["image"].tolist() == ref["paths"]
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in b.frame["image"])
    assert b.target_names == ref["names"] and b.category_ids.tolist() == ref["category_ids"] == [1, 3, 7, 13, 44, 90]
    assert b.split == "train2014" and b.root == str(root.resolve()) and "train2014" in b.DESCR
    # One warning, with the count and the ids of the uncaptioned images kept.
    assert len(record) == 1
    expected = "1 (first: 87038)" if drop_unlabeled else "2 (first: 87038, 403385)"
    assert expected in str(record[0].message)


def test_coco_protocol_on_the_hand_made_cases(coco):
    root, _, _ = coco
    with pytest.warns(UserWarning):
        b = load_coco(root)
    frame = b.frame.set_index("image_id")
    row = dict(zip(b.frame["image_id"], b.target))
    col = {name: j for j, name in enumerate(b.target_names)}
    assert row[37777].tolist() == [int(j == col["train"]) for j in range(6)]  # crowd-only image kept, labelled
    assert 252219 not in row and 403385 not in row  # unlabeled images dropped
    assert frame.loc[87038, "text"] == []
    assert frame.loc[6818, "text"] == [COCO_CAPTIONS[0][1], COCO_CAPTIONS[3][1], COCO_CAPTIONS[8][1]]
    assert row[174482][col["person"]] == 1 and row[174482][col["bottle"]] == 1


def test_coco_no_warning_when_every_image_has_captions(coco):
    root, instances, captions = coco
    captions["annotations"].append({"id": 9999, "image_id": 87038, "caption": "A toothbrush by a stop sign."})
    _write_coco(root, "train2014", instances, captions)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = load_coco(root)
    assert b.frame.set_index("image_id").loc[87038, "text"] == ["A toothbrush by a stop sign."]


@pytest.mark.parametrize("split", COCO_SPLITS)
def test_coco_every_split_reads_its_own_files(tmp_path, split):
    instances, captions = _coco_docs()
    _write_coco(tmp_path, split, instances, captions)
    with pytest.warns(UserWarning):
        b = load_coco(tmp_path, split)
    assert b.split == split and all(os.path.dirname(p) == str(tmp_path / split) for p in b.frame["image"])


def test_coco_refuses_an_unknown_split(coco):
    with pytest.raises(ValueError, match=r"split must be one of \['train2014', 'val2014', 'train2017', 'val2017'\]"):
        load_coco(coco[0], "train2015")


@pytest.mark.parametrize("missing", ["root", "instances", "captions", "images"])
def test_coco_names_a_missing_file_or_folder_and_the_layout(coco, missing):
    root, _, _ = coco
    target = {"root": root / "nowhere", "instances": root / "annotations" / "instances_train2014.json",
              "captions": root / "annotations" / "captions_train2014.json", "images": root / "train2014"}[missing]
    if missing == "images":
        shutil.rmtree(target)
    elif missing != "root":
        target.unlink()
    with pytest.raises(FileNotFoundError, match="not found") as e:
        load_coco(target if missing == "root" else root)
    assert str(target) in str(e.value) and "root/annotations/instances_<split>.json" in str(e.value)


def _corrupt(root, instances, captions, change):
    change(instances, captions)
    _write_coco(root, "train2014", instances, captions, images=False)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda i, c: i.pop("annotations"), r"instances_train2014.json is not a COCO annotation file: it has no "
                                            r"'annotations' key"),
        (lambda i, c: i.pop("categories"), r"instances_train2014.json .*no 'categories' key"),
        (lambda i, c: c.pop("annotations"), r"captions_train2014.json .*no 'annotations' key"),
        (lambda i, c: i["annotations"][2].pop("category_id"), r"annotations\[2\] has no 'category_id' key"),
        (lambda i, c: i["images"][4].pop("file_name"), r"images\[4\] has no 'file_name' key"),
        (lambda i, c: c["annotations"][1].pop("caption"), r"captions_train2014.json: annotations\[1\] has no "
                                                          r"'caption' key"),
        (lambda i, c: i["images"].__setitem__(1, [1, 2]), r"images\[1\] is not a JSON object"),
        (lambda i, c: i["annotations"].append({"id": 77, "image_id": 123, "category_id": 1}),
         r"instances_train2014.json: annotation 77 names image id 123, which is not in the file's images"),
        (lambda i, c: i["annotations"].append({"id": 78, "image_id": 6818, "category_id": 2}),
         r"annotation 78 names category id 2, which is not in the file's categories"),
        (lambda i, c: i["annotations"].append({"id": 79, "image_id": 6818, "category_id": 91}),
         r"annotation 79 names category id 91"),
        (lambda i, c: c["annotations"].append({"id": 80, "image_id": 5, "caption": "x"}),
         r"captions_train2014.json: annotation 80 names image id 5"),
        (lambda i, c: i["images"].append({"id": 37777, "file_name": "again.jpg"}), r"duplicate image id 37777"),
        (lambda i, c: i["categories"].append({"id": 3, "name": "car again"}), r"duplicate category id 3"),
        (lambda i, c: i["images"][0].__setitem__("id", "397133"), r"every image id must be an integer, found "
                                                                  r"'397133'"),
        (lambda i, c: c["annotations"][0].__setitem__("caption", None), r"caption of annotation 5000 is not a "
                                                                        r"string"),
    ],
)
def test_coco_names_what_is_wrong_in_a_file(coco, change, match):
    root, instances, captions = coco
    _corrupt(root, instances, captions, change)
    with pytest.raises(ValueError, match=match):
        load_coco(root)


def test_coco_refuses_a_file_that_is_not_json_or_not_an_object(coco):
    root = coco[0]
    path = root / "annotations" / "instances_train2014.json"
    path.write_text("[1, 2]")
    not_coco = r"instances_train2014\.json is not a COCO annotation file: it has no 'images' key"
    with pytest.raises(ValueError, match=not_coco):
        load_coco(root)
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"instances_train2014\.json is not valid JSON"):
        load_coco(root)


def test_coco_check_files_names_the_missing_images(coco):
    root = coco[0]
    with pytest.warns(UserWarning):
        assert len(load_coco(root, check_files=True).frame) == 5
    for image_id in (6818, 174482):
        (root / "train2014" / f"COCO_x_{image_id:012d}.jpg").unlink()
    with pytest.warns(UserWarning):
        assert len(load_coco(root).frame) == 5  # not checked unless asked
    with pytest.raises(FileNotFoundError, match=r"2 \(first: .*COCO_x_000000006818.jpg, .*COCO_x_000000174482.jpg\) "
                                                r"image files of train2014 are missing"):
        load_coco(root, check_files=True)


# ---------------------------------------------------------------------------------------------------------- VG500

VG_TRAIN = ["2328403.jpg", "1680.jpg", "498046.jpg", "61605.jpg", "107952.jpg"]
VG_TEST = ["39.jpg", "91.jpg"]
VG_LABELS = {"2328403.jpg": [0, 17, 499], "1680.jpg": [3], "498046.jpg": [], "61605.jpg": [17, 250, 3],
             "107952.jpg": [42, 42], "39.jpg": [1, 2], "91.jpg": [499], "5.jpg": [7]}
VG_IN_SECOND_FOLDER = {"107952.jpg", "91.jpg", "1680.jpg"}  # 1680 is in both: VG_100K wins
VG_NOT_IN_FIRST = {"107952.jpg", "91.jpg"}


def _vg_regions():
    # Visual Genome's own key order ("regions" before "id"); entries in no particular order; image 61605 has no
    # entry, image 5 is in no split.
    entries = []
    for name, phrases in [("91.jpg", ["a red kite", "sky"]), ("5.jpg", ["not in any split"]),
                          ("2328403.jpg", ["man wearing a hat ", "Ünïcode straße — ok", "dog"]),
                          ("498046.jpg", []), ("1680.jpg", ["tree"]), ("39.jpg", ["a bus"]),
                          ("107952.jpg", ["white plate", "fork", "fork"])]:
        image_id = int(name[:-4])
        regions = [{"region_id": image_id * 10 + k, "width": 5, "height": 3, "image_id": image_id, "phrase": p,
                    "y": 1, "x": 2} for k, p in enumerate(phrases)]
        entries.append({"regions": regions, "id": image_id})
    return entries


@pytest.fixture
def vg(tmp_path):
    # The train list has Windows line ends and no final newline; the test list ends with a blank line.
    (tmp_path / "train_list_500.txt").write_bytes("\r\n".join(VG_TRAIN).encode())
    (tmp_path / "test_list_500.txt").write_text("\n".join(VG_TEST) + "\n\n")
    (tmp_path / "vg_category_500_labels_index.json").write_text(json.dumps(VG_LABELS))
    for folder in ("VG_100K", "VG_100K_2"):
        (tmp_path / folder).mkdir()
    for name in VG_LABELS:
        folders = ["VG_100K_2"] if name in VG_NOT_IN_FIRST else ["VG_100K"]
        if name in VG_IN_SECOND_FOLDER and name not in VG_NOT_IN_FIRST:
            folders.append("VG_100K_2")
        for folder in folders:
            Image.new("RGB", (5, 3), (1, 2, 3)).save(tmp_path / folder / name, "JPEG")
    return tmp_path


def _write_regions(path, entries=None):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_vg_regions() if entries is None else entries, f, ensure_ascii=False)


def _vg_reference(root, names, regions_path):
    with open(root / "vg_category_500_labels_index.json") as f:
        index = json.load(f)
    target = [[0] * 500 for _ in names]
    for r, name in enumerate(names):
        for j in index[name]:
            target[r][j] = 1
    texts = None
    if regions_path is not None:
        with open(regions_path, encoding="utf-8") as f:
            by_id = {e["id"]: [reg["phrase"] for reg in e["regions"]] for e in json.load(f)}
        texts = [by_id.get(int(name.split(".")[0]), []) for name in names]
    return target, texts


def test_vg500_matches_a_reference_with_streamed_region_phrases(vg):
    pytest.importorskip("ijson")
    _write_regions(vg / "region_descriptions.json")
    with pytest.warns(UserWarning, match=r"1 \(first: 61605\) images have no region descriptions") as record:
        b = load_vg500(vg, "train")
    assert len(record) == 1
    target, texts = _vg_reference(vg, VG_TRAIN, vg / "region_descriptions.json")
    assert list(b.frame.columns) == ["image", "text", "image_id"]
    assert b.frame["image_id"].tolist() == [2328403, 1680, 498046, 61605, 107952]  # the list's order, last id whole
    assert b.target.dtype == np.uint8 and b.target.shape == (5, 500) and b.target.tolist() == target
    assert b.frame["text"].tolist() == texts
    assert b.frame["text"].iloc[0] == ["man wearing a hat ", "Ünïcode straße — ok", "dog"]
    folder_of = {os.path.basename(p): os.path.basename(os.path.dirname(p)) for p in b.frame["image"]}
    assert folder_of == {"2328403.jpg": "VG_100K", "1680.jpg": "VG_100K", "498046.jpg": "VG_100K",
                         "61605.jpg": "VG_100K", "107952.jpg": "VG_100K_2"}
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in b.frame["image"])
    assert b.target_names == [f"label_{j:03d}" for j in range(500)] and "label_000" in b.DESCR
    assert b.split == "train" and b.root == str(vg.resolve())


def test_vg500_test_split_keeps_only_its_images_from_a_given_region_file(vg, tmp_path_factory):
    pytest.importorskip("ijson")
    elsewhere = tmp_path_factory.mktemp("vg_text") / "regions.json"
    _write_regions(elsewhere)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every test image has regions: no warning
        b = load_vg500(vg, "test", region_descriptions=elsewhere)
    target, texts = _vg_reference(vg, VG_TEST, elsewhere)
    assert b.frame["image_id"].tolist() == [39, 91] and b.frame["text"].tolist() == texts == [["a bus"],
                                                                                               ["a red kite", "sky"]]
    assert b.target.tolist() == target
    assert b.frame["image"].map(os.path.dirname).tolist() == [str(vg / "VG_100K"), str(vg / "VG_100K_2")]


def test_vg500_without_region_file_warns_and_has_no_text(vg):
    with pytest.warns(UserWarning, match=r"no region descriptions at .*region_descriptions.json.*Visual Genome"):
        b = load_vg500(vg, "test")
    assert list(b.frame.columns) == ["image", "image_id"] and "No text" in b.DESCR
    with pytest.raises(FileNotFoundError, match=r"region_descriptions file not found: .*absent\.json"):
        load_vg500(vg, "test", region_descriptions=vg / "absent.json")


def test_vg500_without_ijson_says_how_to_install_it(vg, monkeypatch):
    _write_regions(vg / "region_descriptions.json")
    monkeypatch.setitem(sys.modules, "ijson", None)
    with pytest.raises(ImportError, match=r"pip install 'sklearn-difffeat\[benchmarks\]'"):
        load_vg500(vg)


@pytest.mark.parametrize("suffix", ["txt", "json"])
def test_vg500_label_names_from_a_names_file(vg, suffix):
    names = [f"object number {j}" for j in range(500)]
    path = vg / f"vg_category_500_labels.{suffix}"
    path.write_text("\n".join(names) + "\n\n" if suffix == "txt" else json.dumps(names))
    with pytest.warns(UserWarning, match="no region descriptions"):
        b = load_vg500(vg, "test")
    assert b.target_names == names and str(path) in b.DESCR
    path.write_text("\n".join(names[:499]) if suffix == "txt" else json.dumps(names[:499]))
    with pytest.raises(ValueError, match=f"vg_category_500_labels.{suffix} must give 500 non-empty label names"):
        load_vg500(vg, "test")


def test_vg500_refuses_an_unknown_split(vg):
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'test'\], got 'val'"):
        load_vg500(vg, "val")


@pytest.mark.parametrize("missing", ["root", "train_list_500.txt", "vg_category_500_labels_index.json", "images"])
def test_vg500_names_a_missing_file_or_folder(vg, missing):
    if missing == "images":
        shutil.rmtree(vg / "VG_100K")
        shutil.rmtree(vg / "VG_100K_2")
        match = r"no image folder: expected .*VG_100K and/or .*VG_100K_2"
    elif missing == "root":
        match = "dataset folder not found: .*nowhere"
    else:
        (vg / missing).unlink()
        match = f"expected file not found: .*{missing}"
    with pytest.raises(FileNotFoundError, match=match) as e:
        load_vg500(vg / "nowhere" if missing == "root" else vg)
    assert "root/vg_category_500_labels_index.json" in str(e.value)


def test_vg500_names_images_missing_from_both_folders(vg):
    (vg / "VG_100K" / "498046.jpg").unlink()
    (vg / "VG_100K_2" / "107952.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 \(first: 498046.jpg, 107952.jpg\) images of train_list_500.txt "
                                                r"are not in .*VG_100K or .*VG_100K_2"):
        load_vg500(vg)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ({"1680.jpg": [3]}, r"4 \(first: 2328403.jpg, 498046.jpg, 61605.jpg, 107952.jpg\) images of "
                            r"train_list_500.txt are not in .*vg_category_500_labels_index.json"),
        ({**VG_LABELS, "61605.jpg": [17, 500]}, r"image '61605.jpg' has label index 500, outside 0..499"),
        ({**VG_LABELS, "1680.jpg": [-1]}, r"image '1680.jpg' has label index -1"),
        ({**VG_LABELS, "1680.jpg": [2.0]}, r"image '1680.jpg' has label index 2.0"),
        ({**VG_LABELS, "1680.jpg": 3}, r"labels of image '1680.jpg' must be a list"),
        ([1, 2], r"must hold a JSON object"),
    ],
)
def test_vg500_names_what_is_wrong_in_the_label_index(vg, labels, match):
    (vg / "vg_category_500_labels_index.json").write_text(json.dumps(labels))
    with pytest.raises(ValueError, match=match):
        load_vg500(vg)


def test_vg500_refuses_a_repeated_key_or_list_entry_and_a_bad_name(vg):
    (vg / "vg_category_500_labels_index.json").write_text('{"1680.jpg": [1], "39.jpg": [2], "1680.jpg": [3]}')
    with pytest.raises(ValueError, match=r"key '1680\.jpg' appears more than once"):
        load_vg500(vg)
    (vg / "test_list_500.txt").write_text("39.jpg\n91.jpg\n39.jpg\n")
    with pytest.raises(ValueError, match=r"test_list_500\.txt: image '39\.jpg' is listed more than once"):
        load_vg500(vg, "test")
    (vg / "test_list_500.txt").write_text("39.jpg\nkite.jpg\n")
    with pytest.raises(ValueError, match=r"'kite.jpg' is not a Visual Genome image name"):
        load_vg500(vg, "test")


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ({"id": 39, "regions": []}, r"must hold a JSON array"),
        ([{"regions": []}], r"entry 0 has no 'id' key"),
        ([{"id": 39, "regions": [{"region_id": 1}]}], r"a region of image 39 has no 'phrase'"),
        ([{"id": 39}], r"image 39 has no 'regions' list"),
        ([{"id": 39, "regions": []}, {"id": 39, "regions": []}], r"image 39 has more than one entry"),
    ],
)
def test_vg500_names_what_is_wrong_in_the_region_file(vg, entries, match):
    pytest.importorskip("ijson")
    _write_regions(vg / "region_descriptions.json", entries)
    with pytest.raises(ValueError, match=match):
        load_vg500(vg, "test")


def test_vg500_refuses_a_truncated_region_file(vg):
    pytest.importorskip("ijson")
    (vg / "region_descriptions.json").write_text('[{"id": 39, "regions": [{"phrase": "a b')
    with pytest.raises(ValueError, match=r"region_descriptions\.json is not valid JSON"):
        load_vg500(vg, "test")
