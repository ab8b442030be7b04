"""The rotary row order of Q and K.

The original release (and GGUF) rotates adjacent pairs of a head's rows, (0,1), (2,3), ...; Hugging Face rotates
row j with row j + head_dim/2. Within each head, interleaved row 2j + c becomes Hugging Face row c * head_dim/2 + j.
Both functions are pure reorderings, so conversions through them are bit-exact.
"""

from __future__ import annotations

import torch


def interleaved_to_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))
