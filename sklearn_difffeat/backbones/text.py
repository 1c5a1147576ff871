"""Text diffusion backbones: one loader, two implementations, one interface.

Every text backbone is a :class:`~sklearn_difffeat.backbones.base.TextBackbone`: a tokenizer, ``mask_token_id``
(None when the model cannot be noised), ``pad_token_id``, ``num_blocks``, ``width``, ``max_length`` (model
positions, or None), ``module`` (the ``nn.Module``), ``fingerprint`` (weights and tokenizer),
``time_conditioned``, and ``hidden_states(input_ids, attention_mask, sigma, blocks) -> {block: (B, L, D)}``,
running no block after the deepest requested one (block 0 is the token embedding, block k the output of
block k).

MDLM checkpoints (``config.json`` with ``model_type "mdlm"``) run on the native :mod:`.mdlm` implementation;
anything else goes to the generic :mod:`.hf_masked_lm` adapter.
"""

from __future__ import annotations

import json
import os

from ._hub import resolve_model_dir
from .base import TextBackbone
from .hf_masked_lm import HFMaskedLMBackbone
from .mdlm import MDLMBackbone, is_mdlm_config, loglinear_sigma

__all__ = ["HFMaskedLMBackbone", "MDLMBackbone", "is_text_backbone", "load_text_backbone", "loglinear_sigma"]

# Only what loading needs: configs, tokenizers, weights (safetensors only: never pickled .bin files).
_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def is_text_backbone(obj) -> bool:
    return isinstance(obj, TextBackbone)


def load_text_backbone(model, trust_remote_code: bool = False, dtype=None):
    """Resolve ``model`` to a text backbone.

    ``model`` is an already-built backbone (returned as is), ``"embedded:NAME"``, a local folder, or a Hugging
    Face Hub id. A folder whose ``config.json`` says ``model_type: "mdlm"`` (or lists the ``MDLM`` architecture)
    loads natively, without remote code; anything else loads through ``AutoModelForMaskedLM`` /
    ``AutoTokenizer``, with ``trust_remote_code`` passed through (never turned on here).
    """
    if is_text_backbone(model):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path, a hub id, 'embedded:NAME' or a text backbone, got {type(model)!r}.")
    patterns = _ALLOW + (["*.py"] if trust_remote_code else [])
    folder = resolve_model_dir(model, allow_patterns=patterns)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a model folder.")
    if is_mdlm_config(json.loads(config_file.read_text())):
        backbone = MDLMBackbone.from_pretrained(folder)
        if dtype is not None:
            backbone.module.to(dtype)
        return backbone
    return HFMaskedLMBackbone.from_pretrained(folder, trust_remote_code=trust_remote_code, dtype=dtype)
