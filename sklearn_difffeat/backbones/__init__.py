"""Backbones: load a diffusion Transformer and run it truncated, tapping requested blocks. No sklearn here.

Where weights come from: :func:`resolve_model_dir` gives the local folder of an embedded name
(``"embedded:NAME"``), a folder or a Hugging Face Hub id; :func:`embedded_models` lists the embedded names;
:func:`module_fingerprint` hashes a model's weights (it names the feature store's namespaces).
Untrained copies of a model, for baselines, are in :mod:`sklearn_difffeat.backbones.untrained`.
"""

from ._hub import FINGERPRINT_VERSION, embedded_models, module_fingerprint, resolve_model_dir

__all__ = ["FINGERPRINT_VERSION", "embedded_models", "module_fingerprint", "resolve_model_dir"]
