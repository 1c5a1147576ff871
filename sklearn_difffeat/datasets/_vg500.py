"""VG500 (Visual Genome, 500 object labels) in the split and files that C-Tran and SSGRL distribute."""

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.utils import Bunch

from ._benchmark_io import as_root, few, read_json, require, warn_no_text

N_VG_LABELS = 500
VG_LISTS = {"train": "train_list_500.txt", "test": "test_list_500.txt"}
VG_LABEL_INDEX = "vg_category_500_labels_index.json"
VG_LABEL_NAMES = ("vg_category_500_labels.txt", "vg_category_500_labels.json")
VG_IMAGE_DIRS = ("VG_100K", "VG_100K_2")
VG_REGIONS = "region_descriptions.json"

VG_LAYOUT = """\
Expected layout (C-Tran's / SSGRL's VG500 files and Visual Genome's images under root):
  root/train_list_500.txt, root/test_list_500.txt      one image file name per line
  root/vg_category_500_labels_index.json              image file name -> list of label indices in 0..499
  root/VG_100K/ and/or root/VG_100K_2/                 the Visual Genome images
  root/region_descriptions.json                        optional: Visual Genome's region descriptions (text)
  root/vg_category_500_labels.txt (or .json)           optional: the 500 label names, one per line"""

VG_DESCR = """\
VG500 {split} (Visual Genome, 500 object labels)
-------------------------------------------------
{n} images, in the order of {list_name}. target[i, j] = 1 when label index j is in the image's entry of
{index_name}. {names} {text}
Read from {root}. See docs/benchmarks.md.
"""


def load_vg500(root, split="train", *, region_descriptions=None):
    """VG500 images, their 500-label sets and (optionally) their region descriptions as text.

    Reads the split lists and label index of C-Tran (which takes them from SSGRL) and the Visual Genome
    images; see ``docs/benchmarks.md`` for the downloads::

        root/train_list_500.txt, root/test_list_500.txt
        root/vg_category_500_labels_index.json
        root/VG_100K/, root/VG_100K_2/
        root/region_descriptions.json              (optional)
        root/vg_category_500_labels.txt or .json   (optional)

    - rows: the images of the split's list, in its order (surrounding whitespace and blank lines ignored).
      Each image is looked up in ``VG_100K/`` first, then ``VG_100K_2/`` (C-Tran looks only in
      ``VG_100K``); both folders are listed once, and an image found in neither is an error.
    - labels: ``target[i, j] = 1`` for each index ``j`` of the image's list in the label index.
    - label names: the files carry none. ``root/vg_category_500_labels.txt`` (500 lines, the name of label
      ``j`` on line ``j + 1``) or, failing that, ``root/vg_category_500_labels.json`` (a JSON array of 500
      strings) provides them; otherwise the names are ``label_000`` .. ``label_499``.
    - text: the phrases of the image's regions in Visual Genome's ``region_descriptions.json``, in the
      file's order, read as a stream (the file is about 700 MB; needs the ``ijson`` package) keeping only the
      images of the split. An image the file does not mention gets an empty list (one ``UserWarning``).
      Without the file there is no ``text`` column, and a ``UserWarning`` says where it was looked for.

    Parameters
    ----------
    root : str or path-like
    split : {"train", "test"}, default="train"
    region_descriptions : str or path-like, optional
        Where ``region_descriptions.json`` is; by default ``root/region_descriptions.json`` when present.

    Returns
    -------
    Bunch with
        frame : DataFrame with columns ``image`` (absolute path, str), ``text`` (list of str; only with
            region descriptions) and ``image_id`` (int, the file name's stem), in the list's order.
        target : uint8 ndarray (n_images, 500), the 0/1 label indicator.
        target_names : list of the 500 label names.
        split, root : the split name and the absolute dataset folder.
        DESCR : str.

    Raises
    ------
    FileNotFoundError
        For a missing list, label index, image folder, image, or an explicitly given region file.
    ValueError
        For an unknown split, an image of the list absent from the label index, a label index outside 0..499
        (naming the image and the index), or a malformed file (naming it).
    """
    if split not in VG_LISTS:
        raise ValueError(f"split must be one of {list(VG_LISTS)}, got {split!r}")
    root = as_root(root, VG_LAYOUT)
    list_path = require(root / VG_LISTS[split], VG_LAYOUT)
    index_path = require(root / VG_LABEL_INDEX, VG_LAYOUT)

    names = _read_list(list_path)
    image_ids = np.array([_image_id(name, list_path) for name in names], dtype=np.int64)
    paths = _locate_images(root, names, list_path)
    target = _read_label_index(index_path, names, list_path)
    target_names, names_note = _label_names(root)

    frame = pd.DataFrame({"image": paths, "image_id": image_ids})
    regions_path = Path(region_descriptions) if region_descriptions is not None else root / VG_REGIONS
    if region_descriptions is not None and not regions_path.is_file():
        raise FileNotFoundError(f"region_descriptions file not found: {regions_path}")
    if regions_path.is_file():
        texts = _read_region_phrases(regions_path, image_ids)
        missing = [int(image_ids[r]) for r, t in enumerate(texts) if t is None]
        if missing:
            warn_no_text(missing, "region descriptions", regions_path)
        frame.insert(1, "text", [t if t is not None else [] for t in texts])
        text_note = f"Text: the region phrases of {regions_path}."
    else:
        warnings.warn(
            f"no region descriptions at {regions_path}: the frame has no 'text' column. Download "
            "region_descriptions.json.zip from the Visual Genome site (visualgenome.org, version 1.2), unzip it "
            "into the dataset folder or pass its path as region_descriptions=.",
            UserWarning,
            stacklevel=2,
        )
        text_note = f"No text: {regions_path} was not found."
    descr = VG_DESCR.format(split=split, n=len(names), list_name=list_path.name, index_name=index_path.name,
                            names=names_note, text=text_note, root=root)
    return Bunch(frame=frame, target=target, target_names=target_names, split=split, root=str(root), DESCR=descr)


def _read_list(path):
    """The image file names of a split list; a name listed twice raises a ``ValueError``."""
    with open(path, encoding="utf-8-sig") as f:
        # Strip each line whole: a last line without a newline keeps all its characters.
        names = [line.strip() for line in f]
    names = [name for name in names if name]
    if len(set(names)) != len(names):
        seen = set()
        repeated = next(name for name in names if name in seen or seen.add(name))
        raise ValueError(f"{path}: image {repeated!r} is listed more than once")
    return names


def _image_id(name, list_path):
    stem = Path(name).stem
    if not (stem.isascii() and stem.isdigit()):
        raise ValueError(f"{list_path}: {name!r} is not a Visual Genome image name (<integer id>.jpg)")
    return int(stem)


def _locate_images(root, names, list_path):
    """The absolute path of each image: in ``VG_100K/`` if there, else in ``VG_100K_2/``."""
    folders = [root / d for d in VG_IMAGE_DIRS if (root / d).is_dir()]
    if not folders:
        raise FileNotFoundError(f"no image folder: expected {root / VG_IMAGE_DIRS[0]} and/or "
                                f"{root / VG_IMAGE_DIRS[1]}\n{VG_LAYOUT}")
    # One listing per folder instead of one file-system lookup per image.
    listings = [(str(folder), set(os.listdir(folder))) for folder in folders]
    paths, missing = [], []
    for name in names:
        folder = next((f for f, listed in listings if name in listed), None)
        if folder is None:
            missing.append(name)
        else:
            paths.append(os.path.join(folder, name))
    if missing:
        looked = " or ".join(str(f) for f in folders)
        raise FileNotFoundError(f"{few(missing)} images of {list_path.name} are not in {looked}")
    return paths


def _read_label_index(path, names, list_path):
    """The (n, 500) uint8 indicator of the listed images from the label index file."""
    index = read_json(path, object_pairs_hook=_unique_keys(path))
    if not isinstance(index, dict):
        raise ValueError(f"{path} must hold a JSON object (image file name -> label indices)")
    absent = [name for name in names if name not in index]
    if absent:
        raise ValueError(f"{few(absent)} images of {list_path.name} are not in {path}")
    rows, cols = [], []
    for row, name in enumerate(names):
        labels = index[name]
        if not isinstance(labels, list):
            raise ValueError(f"{path}: the labels of image {name!r} must be a list of indices, got {labels!r}")
        for j in labels:
            if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < N_VG_LABELS:
                raise ValueError(f"{path}: image {name!r} has label index {j!r}, outside 0..{N_VG_LABELS - 1}")
        cols.extend(labels)
        rows.extend([row] * len(labels))
    target = np.zeros((len(names), N_VG_LABELS), dtype=np.uint8)
    target[rows, cols] = 1
    return target


def _unique_keys(path):
    """A ``json`` object hook that refuses a key repeated within one object (``dict`` would keep the last)."""

    def build(pairs):
        result = dict(pairs)
        if len(result) != len(pairs):
            seen = set()
            repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise ValueError(f"{path}: key {repeated!r} appears more than once")
        return result

    return build


def _label_names(root):
    """The 500 label names and a sentence for the description."""
    for filename in VG_LABEL_NAMES:
        path = root / filename
        if not path.is_file():
            continue
        if path.suffix == ".json":
            names = read_json(path)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{path} must hold a JSON array of label names (strings)")
        else:
            # Trailing blank lines are not names; any other blank line is an error below.
            names = path.read_text(encoding="utf-8-sig").rstrip("\n").split("\n")
        names = [n.strip() for n in names]
        if len(names) != N_VG_LABELS or not all(names):
            raise ValueError(f"{path} must give {N_VG_LABELS} non-empty label names, one per label index in "
                             f"order; it gives {sum(map(bool, names))} non-empty of {len(names)}")
        return names, f"Label names from {path}."
    note = (f"Label names: the files carry none and neither {' nor '.join(VG_LABEL_NAMES)} is in {root}, so "
            f"the labels are named label_000 .. label_{N_VG_LABELS - 1:03d} by index.")
    return [f"label_{j:03d}" for j in range(N_VG_LABELS)], note


def _read_region_phrases(path, image_ids):
    """Per row of ``image_ids``, the list of its region phrases (None when the file has no entry for it).

    Streams the file's top-level array with ijson, so only the current image's entry is in memory.
    """
    try:
        import ijson
    except ImportError:
        raise ImportError("reading region_descriptions.json needs the ijson package: "
                          "pip install 'sklearn-difffeat[benchmarks]' (or pip install ijson)") from None
    row_of = {int(image_id): row for row, image_id in enumerate(image_ids)}
    phrases = [None] * len(image_ids)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        if not head.startswith(b"["):
            raise ValueError(f"{path} must hold a JSON array of {{'id', 'regions'}} objects (Visual Genome format)")
        f.seek(0)
        try:
            for i, entry in enumerate(ijson.items(f, "item", use_float=True)):
                if not isinstance(entry, dict) or "id" not in entry:
                    raise ValueError(f"{path}: entry {i} has no 'id' key")
                row = row_of.get(entry["id"])
                if row is None:
                    continue
                if phrases[row] is not None:
                    raise ValueError(f"{path}: image {entry['id']} has more than one entry")
                phrases[row] = _entry_phrases(entry, path)
        except ijson.JSONError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    return phrases


def _entry_phrases(entry, path):
    regions = entry.get("regions")
    if not isinstance(regions, list):
        raise ValueError(f"{path}: image {entry['id']} has no 'regions' list")
    try:
        phrases = [region["phrase"] for region in regions]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: a region of image {entry['id']} has no 'phrase'") from None
    if not all(isinstance(p, str) for p in phrases):
        raise ValueError(f"{path}: a region phrase of image {entry['id']} is not a string")
    return phrases
