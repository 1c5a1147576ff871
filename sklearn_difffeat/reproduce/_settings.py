"""What a reproduction runs on: its settings, the search grids, and the paper's reported figures."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path

DATASETS = ("coco", "vg500")
GRIDS = ("paper", "small")

#: The splits each benchmark trains and tests on (the loaders' names).
SPLITS = {"coco": ("train2014", "val2014"), "vg500": ("train", "test")}

#: The timestep axes of each grid; the block axes are resolved from the models (see :func:`grid_axes`).
IMAGE_TIMESTEPS = {"paper": (0, 25, 50, 100, 200, 400, 600, 800), "small": (0, 100, 400)}
TEXT_TIMESTEPS = {"paper": (0.0, 0.1, 0.2, 0.3, 0.5), "small": (0.0, 0.3)}
SMALL_BLOCKS = {"image": 4, "text": 3}  # evenly spread blocks of the small grid, the deepest among them
#: The head that scores the small grid's candidates unless ``search_head`` says otherwise: narrower and shorter
#: trained than the paper's, for quick runs (the demo's search head). The three reported heads keep 2048.
SMALL_SEARCH_HEAD = {"projection_dim": 256, "max_epochs": 20}

#: What Diff-Feat reports (fused image + text, mAP x 100), and on which benchmark.
PAPER_MAP = {"coco": (98.6, "MS-COCO-enhanced"), "vg500": (45.7, "VG500")}


@dataclass(frozen=True)
class ReproduceSettings:
    """One reproduction of the paper's protocol on a benchmark you downloaded.

    Attributes
    ----------
    dataset : {"coco", "vg500"}
        COCO 2014 (train2014 to train and search, val2014 to test, captions as text) or VG500 (train / test
        lists, region phrases as text when ``region_descriptions.json`` is in the folder).
    root : path
        The dataset folder, laid out as docs/benchmarks.md describes.
    store : path
        The feature store folder: every feature goes there, and a rerun reads it instead of computing.
    output : path or None, default=None
        Where the table, the JSON and the state file go; None is ``<store>/reproduce-<dataset>``.
    limit : int or None, default=None
        Keep the first ``limit`` images of each split (a quick run); None keeps them all.
    image_model, text_model : str
        Hub ids, folders or ``embedded:NAME`` of the DiT and of the masked-diffusion text model.
    grid : {"paper", "small"}, default="paper"
        "paper": every block of each model, image timesteps 0..800 (8 values), text timesteps 0..0.5 (5 values).
        "small": 4 image blocks, 3 image timesteps, 3 text blocks, 2 text timesteps, candidates scored with a
        256-wide head trained 20 epochs (unless ``search_head`` says otherwise), for quick runs.
    device : str or None, default=None
        Where features are computed (None: CUDA when available). The fusion heads also train there.
    dtype : {"auto", "float32", "bfloat16", "float16"}, default="auto"
        Precision of the backbones. "auto" is bfloat16 when extraction runs on GPUs, else float32, and then keeps
        whatever an earlier run of the same output folder used, so a search resumed on a CPU machine reads the
        features a GPU stored (the dtype is part of every feature's store namespace).
    batch_size : int, default=64
        Largest batch on the device during extraction.
    num_workers : int or None, default=None
        Image decoding processes of the extractors (None: the extractors' default).
    seed : int, default=0
        Seeds the held-out part of the training split and the fusion heads.
    val_fraction : float, default=0.2
        Share of the training split held out to score the search's candidates.
    search_head, head : dict
        ``FusionClassifier`` parameters, over ``projection_dim=2048`` and its defaults, of the heads that score
        the search's candidates and of the three heads fitted on the whole training split. An empty
        ``search_head`` on the small grid is ``SMALL_SEARCH_HEAD``.
    verbose : int, default=1
        0: only the table and the files written; 1: what each step does and progress bars.
    """

    dataset: str
    root: str | Path
    store: str | Path
    output: str | Path | None = None
    limit: int | None = None
    image_model: str = "facebook/DiT-XL-2-256"
    text_model: str = "kuleshov-group/mdlm-owt"
    grid: str = "paper"
    device: str | None = None
    dtype: str = "auto"
    batch_size: int = 64
    num_workers: int | None = None
    seed: int = 0
    val_fraction: float = 0.2
    search_head: dict = field(default_factory=dict)
    head: dict = field(default_factory=dict)
    verbose: int = 1

    def __post_init__(self):
        choices = {"dataset": DATASETS, "grid": GRIDS, "dtype": ("auto", "float32", "bfloat16", "float16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        for name, minimum, optional in (("limit", 1, True), ("batch_size", 1, False), ("num_workers", 0, True),
                                        ("seed", 0, False), ("verbose", 0, False)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, "
                                 f"got {value!r}.")
        if not isinstance(self.val_fraction, numbers.Real) or not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {self.val_fraction!r}.")
        for name in ("search_head", "head"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict of FusionClassifier parameters.")

    @property
    def candidate_head(self) -> dict:
        """The FusionClassifier parameters of the search's candidates."""
        return self.search_head or (dict(SMALL_SEARCH_HEAD) if self.grid == "small" else {})

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output is not None else Path(self.store) / f"reproduce-{self.dataset}"

    def describe(self) -> dict:
        """The settings as plain JSON values (paths as absolute strings)."""
        values = asdict(self)
        for name in ("root", "store"):
            values[name] = str(Path(values[name]).resolve())
        values["output"] = str(self.output_dir.resolve())
        return values


def spread_blocks(n_blocks: int, count: int) -> list[int]:
    """``count`` blocks spread evenly over ``1..n_blocks``, ending at the deepest (fewer for a shallow model)."""
    return sorted({max(1, round(n_blocks * (i + 1) / count)) for i in range(count)})


def grid_axes(grid: str, n_image_blocks: int | None, n_text_blocks: int | None) -> dict:
    """The search axes of the pipeline ``features -> clf`` for each model whose depth is given.

    "paper" lists every block of each model (1..28 for DiT-XL/2, 1..12 for MDLM-OWT); "small" a few of them.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {list(GRIDS)}, got {grid!r}.")
    axes = {}
    for branch, depth, timesteps in (("image", n_image_blocks, IMAGE_TIMESTEPS), ("text", n_text_blocks,
                                                                                 TEXT_TIMESTEPS)):
        if depth is None:
            continue
        blocks = list(range(1, depth + 1)) if grid == "paper" else spread_blocks(depth, SMALL_BLOCKS[branch])
        axes[f"features__{branch}__block"] = blocks
        axes[f"features__{branch}__timestep"] = list(timesteps[grid])
    return axes


def resolve_dtype(dtype: str, device: str | None, gpu_workers: bool = False) -> str:
    """The backbones' compute dtype: "auto" is bfloat16 when features are computed on GPUs (``device`` names CUDA,
    or none is named and this machine or the Dask workers have one), else float32."""
    if dtype != "auto":
        return dtype
    if device is not None:
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    import torch

    return "bfloat16" if gpu_workers or torch.cuda.is_available() else "float32"
