"""The "chunked" implementation of the fused-linear losses (GRPO, cross-entropy): exactly 3 GEMMs (cuBLAS) and
the gradient computed in the forward, no atomics.

For each chunk of C rows:

1. ``z = hidden_c @ weight.T (+ bias)`` into a [C, V] buffer of the input dtype, reused across chunks;
2. one Triton kernel (:func:`_rows_kernel`, a program per block of rows, one pass over the vocabulary in
   blocks, fp32 maths) reads each row of ``z`` once: it computes the log-sum-exp and ``logp_i = z[i, t_i] / T -
   lse_i``, the per-token coefficient ``c_i = d loss / d logp_i`` (GRPO: from the clipped surrogate, the k3 KL and
   the aggregation weight, with torch autograd's exact rules; otherwise a given vector), writes ``logp`` and
   ``c``, and overwrites ``z`` in place, as it reads it, with ``P`` such that ``dz = c_i * (onehot(t_i) -
   softmax(z_i / T)) / T = alpha_i * P_i`` (``P_ij = exp(z_ij / T - s_i)`` with a shift fixed before the row is
   read, see the kernel; ``alpha_i = -c_i exp(s_i - lse_i) / T``). A row costs one read and one write of ``z``
   (a gradient written as ``dz`` itself needs the log-sum-exp first: two reads and a write);
3. ``dhidden_c = alpha * (P @ weight)`` (one GEMM, fp32 product, scaled rows) and ``dweight += P.T @ (alpha *
   hidden_c)`` (one GEMM: the first chunk with gradient rows writes the accumulator, later ones ``addmm`` into
   it), ``dbias += alpha @ P`` (fp32 output).

The backward only hands the gradients over, scaled by the incoming scalar ``grad_output`` when it is not 1.

Chunk size: at most ``_CHUNK_BYTES`` (1 GiB) of ``z``, chunks balanced; at N=16384, H=2560, V=151936, bf16 that
is 5 chunks of 3328 rows (the last 3072). A first guess from GEMM shapes and the memory budget, to be tuned on
a GPU.

Rows whose gradient is zero by construction (masked, ignored, or a zero advantage without KL) are sorted
behind the others and skip the gradient pass and both backward GEMMs (see :func:`_chunk_loop`).

dweight accumulator dtype (the memory/precision trade-off): fp32 when the weight is fp32 or when an fp32
[V, H] buffer is small (<= ``_FP32_DW_MAX_BYTES`` = 256 MiB; a half weight then gets each chunk's product in
fp32 where torch has fp32-output half GEMMs, and sums the chunks in fp32); otherwise the weight's own dtype. At
the anchor shape (V=151936, H=2560, bf16) an fp32 accumulator alone is 1.56 GB and, with the z buffer and the
final bf16 copy, peak extra memory would pass Liger's 2.19 GiB; so there dweight accumulates in bf16: each chunk's
``P.T @ (alpha * hidden_c)`` is summed in fp32 inside cuBLAS and added to the bf16 accumulator in the fp32
epilogue, i.e. one bf16 rounding of the running sum per chunk (ceil(N / C) roundings; 5 for N=16384) instead of
one for an unchunked GEMM. dhidden, P and alpha * hidden_c are in the input dtype (P and alpha * hidden_c each
rounded once, where an eager bf16 backward rounds dz once).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from . import _dispatch

ENV_IMPL = "R4B_FUSED_LINEAR_IMPL"
IMPLS = ("chunked", "tiled")

# Bytes of the [C, V] logits/gradient buffer of one chunk. Needs tuning on a GPU (bigger chunks: fewer bf16
# roundings of dweight, fewer read-modify-writes of the dweight accumulator, and a d hidden GEMM with enough
# output tiles for every SM: C=3328 at H=2560 gives 26 x 10 tiles of 128 x 256, about 2 waves on 132 SMs, where
# C=1536 gives 120 tiles, under one wave; smaller: less memory). 1 GiB: at the anchor shape (16384 x 2560 x
# 151936, bf16) 5 chunks of <= 3328 rows and a peak of about 1.9 GB (z 1.0 + bf16 dweight 0.78 + dhidden and the
# sorted hidden 0.08 each), under Liger chunked's 2.19 GiB.
_CHUNK_BYTES = 1 << 30
# Tests set this to force several chunks on tiny inputs (None: derived from _CHUNK_BYTES).
_MAX_CHUNK_ROWS: int | None = None
# An fp32 dweight accumulator is used whenever it is at most this big (always for fp32 weights).
_FP32_DW_MAX_BYTES = 256 << 20
# Skip the backward GEMMs of rows whose gradient is zero by construction (tests turn it off to compare).
_SKIP_ZERO_ROWS = True

if _dispatch.triton_importable():
    import triton
    import triton.language as tl
else:  # pragma: no cover - torch-only installs
    triton = None
    tl = None


def impl() -> str:
    """The Triton implementation to use for the losses with gradients: $R4B_FUSED_LINEAR_IMPL, default chunked."""
    val = os.environ.get(ENV_IMPL, "chunked") or "chunked"
    if val not in IMPLS:
        raise ValueError(f"{ENV_IMPL} must be one of {IMPLS}, got {val!r}")
    return val


def use_chunked(dtype: torch.dtype) -> bool:
    """Whether a loss with gradients runs the chunked implementation: $R4B_FUSED_LINEAR_IMPL says chunked and the
    inputs are not fp16. The chunked path stores exp(z / T - s) values up to e^20 and a row scale down to about
    e^-32 times the loss coefficient, which needs fp32's exponent range (bf16 has it); fp16 training also scales
    the loss (GradScaler) after the chunked path has written its gradient. fp16 inputs therefore take the tiled
    path, which applies the scale before rounding."""
    return impl() == "chunked" and dtype != torch.float16


def chunk_rows(n: int, v: int, elem: int) -> int:
    """Rows per chunk: the fewest chunks whose [C, V] buffer fits ``_CHUNK_BYTES``, balanced (the last chunk is
    not a small remainder), C a multiple of 256 when the cap allows (GEMM tiles)."""
    cap = max(1, _CHUNK_BYTES // max(v * elem, 1))
    if cap > 256:
        cap -= cap % 256
    if _MAX_CHUNK_ROWS is not None:
        cap = min(cap, _MAX_CHUNK_ROWS)
    if n <= cap:
        return max(1, n)
    rows = -(-n // -(-n // cap))  # ceil(n / number of chunks)
    if cap >= 256 and rows % 256:
        up = rows + 256 - rows % 256
        rows = up if up <= cap else rows
    return rows


def dweight_dtype(weight: Tensor) -> torch.dtype:
    if weight.dtype == torch.float32 or weight.numel() * 4 <= _FP32_DW_MAX_BYTES:
        return torch.float32
    return weight.dtype


# ---------------------------------------------------------------------------------------------- triton

MODE_GRPO, MODE_COEF = 0, 1

# Rescale threshold of the row kernel's shift (see _rows_kernel): a row's stored exp(u - s) stay below
# e^_RESCALE_AT. Tests lower it to run the rescale path on ordinary inputs.
_RESCALE_AT = 20.0

if triton is not None:

    @triton.jit
    def _rne_bf16(x, RNE: tl.constexpr):
        """x (fp32) rounded to the nearest bf16 value (ties to even) when RNE: the CPU interpreter's fp32 -> bf16
        cast truncates, a GPU's rounds to nearest; with RNE the cast that follows is exact."""
        if RNE:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            x = b.to(tl.float32, bitcast=True)
        return x

    @triton.jit
    def _exp2_neg(k):
        """2^-k exactly for integer-valued fp32 k in [0, 127]; 0 at 127."""
        return ((127.0 - k).to(tl.int32) << 23).to(tl.float32, bitcast=True)

    # the row counts are runtime values: specialised (value 1, divisibility by 16) the varying last chunk of a run
    # compiled up to ~9 variants of the kernel (stride_z stays specialised: its divisibility keeps the 16-byte loads)
    @triton.jit(do_not_specialize=["R", "R_grad"])
    def _rows_kernel(
        z_ptr, t_ptr, w_ptr, adv_ptr, old_ptr, ref_ptr, logp_ptr, c_ptr, a_ptr,
        R, R_grad, stride_z, inv_temp, lo, hi, beta, rescale_at,
        V: tl.constexpr, MODE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, STAGES: tl.constexpr, RNE: tl.constexpr,
    ):
        """BLOCK_R rows of z, in one pass over each row: the log-sum-exp, logp, c = d loss / d logp, and, for the
        first R_grad rows (the caller puts the rows whose gradient can be non-zero first and skips the others'
        backward GEMMs: their z is left as it is), z overwritten in place with P and alpha written, such that
        dz = c (onehot - softmax(z / T)) / T = alpha[:, None] * P.

        With u = z / T and a per-row shift s: P[i, j] = exp(u_ij - s_i) for j != t_i and P[i, t_i] = -sum_{j != t_i}
        exp(u_ij - s_i); alpha_i = -c_i / (T S_i) with S_i = sum_j exp(u_ij - s_i) = exp(lse_i - s_i). Then
        alpha_i P_ij = -c_i p_ij / T off the target and c_i (1 - p_it) / T at it (no cancellation: 1 - p_it is the
        sum of the other terms). Only a shift fixed before the row is read lets P be written as the row is read,
        so s_i starts at the target's u (so the largest P is at most 1 / p_t) and is raised to a block's maximum
        when that exceeds it by more than ``rescale_at`` (to s0 + k ln 2, k whole). A raise stops the row's stores;
        after the loop that row is visited again and all of it written at the final shift, the P stored before the
        raise scaled by an exact 2^-k (rare: targets with p_t < e^-rescale_at). P needs fp32's exponent range (fp32
        or bf16 z, not fp16). Rows without a target in [0, V) are not read at all (logp 0, c 0)."""
        # row blocks pid, pid + programs, ...: one block per program with the default grid; about one program per
        # SM with a capped grid (the sweep's "p" configs). STAGES > 1 pipelines the vocabulary loop's loads.
        for rb in range(tl.program_id(0), tl.cdiv(R, BLOCK_R), tl.num_programs(0)):
            rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = rows < R
            rows64 = rows.to(tl.int64)
            tgt = tl.load(t_ptr + rows64, mask=row_ok, other=-1).to(tl.int64)
            has_t = row_ok & (tgt >= 0) & (tgt < V)
            write = has_t & (rows < R_grad)
            base = z_ptr + rows64[:, None] * stride_z
            ut = tl.load(z_ptr + rows64 * stride_z + tgt, mask=has_t, other=0.0).to(tl.float32) * inv_temp
            s0 = tl.where(ut == float("-inf"), 0.0, ut)  # the first shift (a -inf target: any finite one does)
            sh = s0  # the shift s
            kk = tl.zeros([BLOCK_R], tl.float32)  # s = s0 + kk ln 2 while kk < 127 (then s is a block maximum)
            acc = tl.zeros([BLOCK_R], tl.float32)  # sum over j != t of exp(u_j - s)
            stop = tl.full([BLOCK_R], V, tl.int32)  # where the row's first raise of s stopped its stores
            if tl.max(has_t.to(tl.int32), 0) > 0:
                for v0 in tl.range(0, V, BLOCK_V, num_stages=STAGES):
                    cols = v0 + tl.arange(0, BLOCK_V)
                    not_t = cols[None, :].to(tl.int64) != tgt[:, None]
                    ok = has_t[:, None] & (cols < V)[None, :]
                    u = tl.load(base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
                    bmax = tl.max(u, 1)
                    # rare: s raised to a whole number of ln 2 above s0 at or past the block's maximum, so that the
                    # fix-up's factor exp(s0 - s) = 2^-kk is exact (P written before the raise is rounded once)
                    up = has_t & (bmax > sh + rescale_at)
                    k_new = tl.where(up, tl.minimum(tl.ceil((bmax - s0) * 1.4426950408889634), 127.0), kk)
                    new = tl.where(up, tl.where(k_new < 127.0, s0 + k_new * 0.6931471805599453, bmax), sh)
                    acc = acc * tl.exp(sh - new)
                    stop = tl.where(up & (stop == V), v0, stop)
                    sh = new
                    kk = k_new
                    e = tl.where(not_t, tl.exp(u - sh[:, None]), 0.0)
                    acc += tl.sum(e, 1)
                    # the target's column too (its 0 is replaced below): a per-column store mask would cost the
                    # vector stores (sm_90 PTX: one st.global.b16 per element instead of st.global.v4)
                    tl.store(base + cols[None, :], _rne_bf16(e, RNE).to(z_ptr.dtype.element_ty),
                             mask=ok & (write & (stop == V))[:, None])
                # rows whose s was raised: blocks before `stop` hold P at the first shift (rescaled here), the others
                # still hold z (P computed here). Outside the loop above, which stays free of nested control flow.
                fix = write & (stop < V)
                if tl.max(fix.to(tl.int32), 0) > 0:
                    f0 = _exp2_neg(kk)[:, None]
                    tl.debug_barrier()  # the loads below read back other threads' stores
                    for v1 in range(0, V, BLOCK_V):
                        c1 = v1 + tl.arange(0, BLOCK_V)
                        m1 = fix[:, None] & (c1 < V)[None, :]
                        x = tl.load(base + c1[None, :], mask=m1, other=0.0).to(tl.float32)
                        e1 = tl.where((v1 < stop)[:, None], x * f0, tl.exp(x * inv_temp - sh[:, None]))
                        tl.store(base + c1[None, :], _rne_bf16(e1, RNE).to(z_ptr.dtype.element_ty), mask=m1)
            total = acc + tl.exp(ut - sh)  # S
            logp = tl.where(has_t, ut - sh - tl.log(tl.where(has_t, total, 1.0)), 0.0)
            # per-token coefficient d loss / d logp
            w = tl.load(w_ptr + rows64, mask=row_ok, other=0.0)
            if MODE == 0:
                trained = (w != 0) & has_t
                adv = tl.where(trained, tl.load(adv_ptr + rows64, mask=row_ok, other=0.0), 0.0)
                if HAS_OLD:
                    old = tl.load(old_ptr + rows64, mask=row_ok, other=0.0)
                    lr = tl.where(trained, logp - old, 0.0)
                else:
                    lr = tl.zeros([BLOCK_R], tl.float32)  # on-policy: logp - logp.detach() = 0, ratio exactly 1
                ratio = tl.exp(lr)
                clipped = tl.minimum(tl.maximum(ratio, lo), hi)
                a = ratio * adv
                b = clipped * adv
                # torch.minimum's backward: the smaller input gets the gradient, a tie splits it in half
                fa = tl.where(a < b, 1.0, tl.where(a == b, 0.5, 0.0))
                fb = tl.where(b < a, 1.0, tl.where(a == b, 0.5, 0.0))
                # clamp's backward passes the gradient where lo <= ratio <= hi (bounds included)
                cg = tl.where((ratio >= lo) & (ratio <= hi), 1.0, 0.0)
                g = -(fa * adv + fb * cg * adv) * ratio
                if HAS_KL:
                    ref = tl.load(ref_ptr + rows64, mask=row_ok, other=0.0)
                    d = tl.where(trained, ref - logp, 0.0)
                    g += beta * (1.0 - tl.exp(d))
                c = tl.where(trained, w * g, 0.0)
            else:
                c = tl.where(has_t, w, 0.0)
            tl.store(logp_ptr + rows64, logp, mask=row_ok)
            tl.store(c_ptr + rows64, c, mask=row_ok)
            alpha = tl.where(write, -c * inv_temp / tl.where(write, total, 1.0), 0.0)
            tl.store(a_ptr + rows64, alpha, mask=row_ok)
            tl.debug_barrier()  # after every thread's store of the target's column in the loop
            tl.store(z_ptr + rows64 * stride_z + tgt, _rne_bf16(-acc, RNE).to(z_ptr.dtype.element_ty), mask=write)


    @triton.jit(do_not_specialize=["K"])
    def _scale_rows_kernel(x_ptr, a_ptr, idx_ptr, out_ptr, K, H, stride_x, stride_o, HAS_IDX: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, RNE: tl.constexpr):
        """out[idx[i] (or i), :] = (x[i, :] * a[i]) rounded once to out's dtype, for the K rows of x (fp32 maths):
        the backward's row scale alpha on a GEMM's small side, one read and one write instead of torch's upcast,
        scale, downcast and scatter passes."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = rows < K
        r64 = rows.to(tl.int64)
        a = tl.load(a_ptr + r64, mask=ok, other=0.0)
        dst = tl.load(idx_ptr + r64, mask=ok, other=0) if HAS_IDX else r64
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            m = ok[:, None] & (cols < H)[None, :]
            x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
            y = _rne_bf16(x * a[:, None], RNE)
            tl.store(out_ptr + dst[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=m)


def gpu_scale_rows_config(h: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, num_warps) of the row-scale kernel on a GPU: a row per program, up to 2048 columns a
    step (16-byte accesses when H is a multiple of 16)."""
    return 1, min(2048, triton.next_power_of_2(h)), 4


def _scale_rows(x: Tensor, alpha: Tensor, out: Tensor, idx: Tensor | None = None) -> Tensor:
    """out[idx[i] (or i)] = (x[i] * alpha[i]) in fp32, rounded once to out's dtype; x (K, H) with unit last
    stride, alpha (K,) fp32, idx (K,) int64 rows of out (the chunk loop's Triton kernel)."""
    k, h = x.shape
    if k == 0:
        return out
    br, bh, warps = (64, min(1024, triton.next_power_of_2(h)), 4) if not x.is_cuda else gpu_scale_rows_config(h)
    _scale_rows_kernel[(triton.cdiv(k, br),)](
        x, alpha, idx if idx is not None else alpha, out, k, h, x.stride(0), out.stride(0), HAS_IDX=idx is not None,
        BLOCK_R=br, BLOCK_H=bh, RNE=out.dtype == torch.bfloat16 and _dispatch.triton_interpret(), num_warps=warps)
    return out


def gpu_rows_config() -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps) of the row kernel on a GPU: one row per program, 4096-wide vocabulary blocks,
    4 warps (32 fp32 values per thread). bench grpo_rows on one 3328-row chunk of the anchor: H100 (2026-11-26)
    92% of copy, tied with 8 warps; H200 (2026-11-27) 0.601 ms = 80% of a same-size copy vs 8 warps' 0.652 ms (74%),
    the best of the eight configs that run reached."""
    return 1, 4096, 4


def _rows_config(rows: int, v: int, device: torch.device) -> tuple[int, int, int]:
    if device.type == "cpu":  # interpreter: few, wide programs (it runs them one after another)
        bv = min(1024, max(16, triton.next_power_of_2(v)))
        br, warps = (1 << 16) // bv, 4
    else:
        br, bv, warps = gpu_rows_config()
        bv = min(bv, max(16, triton.next_power_of_2(v)))
    br = min(br, triton.next_power_of_2(max(rows, 1)))
    return br, bv, warps


def _launch_rows(z: Tensor, targets: Tensor, w: Tensor, adv: Tensor | None, old: Tensor | None,
                 ref: Tensor | None, logp: Tensor, c: Tensor, alpha: Tensor, temperature: float, lo: float, hi: float,
                 beta: float, mode: int, rows_grad: int | None = None, config: tuple[int, ...] | None = None) -> None:
    """One launch of :func:`_rows_kernel` over the rows of ``z`` (fp32 or bf16); ``config`` (BLOCK_R, BLOCK_V,
    num_warps[, programs[, stages]]) overrides the default (bench/bench_grpo_rows.py sweeps it): ``programs`` > 0
    caps the grid, each program then walking several row blocks; ``stages`` (default 1) pipelines the vocabulary
    loop."""
    rows, v = z.shape
    rows_grad = rows if rows_grad is None else rows_grad
    if rows_grad > 0 and z.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the chunked gradient needs fp32 or bf16 logits (fp32's exponent range), got {z.dtype}")
    br, bv, warps, *rest = config if config is not None else _rows_config(rows, v, z.device)
    programs = rest[0] if len(rest) > 0 else 0
    stages = rest[1] if len(rest) > 1 else 1
    blocks = triton.cdiv(rows, br)
    grid = (min(blocks, programs) if programs > 0 else blocks,)
    _rows_kernel[grid](
        z, targets, w, adv if adv is not None else w, old if old is not None else w, ref if ref is not None else w,
        logp, c, alpha, rows, rows_grad, z.stride(0), 1.0 / temperature, lo, hi, beta, _RESCALE_AT,
        V=v, MODE=mode, HAS_OLD=old is not None, HAS_KL=ref is not None and beta > 0, BLOCK_R=br, BLOCK_V=bv,
        STAGES=stages, RNE=z.dtype == torch.bfloat16 and _dispatch.triton_interpret(), num_warps=warps,
    )


_MM_OUT_DTYPE = True  # torch.mm(..., out_dtype=torch.float32) works on this build's CUDA tensors (checked once)


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in fp32: cuBLAS's fp32 output of a half-precision GEMM (no rounding of the product to half) where
    torch offers it, else the half product upcast (CUDA) or an fp32 GEMM (CPU, where only tests run half GEMMs)."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if not a.is_cuda:
        return torch.mm(a.float(), b.float())
    if _MM_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):  # no fp32-output half GEMM in this torch build
            _MM_OUT_DTYPE = False
    return torch.mm(a, b).float()


# ------------------------------------------------------------------------------------------- the loop


def _grad_rows(targets: Tensor, w: Tensor, adv: Tensor | None, v: int, kl: bool, mode: int) -> Tensor:
    """(N,) bool: rows whose gradient can be non-zero. Every other row has c_i = 0 exactly (masked, no target,
    or, in GRPO without KL, a zero advantage: all-equal rewards in a group), so its backward GEMMs are skipped."""
    rows = (targets >= 0) & (targets < v) & (w != 0)
    if mode == MODE_GRPO and not kl:
        rows &= adv != 0
    return rows


def no_autocast(fn):
    """Run ``fn`` with autocast off: the maths of the fused-linear ops is fp32 (or the inputs' dtype for the
    GEMMs) whatever the caller's autocast; under it a torch matmul would silently run in bf16/fp16, and an
    index-put of its result into a buffer of the input dtype fails."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


@no_autocast
def _chunk_loop(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, w: Tensor,
                adv: Tensor | None, old: Tensor | None, ref: Tensor | None, temperature: float, lo: float, hi: float,
                beta: float, mode: int, need_dh: bool, need_dw: bool, need_db: bool
                ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(logp [N] f32, c [N] f32, dhidden [N,H] hidden dtype, dweight [V,H], dbias [V] f32), None where not needed.

    ``w`` (N,) f32: the aggregation weight (MODE_GRPO) or the coefficient itself (MODE_COEF).

    Rows whose gradient is zero by construction (:func:`_grad_rows`) are moved behind the others (one stable
    sort and a gather of the (N,) vectors and of ``hidden``, N*H elements): every row still gets its logits GEMM
    and log-prob, but only the leading ``n_grad`` rows get the row kernel's gradient pass and the two backward
    GEMMs. This needs the count on the host (one sync per call)."""
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    c = torch.empty(n, dtype=torch.float32, device=dev)
    need_any = need_dh or need_dw or need_db
    perm = None
    n_grad = n if need_any else 0
    if n > 0 and need_any and _SKIP_ZERO_ROWS:
        active = _grad_rows(targets, w, adv, v, ref is not None and beta > 0, mode)
        n_grad = int(active.sum())  # host sync
        if 0 < n_grad < n:  # rows with a gradient first, the others after, each group in its original order
            perm = torch.argsort((~active).to(torch.int8), stable=True)
            hidden, targets, w = hidden[perm], targets[perm], w[perm]
            adv, old, ref = (None if x is None else x[perm] for x in (adv, old, ref))
    # dhidden rows of skipped rows are never written: zeros then, otherwise every row is written
    dh = (torch.zeros if n_grad < n else torch.empty)(n, h, dtype=hidden.dtype, device=dev) if need_dh else None
    # dweight: chunk 0 holds the first rows with a gradient (they are sorted first) and writes it with a plain GEMM,
    # later chunks add to it; zeros when no row has a gradient (at the anchor shape a zero-fill and the first
    # chunk's read of it would be 1.6 GB of traffic)
    dw = (torch.zeros if n_grad == 0 else torch.empty)(v, h, dtype=dweight_dtype(weight), device=dev) \
        if need_dw else None
    db = torch.zeros(v, dtype=torch.float32, device=dev) if need_db else None
    if n == 0:
        return logp, c, dh, dw, db
    logp_p = logp if perm is None else torch.empty_like(logp)
    c_p = c if perm is None else torch.empty_like(c)
    step = chunk_rows(n, v, hidden.element_size())
    zbuf = torch.empty(step, v, dtype=hidden.dtype, device=dev)
    abuf = torch.empty(step, dtype=torch.float32, device=dev)  # alpha of the chunk's rows
    wt = weight.T
    targets = targets.contiguous()
    for s in range(0, n, step):
        e = min(n, s + step)
        k = min(e, max(n_grad, s)) - s  # rows of this chunk with a gradient (the leading ones)
        hc = hidden[s:e]
        z = zbuf[: e - s]
        if bias is not None:
            torch.addmm(bias, hc, wt, out=z)
        else:
            torch.mm(hc, wt, out=z)
        _launch_rows(z, targets[s:e], w[s:e], None if adv is None else adv[s:e], None if old is None else old[s:e],
                     None if ref is None else ref[s:e], logp_p[s:e], c_p[s:e], abuf[: e - s], temperature, lo, hi,
                     beta, mode, k)
        if k == 0:
            continue
        # dz = alpha[:, None] * P (P in z): the row scale goes on the GEMMs' small sides
        pk, hk, ak = z[:k], hc[:k], abuf[:k, None]
        if dh is not None:  # dhidden = alpha * (P @ weight), the product kept in fp32 until scaled
            if perm is None:
                _scale_rows(_mm_f32(pk, weight), abuf[:k], dh[s : s + k])
            else:
                _scale_rows(_mm_f32(pk, weight), abuf[:k], dh, perm[s : s + k])
        if dw is not None:  # dweight += P.T @ (alpha * hidden)
            ha = _scale_rows(hk, abuf[:k], torch.empty_like(hk))
            if dw.dtype == pk.dtype:
                if s == 0:
                    torch.mm(pk.T, ha, out=dw)
                else:
                    dw.addmm_(pk.T, ha)
            elif s == 0:  # fp32 accumulator for a half weight (small V*H only): the chunk's product in fp32
                dw.copy_(_mm_f32(pk.T, ha))
            else:
                dw += _mm_f32(pk.T, ha)
        if db is not None:  # dbias += alpha @ P (alpha rounded to P's dtype; the result goes to the bias dtype)
            db += _mm_f32(ak[:, 0].to(pk.dtype)[None], pk)[0]
    if perm is not None:
        logp[perm] = logp_p
        c[perm] = c_p
    return logp, c, dh, dw, db


def chunked_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float
                     ) -> Tensor:
    """(N,) f32 log-probs without gradients (0 where the target is outside [0, V)): per chunk one cuBLAS GEMM and
    the row kernel with no row given the gradient (one read of the [C, V] buffer, no writes)."""
    n = hidden.shape[0]
    w = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    logp, *_ = _chunk_loop(hidden.contiguous(), weight.contiguous(), bias, targets.contiguous(), w, None, None,
                           None, float(temperature), 1.0, 1.0, 0.0, MODE_COEF, False, False, False)
    return logp


# -------------------------------------------------------------------------------------------- autograd


class _ChunkedLoss(torch.autograd.Function):
    """(loss (), logp (N,) detached) with the gradients computed in the forward; the backward hands them over
    (scaled in place by the incoming scalar when it is not 1), so that no second [V, H] buffer is allocated.
    Hence one backward per forward: a second backward through a retained graph raises."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, w, adv, old, ref, temperature, lo, hi, beta, mode, loss_fn):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        logp, _, dh, dw, db = _chunk_loop(hidden, weight, bias, targets, w, adv, old, ref, temperature, lo, hi,
                                          beta, mode, need_dh, need_dw, need_db)
        loss = loss_fn(logp)
        ctx.grads = [dh, dw, db]  # not save_for_backward: handed over (not copied) in the backward
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(logp)
        return loss, logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_logp):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused-linear loss (chunked Triton implementation) computes its gradients in the forward and "
                "hands them over in the first backward: a second backward through the same graph "
                "(retain_graph=True) is not supported; recompute the loss, or set R4B_FUSED_LINEAR_IMPL=tiled"
            )
        grads, ctx.grads = ctx.grads, None
        h_dt, w_dt, b_dt = ctx.dtypes
        g = float(grad_loss)  # host sync; a Python float multiplies in fp32 maths (a half g would round it)

        def scale(x, dt):
            if x is None:
                return None
            if g != 1.0:  # the usual loss.backward() needs no pass over the gradients at all
                x.mul_(g)
            return x.to(dt)  # no copy when x is already in dt

        return (scale(grads[0], h_dt), scale(grads[1], w_dt), scale(grads[2], b_dt)) + (None,) * 11


def chunked_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, w: Tensor,
                 loss_fn, *, adv: Tensor | None = None, old: Tensor | None = None, ref: Tensor | None = None,
                 temperature: float = 1.0, eps_low: float = 0.0, eps_high: float = 0.0, beta: float = 0.0,
                 mode: int = MODE_COEF) -> tuple[Tensor, Tensor]:
    """(loss, logp) with d loss / d logp_i = c_i: MODE_GRPO derives c from the GRPO inputs and the aggregation
    weights ``w``; MODE_COEF takes c = ``w``. ``loss_fn(logp)`` gives the loss value (no grad needed there).
    Targets outside [0, V) give logp 0 and no gradient. Inputs already validated; all (N,) vectors on hidden's
    device (w, adv, old, ref converted to contiguous fp32 here)."""
    def f32(x):
        return None if x is None else x.float().contiguous()

    return _ChunkedLoss.apply(hidden.contiguous(), weight.contiguous(), bias, targets, f32(w), f32(adv), f32(old),
                              f32(ref), float(temperature), 1.0 - eps_low, 1.0 + eps_high, float(beta), mode, loss_fn)



class _LogprobsChunkedBwd(torch.autograd.Function):
    """logp (N,) f32 for an arbitrary downstream (e.g. cross-entropy with reduction="none"): the chunked forward
    (GEMM + the row kernel without writes), and a backward that recomputes the logits with the chunk loop (4 GEMMs
    in all, no atomics)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature):
        logp = chunked_logprobs(hidden, weight, bias, targets, temperature)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature = temperature
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        _, _, dh, dw, db = _chunk_loop(hidden, weight, bias, targets, grad_logp.float().contiguous(), None, None,
                                       None, ctx.temperature, 1.0, 1.0, 0.0, MODE_COEF, need_dh, need_dw,
                                       need_db and bias is not None)
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None)


def linear_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float
                    ) -> Tensor:
    """Differentiable logp (N,) f32 (0 where the target is outside [0, V)), chunked backward."""
    return _LogprobsChunkedBwd.apply(hidden.contiguous(), weight.contiguous(), bias, targets.contiguous(),
                                     float(temperature))
