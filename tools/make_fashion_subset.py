"""Regenerate the data shipped in ``sklearn_difffeat/datasets/data/`` from Debian packages.

    apt-get install -y dataset-fashion-mnist wordnet-base
    python tools/make_fashion_subset.py

Writes, deterministically (no random numbers are drawn; the same packages give byte-identical outputs):

- ``fashion_mnist_subset.npz``: the first ``N_TRAIN`` images of each class in the Fashion-MNIST *train* file
  and the first ``N_TEST`` of each class in its *t10k* (test) file, as uint8 (n, 28, 28) arrays with their
  class labels and their row index in the original IDX file (provenance).
- ``fashion_text.json``: per class, the noun phrases captions may use to name an item (WordNet lemmas of the
  synsets listed below plus a few common English names, marked ``"source": "project"``), the WordNet glosses
  of those synsets (cleaned: usage examples and parentheticals removed), and the "marker" phrases whose
  presence in a caption counts as mentioning the class. Any gloss that contains another class's marker is
  dropped, so a description can never name a class that is not in the mosaic.
- ``LICENSE_fashion_mnist.txt`` and ``LICENSE_wordnet.txt``: the licences those files are shipped under.
"""

import gzip
import json
import re
import struct
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
WORDNET_DIR = Path("/usr/share/wordnet")
OUT = Path(__file__).resolve().parents[1] / "sklearn_difffeat" / "datasets" / "data"

N_TRAIN = 400  # per class: 4,000 train sources
N_TEST = 100  # per class: 1,000 test sources

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

# Per class: noun phrases (with their determiner, so captions read as English) and the marker each one is
# detected by; then the WordNet noun synsets (data.noun offsets) whose glosses may describe the item. Names
# were chosen so that no marker of one class occurs inside a phrase of another (e.g. no "tee shirt" for
# T-shirt because "shirt" marks the Shirt class; positions say "upper left", never "top left").
VOCAB = {
    "T-shirt/top": {
        "names": [("a T-shirt", "t-shirt"), ("a tee", "tee"), ("a top", "top"), ("a tank top", "tank top"),
                  ("a singlet", "singlet"), ("a jersey", "jersey")],
        "synsets": ["04453666", "04223299", "03595614", "04390577"],  # top, singlet, T-shirt, tank top
    },
    "Trouser": {
        "names": [("a pair of trousers", "trousers"), ("a pair of pants", "pants"), ("a pair of slacks", "slacks"),
                  ("a pair of jeans", "jeans"), ("a pair of sweatpants", "sweatpants"),
                  ("a pair of chinos", "chinos")],
        "synsets": ["04489008", "04233715", "03594734", "04370288", "03688605"],
    },
    "Pullover": {
        "names": [("a pullover", "pullover"), ("a sweater", "sweater"), ("a jumper", "jumper"),
                  ("a sweatshirt", "sweatshirt"), ("a slipover", "slipover"), ("a knitted sweater", "sweater")],
        "synsets": ["04021028", "04370048", "04370456"],
    },
    "Dress": {
        "names": [("a dress", "dress"), ("a frock", "frock"), ("a gown", "gown"), ("a sundress", "sundress"),
                  ("a summer dress", "dress")],
        "synsets": ["03236735", "03450230", "04355511", "03013438", "03619196"],
    },
    "Coat": {
        "names": [("a coat", "coat"), ("a jacket", "jacket"), ("an overcoat", "overcoat"),
                  ("a raincoat", "raincoat"), ("a parka", "parka"), ("an anorak", "anorak"),
                  ("a topcoat", "topcoat"), ("a windbreaker", "windbreaker")],
        "synsets": ["03057021", "03456665", "03589791", "04049405", "03891051", "03254046"],
    },
    "Sandal": {
        "names": [("a sandal", "sandal"), ("a pair of sandals", "sandals"), ("a flip-flop", "flip-flop"),
                  ("an espadrille", "espadrille"), ("a huarache", "huarache")],
        "synsets": ["04133789", "03297103", "03364008", "03547530"],
    },
    "Shirt": {
        "names": [("a shirt", "shirt"), ("a polo shirt", "shirt"), ("a work shirt", "shirt"),
                  ("a flannel shirt", "shirt"), ("a blouse", "blouse"), ("a kurta", "kurta")],
        "synsets": ["04197391", "03978966", "04602956", "03163381", "03629231", "02943964", "02854926"],
    },
    "Sneaker": {
        "names": [("a sneaker", "sneaker"), ("a pair of sneakers", "sneakers"), ("a running shoe", "running shoe"),
                  ("a gym shoe", "gym shoe"), ("a tennis shoe", "tennis shoe"), ("a plimsoll", "plimsoll"),
                  ("a pair of trainers", "trainers")],
        "synsets": ["03472535", "04120489", "03967270"],
    },
    "Bag": {
        "names": [("a bag", "bag"), ("a handbag", "handbag"), ("a purse", "purse"), ("a tote bag", "bag"),
                  ("a shoulder bag", "bag"), ("a clutch", "clutch"), ("a satchel", "satchel")],
        "synsets": ["02774152", "04207343", "02970408", "03055418", "03301940", "02769748"],
    },
    "Ankle boot": {
        "names": [("an ankle boot", "ankle boot"), ("a boot", "boot"), ("a pair of boots", "boots"),
                  ("a chukka boot", "chukka"), ("a half boot", "boot"), ("a pair of ankle boots", "ankle boots")],
        "synsets": ["02872752", "03027625", "02925666"],
    },
}
# A name whose head noun is a lemma of one of the listed synsets is recorded as "wordnet"; the few others are
# common English names added by hand (recorded as "project"). Every phrase is grammatically singular ("a pair
# of trousers"), so caption templates can use it as a subject.

TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def tokens(text):
    """Lower-case word tokens; hyphenated words stay whole, so "T-shirt" does not contain "shirt"."""
    return TOKEN.findall(text.lower())


def contains_phrase(text, phrase):
    t, p = tokens(text), tokens(phrase)
    return any(t[i : i + len(p)] == p for i in range(len(t) - len(p) + 1))


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2049:  # labels
        return np.frombuffer(data, np.uint8, offset=8).copy()
    rows, cols = struct.unpack(">II", data[8:16])
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols).copy()


def first_per_class(labels, k):
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:k] for c in range(10)]))


def wordnet_synset(offset):
    with open(WORDNET_DIR / "data.noun", "rb") as f:
        f.seek(int(offset))
        line = f.readline().decode("utf-8")
    head, gloss = line.split(" | ", 1)
    fields = head.split()
    assert fields[0] == offset, (offset, fields[0])
    lemmas = [fields[4 + 2 * i] for i in range(int(fields[3], 16))]
    return lemmas, gloss.strip()


def clean_gloss(gloss):
    # Keep the definition; drop usage examples ("..."), parentheticals and WordNet's `quoted' remarks.
    parts = [p.strip() for p in gloss.split(";") if p.strip() and not p.strip().startswith('"')]
    text = "; ".join(parts)
    text = re.sub(r"\s*\([^)]*\)", "", text)
    text = re.sub(r"\s*`[^']*'[^;]*", "", text)
    return re.sub(r"\s+", " ", text).strip(" ;,")


def save_npz(path, arrays):
    """np.savez_compressed, but with fixed zip timestamps so that reruns give identical bytes."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, buf.getvalue(), compresslevel=9)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, stem, k in [("train", "train", N_TRAIN), ("test", "t10k", N_TEST)]:
        images = read_idx(FASHION_DIR / f"{stem}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_DIR / f"{stem}-labels-idx1-ubyte.gz")
        idx = first_per_class(labels, k)
        arrays[f"{split}_images"] = images[idx]
        arrays[f"{split}_labels"] = labels[idx]
        arrays[f"{split}_source_row"] = idx.astype(np.int32)
    save_npz(OUT / "fashion_mnist_subset.npz", arrays)

    markers = {c: sorted({m for _, m in v["names"]}) for c, v in VOCAB.items()}
    classes = []
    for c in CLASSES:
        lemma_words = set()
        glosses = []
        for off in VOCAB[c]["synsets"]:
            lemmas, gloss = wordnet_synset(off)
            lemma_words |= {w.lower().replace("_", " ") for w in lemmas}
            text = clean_gloss(gloss)
            leaked = [m for other in CLASSES if other != c for m in markers[other] if contains_phrase(text, m)]
            if leaked:
                print(f"drop gloss of {lemmas[0]} for {c!r}: mentions {leaked}: {text!r}")
                continue
            glosses.append({"text": text, "synset": f"n{off}", "lemma": lemmas[0]})
        names = []
        for phrase, marker in VOCAB[c]["names"]:
            for other in CLASSES:
                if other != c:
                    bad = [m for m in markers[other] if contains_phrase(phrase, m)]
                    assert not bad, (c, phrase, bad)
            head = re.sub(r"^(a pair of|an|a) ", "", phrase.lower())
            in_wn = head in lemma_words or head.rstrip("s") in lemma_words or head.split()[-1] in lemma_words
            names.append({"phrase": phrase, "marker": marker, "source": "wordnet" if in_wn else "project"})
        classes.append({"name": c, "markers": markers[c], "names": names, "glosses": glosses})
        print(f"{c:12s} {len(names)} names, {len(glosses)} glosses")
    doc = {
        "about": "Words and WordNet 3.0 glosses used to caption Fashion-MNIST mosaics; "
        "built by tools/make_fashion_subset.py. Glosses: WordNet 3.0 (c) 2006 Princeton University, "
        "see LICENSE_wordnet.txt.",
        "classes": classes,
    }
    (OUT / "fashion_text.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")

    fm = Path("/usr/share/doc/dataset-fashion-mnist/copyright").read_text()
    mit = fm.rsplit("License: Expat\n", 1)[-1]
    (OUT / "LICENSE_fashion_mnist.txt").write_text(
        "Fashion-MNIST images (a subset, unchanged pixels): https://github.com/zalandoresearch/fashion-mnist\n"
        "Taken from the Debian package dataset-fashion-mnist.\n\n"
        "The MIT License (MIT)\n\nCopyright (c) 2017 Zalando SE, https://tech.zalando.com\n\n"  # as upstream
        + "\n".join(line[1:] if line.startswith(" ") else line for line in mit.splitlines()).replace("\n.\n", "\n\n")
        + "\n"
    )
    wn = Path("/usr/share/doc/wordnet-base/copyright").read_text()
    wn_lic = wn.split("License: WordNet3.0\n", 1)[1].split("\nFiles:", 1)[0]
    (OUT / "LICENSE_wordnet.txt").write_text(
        "The glosses and lemmas in fashion_text.json come from WordNet 3.0 (Debian package wordnet-base),\n"
        "https://wordnet.princeton.edu/, used under the WordNet 3.0 licence:\n\n"
        + "\n".join(line[1:] if line.startswith(" ") else line for line in wn_lic.splitlines()).replace(
            "\n.\n", "\n\n"
        )
        + "\n"
    )
    for p in sorted(OUT.iterdir()):
        print(f"{p.name}: {p.stat().st_size / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
