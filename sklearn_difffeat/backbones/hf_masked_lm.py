"""Any Hugging Face masked LM as a text diffusion backbone.

Absorbing-state (masked) diffusion LMs are masked LMs trained over every mask ratio, so BERT-like models and
masked diffusion LMs with no time input (LLaDA, Dream: remote code, ``trust_remote_code=True``) share one
adapter: noise replaces tokens with the tokenizer's mask token, and block ``k`` is ``hidden_states[k]`` of the
model's ``output_hidden_states=True`` output.

Truncation: when the model's list of Transformer layers can be found, block ``k < num_blocks`` is read as the
*input* of layer ``k`` (0-based), i.e. the output of block ``k``, by a forward pre-hook that then stops the
pass, so layers after the deepest requested block never run. The last block is always read from the full
forward's ``hidden_states[-1]``, because some models (Llama-style, LLaDA) apply a final norm there.

Remote code is never executed unless the caller passes ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .base import TextBackbone, resolve_blocks

# Where common architectures keep their layer list, relative to the full model.
_LAYER_PATHS = (
    "base_model.encoder.layer",  # BERT, RoBERTa, ELECTRA, ...
    "base_model.layers",  # Llama-style (Dream), ModernBERT
    "base_model.transformer.blocks",  # LLaDA
    "base_model.transformer.layer",  # DistilBERT
    "base_model.encoder.layers",
    "base_model.h",
)


class _Stop(Exception):
    """Raised by the tap hook once the deepest requested block is captured: nothing after it runs."""


def _config_value(config, *names):
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def check_remote_code(folder, trust_remote_code: bool) -> None:
    """Refuse a model whose config needs remote code, unless the user said ``trust_remote_code=True``."""
    config_file = Path(folder) / "config.json"
    data = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if data.get("auto_map") and not trust_remote_code:
        raise ValueError(
            f"The model in {folder} needs its own Python code (config.json has 'auto_map': "
            f"{sorted(data['auto_map'])}). Running it executes that code on your machine; if you trust its "
            f"source, pass trust_remote_code=True."
        )


class HFMaskedLMBackbone(TextBackbone):
    """A transformers model with ``output_hidden_states`` and its tokenizer, as a text backbone."""

    def __init__(self, model: nn.Module, tokenizer, mask_token_id: int | None = None):
        self.module = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        if mask_token_id is None:
            mask_token_id = tokenizer.mask_token_id
        if mask_token_id is None:
            mask_token_id = _config_value(config, "mask_token_id")
        self.mask_token_id = None if mask_token_id is None else int(mask_token_id)  # None: t > 0 is refused
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)
        self.num_blocks = int(_config_value(config, "num_hidden_layers", "n_layers", "num_layers", "n_layer"))
        self.width = int(_config_value(config, "hidden_size", "d_model", "n_embd"))
        max_pos = _config_value(config, "max_position_embeddings", "max_sequence_length", "n_positions")
        self.max_length = int(max_pos) if max_pos else None
        self.time_conditioned = False
        self._layers = self._find_layers(model, self.num_blocks)
        self._set_fingerprint()

    @staticmethod
    def _find_layers(model, num_blocks):
        for path in _LAYER_PATHS:
            obj = model
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if isinstance(obj, nn.ModuleList) and len(obj) == num_blocks:
                return obj
        return None  # unknown layout: every request runs the full forward

    @classmethod
    def from_pretrained(cls, folder, trust_remote_code: bool = False, dtype=None) -> HFMaskedLMBackbone:
        from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

        check_remote_code(folder, trust_remote_code)
        folder = str(folder)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        kwargs = dict(config=config, trust_remote_code=trust_remote_code, dtype=dtype or torch.float32)
        try:
            model = AutoModelForMaskedLM.from_pretrained(folder, **kwargs)
        except ValueError:  # no masked-LM class registered (LLaDA, Dream expose AutoModel only)
            model = AutoModel.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer)

    @torch.no_grad()
    def hidden_states(self, input_ids, attention_mask=None, sigma=None, blocks=(-1,)) -> dict:
        """{block: (B, L, D)}; ``sigma`` is ignored (these models have no time input)."""
        n = self.num_blocks
        wanted = {resolve_blocks(b, n)[0] for b in blocks}
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self._layers is None or n in wanted:
            out = self.module(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            return {k: out.hidden_states[k] for k in wanted}

        captured, deepest = {}, max(wanted)

        def tap(k):
            def hook(module, args, kwargs):
                captured[k] = args[0] if args else kwargs["hidden_states"]
                if k == deepest:
                    raise _Stop

            return hook

        handles = [self._layers[k].register_forward_pre_hook(tap(k), with_kwargs=True) for k in wanted]
        try:
            self.module(input_ids=input_ids, attention_mask=attention_mask)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return captured
