"""rope: rotary position embedding in Qwen3's rotate-half form, positions taken from position_ids.

Owns the torch reference and the public function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _dispatch

OP = "rope"
_dispatch.register(OP, ("torch",))


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin: (T, head_dim) fp32, computed exactly as transformers' default RoPE does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(x: Tensor, position_ids: Tensor, theta: float = 1e6) -> Tensor:
    """x: (T, H, D); returns x * cos + rotate_half(x) * sin with cos/sin (T, 1, D), in x.dtype."""
    cos, sin = rope_cos_sin(position_ids, x.shape[-1], theta)
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]  # (T, 1, D)
    return x * cos + _rotate_half(x) * sin


def rope(x: Tensor, position_ids: Tensor, theta: float = 1e6, *, backend: str | None = None) -> Tensor:
    """Apply RoPE to one projection.

    x: (T, H, D) float, D even; position_ids: (T,) int64 on the same device. Returns (T, H, D) in x.dtype.
    """
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES, ndim=3)
    _checks.tensor("position_ids", position_ids, dtypes=(torch.int64, torch.int32), ndim=1)
    _checks.same_device(x=x, position_ids=position_ids)
    _checks.same_len(x.shape[0], "x", position_ids=position_ids)
    if x.shape[-1] % 2:
        raise ValueError(f"x's head dimension must be even for RoPE, got D={x.shape[-1]}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta}")
    _dispatch.pick(OP, backend, x)
    return rope_ref(x, position_ids, theta)
