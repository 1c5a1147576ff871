"""Fashion-MNIST mosaics with generated captions: a small, real, offline multi-label image+text set.

Everything here is generated from the files in ``data/`` (see ``docs/data.md``): real Fashion-MNIST images
(MIT, (c) Zalando SE) and WordNet 3.0 glosses ((c) Princeton University). The *layout* of each mosaic and
its *caption* are synthetic, drawn from a seeded generator by the recipe below.
"""

import copy
import json
import re
from functools import lru_cache
from importlib import resources

import numpy as np
import pandas as pd
from sklearn.utils import Bunch

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CELL_NAMES = ("upper left", "upper right", "lower left", "lower right")  # never "top": it names a class
_SPLITS = {"train": 0, "test": 1}
MENTION_PROB = 0.5  # default chance that a present class is mentioned in the caption

# Caption templates, written for this project. None of them contains a class marker (checked by the tests),
# so the only class words in a caption are those of items actually placed in the mosaic.
NAME_TEMPLATES = [
    "There is {x}.",
    "I can see {x}.",
    "The picture shows {x}.",
    "{x} is part of the set.",
    "Look closely and you will find {x}.",
    "Also included: {x}.",
    "Someone has put {x} here.",
    "This one has {x}.",
    "{x} appears in the image.",
    "We photographed {x}.",
]
LIST_TEMPLATES = ["I can see {x}.", "The set includes {x}.", "Shown here: {x}.", "This photo has {x}."]
GLOSS_TEMPLATES = [
    "One item is {g}.",
    "It contains {g}.",
    "Among the items: {g}.",
    "Included here is {g}.",
    "There is something like {g}.",
    "The shop describes one piece as {g}.",
]
POS_GLOSS_TEMPLATE = "{pos}: {g}."
POSITIONS = ["in the {cell} corner", "at the {cell}", "in the {cell} square"]
COUNT_TEMPLATES = {
    1: ["A single item.", "Just one thing is shown."],
    "n": ["{n} items in total.", "The mosaic holds {n} items.", "{n} products are shown."],
}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
FILLERS = [
    "A product photo on a black background.",
    "Picture from an online fashion catalogue.",
    "Everything is shown in shades of gray.",
    "Low resolution scan.",
    "Taken in a studio.",
    "Part of this season's collection.",
    "Nothing special to report.",
    "Another photo from the same shop.",
    "The lighting is soft.",
    "Image for the website.",
    "New arrivals this week.",
    "Best sellers of the month.",
    "The photo was taken from above.",
    "Free delivery on all orders.",
    "A quick snapshot for the catalogue.",
    "Sizes vary.",
    "Available while stocks last.",
    "Scanned at low resolution.",
    "All items are sold separately.",
    "A plain dark backdrop.",
    "From the archive.",
    "Prices on request.",
    "Each piece was photographed on its own.",
    "Returns are accepted within thirty days.",
]

DESCR = """\
Fashion-MNIST mosaics (multi-label image + text, generated)
-----------------------------------------------------------

Each sample is a 56x56 mosaic on a 2x2 grid of 28x28 cells. 1 to 4 cells (uniformly) hold a real
Fashion-MNIST image (MIT licence, (c) 2017 Zalando SE); empty cells are black. Each item's class is drawn
uniformly from the 10 classes (repeats allowed) and its image uniformly from the shipped images of that class.
Labels are the SET of item classes (10 labels). Train and test mosaics use disjoint source images (the first
400 per class of the Fashion-MNIST train file, the first 100 per class of its test file).

The caption is generated: each class present is mentioned with probability 0.5, by a name ("a pair of
jeans", "an anorak") or a WordNet 3.0 gloss ("a shoe consisting of a sole fastened by straps to the foot"),
sometimes with its true cell position; a true item count and 0-2 neutral filler sentences may be added; the
sentences are shuffled. A caption never mentions a class that is absent from the mosaic, and often omits
present ones, so neither modality alone gives every label.

The layout and captions are synthetic; only the item images and glosses are real. See docs/data.md.
"""

_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def _tokens(text):
    # Hyphenated words stay whole, so "T-shirt" does not contain the Shirt marker "shirt".
    return _TOKEN.findall(text.lower())


@lru_cache(maxsize=1)
def _text_resources():
    with resources.files(__package__).joinpath("data", "fashion_text.json").open("r", encoding="utf-8") as f:
        return json.load(f)["classes"]


def load_fashion_vocabulary():
    """The class vocabulary the captions are written from: one entry per class, in ``CLASS_NAMES`` order.

    Each entry is a dict with

    - ``name``: the class name;
    - ``markers``: every phrase that names the class (what :func:`mentioned_classes` looks for);
    - ``names``: the item names captions use, each ``{"phrase", "marker", "source"}``: the phrase ("a pair of
      jeans"), the marker it contains, and "wordnet" or "project" for where the name comes from;
    - ``glosses``: the WordNet 3.0 glosses captions use, each ``{"text", "synset", "lemma"}``.

    It is the content of the shipped ``data/fashion_text.json`` (see ``docs/data.md``).

    Returns a fresh copy on every call: changing it does not change the captions.
    """
    return copy.deepcopy(_text_resources())


@lru_cache(maxsize=2)
def _sources(split):
    with resources.files(__package__).joinpath("data", "fashion_mnist_subset.npz").open("rb") as f, np.load(f) as z:
        images, labels = z[f"{split}_images"], z[f"{split}_labels"].astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_fashion_sources(split="train"):
    """The shipped Fashion-MNIST source images of one split.

    Returns ``(images, labels)``: uint8 ``(n, 28, 28)`` and int64 ``(n,)`` read-only arrays. The ``sources``
    column of :func:`load_fashion_mosaics` indexes these rows.
    """
    _check_split(split)
    return _sources(split)


def mentioned_classes(text):
    """Indices of the classes a caption mentions, by name marker or by one of the class's glosses."""
    toks = _tokens(text)
    lowered = text.lower()
    found = set()
    for c, entry in enumerate(_text_resources()):
        for marker in entry["markers"]:
            m = _tokens(marker)
            if any(toks[i : i + len(m)] == m for i in range(len(toks) - len(m) + 1)):
                found.add(c)
        if any(g["text"].lower() in lowered for g in entry["glosses"]):
            found.add(c)
    return found


def _check_split(split):
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _caption(rng, items, mention_prob):
    """One caption for a mosaic whose cells hold class indices ``items`` (-1: empty)."""
    vocab = _text_resources()
    present = list(dict.fromkeys(int(c) for c in items if c >= 0))  # in cell order, unique
    mentioned = [c for c in present if rng.random() < mention_prob]
    sentences, named = [], []
    for c in mentioned:
        cells = [i for i, v in enumerate(items) if v == c]
        pos = None
        if rng.random() < 0.3:
            pos = POSITIONS[rng.integers(len(POSITIONS))].format(cell=CELL_NAMES[cells[rng.integers(len(cells))]])
        glosses = vocab[c]["glosses"]
        if glosses and rng.random() < 0.4:
            g = glosses[rng.integers(len(glosses))]["text"]
            if pos is not None:
                sentences.append(POS_GLOSS_TEMPLATE.format(pos=pos, g=g))
            else:
                sentences.append(GLOSS_TEMPLATES[rng.integers(len(GLOSS_TEMPLATES))].format(g=g))
        else:
            names = vocab[c]["names"]
            phrase = names[rng.integers(len(names))]["phrase"]
            named.append(phrase if pos is None else f"{phrase} {pos}")
    if len(named) >= 2 and rng.random() < 0.5:
        listed = ", ".join(named[:-1]) + " and " + named[-1]
        sentences.append(LIST_TEMPLATES[rng.integers(len(LIST_TEMPLATES))].format(x=listed))
    else:
        sentences += [NAME_TEMPLATES[rng.integers(len(NAME_TEMPLATES))].format(x=x) for x in named]
    n_items = int(np.sum(np.asarray(items) >= 0))
    if rng.random() < 0.25:
        if n_items == 1:
            sentences.append(COUNT_TEMPLATES[1][rng.integers(2)])
        else:
            t = COUNT_TEMPLATES["n"][rng.integers(3)]
            sentences.append(t.format(n=NUMBER_WORDS[n_items]))
    n_fill = rng.integers(0 if sentences else 1, 3)
    sentences += [FILLERS[i] for i in rng.choice(len(FILLERS), size=n_fill, replace=False)]
    order = rng.permutation(len(sentences))
    return " ".join(sentences[i][0].upper() + sentences[i][1:] for i in order)


def load_fashion_mosaics(n_samples=1000, *, split="train", random_state=0, mention_prob=MENTION_PROB,
                         return_X_y=False):
    """Multi-label mosaics of real Fashion-MNIST images with generated captions.

    Recipe (sample ``i`` depends only on ``(random_state, split, i)``, so a larger ``n_samples`` extends a
    smaller one): a generator seeded with ``(random_state, split, i)`` draws the number of items ``k`` in
    {1, 2, 3, 4}, ``k`` distinct cells of the 2x2 grid (0 upper left, 1 upper right, 2 lower left, 3 lower
    right), a class per item uniformly among the 10 (repeats allowed) and a source image uniformly among the
    shipped images of that class and split. Labels are the set of item classes. The caption mentions each
    present class with probability ``mention_prob`` by a name or a WordNet gloss, sometimes with its cell, may
    state the true item count, adds 0-2 neutral filler sentences (at least one when nothing else is said)
    and never mentions an absent class. See ``docs/data.md``.

    Parameters
    ----------
    n_samples : int, default=1000
    split : {"train", "test"}, default="train"
        Train and test mosaics are built from disjoint source images.
    random_state : int, default=0
    mention_prob : float in [0, 1], default=0.5
    return_X_y : bool, default=False
        If True return ``(X, Y)`` instead of a Bunch.

    Returns
    -------
    Bunch with
        data : DataFrame with columns ``image`` (uint8 (56, 56, 3) arrays: RGB, the gray value replicated)
            and ``text`` (str); ready for a ColumnTransformer.
        target, Y : int64 ndarray (n_samples, 10), 0/1 label indicator matrix (the same array).
        target_names, label_names : list of the 10 class names.
        frame : DataFrame with ``image``, ``text``, ``items`` (int tuple of 4: class per cell, -1 empty),
            ``sources`` (int tuple of 4: row of :func:`load_fashion_sources` per cell, -1 empty) and one 0/1
            column per label.
        DESCR : str.
    (X, Y) : if ``return_X_y``.
    """
    _check_split(split)
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)) or random_state < 0:
        raise ValueError(f"random_state must be a non-negative int, got {random_state!r}")
    if not 0.0 <= float(mention_prob) <= 1.0:
        raise ValueError(f"mention_prob must be in [0, 1], got {mention_prob!r}")
    images, labels = _sources(split)
    pools = [np.flatnonzero(labels == c) for c in range(len(CLASS_NAMES))]

    mosaics, texts, all_items, all_sources = [], [], [], []
    Y = np.zeros((n_samples, len(CLASS_NAMES)), dtype=np.int64)
    for i in range(n_samples):
        rng = np.random.default_rng([int(random_state), _SPLITS[split], i])
        k = int(rng.integers(1, 5))
        cells = rng.choice(4, size=k, replace=False)
        classes = rng.integers(0, len(CLASS_NAMES), size=k)
        items, sources = [-1] * 4, [-1] * 4
        mosaic = np.zeros((56, 56), dtype=np.uint8)
        for cell, c in zip(cells, classes):
            src = int(pools[c][rng.integers(len(pools[c]))])
            r, col = divmod(int(cell), 2)
            mosaic[28 * r : 28 * r + 28, 28 * col : 28 * col + 28] = images[src]
            items[cell], sources[cell] = int(c), src
        Y[i, classes] = 1
        texts.append(_caption(rng, items, float(mention_prob)))
        mosaics.append(np.repeat(mosaic[:, :, None], 3, axis=2))
        all_items.append(tuple(items))
        all_sources.append(tuple(sources))

    data = pd.DataFrame({"image": pd.Series(mosaics, dtype=object), "text": texts})
    if return_X_y:
        return data, Y
    frame = data.assign(items=all_items, sources=all_sources)
    frame = pd.concat([frame, pd.DataFrame(Y, columns=CLASS_NAMES)], axis=1)
    names = list(CLASS_NAMES)
    return Bunch(data=data, target=Y, Y=Y, target_names=names, label_names=names, frame=frame, DESCR=DESCR)
