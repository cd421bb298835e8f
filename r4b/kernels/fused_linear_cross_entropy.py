"""fused_linear_cross_entropy: the SFT loss straight from hidden states, -log softmax(hidden @ weight.T +
bias)[target], with backward into hidden / weight / bias and no [N, V] logits. Kernels in _fused_linear.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _dispatch, _fused_linear

OP = "fused_linear_cross_entropy"
_dispatch.register(OP, ("triton", "torch"))

REDUCTIONS = ("mean", "sum", "none")


def _cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, reduction: str,
                   bias: Tensor | None, backend: str) -> Tensor:
    v = weight.shape[0]
    valid = (targets != ignore_index) & (targets >= 0) & (targets < v)  # (N,)
    t = torch.where(valid, targets, -1)  # ignore_index may be a real id: such rows must not get a target
    logp = _fused_linear.linear_logprobs(hidden, weight, bias, t, 1.0, backend)  # (N,) f32
    loss = torch.where(valid, -logp, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def fused_linear_cross_entropy_ref(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    bias: Tensor | None = None,
) -> Tensor:
    """Torch reference (chunked over rows for the forward and the backward): same contract as the public op."""
    return _cross_entropy(hidden, weight, targets, ignore_index, reduction, bias, "torch")


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    bias: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Cross-entropy of ``targets`` under softmax(hidden @ weight.T + bias), differentiable in hidden, weight, bias.

    hidden: (N, H) float32/float16/bfloat16; weight: (V, H) and bias: optional (V,), hidden's dtype;
    targets: (N,) int64 or int32, each in [0, V) or ``ignore_index`` (ignored: loss 0, no gradient).
    reduction: "mean" (over non-ignored tokens; 0.0, not NaN, when every token is ignored), "sum", or
    "none" ((N,) float32, 0.0 at ignored tokens). Returns float32. Maths in fp32; gradients come back in
    the inputs' dtypes.
    """
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _fused_linear.check_common(hidden, weight, bias, targets, 1.0, ignore_index=ignore_index)
    _checks.choice("reduction", reduction, REDUCTIONS)
    chosen = _dispatch.pick(OP, backend, hidden)
    return _cross_entropy(hidden, weight, targets, ignore_index, reduction, bias, chosen)
