"""Small file helpers shared by the benchmark loaders (COCO, VG500): checked paths, JSON reading, messages."""

import json
import warnings
from pathlib import Path

N_SHOWN = 5  # how many offending items an error or warning lists


def few(items):
    """``'<count> (first: a, b, c)'`` for an error message about a list of items."""
    items = list(items)
    shown = ", ".join(str(x) for x in items[:N_SHOWN])
    more = ", ..." if len(items) > N_SHOWN else ""
    return f"{len(items)} (first: {shown}{more})"


def as_root(root, layout):
    """The absolute dataset folder; raises ``FileNotFoundError`` with the expected layout when it is absent."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {path}\n{layout}")
    return path.resolve()


def require(path, layout, *, folder=False):
    """Raise ``FileNotFoundError`` naming ``path`` and the expected layout when it is not a file (or folder)."""
    present = path.is_dir() if folder else path.is_file()
    if not present:
        kind = "folder" if folder else "file"
        raise FileNotFoundError(f"expected {kind} not found: {path}\n{layout}")
    return path


def read_json(path, **kwargs):
    """``json.load`` of a UTF-8 file; a syntax error becomes a ``ValueError`` naming the file."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f, **kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def warn_no_text(missing_ids, what, source):
    """One ``UserWarning`` for the images that get an empty text list because ``source`` has none for them."""
    warnings.warn(
        f"{few(missing_ids)} images have no {what} in {source}; their 'text' is an empty list",
        UserWarning,
        stacklevel=3,
    )
