"""add_rms_norm: the decoder's residual add followed by RMSNorm, in one kernel each way.

``normed, summed = add_rms_norm(x, residual, w)`` equals ``summed = x + residual; normed = rms_norm(summed, w)``.
Unfused, a decoder layer's residual add and the next norm read and write the hidden states five times forward
(the add: two reads, a write; the norm: a read, a write) and six times backward (the norm's backward, and the add
that accumulates the residual branch's gradient); fused, four and four. The kernels are rms_norm's (its forward
and backward with the add switched on: r4b/kernels/rms_norm.py).

Owns the torch reference, the autograd Function and the public function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _compile, _dispatch
from .rms_norm import check_args, rms_norm_ref

OP = "add_rms_norm"
_dispatch.register(OP, ("triton", "torch"))


def add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(rms_norm_ref(x + residual, weight, eps), x + residual), the sum in x's dtype as eager torch adds."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


if _dispatch.triton_importable():
    from .rms_norm import _backward, _forward, _rows

    def _fn_forward(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(y, sum, both shaped as x; the (N, D) sum rows s; rstd): the forward of the Function and the custom op."""
        D = x.shape[-1]
        y, rstd, s = _forward(_rows(x, D), weight, eps, _rows(residual, D))
        if x.dim() == 2:  # the model's (T, H) rows: the tensors themselves, not views (FSDP2 warns of views)
            return y, s, s, rstd
        return y.view(x.shape), s.view(x.shape), s, rstd

    def _fn_backward(dy: Tensor | None, ds: Tensor | None, s: Tensor, weight: Tensor, rstd: Tensor,
                     shape) -> tuple[Tensor, Tensor]:
        """(dx shaped ``shape``, dweight) from the (N, D) sum rows s: the gradient x and residual both get."""
        D = s.shape[1]
        if dy is None:  # only the sum reached the loss: it passes its gradient to both inputs
            dx = ds if ds is not None else torch.zeros(shape, dtype=s.dtype, device=s.device)
            return dx, torch.zeros_like(weight)
        dx, dw = _backward(_rows(dy, D), s, weight, rstd, _rows(ds, D) if ds is not None else None)
        return dx.view(shape), dw

    class _AddRMSNormFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: Tensor, residual: Tensor, weight: Tensor, eps: float):
            y, summed, s, rstd = _fn_forward(x, residual, weight, eps)
            ctx.save_for_backward(s, weight, rstd)
            ctx.x_shape = x.shape
            # a sum nobody differentiates (the final norm's) gets None, not a materialised zero gradient to read
            ctx.set_materialize_grads(False)
            return y, summed

        @staticmethod
        @torch.autograd.function.once_differentiable  # a double backward raises instead of dropping terms
        def backward(ctx, dy: Tensor | None, ds: Tensor | None):
            s, weight, rstd = ctx.saved_tensors
            dx, dw = _fn_backward(dy, ds, s, weight, rstd, ctx.x_shape)
            # x and residual get the same gradient (the same tensor, as torch's add backward returns it)
            return dx, dx, dw, None

    # under torch.compile (r4b/kernels/_compile.py): the same forward and backward as custom ops (whose autograd
    # materialises a zero gradient for an unused output)
    @_compile.custom_op("add_rms_norm")
    def _add_rms_norm_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        y, summed, _, rstd = _fn_forward(x, residual, weight, eps)
        return _compile.contiguous(y, summed, rstd)

    @_add_rms_norm_op.register_fake
    def _(x, residual, weight, eps):
        return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), x.new_empty(x.shape),
                x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32))

    @_compile.custom_op("add_rms_norm_backward")
    def _add_rms_norm_backward_op(dy: Tensor, ds: Tensor, summed: Tensor, weight: Tensor,
                                  rstd: Tensor) -> tuple[Tensor, Tensor]:
        return _compile.contiguous(*_fn_backward(dy, ds, _rows(summed, summed.shape[-1]), weight, rstd,
                                                 summed.shape))

    @_add_rms_norm_backward_op.register_fake
    def _(dy, ds, summed, weight, rstd):
        return summed.new_empty(summed.shape), weight.new_empty(weight.shape)

    def _add_rms_norm_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[2], output[1], output[2])
        ctx.mark_non_differentiable(output[2])

    def _add_rms_norm_grads(ctx, dy, ds, _drstd):
        weight, summed, rstd = ctx.saved_tensors
        dx, dw = _add_rms_norm_backward_op(dy, ds, summed, weight, rstd)
        return dx, dx, dw, None

    _add_rms_norm_op.register_autograd(_add_rms_norm_grads, setup_context=_add_rms_norm_setup)


@_dispatch.on_tensor_device
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, *,
                 backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Residual add then RMSNorm over the last dimension: returns ``(rms_norm(x + residual, weight, eps), x +
    residual)``.

    x, residual: (..., D) float, same shape and dtype; weight: (D,) float; all on one device. The sum is rounded
    to x's dtype (as eager torch adds) and normalised from that rounded value, so the Triton path gives the same
    values as ``rms_norm(x + residual, weight)``; the normalised output follows rms_norm's dtype rule (the
    promotion of x's and weight's dtypes). Both outputs are differentiable; x and residual get the same gradient.
    """
    check_args(x, weight, eps, residual=residual)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual must have x's shape and dtype, got residual {tuple(residual.shape)} "
                         f"{str(residual.dtype).replace('torch.', '')} and x {tuple(x.shape)} "
                         f"{str(x.dtype).replace('torch.', '')}")
    if _dispatch.pick(OP, backend, x) == "triton":
        if _compile.compiling():
            return _add_rms_norm_op(x, residual, weight.contiguous(), float(eps))[:2]
        return _AddRMSNormFn.apply(x, residual, weight.contiguous(), float(eps))
    return add_rms_norm_ref(x, residual, weight, eps)
