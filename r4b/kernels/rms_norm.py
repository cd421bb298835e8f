"""rms_norm: Qwen3's RMSNorm (also the per-head q/k norm).

Owns the torch reference, the Triton forward/backward kernels (rows tiled BLOCK_M x BLOCK_D, fp32 inside),
the autograd Function and the public function.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _checks, _compile, _dispatch

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
    def _rms_fwd_kernel(X, W, Y, RSTD, R, S, n_rows, stride_x, stride_y, stride_r, stride_s, eps, D: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ADD: tl.constexpr):
        # One program normalises BLOCK_M rows; x is (n_rows, D) with row stride stride_x. ADD (add_rms_norm): the
        # rows normalised are s = x + r, rounded to x's dtype (the eager add) and stored to S.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < n_rows
        mask = rmask[:, None] & (cols[None, :] < D)
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if ADD:
            r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = (x + r).to(X.dtype.element_ty)
            tl.store(S + rows64[:, None] * stride_s + cols[None, :], x, mask=mask)
            x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        # Round the normalised value to x's dtype before the weight product, as the reference does.
        h = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], (h * w[None, :]).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit(do_not_specialize=["n_rows"])
    def _rms_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, DS, n_rows, stride_dy, stride_x, stride_dx, stride_ds,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, STAGES: tl.constexpr,
                        PROGS_PER_SM: tl.constexpr, ADD_DS: tl.constexpr):
        # A persistent program walks row blocks pid, pid + nprog, ...; its dweight partial sum goes to row pid of
        # the (nprog, D) DW_PART (written by every program, also one without rows). The row loop is software
        # pipelined (cp.async into shared memory on sm_80+): triton issues block i + STAGES - 1's x / dy / rstd
        # loads after block i's store, so STAGES - 2 blocks' loads stay in flight through each block's reductions
        # and store. The serial load -> wait -> reduce -> store loop ran fwd+bwd at 38% of copy bandwidth at
        # D=2560 (H100, 2026-11-26). PROGS_PER_SM only sizes the launcher's grid (an autotuned value reaches the
        # grid through the kernel's arguments). ADD_DS (add_rms_norm): dx also gets the gradient ds that reached
        # the sum itself, read from DS.
        pid = tl.program_id(0)
        row_step = tl.num_programs(0) * BLOCK_M
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r0 in tl.range(pid * BLOCK_M, n_rows, row_step, num_stages=STAGES):
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
            if ADD_DS:
                dx += tl.load(DS + rows64[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PART + pid * D + cols, dw, mask=cmask)

    @functools.lru_cache(maxsize=256)
    def _gpu_blocks(D: int) -> tuple[int, int, int]:
        """(BLOCK_D, BLOCK_M, num_warps) of the fixed GPU tile: ~4k elements per program (cached: a pure function
        of D, computed in plain Python, as triton.next_power_of_2 costs microseconds a call)."""
        block_d = 1 << (D - 1).bit_length()  # triton.next_power_of_2(D), D >= 1
        block_m = max(1, min(64, 4096 // block_d))
        num_warps = 4 if block_d * block_m <= 4096 else 8
        return block_d, block_m, num_warps

    def _blocks(D: int, interpret: bool | None = None) -> tuple[int, int, int]:
        """(BLOCK_D, BLOCK_M, num_warps) used here: the GPU tile, with at most 8 rows under the interpreter
        (``interpret``: _dispatch.triton_interpret(), read once by the launchers; read here when not given)."""
        block_d, block_m, num_warps = _gpu_blocks(D)
        if _dispatch.triton_interpret() if interpret is None else interpret:  # keep interpreter tiles small
            block_m = max(1, min(block_m, 8))
        return block_d, block_m, num_warps

    # GPU backward: autotuned once per D (never on the row count) over tiles of (elements a step, warps, pipeline
    # stages, programs per SM); a step is BLOCK_M rows of BLOCK_D, one row from 4096 (2 rows of 4096 take 153
    # registers a thread at 8 warps: one program an SM). The grid is one wave of PROGS_PER_SM programs an SM (a
    # program the registers or shared memory cannot fit runs after the wave), so each tile comes with the count
    # that resides on an H100, and one less for rows needing more registers (ptxas, sm_90, 4 warps x 3 stages:
    # 128 / 117 / 167 registers at D=2560 / 128 / 4096; the bench's --aot listing checks every config kept at
    # the bench shapes). No STAGES=2: its one buffer is refilled only after the block's store, overlapping
    # almost nothing.
    BWD_TILES = [(4096, 4, 3, 4), (4096, 4, 3, 3), (4096, 16, 3, 2), (4096, 16, 4, 2), (2048, 4, 3, 4),
                 (8192, 8, 3, 2), (8192, 8, 3, 1)]
    # add_rms_norm's backward (ADD_DS: ds read too) holds more registers: 196 a thread at D=2560, 4 warps, 3
    # stages (ptxas, sm_90), so two such programs an SM where rms_norm's runs four; at 8 warps 80 (3 stages: three
    # programs an SM, 24 warps) or 102 (4 stages: two). Those counts are D=2560's (one row a step, the model's
    # hidden size); a tile of narrow rows (BLOCK_M > 1) can need more, and a grid the registers cannot hold runs a
    # second partial wave, which the autotuner's timing then sees.
    ADD_BWD_TILES = [(4096, 8, 3, 3), (4096, 8, 4, 2), (4096, 4, 3, 2), (4096, 4, 4, 2), (4096, 16, 3, 2),
                     (4096, 16, 4, 2), (2048, 4, 3, 3), (8192, 8, 3, 1)]

    def _configs(tiles) -> list[tuple[int, int, int, int]]:
        """(BLOCK_M, warps, STAGES, PROGS_PER_SM): every tile's options at every row count, the first tile first."""
        return [(bm, w, s, p) for bm in (1, 2, 4, 8, 16, 32, 64) for w, s, p in dict.fromkeys(
            (w, s, p) for _, w, s, p in tiles)]

    BWD_CONFIGS = _configs(BWD_TILES)

    def _make_prune(tiles, max_per_sm: int):
        def prune(configs, named_args, **kwargs):
            block_d = kwargs["BLOCK_D"]
            kept = [c for c in configs if (c.kwargs["BLOCK_M"] == 1 or block_d < 4096) and (
                c.kwargs["BLOCK_M"] * block_d, c.num_warps, c.kwargs["STAGES"], c.kwargs["PROGS_PER_SM"]) in tiles]
            if not kept:  # very narrow or very wide rows: the fixed tile (255 registers at 16k wide: one an SM)
                _, bm, w = _gpu_blocks(kwargs["D"])
                kept = [triton.Config({"BLOCK_M": bm, "STAGES": 3,
                                       "PROGS_PER_SM": 1 if block_d > 8192 else max_per_sm}, num_warps=w,
                                      num_stages=1)]
            return kept

        return prune

    _bwd_prune = _make_prune(BWD_TILES, 4)
    _bwd_add_prune = _make_prune(ADD_BWD_TILES, 2)

    def _autotuned(configs, prune):
        # num_stages=1: the kernel's one loop is pipelined by its own STAGES
        return triton.autotune([triton.Config({"BLOCK_M": bm, "STAGES": s, "PROGS_PER_SM": p}, num_warps=w,
                                              num_stages=1) for bm, w, s, p in configs],
                               key=["D"], prune_configs_by={"early_config_prune": prune})(_rms_bwd_kernel)

    _bwd_tuned = _autotuned(BWD_CONFIGS, _bwd_prune)
    # the same kernel with ADD_DS (add_rms_norm's backward): its own tiles, choices and cache
    _bwd_add_tuned = _autotuned(_configs(ADD_BWD_TILES), _bwd_add_prune)

    _BWD_MAX_PER_SM = max(p for *_, p in BWD_TILES)  # >= the fallback's and the interpreter's 4

    def _bwd_grid(n: int, block_m: int, progs_per_sm: int, sms: int) -> int:
        """Programs of the persistent backward: one resident wave, and no more than there are row blocks."""
        return min(progs_per_sm * sms, -(-n // block_m))  # triton.cdiv

    def _rows(t: Tensor, D: int) -> Tensor:
        """(N, D) view (or copy) with unit stride along D (a 2-D t itself: reshape would return a view of it)."""
        t2 = t if t.dim() == 2 else t.reshape(-1, D)  # (N, D)
        return t2 if t2.stride(-1) == 1 else t2.contiguous()


    def _forward(x2: Tensor, weight: Tensor, eps: float, r2: Tensor | None = None):
        """(y, rstd, s) of the (N, D) rows x2 (+ r2: s = x2 + r2 normalised and returned; else s is None)."""
        n, D = x2.shape
        y = torch.empty((n, D), dtype=torch.promote_types(x2.dtype, weight.dtype), device=x2.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x2.device)
        s = torch.empty((n, D), dtype=x2.dtype, device=x2.device) if r2 is not None else None
        if n > 0:
            block_d, block_m, warps = _blocks(D, _dispatch.triton_interpret())
            rr, ss = (r2, s) if r2 is not None else (x2, y)  # unused without ADD
            _rms_fwd_kernel[(-(-n // block_m),)](
                x2, weight, y, rstd, rr, ss, n, x2.stride(0), y.stride(0), rr.stride(0), ss.stride(0), eps, D=D,
                BLOCK_D=block_d, BLOCK_M=block_m, ADD=r2 is not None, num_warps=warps)
        return y, rstd, s

    def _backward(dy2: Tensor, x2: Tensor, weight: Tensor, rstd: Tensor, ds2: Tensor | None = None):
        """(dx, dweight) of rms_norm's (N, D) rows x2 for the output gradient dy2, plus ds2 added into dx when given
        (add_rms_norm: the gradient that reached the sum itself)."""
        n, D = x2.shape
        dx = torch.empty((n, D), dtype=x2.dtype, device=x2.device)
        if n == 0:  # nothing to launch: the weight gradient is exactly 0
            return dx, torch.zeros_like(weight)
        interpret = _dispatch.triton_interpret()
        block_d, block_m, warps = _blocks(D, interpret)
        gpu = x2.is_cuda and not interpret
        sms = _dispatch.sm_count(x2.device) if gpu else 1
        # each program writes its row of dw_part (summed below): sized for the grid of any config
        dw_part = torch.empty((min(_BWD_MAX_PER_SM * sms, n), D), dtype=torch.float32, device=x2.device)
        add = ds2 is not None
        dd = ds2 if add else dy2  # unused without ADD_DS
        args = (dy2, x2, weight, rstd, dx, dw_part, dd, n, dy2.stride(0), x2.stride(0), dx.stride(0), dd.stride(0))
        if gpu:
            tuned = _bwd_add_tuned if add else _bwd_tuned
            cfg = _dispatch.tuned_config(tuned, (D,), args[:7])
            if cfg is not None:  # chosen before for this D and these dtypes: launch it directly
                kw = cfg.kwargs
                nprog = _bwd_grid(n, kw["BLOCK_M"], kw["PROGS_PER_SM"], sms)
                _rms_bwd_kernel[(nprog,)](*args, D=D, BLOCK_D=block_d, ADD_DS=add, **cfg.all_kwargs())
            else:
                # programs of each launch, in order: the last is the launch whose partials are summed (an
                # autotuning call first times every config; a local list, not the autotuner's shared
                # best_config, which another device's backward thread may be changing)
                grids: list[int] = []

                def grid(m):
                    grids.append(_bwd_grid(n, m["BLOCK_M"], m["PROGS_PER_SM"], sms))
                    return (grids[-1],)

                tuned[grid](*args, D=D, BLOCK_D=block_d, ADD_DS=add)
                nprog = grids[-1]
        else:  # the interpreter: one "SM" of 4 programs, so that the tests' rows walk several blocks a program
            nprog = _bwd_grid(n, block_m, 4, sms)
            _rms_bwd_kernel[(nprog,)](*args, D=D, BLOCK_D=block_d, BLOCK_M=block_m, STAGES=3, PROGS_PER_SM=4,
                                      ADD_DS=add, num_warps=warps)
        return dx, dw_part[:nprog].sum(0).to(weight.dtype)  # (D,)

    def _fn_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """(y shaped as x, the (N, D) rows x2 normalised, rstd): the forward of the Function and the custom op."""
        x2 = _rows(x, x.shape[-1])  # (N, D)
        y, rstd, _ = _forward(x2, weight, eps)
        return (y if x2 is x else y.view(x.shape)), x2, rstd

    def _fn_backward(dy: Tensor, x2: Tensor, weight: Tensor, rstd: Tensor, shape) -> tuple[Tensor, Tensor]:
        """(dx shaped ``shape``, dweight) of the rows x2 (see _fn_forward) for the output gradient dy."""
        dx, dw = _backward(_rows(dy, x2.shape[1]), x2, weight, rstd)
        return (dx if len(shape) == 2 else dx.view(shape)), dw

    class _RMSNormFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
            y, x2, rstd = _fn_forward(x, weight, eps)
            ctx.save_for_backward(x2, weight, rstd)
            ctx.x_shape = x.shape
            return y

        @staticmethod
        @torch.autograd.function.once_differentiable  # a double backward raises instead of dropping terms
        def backward(ctx, dy: Tensor):
            x2, weight, rstd = ctx.saved_tensors
            dx, dw = _fn_backward(dy, x2, weight, rstd, ctx.x_shape)
            return dx, dw, None

    # under torch.compile (r4b/kernels/_compile.py): the same forward and backward as custom ops
    @_compile.custom_op("rms_norm")
    def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        y, _, rstd = _fn_forward(x, weight, eps)
        return _compile.contiguous(y, rstd)

    @_rms_norm_op.register_fake
    def _(x, weight, eps):
        return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
                x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32))

    @_compile.custom_op("rms_norm_backward")
    def _rms_norm_backward_op(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
        return _compile.contiguous(*_fn_backward(dy, _rows(x, x.shape[-1]), weight, rstd, x.shape))

    @_rms_norm_backward_op.register_fake
    def _(dy, x, weight, rstd):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    def _rms_norm_setup(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.mark_non_differentiable(output[1])

    def _rms_norm_grads(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_backward_op(dy, x, weight, rstd)
        return dx, dw, None

    _rms_norm_op.register_autograd(_rms_norm_grads, setup_context=_rms_norm_setup)


def check_args(x: Tensor, weight: Tensor, eps: float, **more: Tensor) -> None:
    """The checks of rms_norm's arguments (and of ``more`` tensors that go with x: same device, float)."""
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    for name, t in more.items():
        _checks.tensor(name, t, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, dtypes=_checks.FLOAT_DTYPES, ndim=1)
    _checks.same_device(x=x, **more, weight=weight)
    if x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"x's last dimension must equal weight's size {weight.shape[0]}, got x.shape={tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"x's last dimension (the normalised one) must be >= 1, got x.shape={tuple(x.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


@_dispatch.on_tensor_device
def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: str | None = None) -> Tensor:
    """RMSNorm over the last dimension.

    x: (..., D) float; weight: (D,) float, same device. Returns (..., D) in x.dtype (the product with
    weight follows torch type promotion, as in transformers). The Triton path keeps the normalised value's
    rounding to x.dtype and rounds the product once (eager torch rounds identically for one dtype).
    """
    check_args(x, weight, eps)
    if _dispatch.pick(OP, backend, x) == "triton":
        if _compile.compiling():
            return _rms_norm_op(x, weight.contiguous(), float(eps))[0]
        return _RMSNormFn.apply(x, weight.contiguous(), float(eps))
    return rms_norm_ref(x, weight, eps)
