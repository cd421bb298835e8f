"""qk_norm_rope: Qwen3's per-head q/k RMSNorm followed by RoPE, for q and k in one kernel.

``qk_norm_rope(q, k, wq, wk, pos)`` equals ``(rope(rms_norm(q, wq), pos), rope(rms_norm(k, wk), pos))``. Unfused
that is four kernels forward and four backward, each reading and writing the whole q or k, and four autograd nodes;
fused it is one forward kernel (each element read once, written once) and one backward kernel (dy and x read once,
dx written once), and the cos / sin of a token block are formed once for its q and k heads together.

Owns the torch reference, the Triton forward / backward kernels, the autograd Function and the public function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _compile, _dispatch
from .rms_norm import rms_norm_ref
from .rope import _inv_freq, rope_ref

OP = "qk_norm_rope"
_dispatch.register(OP, ("triton", "torch"))


def qk_norm_rope_ref(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, position_ids: Tensor,
                     eps: float = 1e-6, theta: float = 1e6) -> tuple[Tensor, Tensor]:
    """The composition it fuses: rope(rms_norm(x, w, eps), position_ids, theta) for q and for k (the roundings of
    rms_norm_ref and rope_ref included)."""
    return (rope_ref(rms_norm_ref(q, q_weight, eps), position_ids, theta),
            rope_ref(rms_norm_ref(k, k_weight, eps), position_ids, theta))


if _dispatch.triton_importable():
    import triton
    import triton.language as tl

    from .rope import _blocks, _prune, angles

    @triton.jit
    def _fwd_heads(X, W, Y, H, stride_xt, stride_xh, stride_yt, stride_yh, t64, cols, cmask, mask, c32, s32, eps,
                   HALF: tl.constexpr, STAGES: tl.constexpr):
        """The H heads of one projection for a block of tokens: each head's two halves x1 = x[:HALF], x2 =
        x[HALF:] are normalised (rms over both), rounded to x's dtype, scaled by the weight's halves and rounded to
        y's dtype (rms_norm), then rotated by cos / sin rounded to y's dtype (rope, fp32 products, one rounding)."""
        c = c32.to(Y.dtype.element_ty).to(tl.float32)
        s = s32.to(Y.dtype.element_ty).to(tl.float32)
        w1 = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(W + HALF + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        xp = X + t64 * stride_xt + cols[None, :]  # head 0's first halves; pointers step by a head stride
        yp = Y + t64 * stride_yt + cols[None, :]
        for _ in tl.range(H, num_stages=STAGES):
            x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
            rstd = (1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps))[:, None]
            n1 = ((x1 * rstd).to(X.dtype.element_ty).to(tl.float32) * w1).to(Y.dtype.element_ty).to(tl.float32)
            n2 = ((x2 * rstd).to(X.dtype.element_ty).to(tl.float32) * w2).to(Y.dtype.element_ty).to(tl.float32)
            tl.store(yp, (n1 * c - n2 * s).to(Y.dtype.element_ty), mask=mask)
            tl.store(yp + HALF, (n2 * c + n1 * s).to(Y.dtype.element_ty), mask=mask)
            xp += stride_xh
            yp += stride_yh

    @triton.jit(do_not_specialize=["T", "HQ", "HK", "t_bucket"])
    def _fwd_kernel(Q, K, WQ, WK, POS, INV_FREQ, YQ, YK, T, HQ, HK, t_bucket, stride_qt, stride_qh, stride_kt,
                    stride_kh, stride_yqt, stride_yqh, stride_ykt, stride_ykh, eps, HALF: tl.constexpr,
                    BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, STAGES: tl.constexpr):
        # One program: BLOCK_T tokens, all their q heads then all their k heads; cos / sin formed once for both.
        # t_bucket is only the autotune key's row bucket.
        t64, cols, cmask, mask, c32, s32 = angles(POS, INV_FREQ, T, BLOCK_T, BLOCK_HALF, HALF)
        _fwd_heads(Q, WQ, YQ, HQ, stride_qt, stride_qh, stride_yqt, stride_yqh, t64, cols, cmask, mask, c32, s32, eps,
                   HALF, STAGES)
        _fwd_heads(K, WK, YK, HK, stride_kt, stride_kh, stride_ykt, stride_ykh, t64, cols, cmask, mask, c32, s32, eps,
                   HALF, STAGES)

    @triton.jit
    def _bwd_heads(DY, X, W, DX, DW_PART, H, stride_dyt, stride_dyh, stride_xt, stride_xh, stride_dxt, stride_dxh,
                   t64, cols, cmask, mask, c32, s32, eps, HALF: tl.constexpr, STAGES: tl.constexpr):
        """Backward of _fwd_heads for H heads: dn = the inverse rotation of dy (cos / sin rounded to dy's dtype,
        as rope's backward), then rms_norm's backward with rstd recomputed from x: dw += sum dn * xhat, dx = rstd
        (g - xhat mean(g xhat)) with g = dn * w. The weight-gradient halves of this program's tokens and heads go
        to DW_PART[0:HALF] and DW_PART[HALF:2 HALF]."""
        c = c32.to(DY.dtype.element_ty).to(tl.float32)
        s = s32.to(DY.dtype.element_ty).to(tl.float32)
        w1 = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(W + HALF + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        dw1 = tl.zeros_like(c)
        dw2 = tl.zeros_like(c)
        dyp = DY + t64 * stride_dyt + cols[None, :]
        xp = X + t64 * stride_xt + cols[None, :]
        dxp = DX + t64 * stride_dxt + cols[None, :]
        for _ in tl.range(H, num_stages=STAGES):
            dy1 = tl.load(dyp, mask=mask, other=0.0).to(tl.float32)
            dy2 = tl.load(dyp + HALF, mask=mask, other=0.0).to(tl.float32)
            x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
            dn1 = dy1 * c + dy2 * s  # rotation by -angle
            dn2 = dy2 * c - dy1 * s
            rstd = (1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps))[:, None]
            xh1 = x1 * rstd
            xh2 = x2 * rstd
            dw1 += dn1 * xh1
            dw2 += dn2 * xh2
            g1 = dn1 * w1
            g2 = dn2 * w2
            m = ((tl.sum(g1 * xh1, 1) + tl.sum(g2 * xh2, 1)) / (2 * HALF))[:, None]
            tl.store(dxp, (rstd * (g1 - xh1 * m)).to(DX.dtype.element_ty), mask=mask)
            tl.store(dxp + HALF, (rstd * (g2 - xh2 * m)).to(DX.dtype.element_ty), mask=mask)
            dyp += stride_dyh
            xp += stride_xh
            dxp += stride_dxh
        tl.store(DW_PART + cols, tl.sum(dw1, 0), mask=cmask)
        tl.store(DW_PART + HALF + cols, tl.sum(dw2, 0), mask=cmask)

    @triton.jit(do_not_specialize=["T", "HQ", "HK", "t_bucket"])
    def _bwd_kernel(DYQ, DYK, Q, K, WQ, WK, POS, INV_FREQ, DXQ, DXK, DW_PART, T, HQ, HK, t_bucket, stride_dyqt,
                    stride_dyqh, stride_dykt, stride_dykh, stride_qt, stride_qh, stride_kt, stride_kh, stride_dxqt,
                    stride_dxqh, stride_dxkt, stride_dxkh, eps, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    BLOCK_T: tl.constexpr, STAGES: tl.constexpr):
        # One program: BLOCK_T tokens' q heads then k heads; its weight-gradient partials go to row pid of the
        # (programs, 2, 2 HALF) DW_PART (q's at [pid, 0], k's at [pid, 1]), summed over programs by the caller.
        t64, cols, cmask, mask, c32, s32 = angles(POS, INV_FREQ, T, BLOCK_T, BLOCK_HALF, HALF)
        part = DW_PART + tl.program_id(0).to(tl.int64) * (4 * HALF)
        _bwd_heads(DYQ, Q, WQ, DXQ, part, HQ, stride_dyqt, stride_dyqh, stride_qt, stride_qh, stride_dxqt,
                   stride_dxqh, t64, cols, cmask, mask, c32, s32, eps, HALF, STAGES)
        _bwd_heads(DYK, K, WK, DXK, part + 2 * HALF, HK, stride_dykt, stride_dykh, stride_kt, stride_kh, stride_dxkt,
                   stride_dxkh, t64, cols, cmask, mask, c32, s32, eps, HALF, STAGES)

    # GPU: each direction autotuned once per (q heads, k heads, half head dim, bucket of T) over (BLOCK_T, warps,
    # STAGES: the head loop's loads pipelined through shared memory when > 1), tiles over 4k element pairs pruned
    # (rope's _prune; registers: the backward holds x, dy, their products and the dw sums). The first is rope's
    # _blocks choice at D=128, unpipelined. (2-warp tiles spilled in the backward under ptxas, sm_90: left out.)
    CONFIGS = [(16, 4, 1), (16, 4, 3), (8, 4, 3), (32, 4, 1), (32, 8, 3), (64, 8, 3)]

    def _tuned(kernel):
        return triton.autotune([triton.Config({"BLOCK_T": t, "STAGES": st}, num_warps=w) for t, w, st in CONFIGS],
                               key=["HQ", "HK", "HALF", "t_bucket"],
                               prune_configs_by={"early_config_prune": _prune})(kernel)

    _fwd_tuned = _tuned(_fwd_kernel)
    _bwd_tuned = _tuned(_bwd_kernel)

    def _grid_of(T: int, block_t: int) -> int:
        return -(-T // block_t)  # triton.cdiv

    def _launch(kernel, tuned, args: tuple, n_tensors: int, T: int, HQ: int, HK: int, D: int,
                on_grid=None) -> None:
        """Launch ``kernel`` (GPU: through the autotuner ``tuned``, or directly with the config it chose before)
        over the token blocks of T; ``on_grid(programs)`` is told the launched grid."""
        interpret = _dispatch.triton_interpret()
        block_half, block_t = _blocks(D, interpret)
        meta = dict(HALF=D // 2, BLOCK_HALF=block_half)

        def grid(m):
            g = _grid_of(T, m["BLOCK_T"])
            if on_grid:
                on_grid(g)
            return (g,)

        if args[0].is_cuda and not interpret:
            cfg = _dispatch.tuned_config(tuned, (HQ, HK, D // 2, _dispatch.rows_bucket(T)), args[:n_tensors])
            if cfg is not None:
                kernel[grid(cfg.kwargs)](*args, **meta, **cfg.all_kwargs())
            else:
                tuned[grid](*args, **meta)
        else:
            kernel[grid({"BLOCK_T": block_t})](*args, **meta, BLOCK_T=block_t, STAGES=1, num_warps=4)

    def _unit(t: Tensor) -> Tensor:
        return t if t.stride(-1) == 1 else t.contiguous()

    def _fn_forward(q: Tensor, k: Tensor, wq: Tensor, wk: Tensor, pos: Tensor, eps: float, theta: float,
                    cached: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(yq, yk, the q and k read (unit last stride), inv_freq): the forward of the Function and (``cached``
        False: see rope._inv_freq) the custom op."""
        q, k = _unit(q), _unit(k)
        T, HQ, D = q.shape
        HK = k.shape[1]
        inv_freq = _inv_freq(D, theta, q.device, cached)
        yq = torch.empty((T, HQ, D), dtype=torch.promote_types(q.dtype, wq.dtype), device=q.device)
        yk = torch.empty((T, HK, D), dtype=torch.promote_types(k.dtype, wk.dtype), device=k.device)
        if T > 0 and HQ + HK > 0:
            args = (q, k, wq, wk, pos, inv_freq, yq, yk, T, HQ, HK, _dispatch.rows_bucket(T), *q.stride()[:2],
                    *k.stride()[:2], *yq.stride()[:2], *yk.stride()[:2], eps)
            _launch(_fwd_kernel, _fwd_tuned, args, 8, T, HQ, HK, D)
        return yq, yk, q, k, inv_freq

    def _fn_backward(dyq: Tensor, dyk: Tensor, q: Tensor, k: Tensor, wq: Tensor, wk: Tensor, pos: Tensor,
                     inv_freq: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(dq, dk, dq_weight, dk_weight) for the q, k and inv_freq of _fn_forward."""
        T, HQ, D = q.shape
        HK = k.shape[1]
        dyq, dyk = _unit(dyq), _unit(dyk)
        dxq = torch.empty((T, HQ, D), dtype=q.dtype, device=q.device)
        dxk = torch.empty((T, HK, D), dtype=k.dtype, device=k.device)
        if T == 0 or HQ + HK == 0:  # nothing to launch: the weight gradients are exactly 0
            return dxq, dxk, torch.zeros_like(wq), torch.zeros_like(wk)
        interpret = _dispatch.triton_interpret()
        # each program writes its (2, D) partial; sized for the grid of the smallest BLOCK_T any config has
        min_t = min(t for t, _, _ in CONFIGS) if q.is_cuda and not interpret else _blocks(D, interpret)[1]
        part = torch.empty((_grid_of(T, min_t), 2, D), dtype=torch.float32, device=q.device)
        grids: list[int] = []
        args = (dyq, dyk, q, k, wq, wk, pos, inv_freq, dxq, dxk, part, T, HQ, HK, _dispatch.rows_bucket(T),
                *dyq.stride()[:2], *dyk.stride()[:2], *q.stride()[:2], *k.stride()[:2], *dxq.stride()[:2],
                *dxk.stride()[:2], eps)
        # the last launch's grid is the one whose partials count (an autotuning call times every config first)
        _launch(_bwd_kernel, _bwd_tuned, args, 11, T, HQ, HK, D, on_grid=grids.append)
        dw = part[:grids[-1]].sum(0)  # (2, D) fp32
        return dxq, dxk, dw[0].to(wq.dtype), dw[1].to(wk.dtype)

    class _QKNormRopeFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q: Tensor, k: Tensor, wq: Tensor, wk: Tensor, pos: Tensor, eps: float, theta: float):
            yq, yk, q, k, inv_freq = _fn_forward(q, k, wq, wk, pos, eps, theta)
            ctx.save_for_backward(q, k, wq, wk, pos, inv_freq)
            ctx.eps = eps
            return yq, yk

        @staticmethod
        @torch.autograd.function.once_differentiable  # a double backward raises instead of dropping terms
        def backward(ctx, dyq: Tensor, dyk: Tensor):
            # (an output that did not reach the loss gets a zero gradient: autograd materialises it)
            return (*_fn_backward(dyq, dyk, *ctx.saved_tensors, ctx.eps), None, None, None)

    # under torch.compile (r4b/kernels/_compile.py): the same forward and backward as custom ops
    @_compile.custom_op("qk_norm_rope")
    def _qk_norm_rope_op(q: Tensor, k: Tensor, wq: Tensor, wk: Tensor, pos: Tensor, eps: float,
                         theta: float) -> tuple[Tensor, Tensor]:
        return _fn_forward(q, k, wq, wk, pos, eps, theta, cached=False)[:2]

    @_qk_norm_rope_op.register_fake
    def _(q, k, wq, wk, pos, eps, theta):
        return (q.new_empty(q.shape, dtype=torch.promote_types(q.dtype, wq.dtype)),
                k.new_empty(k.shape, dtype=torch.promote_types(k.dtype, wk.dtype)))

    @_compile.custom_op("qk_norm_rope_backward")
    def _qk_norm_rope_backward_op(dyq: Tensor, dyk: Tensor, q: Tensor, k: Tensor, wq: Tensor, wk: Tensor,
                                  pos: Tensor, eps: float, theta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dxq, dxk, dwq, dwk = _fn_backward(dyq, dyk, _unit(q), _unit(k), wq, wk, pos,
                                          _inv_freq(q.shape[-1], theta, q.device, cached=False), eps)
        # fp32 weights: dwq and dwk are two rows of one (2, D) sum, which the op's outputs must not share
        return dxq, dxk, dwq.clone() if dwq._base is not None else dwq, dwk.clone() if dwk._base is not None else dwk

    @_qk_norm_rope_backward_op.register_fake
    def _(dyq, dyk, q, k, wq, wk, pos, eps, theta):
        return (q.new_empty(q.shape), k.new_empty(k.shape), wq.new_empty(wq.shape), wk.new_empty(wk.shape))

    def _qk_norm_rope_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:5])
        ctx.eps, ctx.theta = inputs[5], inputs[6]

    def _qk_norm_rope_grads(ctx, dyq, dyk):
        grads = _qk_norm_rope_backward_op(dyq, dyk, *ctx.saved_tensors, ctx.eps, ctx.theta)
        return (*grads, None, None, None)

    _qk_norm_rope_op.register_autograd(_qk_norm_rope_grads, setup_context=_qk_norm_rope_setup)


@_dispatch.on_tensor_device
def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, position_ids: Tensor, eps: float = 1e-6,
                 theta: float = 1e6, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm then RoPE of q and k (Qwen3's attention input), in one kernel each way.

    q: (T, Hq, D), k: (T, Hkv, D) float with a unit last stride (head slices of a fused qkv projection work);
    q_weight, k_weight: (D,) float; position_ids: (T,) int64 or int32; all on one device; D even. Returns q and k
    rotated, contiguous, each in the promotion of its input's and weight's dtypes: the values of
    ``rope(rms_norm(q, q_weight, eps), position_ids, theta)`` and the same for k (the Triton path keeps
    rms_norm's two roundings and rope's one, so the results differ from the unfused ops' only where the sum of
    squares, taken here over a head's two halves, rounds differently; the normalised value is not written in
    between, and the backward keeps the rotated gradient in fp32 where the unfused path rounds it).
    """
    _checks.tensor("q", q, dtypes=_checks.FLOAT_DTYPES, ndim=3)
    _checks.tensor("k", k, dtypes=_checks.FLOAT_DTYPES, ndim=3)
    _checks.tensor("q_weight", q_weight, dtypes=_checks.FLOAT_DTYPES, ndim=1)
    _checks.tensor("k_weight", k_weight, dtypes=_checks.FLOAT_DTYPES, ndim=1)
    _checks.tensor("position_ids", position_ids, dtypes=(torch.int64, torch.int32), ndim=1)
    _checks.same_device(q=q, k=k, q_weight=q_weight, k_weight=k_weight, position_ids=position_ids)
    _checks.same_len(q.shape[0], "q", k=k, position_ids=position_ids)
    D = q.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"q and k must share the head dimension, got q.shape={tuple(q.shape)}, "
                         f"k.shape={tuple(k.shape)}")
    if D % 2 or D == 0:
        raise ValueError(f"the head dimension must be even and >= 2 for RoPE, got D={D}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape[0] != D:
            raise ValueError(f"{name} must have the head dimension's size {D}, got {name}.shape={tuple(w.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta}")
    if _dispatch.pick(OP, backend, q) == "triton":
        fn = _qk_norm_rope_op if _compile.compiling() else _QKNormRopeFn.apply
        return fn(q, k, q_weight.contiguous(), k_weight.contiguous(), position_ids.contiguous(), float(eps),
                  float(theta))
    return qk_norm_rope_ref(q, k, q_weight, k_weight, position_ids, eps, theta)
