"""Native MDLM / SEDD "DDiT" text diffusion Transformer, in plain PyTorch.

Why native: the hub checkpoint ``kuleshov-group/mdlm-owt`` ships remote code that imports ``flash_attn`` (even
for its no-flash variant), so it needs both ``trust_remote_code=True`` and a CUDA-only extension. This module
re-implements the same equations with ``torch.nn.functional.scaled_dot_product_attention``; it runs on CPU and
GPU, loads the hub weights as they are, adds a key padding mask (MDLM has none: it trains on packed sequences),
and can stop after any block.

Architecture (MDLM ``models/dit.py``; hub ``modeling_mdlm.py``), width D, H heads, head width d = D / H::

    x   = E[input_ids]                                    # vocab_embed.embedding, (V, D)
    c   = silu(MLP(sincos_256(sigma)))                    # sigma_map: Linear(256, C), SiLU, Linear(C, C)
    per block (bidirectional):
      shift1, scale1, gate1, shift2, scale2, gate2 = adaLN_modulation(c)       # Linear(C, 6D)
      h   = LN(x) * (1 + scale1) + shift1                 # LayerNorm without bias (weight only), eps 1e-5
      q, k, v = split(attn_qkv(h))                        # no bias; layout (3, H, d) along the last axis
      q, k = rope(q), rope(k)                             # rotate-half rotary, base 10000, on every head dim
      x   = x + gate1 * dropout(attn_out(softmax(q k^T / sqrt(d)) v))          # attn_out: no bias
      h   = LN(x) * (1 + scale2) + shift2
      x   = x + gate2 * dropout(mlp(h))                   # Linear(D, 4D), GELU(tanh), Linear(4D, D)
    logits = linear(LN(x) * (1 + scale) + shift)          # output_layer, own adaLN Linear(C, 2D)

Dropout is applied to the branch before the gate scales it (``bias_dropout_add_scale``); it only matters when
training. MDLM checkpoints use ``time_conditioning=False``: sigma is replaced by zeros, so the noise level enters
only through the masked tokens. A sigma-conditioned checkpoint receives the log-linear sigma of
:func:`loglinear_sigma`.

Checkpoint names. The hub's ``model.safetensors`` stores the ``MDLM`` wrapper whose only child is
``backbone``; our modules carry the same names, so the mapping is "add / strip ``backbone.``":

=====================================================  ==========================================
hub name (``model.safetensors``)                        :class:`DDiTModel` parameter
=====================================================  ==========================================
``backbone.vocab_embed.embedding`` (V, D)              ``vocab_embed.embedding``
``backbone.sigma_map.mlp.{0,2}.{weight,bias}``         ``sigma_map.mlp.{0,2}.*``
``backbone.blocks.{i}.norm1.weight``                   ``blocks.{i}.norm1.weight``
``backbone.blocks.{i}.attn_qkv.weight`` (3D, D)        ``blocks.{i}.attn_qkv.weight``
``backbone.blocks.{i}.attn_out.weight`` (D, D)         ``blocks.{i}.attn_out.weight``
``backbone.blocks.{i}.norm2.weight``                   ``blocks.{i}.norm2.weight``
``backbone.blocks.{i}.mlp.{0,2}.{weight,bias}``        ``blocks.{i}.mlp.{0,2}.*``
``backbone.blocks.{i}.adaLN_modulation.{weight,bias}`` ``blocks.{i}.adaLN_modulation.*`` (6D, C)
``backbone.output_layer.norm_final.weight``            ``output_layer.norm_final.weight``
``backbone.output_layer.linear.{weight,bias}``         ``output_layer.linear.*`` (V, D)
``backbone.output_layer.adaLN_modulation.*``           ``output_layer.adaLN_modulation.*`` (2D, C)
``backbone.rotary_emb.inv_freq``                       not a parameter: recomputed, ignored on load
=====================================================  ==========================================

``config.json`` fields (hub ``MDLMConfig``): ``model_type="mdlm"``, ``architectures=["MDLM"]``, ``vocab_size``
(50258 = GPT-2's 50257 + the mask token), ``model_length`` (1024), ``hidden_dim`` (768), ``cond_dim`` (128),
``n_blocks`` (12), ``n_heads`` (12), ``dropout`` (0.1), ``time_conditioning`` (false).

Tokenizer: a folder holding tokenizer files is read with ``AutoTokenizer``; otherwise MDLM's GPT-2 tokenizer
(hub ``gpt2``, online only) is used, and the mask token is id ``vocab_size - 1`` (50257), as in MDLM.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import TextBackbone, resolve_blocks

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HUB_PREFIX = "backbone."
_FREQ_DIM = 256  # width of the sinusoidal sigma embedding (TimestepEmbedder's frequency_embedding_size)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")


def loglinear_sigma(t, eps: float = 1e-3):
    """MDLM's log-linear total noise ``sigma(t) = -log(1 - (1 - eps) t)`` (``noise_schedule.LogLinearNoise``).

    A token is masked with probability ``1 - exp(-sigma) = (1 - eps) t``; eps keeps sigma finite at t = 1.
    """
    t = torch.as_tensor(t, dtype=torch.float32)
    return -torch.log1p(-(1 - eps) * t)


@dataclass
class DDiTConfig:
    """The fields of MDLM's hub ``config.json``; unknown fields are kept and written back."""

    vocab_size: int = 50258
    model_length: int = 1024
    hidden_dim: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1
    time_conditioning: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.hidden_dim % self.n_heads or (self.hidden_dim // self.n_heads) % 2:
            raise ValueError(
                f"hidden_dim={self.hidden_dim} must split into n_heads={self.n_heads} heads of even width."
            )

    @classmethod
    def from_dict(cls, data: dict) -> DDiTConfig:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        # model_type / architectures are rewritten on save; auto_map points at remote code we never ship.
        extra = {k: v for k, v in data.items() if k not in names | {"model_type", "architectures", "auto_map"}}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        data = asdict(self)
        extra = data.pop("extra")
        return {"model_type": "mdlm", "architectures": ["MDLM"], **data, **extra}

    @classmethod
    def from_pretrained(cls, folder) -> DDiTConfig:
        return cls.from_dict(json.loads((Path(folder) / CONFIG_NAME).read_text()))

    def save_pretrained(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def is_mdlm_config(data: dict) -> bool:
    """Whether a parsed ``config.json`` describes an MDLM DDiT checkpoint."""
    return data.get("model_type") == "mdlm" or "MDLM" in (data.get("architectures") or [])


# ---- layers ------------------------------------------------------------------------------------------------
class _LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 like MDLM (stable under bf16)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = F.layer_norm(x.float(), (x.shape[-1],)) * self.weight.float()
        return y.to(x.dtype)


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class _TokenEmbedding(nn.Module):
    """A raw (V, D) parameter, so the checkpoint name is ``vocab_embed.embedding`` as in MDLM."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, ids):
        return self.embedding[ids]


class _SigmaEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar noise level (cos half, then sin half) followed by an MLP."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(_FREQ_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma):
        half = _FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def _rotary_tables(length: int, head_dim: int, device):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (L, d): the same angle for dims i and i + d/2
    return angles.cos(), angles.sin()


def _apply_rotary(x, cos, sin):
    """x: (B, L, H, d). Pairs dim i with dim i + d/2 (flash-attn's non-interleaved layout, used by MDLM)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class DDiTBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, cond_dim: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = _LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = _LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
        # Zero init (as in DiT / MDLM): a fresh block starts as the identity.
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x, c, cos, sin, attn_mask=None):
        b, n, dim = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        qkv = self.attn_qkv(_modulate(self.norm1(x), shift1, scale1)).view(b, n, 3, self.n_heads, -1)
        q, k, v = qkv.unbind(dim=2)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        ).transpose(1, 2).reshape(b, n, dim)
        x = x + gate1 * F.dropout(self.attn_out(attn), self.dropout, self.training)
        h = self.mlp(_modulate(self.norm2(x), shift2, scale2))
        return x + gate2 * F.dropout(h, self.dropout, self.training)


class DDiTFinalLayer(nn.Module):
    def __init__(self, dim: int, vocab_size: int, cond_dim: int):
        super().__init__()
        self.norm_final = _LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab_size)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
        for layer in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


# ---- model -------------------------------------------------------------------------------------------------
class DDiTModel(nn.Module):
    """MDLM's DDiT backbone: ``forward(input_ids, sigma, attention_mask=None) -> logits (B, L, vocab)``."""

    def __init__(self, config: DDiTConfig):
        super().__init__()
        self.config = config
        self.vocab_embed = _TokenEmbedding(config.vocab_size, config.hidden_dim)
        self.sigma_map = _SigmaEmbedding(config.cond_dim)
        self.blocks = nn.ModuleList(
            DDiTBlock(config.hidden_dim, config.n_heads, config.cond_dim, config.dropout)
            for _ in range(config.n_blocks)
        )
        self.output_layer = DDiTFinalLayer(config.hidden_dim, config.vocab_size, config.cond_dim)

    # The pieces of a forward pass, shared by forward() and the truncated block_outputs().
    def _condition(self, sigma, batch: int, device):
        if sigma is None or not self.config.time_conditioning:
            sigma = torch.zeros(batch, device=device)  # MDLM zeroes sigma when time_conditioning is off
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch)
        return F.silu(self.sigma_map(sigma))

    @staticmethod
    def _attn_mask(attention_mask, length: int):
        # None when nothing is padded, so unpadded inputs run the plain (mask-free) attention.
        if attention_mask is None:
            return None
        keep = attention_mask.to(torch.bool)
        if bool(keep.all()):
            return None
        if not bool(keep.any(dim=1).all()):
            raise ValueError("Every sequence needs at least one real (unpadded) token.")
        return keep[:, None, None, :length]  # (B, 1, 1, L): every query ignores padded keys

    def _blocks(self, input_ids, sigma, attention_mask, depth: int, taps=()):
        x = self.vocab_embed(input_ids)
        c = self._condition(sigma, input_ids.shape[0], input_ids.device).to(x.dtype)
        cos, sin = _rotary_tables(input_ids.shape[1], self.config.hidden_dim // self.config.n_heads, x.device)
        mask = self._attn_mask(attention_mask, input_ids.shape[1])
        out = {0: x} if 0 in taps else {}
        for k in range(1, depth + 1):
            x = self.blocks[k - 1](x, c, cos, sin, mask)
            if k in taps:
                out[k] = x
        return x, c, out

    def forward(self, input_ids, sigma=None, attention_mask=None):
        x, c, _ = self._blocks(input_ids, sigma, attention_mask, self.config.n_blocks)
        return self.output_layer(x, c)

    def block_outputs(self, input_ids, sigma=None, attention_mask=None, blocks=(-1,)) -> dict:
        """{block: (B, L, D)} for the requested blocks, running no block after the deepest one.

        Block 0 is the token embedding entering block 1; block k is the output of block k (1-based).
        """
        taps = {resolve_blocks(b, self.config.n_blocks)[0] for b in blocks}
        _, _, out = self._blocks(input_ids, sigma, attention_mask, max(taps), taps)
        return out

    # ---- hub layout ------------------------------------------------------------------------------------
    def hub_state_dict(self) -> dict:
        """Parameters under their hub names (``backbone.`` prefix), plus the rotary ``inv_freq`` buffer."""
        state = {HUB_PREFIX + k: v.detach().contiguous() for k, v in self.state_dict().items()}
        head_dim = self.config.hidden_dim // self.config.n_heads
        state[HUB_PREFIX + "rotary_emb.inv_freq"] = 1.0 / (
            10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        )
        return state

    def load_hub_state_dict(self, state: dict) -> None:
        ours = {}
        for name, tensor in state.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a fixed function of the head width, recomputed on the fly
            if not name.startswith(HUB_PREFIX):
                raise ValueError(f"Unexpected parameter {name!r} in an MDLM checkpoint (expected 'backbone.*').")
            ours[name[len(HUB_PREFIX):]] = tensor
        missing, unexpected = self.load_state_dict(ours, strict=False)
        if missing or unexpected:
            raise ValueError(f"MDLM checkpoint does not match its config: missing {missing}, unexpected {unexpected}.")

    def save_pretrained(self, folder) -> None:
        """Write ``config.json`` and ``model.safetensors`` in the hub layout, with the hub's names."""
        from safetensors.torch import save_file

        self.config.save_pretrained(folder)
        state = {k: v.to("cpu") for k, v in self.hub_state_dict().items()}
        save_file(state, str(Path(folder) / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, folder) -> DDiTModel:
        from safetensors.torch import load_file

        folder = Path(folder)
        model = cls(DDiTConfig.from_pretrained(folder))
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found: an MDLM folder needs config.json and model.safetensors.")
        model.load_hub_state_dict(load_file(str(weights)))
        return model.eval()


# ---- the text-backbone interface ---------------------------------------------------------------------------
def load_mdlm_tokenizer(folder):
    """The folder's own tokenizer if it has one, else MDLM's GPT-2 tokenizer (hub "gpt2", online only)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        # AutoTokenizer peeks at config.json and warns that it does not know model_type "mdlm": expected here.
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        finally:
            hf_logging.set_verbosity(level)
    try:
        return AutoTokenizer.from_pretrained("gpt2")
    except Exception as exc:
        raise OSError(
            f"{folder} has no tokenizer files and MDLM's GPT-2 tokenizer (hub 'gpt2') could not be fetched "
            f"({type(exc).__name__}). Save a tokenizer into the model folder (tokenizer.save_pretrained(folder)) "
            f"to work offline."
        ) from exc


class MDLMBackbone(TextBackbone):
    """A :class:`DDiTModel` with its tokenizer, behind the interface the text extractor uses."""

    def __init__(self, model: DDiTModel, tokenizer, mask_token_id: int | None = None):
        self.module = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        if mask_token_id is None:
            # MDLM appends [MASK] after the tokenizer's vocabulary when the tokenizer has none (GPT-2).
            mask_token_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else cfg.vocab_size - 1
        self.mask_token_id = int(mask_token_id)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)  # any id works: pad keys are masked out
        self.num_blocks = cfg.n_blocks
        self.width = cfg.hidden_dim
        self.max_length = cfg.model_length
        self.time_conditioned = bool(cfg.time_conditioning)
        self._set_fingerprint()

    @classmethod
    def from_pretrained(cls, folder) -> MDLMBackbone:
        model = DDiTModel.from_pretrained(folder)
        return cls(model, load_mdlm_tokenizer(folder))

    @torch.no_grad()
    def hidden_states(self, input_ids, attention_mask=None, sigma=None, blocks=(-1,)) -> dict:
        if sigma is not None:
            sigma = sigma.to(self.dtype)
        return self.module.block_outputs(input_ids, sigma, attention_mask, blocks)
