"""fused_linear_logprobs: log p(targets) under softmax((hidden @ weight.T + bias) / temperature), no [N, V]
logits and no grad (old-policy / reference log-probs, rollout scoring). The kernels live in _fused_linear.py
(tiled: online log-sum-exp over vocabulary tiles, O(N) memory) and _fused_linear_chunked.py (chunked, the default
of $R4B_FUSED_LINEAR_IMPL: a cuBLAS GEMM per row chunk into a reused [C, V] buffer of at most 1 GiB, then one
read of it by the row kernel).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _compile, _dispatch, _fused_linear

OP = "fused_linear_logprobs"
_dispatch.register(OP, ("triton", "torch"))


def fused_linear_logprobs_ref(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0, *, bias: Tensor | None = None
) -> Tensor:
    """Torch reference: fp32 logits of a chunk of rows at a time (bounded memory, runs on big CPU inputs)."""
    with torch.no_grad():
        return _fused_linear.torch_fwd(hidden, weight, bias, targets, temperature)[0]


@_compile.eager  # under torch.compile: runs eagerly (r4b/kernels/_compile.py)
@_dispatch.on_tensor_device
def fused_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    *,
    bias: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Per-token log-probabilities of ``targets``, never materialising the logits.

    hidden: (N, H) float32/float16/bfloat16 (any row stride); weight: (V, H), hidden's dtype (the lm_head);
    bias: optional (V,), hidden's dtype; targets: (N,) int64 or int32, each in [0, V) or -100 (no target);
    temperature > 0 divides the logits. Returns (N,) float32, detached, 0.0 where the target is -100.
    Maths in fp32 whatever the input dtype.
    """
    _fused_linear.check_common(hidden, weight, bias, targets, temperature)
    chosen = _dispatch.pick(OP, backend, hidden)
    return _fused_linear.logprobs_no_grad(hidden, weight, bias, targets, float(temperature), chosen)
