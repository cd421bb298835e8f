"""rms_norm: Qwen3's RMSNorm (also the per-head q/k norm). Owns the torch reference and the public function."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _dispatch

OP = "rms_norm"
_dispatch.register(OP, ("torch",))


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32 and cast back to x.dtype (as Qwen3)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: str | None = None) -> Tensor:
    """RMSNorm over the last dimension.

    x: (..., D) float; weight: (D,) float, same device. Returns (..., D) in x.dtype (the product with
    weight follows torch type promotion, as in transformers).
    """
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, dtypes=_checks.FLOAT_DTYPES, ndim=1)
    _checks.same_device(x=x, weight=weight)
    if x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"x's last dimension must equal weight's size {weight.shape[0]}, got x.shape={tuple(x.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    _dispatch.pick(OP, backend, x)
    return rms_norm_ref(x, weight, eps)
