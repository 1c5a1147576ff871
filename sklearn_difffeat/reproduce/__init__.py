"""Reproduce the paper's protocol on MS-COCO 2014 or VG500: ``sklearn-difffeat reproduce`` and its steps.

Each step is a plain function that can be called on its own:

1. :func:`load_splits`: the training and test splits (with ``limit``), images without text set apart;
2. :func:`extract_features`: image and text features at every grid timestep, every block up to the grid's
   deepest, into the feature store (resumable, in-process or on Dask);
3. :func:`search_cells`: ``BlockTimestepSearchCV`` over the grid from the Diff-Feat priors, scored by mAP on a
   held-out part of the training split, reading the store;
4. :func:`fit_and_score`: image-only, text-only and fused ``FusionClassifier(projection_dim=2048)`` heads fitted
   on the whole training split at the chosen cells, scored on the test split (mAP, CP, CR, CF1, OP, OR, OF1 and
   their top-3 variants);
5. :func:`write_report`: ``results.md`` and ``results.json`` beside the paper's reported mAP.

:func:`run_reproduce` runs them in order and records each finished step in ``<output>/state.json``, so a rerun
resumes after the last one. See docs/benchmarks.md, "Reproducing the paper".
"""

from ._data import Split, holdout_fold, load_splits
from ._report import METRICS, markdown, write_report
from ._run import run_reproduce
from ._settings import PAPER_MAP, ReproduceSettings, grid_axes
from ._steps import build_pipeline, extract_features, fit_and_score, model_depths, search_cells

__all__ = [
    "METRICS", "PAPER_MAP", "ReproduceSettings", "Split", "build_pipeline", "extract_features", "fit_and_score",
    "grid_axes", "holdout_fold", "load_splits", "markdown", "model_depths", "run_reproduce", "search_cells",
    "write_report",
]
