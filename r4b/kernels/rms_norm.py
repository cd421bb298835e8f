"""rms_norm: Qwen3's RMSNorm (also the per-head q/k norm).

Owns the torch reference, the Triton forward/backward kernels (rows tiled BLOCK_M x BLOCK_D, fp32 inside),
the autograd Function and the public function.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _checks, _dispatch

OP = "rms_norm"
_dispatch.register(OP, ("triton", "torch"))


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32 and cast back to x.dtype (as Qwen3)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


if _dispatch.triton_importable():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n_rows"])
    def _rms_fwd_kernel(X, W, Y, RSTD, n_rows, stride_x, stride_y, eps, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr):
        # One program normalises BLOCK_M rows; x is (n_rows, D) with row stride stride_x.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < n_rows
        mask = rmask[:, None] & (cols[None, :] < D)
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        # Round the normalised value to x's dtype before the weight product, as the reference does.
        h = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], (h * w[None, :]).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit(do_not_specialize=["n_rows"])
    def _rms_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, n_rows, stride_dy, stride_x, stride_dx, D: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        # A persistent program walks row blocks pid, pid + nprog, ...; its dweight partial sum goes to
        # DW_PART[pid] (written by every program, also one without rows).
        pid = tl.program_id(0)
        row_step = tl.num_programs(0) * BLOCK_M
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r0 in range(pid * BLOCK_M, n_rows, row_step):
            rows = r0 + tl.arange(0, BLOCK_M)
            rmask = rows < n_rows
            mask = rmask[:, None] & cmask[None, :]
            rows64 = rows.to(tl.int64)
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            xhat = x * rstd[:, None]
            dw += tl.sum(dy * xhat, axis=0)
            g = dy * w[None, :]
            # d/dx of x * rstd: rstd * (g - xhat * mean(g * xhat))
            dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / D)[:, None])
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PART + pid * BLOCK_D + cols, dw, mask=cmask)

    def _gpu_blocks(D: int) -> tuple[int, int, int]:
        """(BLOCK_D, BLOCK_M, num_warps) of the fixed GPU tile: ~4k elements per program."""
        block_d = triton.next_power_of_2(D)
        block_m = max(1, min(64, 4096 // block_d))
        num_warps = 4 if block_d * block_m <= 4096 else 8
        return block_d, block_m, num_warps

    def _blocks(D: int) -> tuple[int, int, int]:
        """(BLOCK_D, BLOCK_M, num_warps) used here: the GPU tile, with at most 8 rows under the interpreter."""
        block_d, block_m, num_warps = _gpu_blocks(D)
        if _dispatch.triton_interpret():  # keep interpreter tiles small
            block_m = max(1, min(block_m, 8))
        return block_d, block_m, num_warps

    # GPU backward: autotuned once per D over (rows per step, warps), kept to 2k..8k elements a step (16 warps
    # only from 4k). The fixed tiles timed on the H100 (2026-11-26) are among them: 1 row x 4 warps at D=2560
    # (38% of copy bandwidth fwd+bwd) and 32 rows x 4 warps at the q/k head norm D=128 (80%).
    BWD_CONFIGS = [(bm, w) for bm in (1, 2, 4, 8, 16, 32, 64) for w in (4, 8)] + [(1, 16), (2, 16)]

    def _bwd_prune(configs, named_args, **kwargs):
        block_d = kwargs["BLOCK_D"]
        kept = [c for c in configs if 2048 <= c.kwargs["BLOCK_M"] * block_d <= 8192
                and (c.num_warps < 16 or c.kwargs["BLOCK_M"] * block_d >= 4096)]
        if not kept:  # very narrow or very wide rows: the fixed tile
            bm, w = _gpu_blocks(kwargs["D"])[1:]
            kept = [c for c in configs if c.kwargs["BLOCK_M"] == bm and c.num_warps == w] or configs[:1]
        return kept

    _bwd_tuned = triton.autotune([triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in BWD_CONFIGS],
                                 key=["D"], prune_configs_by={"early_config_prune": _bwd_prune})(_rms_bwd_kernel)

    @functools.cache
    def _sm_count(device: torch.device) -> int:
        return torch.cuda.get_device_properties(device).multi_processor_count

    def _rows(t: Tensor, D: int) -> Tensor:
        """(N, D) view (or copy) with unit stride along D."""
        t2 = t.reshape(-1, D)  # (N, D)
        return t2 if t2.stride(-1) == 1 else t2.contiguous()

    class _RMSNormFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
            D = x.shape[-1]
            x2 = _rows(x, D)  # (N, D)
            n = x2.shape[0]
            out_dtype = torch.promote_types(x.dtype, weight.dtype)
            y = torch.empty((n, D), dtype=out_dtype, device=x.device)
            rstd = torch.empty(n, dtype=torch.float32, device=x.device)
            block_d, block_m, warps = _blocks(D)
            if n > 0:
                _rms_fwd_kernel[(triton.cdiv(n, block_m),)](
                    x2, weight, y, rstd, n, x2.stride(0), y.stride(0), eps, D=D, BLOCK_D=block_d, BLOCK_M=block_m,
                    num_warps=warps)
            ctx.save_for_backward(x2, weight, rstd)
            ctx.x_shape = x.shape
            return y.view(x.shape)

        @staticmethod
        @torch.autograd.function.once_differentiable  # a double backward raises instead of dropping terms
        def backward(ctx, dy: Tensor):
            x2, weight, rstd = ctx.saved_tensors
            n, D = x2.shape
            dy2 = _rows(dy, D)  # (N, D)
            dx = torch.empty((n, D), dtype=x2.dtype, device=x2.device)
            block_d, block_m, warps = _blocks(D)
            gpu = x2.device.type == "cuda" and not _dispatch.triton_interpret()
            # the grid does not depend on the (autotuned) row block: programs without rows write zero partials
            nprog = max(1, min(4 * _sm_count(x2.device), n)) if gpu else max(1, min(4, triton.cdiv(n, block_m)))
            # every launched program writes its whole partial row: no zero fill needed (nothing is launched for
            # n == 0, so that case gets zeros)
            alloc = torch.empty if n > 0 else torch.zeros
            dw_part = alloc((nprog, block_d), dtype=torch.float32, device=x2.device)
            args = (dy2, x2, weight, rstd, dx, dw_part, n, dy2.stride(0), x2.stride(0), dx.stride(0))
            if n > 0 and gpu:
                _bwd_tuned[(nprog,)](*args, D=D, BLOCK_D=block_d)
            elif n > 0:
                _rms_bwd_kernel[(nprog,)](*args, D=D, BLOCK_D=block_d, BLOCK_M=block_m, num_warps=warps)
            dw = dw_part[:, :D].sum(0).to(weight.dtype)  # (D,)
            return dx.view(ctx.x_shape), dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: str | None = None) -> Tensor:
    """RMSNorm over the last dimension.

    x: (..., D) float; weight: (D,) float, same device. Returns (..., D) in x.dtype (the product with
    weight follows torch type promotion, as in transformers). The Triton path keeps the normalised value's
    rounding to x.dtype and rounds the product once (eager torch rounds identically for one dtype).
    """
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, dtypes=_checks.FLOAT_DTYPES, ndim=1)
    _checks.same_device(x=x, weight=weight)
    if x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"x's last dimension must equal weight's size {weight.shape[0]}, got x.shape={tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"x's last dimension (the normalised one) must be >= 1, got x.shape={tuple(x.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if _dispatch.pick(OP, backend, x) == "triton":
        return _RMSNormFn.apply(x, weight.contiguous(), float(eps))
    return rms_norm_ref(x, weight, eps)
