"""fused_linear_cross_entropy: the SFT loss straight from hidden states, -log softmax(hidden @ weight.T +
bias)[target], with backward into hidden / weight / bias and no [N, V] logits. Kernels in _fused_linear_chunked.py (the
default Triton implementation with gradients: the gradient is formed in the forward with 3 GEMMs) and
_fused_linear.py (R4B_FUSED_LINEAR_IMPL=tiled, and the no-grad forward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _compile, _dispatch, _fused_linear, _fused_linear_chunked

OP = "fused_linear_cross_entropy"
_dispatch.register(OP, ("triton", "torch"))

REDUCTIONS = ("mean", "sum", "none")


def _cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, reduction: str,
                   bias: Tensor | None, backend: str) -> Tensor:
    v = weight.shape[0]
    valid = (targets != ignore_index) & (targets >= 0) & (targets < v)  # (N,)
    t = torch.where(valid, targets, -1)  # ignore_index may be a real id: such rows must not get a target

    def reduce(logp: Tensor) -> Tensor:
        loss = torch.where(valid, -logp, 0.0)
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        return loss.sum() / valid.sum().clamp(min=1)

    grads = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    if backend == "triton" and grads and _fused_linear_chunked.use_chunked(hidden.dtype):
        if reduction == "none":  # the per-token weights come only with grad_output: recompute in the backward
            return reduce(_fused_linear_chunked.linear_logprobs(hidden, weight, bias, t, 1.0))
        coef = -valid.float()  # d loss / d logp
        if reduction == "mean":
            coef = coef / valid.sum().clamp(min=1).float()
        return _fused_linear_chunked.chunked_loss(hidden, weight, bias, t, coef, reduce)[0]
    return reduce(_fused_linear.linear_logprobs(hidden, weight, bias, t, 1.0, backend))  # (N,) f32


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


@_compile.eager  # under torch.compile: runs eagerly (r4b/kernels/_compile.py)
@_dispatch.on_tensor_device
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
