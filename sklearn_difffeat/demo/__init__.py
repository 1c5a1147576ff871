"""The end-to-end Diff-Feat demo on embedded data and models: offline, on CPU, in a few minutes.

``python -m sklearn_difffeat demo`` loads the Fashion-MNIST mosaics, builds the pipeline
(ColumnTransformer of the two extractors -> FusionClassifier), runs BlockTimestepSearchCV over the image and
text (block, timestep) axes, scores image-only, text-only and fused models on the held-out split, saves and
reloads the fitted pipeline, and draws two figures: a heatmap of the image branch's score over (block,
timestep), and a t-SNE of the held-out image, text and fused features.

From Python: ``run_demo()`` runs the documented demo, ``run_demo(n_train=200, n_test=100)`` or
``run_demo(DemoSettings(...))`` another one (:class:`DemoSettings` documents every setting).

Modules: ``_run`` (the settings and the steps), ``_pipeline`` (the pipeline and its search axes), ``_probes``
(the linear probes), ``_figures`` (heatmap and t-SNE), ``_report`` (the printed table).
"""

from ._pipeline import IMAGE_MODEL, IMAGE_TIMESTEPS, SEARCH_HEAD, TEXT_MODEL, TEXT_TIMESTEPS, build_pipeline
from ._probes import PROBE_C, linear_probe
from ._run import DemoSettings, run_demo

__all__ = [
    "IMAGE_MODEL",
    "IMAGE_TIMESTEPS",
    "PROBE_C",
    "SEARCH_HEAD",
    "TEXT_MODEL",
    "TEXT_TIMESTEPS",
    "DemoSettings",
    "build_pipeline",
    "linear_probe",
    "run_demo",
]
