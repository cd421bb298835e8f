"""swiglu: silu(gate) * up, the Qwen3 MLP activation.

Owns the torch reference, the Triton forward/backward kernels (2-D tiles over (rows, I) on a 1-D grid, strided rows
so the two halves of a fused gate_up projection are read in place), the autograd Function and the public function.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, _compile, _dispatch

OP = "swiglu"
_dispatch.register(OP, ("triton", "torch"))


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


if _dispatch.triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """(rows as int64, columns) of this program. One grid axis, column blocks fastest: a 2-D grid put the column
        blocks on axis 1, whose 65,535 limit refused a last dimension past 33.5M (e.g. a flattened input)."""
        n_col_blocks = tl.cdiv(n_cols, BLOCK_N)
        pid = tl.program_id(0)
        rows = ((pid // n_col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (pid % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        return rows, cols

    # n_cols stays specialised (Triton keys on its divisibility by 16, not its value): with it unknown, the column
    # mask could not be proven constant over 8 bf16 lanes and every load and store went element by element. On
    # an H100 (2026-11-26) the forward with n_cols unspecialised moved 2.0 TB/s where torch.compile moved 3.0.
    @triton.jit(do_not_specialize=["n_rows", "rows_bucket"])
    def _swiglu_fwd_kernel(G, U, Y, n_rows, n_cols, rows_bucket, stride_g, stride_u, stride_y, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
        rows, cols = _tile(n_cols, BLOCK_M, BLOCK_N)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["n_rows", "rows_bucket"])
    def _swiglu_bwd_kernel(DY, G, U, DG, DU, n_rows, n_cols, rows_bucket, stride_dy, stride_g, stride_u, stride_d,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows, cols = _tile(n_cols, BLOCK_M, BLOCK_N)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sg = tl.sigmoid(g)
        silu = g * sg
        # d silu(g)/dg = sg * (1 + g * (1 - sg))
        dg = dy * u * sg * (1.0 + g * (1.0 - sg))
        du = dy * silu
        off = rows[:, None] * stride_d + cols[None, :]
        tl.store(DG + off, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + off, du.to(DU.dtype.element_ty), mask=mask)

    def _rows(t: Tensor, n_cols: int) -> Tensor:
        # (N, I): a view for contiguous tensors and for chunks of a fused gate_up (a 2-D t itself: reshape would
        # return a view of it)
        t2 = t if t.dim() == 2 else t.reshape(-1, n_cols)
        return t2 if t2.stride(-1) == 1 else t2.contiguous()

    @functools.lru_cache(maxsize=256)
    def _gpu_blocks(n_cols: int) -> tuple[int, int]:
        """(BLOCK_M, BLOCK_N) of the first GPU config: 4k elements per program (cached: a pure function of n_cols,
        in plain Python, as triton.next_power_of_2 costs microseconds a call)."""
        block_n = min(1024, 1 << (n_cols - 1).bit_length())  # triton.next_power_of_2(n_cols), n_cols >= 1
        return max(1, 4096 // block_n), block_n

    def _grid_blocks(n_cols: int, interpret: bool | None = None) -> tuple[int, int]:
        """(BLOCK_M, BLOCK_N) of the interpreter and of the first GPU config: 4k elements per program
        (``interpret``: _dispatch.triton_interpret(), read here when not given)."""
        block_m, block_n = _gpu_blocks(n_cols)
        if _dispatch.triton_interpret() if interpret is None else interpret:
            block_m = min(block_m, 8)
        return block_m, block_n

    # GPU: autotuned once per (column count, bucket of the row count: _dispatch.rows_bucket) over these
    # (BLOCK_M, BLOCK_N, warps). The first is the fixed tile measured on the H100 (2026-11-26, before n_cols was
    # specialised: 67% of copy bandwidth); the others trade rows for columns and warps. The bench's --aot report
    # lists their registers and load widths.
    CONFIGS = [(4, 1024, 4), (8, 1024, 8), (2, 2048, 8), (1, 4096, 8), (16, 512, 8), (8, 512, 4)]

    def _prune(configs, named_args, **kwargs):
        """Drop column tiles more than twice the (power-of-two) row width: they would be mostly masked."""
        width = triton.next_power_of_2(named_args["n_cols"])
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max(512, 2 * width)]
        return kept or configs[:1]

    _cfgs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in CONFIGS]
    _fwd_tuned = triton.autotune(_cfgs, key=["n_cols", "rows_bucket"], prune_configs_by={"early_config_prune": _prune})(
        _swiglu_fwd_kernel)
    _bwd_tuned = triton.autotune(_cfgs, key=["n_cols", "rows_bucket"], prune_configs_by={"early_config_prune": _prune})(
        _swiglu_bwd_kernel)


    def _launch(tuned, kernel, out: Tensor, args: tuple, n_tensors: int) -> None:
        """Run the forward or backward kernel over out's (n, n_cols) elements: autotuned on a GPU (a config chosen
        before for the key and these dtypes launched directly), the fixed tile under the interpreter. args start
        with the n_tensors pointers, then n, n_cols, rows_bucket."""
        n, n_cols = out.shape
        if not out.numel():
            return
        interpret = _dispatch.triton_interpret()
        if out.is_cuda and not interpret:
            cfg = _dispatch.tuned_config(tuned, (n_cols, args[n_tensors + 2]), args[:n_tensors])
            if cfg is not None:
                bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                kernel[(-(-n // bm) * -(-n_cols // bn),)](*args, **cfg.all_kwargs())
            else:
                tuned[lambda m: (-(-n // m["BLOCK_M"]) * -(-n_cols // m["BLOCK_N"]),)](*args)
        else:
            bm, bn = _grid_blocks(n_cols, interpret)
            kernel[(-(-n // bm) * -(-n_cols // bn),)](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)

    def _fn_forward(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(y shaped as gate, the (N, I) rows of gate and up): the forward of the Function and the custom op."""
        n_cols = gate.shape[-1]
        g2, u2 = _rows(gate, n_cols), _rows(up, n_cols)  # (N, I)
        n = g2.shape[0]
        y = torch.empty((n, n_cols), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        _launch(_fwd_tuned, _swiglu_fwd_kernel, y,
                (g2, u2, y, n, n_cols, _dispatch.rows_bucket(n), g2.stride(0), u2.stride(0), y.stride(0)), 3)
        return (y if gate.dim() == 2 else y.view(gate.shape)), g2, u2

    def _fn_backward(dy: Tensor, g2: Tensor, u2: Tensor, shape) -> tuple[Tensor, Tensor]:
        """(dgate, dup) shaped ``shape`` from the (N, I) rows g2, u2 (see _fn_forward)."""
        n, n_cols = g2.shape
        dy2 = _rows(dy, n_cols)  # (N, I)
        dg = torch.empty((n, n_cols), dtype=g2.dtype, device=g2.device)
        du = torch.empty((n, n_cols), dtype=u2.dtype, device=u2.device)
        _launch(_bwd_tuned, _swiglu_bwd_kernel, dg,
                (dy2, g2, u2, dg, du, n, n_cols, _dispatch.rows_bucket(n), dy2.stride(0), g2.stride(0),
                 u2.stride(0), dg.stride(0)), 5)
        if len(shape) == 2:
            return dg, du
        return dg.view(shape), du.view(shape)

    class _SwigluFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
            y, g2, u2 = _fn_forward(gate, up)
            ctx.save_for_backward(g2, u2)
            ctx.shape = gate.shape
            return y

        @staticmethod
        @torch.autograd.function.once_differentiable  # a double backward raises instead of dropping terms
        def backward(ctx, dy: Tensor):
            g2, u2 = ctx.saved_tensors
            return _fn_backward(dy, g2, u2, ctx.shape)

    # under torch.compile (r4b/kernels/_compile.py): the same forward and backward as custom ops
    @_compile.custom_op("swiglu")
    def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
        return _fn_forward(gate, up)[0].contiguous()

    @_swiglu_op.register_fake
    def _(gate, up):
        return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))

    @_compile.custom_op("swiglu_backward")
    def _swiglu_backward_op(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        n_cols = gate.shape[-1]
        return _compile.contiguous(*_fn_backward(dy, _rows(gate, n_cols), _rows(up, n_cols), gate.shape))

    @_swiglu_backward_op.register_fake
    def _(dy, gate, up):
        return gate.new_empty(gate.shape), up.new_empty(up.shape)

    def _swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _swiglu_grads(ctx, dy):
        return _swiglu_backward_op(dy, *ctx.saved_tensors)

    _swiglu_op.register_autograd(_swiglu_grads, setup_context=_swiglu_setup)


@_dispatch.on_tensor_device
def swiglu(gate: Tensor, up: Tensor, *, backend: str | None = None) -> Tensor:
    """silu(gate) * up. gate, up: same shape (..., I), float, same device; strided rows are read in place
    (e.g. the two chunks of a fused gate_up projection). Returns (..., I) in the promoted dtype, contiguous.
    The Triton path computes in fp32 and rounds once."""
    _checks.tensor("gate", gate, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("up", up, dtypes=_checks.FLOAT_DTYPES)
    _checks.same_device(gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got gate={tuple(gate.shape)} up={tuple(up.shape)}")
    if gate.dim() > 0 and gate.shape[-1] == 0:
        raise ValueError(f"gate and up must have a last dimension >= 1, got gate={tuple(gate.shape)}")
    if _dispatch.pick(OP, backend, gate) == "triton":
        fn = _swiglu_op if _compile.compiling() else _SwigluFn.apply
        if gate.dim() == 0:
            return fn(gate.reshape(1), up.reshape(1)).reshape(())
        return fn(gate, up)
    return swiglu_ref(gate, up)
