"""Untrained copies of a model: the same architecture and files with freshly initialised weights.

A probe of a trained model's features means little without the same probe of the untrained architecture
beside it (random Transformer features are often surprisingly good); these copies load like any model folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

KINDS = ("dit", "mdlm")


def untrained_copy(source, kind, folder):
    """Copy a model folder to ``folder`` with its weights replaced by a fresh initialisation (seed 0).

    Parameters
    ----------
    source : str or Path
        A local model folder: a DiT pipeline folder (with a ``transformer/`` subfolder) for ``kind="dit"``, an
        MDLM folder for ``kind="mdlm"``. For an embedded model, pass ``resolve_model_dir("embedded:NAME")``.
    kind : {"dit", "mdlm"}
        Which weights to re-initialise: the DiT's ``transformer/`` or the MDLM's DDiT. Everything else
        (scheduler, tokenizer, configs) is copied unchanged.
    folder : str or Path
        Where the copy goes; it must not exist yet.

    Returns
    -------
    str
        ``folder``, ready to pass as a model to the extractors.
    """
    import torch

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    folder = Path(folder)
    shutil.copytree(source, folder)
    torch.manual_seed(0)
    if kind == "dit":
        from diffusers import DiTTransformer2DModel

        config = DiTTransformer2DModel.load_config(folder / "transformer")
        DiTTransformer2DModel.from_config(config).save_pretrained(folder / "transformer")
    else:
        from .mdlm import DDiTModel

        DDiTModel(DDiTModel.from_pretrained(folder).config).save_pretrained(folder)
    return str(folder)
