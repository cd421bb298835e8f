"""varlen_attention: causal attention over packed variable-length sequences (GQA), no token sees another
sequence. Owns the torch reference (per-sequence SDPA in fp32) and the public function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, _dispatch

OP = "varlen_attention"
_dispatch.register(OP, ("torch",))


def varlen_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool = True, softmax_scale: float | None = None
) -> Tensor:
    """Loop over sequences; each runs fp32 attention with K/V heads repeated for GQA. Returns q.dtype."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    bounds = cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qs = q[s:e].float().transpose(0, 1)  # (Hq, L, D)
        ks = k[s:e].float().transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)  # (Hq, L, D)
        vs = v[s:e].float().transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)  # (Hq, L, D)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)  # (Hq, L, D)
        outs.append(o.transpose(0, 1))  # (L, Hq, D)
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, 0).to(q.dtype)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Attention over a packed batch.

    q: (T, Hq, D), k and v: (T, Hkv, D) with Hq % Hkv == 0, one float dtype and device;
    cu_seqlens: (n+1,) int32, 0 .. T; max_seqlen: the longest sequence. Returns (T, Hq, D) in q.dtype.
    softmax_scale defaults to 1/sqrt(D).
    """
    _checks.tensor("q", q, dtypes=_checks.FLOAT_DTYPES, ndim=3)
    _checks.tensor("k", k, dtypes=(q.dtype,), ndim=3)
    _checks.tensor("v", v, dtypes=(q.dtype,), ndim=3)
    _checks.same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k and v must be (T, Hkv, D) matching q (T, Hq, D), got q={tuple(q.shape)} "
                         f"k={tuple(k.shape)} v={tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"the number of query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    _checks.cu_seqlens("cu_seqlens", cu_seqlens, total=q.shape[0])
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    _dispatch.pick(OP, backend, q)
    return varlen_attention_ref(q, k, v, cu_seqlens, causal, softmax_scale)
