"""The contract every backbone keeps, and the one block-index helper.

A backbone is a loaded diffusion Transformer that can run *truncated*: ``hidden_states(..., blocks)`` returns
the token states after each requested block from one forward pass and runs no block after the deepest one.
What goes in besides ``blocks`` is the modality's own input (noisy latents, timesteps and class labels for a
DiT; token ids, attention mask and noise level for a text model). Extractors rely on nothing else.
"""

from __future__ import annotations

import hashlib
import numbers
from abc import ABC, abstractmethod

import torch


def resolve_blocks(block, num_blocks: int, name: str = "block") -> list[int]:
    """Normalise ``block`` (an int or a list of ints) to indices in ``[0, num_blocks]``, in the order given.

    ``k`` is the output of the k-th block counted from 1, ``0`` the embedding entering block 1, and negative
    values count from the end (``-1`` is the last block), as in Hugging Face ``hidden_states``. ``name`` is the
    parameter named in error messages.
    """
    requested = [block] if isinstance(block, numbers.Integral) else list(block)
    if not requested:
        raise ValueError(f"{name} is an empty list; give at least one block index.")
    resolved = []
    for value in requested:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an int or a list of ints, got {value!r}.")
        index = int(value) + num_blocks + 1 if value < 0 else int(value)
        if not 0 <= index <= num_blocks:
            raise ValueError(
                f"{name}={value} is out of range for a model with {num_blocks} blocks: valid values are "
                f"0..{num_blocks} (0 = embedding, k = output of block k) or -{num_blocks + 1}..-1 from the end."
            )
        if index in resolved:
            raise ValueError(f"{name} lists {value} twice (as block {index}).")
        resolved.append(index)
    return resolved


class DiffusionBackbone(ABC):
    """A diffusion Transformer behind the interface the extractors use.

    Subclasses provide ``num_blocks``, ``width`` (channels of one token state), ``fingerprint`` (a short hash of
    everything that changes the features: weights, noise schedule, tokenizer) and :meth:`hidden_states`.
    """

    num_blocks: int
    width: int

    @property
    @abstractmethod
    def fingerprint(self) -> str: ...

    @property
    @abstractmethod
    def modules(self) -> list[torch.nn.Module]:
        """The torch modules holding the weights (moved and cast together)."""

    @abstractmethod
    def hidden_states(self, *inputs, blocks) -> dict[int, torch.Tensor]:
        """``{k: (B, N, width)}`` for every k in ``blocks`` (indices in ``[0, num_blocks]``), one truncated pass."""

    @property
    def device(self) -> torch.device:
        return next(self.modules[0].parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.modules[0].parameters()).dtype

    def to(self, device=None, dtype=None) -> DiffusionBackbone:
        """Move (and cast floating-point weights of) every module in place; returns self."""
        for module in self.modules:
            # nn.Module.to, not diffusers' override, which warns about casting even when nothing must stay float32.
            torch.nn.Module.to(module, device=device, dtype=dtype)
        return self


class TextBackbone(DiffusionBackbone):
    """A text diffusion Transformer (``self.module``) with its tokenizer.

    Subclasses set ``tokenizer``, ``mask_token_id`` (None when the model cannot be noised), ``pad_token_id``,
    ``num_blocks``, ``width``, ``max_length`` (positions, or None) and ``time_conditioned``, then call
    :meth:`_set_fingerprint`. ``hidden_states(input_ids, attention_mask, sigma, blocks)``.
    """

    module: torch.nn.Module
    tokenizer: object
    mask_token_id: int | None
    pad_token_id: int
    max_length: int | None
    time_conditioned: bool

    def _set_fingerprint(self) -> None:
        # Weights and tokenizer both decide the features of a text; taken before any cast (see DiTBackbone).
        from ._hub import module_fingerprint

        digest = hashlib.blake2b(tokenizer_identity(self.tokenizer), digest_size=6).hexdigest()
        self._fingerprint = f"{module_fingerprint(self.module)}-{digest}"

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.module]


def tokenizer_identity(tokenizer) -> bytes:
    """Bytes that change whenever the tokenizer would split some text differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer serialises its whole pipeline
        return backend.to_str().encode()
    vocab = sorted(tokenizer.get_vocab().items())
    return repr((type(tokenizer).__name__, vocab, tokenizer.all_special_tokens)).encode()
