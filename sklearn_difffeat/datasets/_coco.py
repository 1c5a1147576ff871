"""MS-COCO as a multi-label image + captions benchmark, read from the official download layout."""

import os

import numpy as np
import pandas as pd
from sklearn.utils import Bunch

from ._benchmark_io import as_root, few, read_json, require, warn_no_text

COCO_SPLITS = ("train2014", "val2014", "train2017", "val2017")

COCO_LAYOUT = """\
Expected layout (the official COCO download, unzipped under root):
  root/annotations/instances_<split>.json
  root/annotations/captions_<split>.json
  root/<split>/<file_name of each image>"""

COCO_DESCR = """\
MS-COCO {split} (multi-label, with captions)
--------------------------------------------
{n} images, {k} categories. One row per image, by ascending image id. target[i, j] = 1 when the image has
at least one instance annotation (crowd regions included) of category_ids[j]; columns are ordered by
ascending COCO category id. {dropped} Text: the image's captions, in the captions file's order.
Read from {root}. See docs/benchmarks.md.
"""


def load_coco(root, split="train2014", *, drop_unlabeled=True, check_files=False):
    """MS-COCO images, their captions and their 80-category label sets, from the official files.

    Expects the layout of the official download (cocodataset.org: the ``<split>`` image zip and the
    ``annotations_trainval<year>`` zip, both unzipped under ``root``)::

        root/annotations/instances_<split>.json
        root/annotations/captions_<split>.json
        root/<split>/<file_name>

    Protocol (the one of the multi-label literature; see ``docs/benchmarks.md``):

    - labels: image ``i`` has category ``c`` when any instance annotation of ``i`` has ``category_id`` ``c``.
      Crowd annotations (``iscrowd=1``) count: ML-GCN, ASL and Query2Label all count every annotation.
    - columns: ordered by ascending COCO category id (ids run 1..90 with gaps), as ASL and Query2Label
      order them; ML-GCN orders them by category name instead, so its columns are a permutation of these.
    - rows: one per image, by ascending image id. With ``drop_unlabeled=True`` images without any
      annotation are dropped (as ML-GCN and ASL do: 82,081 train2014 and 40,137 val2014 images remain);
      ``drop_unlabeled=False`` keeps every image of the split with an all-zero row (as Query2Label does).
    - text: the list of the image's captions, in the order of the captions file. An image the captions file
      does not mention gets an empty list, and one ``UserWarning`` gives their count and first ids.

    Parameters
    ----------
    root : str or path-like
        The folder holding ``annotations/`` and the image folders.
    split : {"train2014", "val2014", "train2017", "val2017"}, default="train2014"
    drop_unlabeled : bool, default=True
        Drop the images that have no instance annotation.
    check_files : bool, default=False
        Check that every image file of the returned rows exists, and raise ``FileNotFoundError`` naming the
        missing ones. Off by default: it costs one file-system lookup per image.

    Returns
    -------
    Bunch with
        frame : DataFrame with columns ``image`` (absolute path, str), ``text`` (list of str) and
            ``image_id`` (int), one row per image by ascending ``image_id``.
        target : uint8 ndarray (n_images, n_categories), the 0/1 label indicator (80 columns for COCO).
        target_names : list of the category names, in column order.
        category_ids : int ndarray, the COCO category id of each column (ascending).
        split, root : the split name and the absolute dataset folder.
        DESCR : str.

    Raises
    ------
    ValueError
        For an unknown split, a file that is not COCO-shaped (naming the file and the missing key), an
        annotation naming an unknown image or category (naming the annotation id and the unknown id), or a
        duplicate image or category id.
    FileNotFoundError
        For a missing folder or annotation file (naming the path expected), or missing images when
        ``check_files=True`` (their count and the first few).
    """
    if split not in COCO_SPLITS:
        raise ValueError(f"split must be one of {list(COCO_SPLITS)}, got {split!r}")
    root = as_root(root, COCO_LAYOUT)
    instances_path = require(root / "annotations" / f"instances_{split}.json", COCO_LAYOUT)
    captions_path = require(root / "annotations" / f"captions_{split}.json", COCO_LAYOUT)
    image_dir = require(root / split, COCO_LAYOUT, folder=True)

    image_ids, file_names, category_ids, category_names, target = _read_instances(instances_path)
    texts = _read_captions(captions_path, image_ids)
    keep = target.any(axis=1) if drop_unlabeled else np.ones(len(image_ids), dtype=bool)
    rows = np.flatnonzero(keep)
    paths = [os.path.join(image_dir, file_names[r]) for r in rows]
    if check_files:
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{few(missing)} image files of {split} are missing\n{COCO_LAYOUT}")
    uncaptioned = [int(image_ids[r]) for r in rows if not texts[r]]
    if uncaptioned:
        warn_no_text(uncaptioned, "caption", captions_path)
    frame = pd.DataFrame({"image": paths, "text": [texts[r] for r in rows], "image_id": image_ids[rows]})
    dropped = (
        f"{len(image_ids) - len(rows)} images without annotations were dropped."
        if drop_unlabeled
        else "Images without annotations are kept (all-zero rows)."
    )
    descr = COCO_DESCR.format(split=split, n=len(rows), k=len(category_ids), dropped=dropped, root=root)
    return Bunch(
        frame=frame,
        target=target[rows],
        target_names=category_names,
        category_ids=category_ids,
        split=split,
        root=str(root),
        DESCR=descr,
    )


def _read_instances(path):
    """Sorted image ids, their file names, sorted category ids and names, and the (image, category) indicator."""
    doc = read_json(path)
    image_ids, file_names = _columns(doc, "images", ("id", "file_name"), path)
    category_ids, category_names = _columns(doc, "categories", ("id", "name"), path)
    ann_ids, ann_image_ids, ann_category_ids = _columns(doc, "annotations", ("id", "image_id", "category_id"), path)
    del doc  # the parsed file is the largest object here; free it before building the result

    image_ids, image_order = _sorted_unique_ids(image_ids, path, "image")
    file_names = [file_names[i] for i in image_order]
    bad_name = next((i for i, name in enumerate(file_names) if not isinstance(name, str)), None)
    if bad_name is not None:
        raise ValueError(f"{path}: image {image_ids[bad_name]} has a file_name that is not a string")
    category_ids, category_order = _sorted_unique_ids(category_ids, path, "category")
    category_names = [category_names[i] for i in category_order]
    bad_name = next((i for i, name in enumerate(category_names) if not isinstance(name, str)), None)
    if bad_name is not None:
        raise ValueError(f"{path}: category {category_ids[bad_name]} has a name that is not a string")

    rows = _positions(image_ids, _int_array(ann_image_ids, path, "annotation image_id"), ann_ids, path, "image")
    cols = _positions(category_ids, _int_array(ann_category_ids, path, "annotation category_id"), ann_ids, path,
                      "category")
    target = np.zeros((len(image_ids), len(category_ids)), dtype=np.uint8)
    target[rows, cols] = 1
    return image_ids, file_names, category_ids, category_names, target


def _read_captions(path, image_ids):
    """The list of captions of each image (rows of the sorted ``image_ids``), in the captions file's order."""
    ann_ids, ann_image_ids, captions = _columns(read_json(path), "annotations", ("id", "image_id", "caption"), path)
    rows = _positions(image_ids, _int_array(ann_image_ids, path, "caption image_id"), ann_ids, path, "image")
    bad = next((i for i, c in enumerate(captions) if not isinstance(c, str)), None)
    if bad is not None:
        raise ValueError(f"{path}: the caption of annotation {ann_ids[bad]} is not a string")
    texts = [[] for _ in range(len(image_ids))]
    for row, caption in zip(rows.tolist(), captions):
        texts[row].append(caption)
    return texts


def _columns(doc, section, keys, path):
    """The values of ``keys`` across the records of ``doc[section]``, one list per key."""
    if not isinstance(doc, dict) or section not in doc:
        raise ValueError(f"{path} is not a COCO annotation file: it has no {section!r} key")
    records = doc[section]
    if not isinstance(records, list):
        raise ValueError(f"{path}: {section!r} must be a JSON array, got {type(records).__name__}")
    try:
        return tuple([record[key] for record in records] for key in keys)
    except (KeyError, TypeError):
        # Slow path only to name the first faulty record.
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise ValueError(f"{path}: {section}[{i}] is not a JSON object") from None
            missing = [key for key in keys if key not in record]
            if missing:
                raise ValueError(f"{path}: {section}[{i}] has no {missing[0]!r} key") from None
        raise


def _int_array(values, path, what):
    """``values`` as an int64 array; a value that is not a JSON integer raises a ``ValueError`` naming it."""
    array = np.asarray(values) if values else np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, int)), None)
        found = f"found {bad!r}" if bad is not None else "found one outside the 64-bit range"
        raise ValueError(f"{path}: every {what} must be an integer, {found}")
    return array.astype(np.int64, copy=False)


def _sorted_unique_ids(values, path, what):
    """The ids in ascending order and the order that sorts them; a repeated id raises a ``ValueError``."""
    ids = _int_array(values, path, f"{what} id")
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    repeated = ids[1:][ids[1:] == ids[:-1]]
    if repeated.size:
        raise ValueError(f"{path}: duplicate {what} id {int(repeated[0])} (ids must be unique)")
    return ids, order


def _positions(sorted_ids, query, ann_ids, path, what):
    """Index of each ``query`` id in ``sorted_ids``; an id not there raises naming the annotation and the id."""
    pos = np.searchsorted(sorted_ids, query)
    found = pos < len(sorted_ids)
    found[found] = sorted_ids[pos[found]] == query[found]
    if not found.all():
        i = int(np.flatnonzero(~found)[0])
        raise ValueError(f"{path}: annotation {ann_ids[i]} names {what} id {int(query[i])}, which is not in the "
                         f"file's {'images' if what == 'image' else 'categories'}")
    return pos
