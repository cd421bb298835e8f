"""varlen_attention: attention over packed variable-length sequences (GQA, causal or not); no token sees
another sequence.

Owns the torch reference (per-sequence SDPA in fp32), the Triton kernels (flash-attention-2 style forward
with online softmax and saved log-sum-exp; backward as delta = rowsum(dO * O), a dK/dV kernel that loops over
query blocks and over the query heads of its KV group, and a dQ kernel that loops over key blocks; no atomics),
the autograd Function and the public function. ``R4B_VARLEN_BWD=atomic`` selects the other backward: the dK/dV
kernel also adds dQ into an fp32 buffer with atomics, so that no dQ kernel recomputes the scores (5 matrix
products instead of 7; which is faster is measured by bench/bench_varlen_attention.py's "r4b triton atomic-dq"
row; "split", the default off Hopper, is deterministic; on a Hopper GPU the default for bf16 at head dim 128 is
"gluon-dkdv": this dQ kernel with the Gluon dK/dV kernel of _varlen_gluon.py, also without atomics).
``R4B_VARLEN_LOADS=tma`` loads the blocks the kernels' inner loops
walk (K/V in the forward and dQ kernels, Q/dO in the dK/dV kernel) through TMA tensor descriptors built on the
device, one per sequence and head, so the hardware reads zeros past a sequence's end (sm_90: cp.async.bulk.tensor;
the forward's first autotune config takes 206 registers instead of 254), and the atomic backward adds each dQ tile
with one bulk reduction (cp.reduce.async.bulk.tensor), where the layout allows it (head dim a power of two,
16-byte row and head strides); the bench's "r4b triton tma" rows time it against the default pointer loads.

Grid and sequence boundaries: one program per (tile of BLOCK *packed* tokens, head), ordered tile-major in a
1-D grid (``_tile_of``), so it depends only on T, never on the per-batch lengths. A tile of BLOCK packed rows
may hold the end of one sequence and the start of others; the program finds the sequence of its first row by
binary search over cu_seqlens and walks the "segments" (the rows of one sequence inside the tile) in turn,
running the usual flash loops with that sequence's start and length. Lengths are runtime values: nothing
recompiles per batch.

Also owns the calls into two opt-in peer backends (see _dispatch.py: only ``backend="flash_attn"`` /
``"xformers"`` or ``R4B_ATTN_BACKEND`` select them): flash-attn's ``flash_attn_varlen_func`` (packed layout and
GQA native) and xformers' ``memory_efficient_attention`` with a block-diagonal (causal) mask on a batch of one,
GQA as its 5-D (1, T, Hkv, G, D) layout with K/V expanded over the group (no copy). Gradients are theirs.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, _compile, _dispatch

OP = "varlen_attention"
# the backward: "split" (Triton dQ kernel + dK/dV kernel), "atomic" (Triton, the dK/dV kernel adds dQ),
# "gluon" (sm_90 only, opt-in: the split backward in Gluon, _varlen_gluon.py), "gluon-dkdv" (sm_90: the Triton dQ
# kernel and the Gluon dK/dV kernel, each the faster of its pair at the 16k anchor on an H200, 2026-11-27: dQ 0.96
# vs 1.08 ms, dK/dV 1.45 vs 1.57 ms; forward + backward 3.38 vs split's 3.42 ms in the same run, its GPU tests
# passed) or "ws" (the split backward warp-specialised by triton's Hopper pass; the interpreter or sm_90, opt-in:
# _varlen_ws.py), or the warp-specialised Gluon kernels of _varlen_gluon_ws.py (sm_90; each refused on GPUs until its
# GPU tests pass): "gluon-ws" (its dQ and dK/dV kernels), "gluon-ws-dq" (its dQ kernel, the Gluon dK/dV kernel),
# "gluon-ws-dkdv" (the Triton dQ kernel, its dK/dV kernel). Unset: "gluon-dkdv" where the Gluon dK/dV kernel takes
# the call (a Hopper GPU, bf16, head dim 128, TMA-addressable; what its GPU tests verified), "split" everywhere
# else (_default_gluon_dkdv).
ENV_BWD = "R4B_VARLEN_BWD"
BWD_MODES = ("split", "atomic", "gluon", "gluon-dkdv", "ws", "gluon-ws", "gluon-ws-dq", "gluon-ws-dkdv")
# the backward modes that take the Gluon kernels (the unset default may too): (ws dQ kernel?, ws dK/dV kernel?)
_GLUON_WS_BWD = {"gluon-ws": (True, True), "gluon-ws-dq": (True, False), "gluon-ws-dkdv": (False, True)}
ENV_LOADS = "R4B_VARLEN_LOADS"  # the Triton kernels' block loads: "pointer" (default) or "tma" (tensor descriptors)
# the forward kernel: "triton" (default), "gluon" (sm_90 only, opt-in: _varlen_gluon.py), "gluon-ws" (sm_90 only,
# Gluon with explicit warp specialisation, a producer warp and two consumer warpgroups; refused on GPUs until its
# GPU tests pass: _varlen_gluon_ws.py) or "ws" (Triton with triton's Hopper warp specialisation; the interpreter or
# sm_90, opt-in until timed: _varlen_ws.py)
ENV_FWD = "R4B_VARLEN_FWD"
FWD_MODES = ("triton", "gluon", "gluon-ws", "ws")
_dispatch.register(OP, ("triton", "torch", "flash_attn", "xformers"), env="R4B_ATTN_BACKEND")


def varlen_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool = True, softmax_scale: float | None = None
) -> Tensor:
    """Loop over sequences; each runs fp32 attention with K/V heads repeated for GQA. Returns q.dtype."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    bounds = cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=False):
        if e == s:
            continue
        qs = q[s:e].float().transpose(0, 1)  # (Hq, L, D)
        ks = k[s:e].float().transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)  # (Hq, L, D)
        vs = v[s:e].float().transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)  # (Hq, L, D)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)  # (Hq, L, D)
        outs.append(o.transpose(0, 1))  # (L, Hq, D)
    if not outs:
        return _empty_out(q, k, v)
    return torch.cat(outs, 0).to(q.dtype)


def _empty_out(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The (T, Hq, D) zeros of a batch with no token (T = 0 or no heads) that still belong to the autograd graph
    of q, k and v (an empty micro-batch's loss.backward() must work, with zero gradients)."""
    return q * 0.0 + (k.sum() + v.sum()) * 0.0


_LOG2E = 1.4426950408889634


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _flash_attn(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_seqlen: int, scale: float, causal: bool) -> Tensor:
    """flash-attn on the packed layout as it is: (T, Hq, D), (T, Hkv, D) -> (T, Hq, D)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0, softmax_scale=scale, causal=causal
    )


def _xformers(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float, causal: bool) -> Tensor:
    """xformers with a block-diagonal mask over one packed row. The mask holds the lengths as Python ints, so
    this reads cu_seqlens on the host (one synchronisation per call on a GPU)."""
    import xformers.ops as xops
    from xformers.ops.fmha import attn_bias

    T, Hq, D = q.shape
    Hkv = k.shape[1]
    lens = [n for n in (cu[1:] - cu[:-1]).tolist() if n > 0]  # empty sequences hold no rows: leave them out
    mask = attn_bias.BlockDiagonalCausalMask if causal else attn_bias.BlockDiagonalMask
    bias = mask.from_seqlens(lens, device=q.device)
    if Hq == Hkv:
        o = xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, p=0.0, scale=scale)
        return o.reshape(T, Hq, D)  # (1, T, Hq, D) -> (T, Hq, D)
    G = Hq // Hkv
    q5 = q.view(1, T, Hkv, G, D)  # query head h = hk * G + g, as flash-attn and the reference group them
    k5 = k[None, :, :, None, :].expand(1, T, Hkv, G, D)  # (1, T, Hkv, G, D), stride 0 over G: no copy
    v5 = v[None, :, :, None, :].expand(1, T, Hkv, G, D)
    o = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias, p=0.0, scale=scale)  # (1, T, Hkv, G, D)
    return o.reshape(T, Hq, D)


if _dispatch.triton_importable():
    import triton
    import triton.language as tl

    # score of a masked pair: finite, so a row that is fully masked in one block never makes NaN
    # (compiled Triton only reads globals that are constexpr)
    _NEG = tl.constexpr(-1.0e30)

    @triton.jit
    def _seq_of(CU, n_seqs, t):
        """The sequence holding packed token t: the largest s in [0, n_seqs) with cu[s] <= t."""
        lo = t * 0
        hi = lo + n_seqs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            take = tl.load(CU + mid) <= t
            lo = tl.where(take, mid, lo)
            hi = tl.where(take, hi, mid)
        return lo

    @triton.jit
    def _load_rows(base, idx, stride, offs_d, row_mask, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   MASK_ROWS: tl.constexpr):
        """(len(idx), BLOCK_D) tile of rows base + idx * stride; zeros outside the mask and past D."""
        ptrs = base + idx[:, None] * stride + offs_d[None, :]
        if MASK_ROWS:
            if BLOCK_D == D:
                x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
            else:
                x = tl.load(ptrs, mask=row_mask[:, None] & (offs_d[None, :] < D), other=0.0)
        else:
            if BLOCK_D == D:
                x = tl.load(ptrs)
            else:
                x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
        return x

    @triton.jit
    def _load_rows_t(base, idx, stride, offs_d, row_mask, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     MASK_ROWS: tl.constexpr):
        """The transposed tile, (BLOCK_D, len(idx))."""
        ptrs = base + idx[None, :] * stride + offs_d[:, None]
        if MASK_ROWS:
            if BLOCK_D == D:
                x = tl.load(ptrs, mask=row_mask[None, :], other=0.0)
            else:
                x = tl.load(ptrs, mask=row_mask[None, :] & (offs_d[:, None] < D), other=0.0)
        else:
            if BLOCK_D == D:
                x = tl.load(ptrs)
            else:
                x = tl.load(ptrs, mask=offs_d[:, None] < D, other=0.0)
        return x

    @triton.jit
    def _key_bounds(qlo, qhi, L, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        """Key ranges of a segment whose query rows are [qlo, qhi) of a sequence of L tokens (local indices):
        [0, hi1) whole key blocks every query row sees (no mask), [hi1, hi2) the masked rest."""
        if CAUSAL:
            hi1 = (qlo // BLOCK_N) * BLOCK_N  # keys below every query row of the segment
            hi2 = qhi
        else:
            hi1 = (L // BLOCK_N) * BLOCK_N
            hi2 = L
        return hi1, hi2

    @triton.jit
    def _tile_of(n_heads, T, BLOCK: tl.constexpr, HEAVY_LAST: tl.constexpr):
        """(first packed row, head) of this program. The 1-D grid is tile-major (the heads of one tile are
        consecutive programs) and GPUs start programs in grid order, so what runs last decides the tail: a causal
        query tile's work grows towards the end of its sequence, so query kernels walk the tiles backwards
        (HEAVY_LAST=True: the heavy last tiles of each sequence start first and the last programs are the light
        first tiles); a key tile's work shrinks towards the end, so key kernels walk forwards. In a list-scheduling
        model of the 16k anchor (1 program per SM; ``python -m bench.bench_varlen_attention --sched``) this cuts
        the dK/dV kernel's tail from ~19% to ~2% over the head-major grid it had, and the forward's from ~5% to
        ~0.5%."""
        pid = tl.program_id(0)
        h = pid % n_heads
        tile = pid // n_heads
        if HEAVY_LAST:
            tile = (T + BLOCK - 1) // BLOCK - 1 - tile
        return tile * BLOCK, h

    @triton.jit
    def _seq_desc(base, L, stride_t, D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                  TMA: tl.constexpr):
        """With TMA, the TMA descriptor of one sequence's rows of one head: L rows of D at base (stride
        stride_t). Built on the device per segment, so the hardware zero-fills rows past the sequence's end: a
        block that reaches into the next sequence reads zeros there, as the pointer loads' masks do (never a
        neighbour's values, which could be inf or NaN: 0 * inf is NaN in a matrix product). At least one row,
        for an empty sequence. Without TMA, base itself (the pointer loads' argument; the descriptor is unused)."""
        if TMA:
            desc = tl.make_tensor_descriptor(base, shape=[tl.maximum(L, 1), D], strides=[stride_t, 1],
                                             block_shape=[BLOCK_ROWS, BLOCK_D])
        else:
            desc = base
        return desc

    # ---------------------------------------------------------------- forward

    @triton.jit
    def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, q_loc, lo, hi, qk_scale,
                   offs_d, desc_k, desc_v, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                   TMA: tl.constexpr):
        """Online-softmax accumulation over key blocks [lo, hi) of one sequence (local indices).

        MASK=False: every key of every block is valid for every query row of the segment (no masks at all).
        MASK=True: keys >= hi are cut, and with CAUSAL keys after the query too.
        TMA: K and V blocks come through the sequence's tensor descriptors (_seq_desc), local rows.
        """
        offs_n = tl.arange(0, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            kn = n0 + offs_n
            kmask = kn < hi
            if TMA:
                kT = tl.trans(desc_k.load([n0, 0]))  # (BLOCK_D, BLOCK_N)
            else:
                kT = _load_rows_t(k_base, kn, stride_kt, offs_d, kmask, D, BLOCK_D, MASK)  # (BLOCK_D, BLOCK_N)
            qk = tl.dot(q, kT, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N) raw scores
            if MASK:
                ok = kmask[None, :]
                if CAUSAL:
                    ok = ok & (kn[None, :] <= q_loc[:, None])
                qk = tl.where(ok, qk * qk_scale, _NEG)  # log2 units
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                p = tl.exp2(qk - m_new[:, None])
            else:
                # scale the row maximum, not every score: qk * scale - m is then one FMA per score (scaling by a
                # positive number commutes with the maximum, so m_new is the same either way)
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                p = tl.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if TMA:
                v = desc_v.load([n0, 0])  # (BLOCK_N, BLOCK_D)
            else:
                v = _load_rows(v_base, kn, stride_vt, offs_d, kmask, D, BLOCK_D, MASK)  # (BLOCK_N, BLOCK_D)
            # the rescaled accumulator as the product's accumulator: the MMA adds into it (no separate add)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit(do_not_specialize=["T", "n_seqs", "t_bucket"])
    def _fwd_kernel(Q, K, V, Out, LSE, CU, T, n_seqs, t_bucket, n_heads, qk_scale,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr):
        # program (query tile of packed rows, query head); LSE is (Hq, T) fp32 in log2 units.
        t0, h = _tile_of(n_heads, T, BLOCK_M, CAUSAL)
        hk = h // GROUP
        h64, hk64 = h.to(tl.int64), hk.to(tl.int64)  # per-head bases in int64: h * head stride can pass 2^31
        rows = t0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_rows(Q + h64 * stride_qh, rows.to(tl.int64), stride_qt, offs_d, rows < T, D, BLOCK_D, True)
        t_end = tl.minimum(t0 + BLOCK_M, T)
        s = _seq_of(CU, n_seqs, t0)
        t = t0
        while t < t_end:  # one segment (the tile's rows of sequence s) per iteration
            cs = tl.load(CU + s)
            ce = tl.load(CU + s + 1)
            seg_hi = tl.minimum(ce, t_end)
            L = ce - cs
            q_loc = rows - cs  # local query index of each tile row (meaningful inside [t, seg_hi) only)
            hi1, hi2 = _key_bounds(t - cs, seg_hi - cs, L, BLOCK_N, CAUSAL)
            k_base = K + cs.to(tl.int64) * stride_kt + hk64 * stride_kh
            v_base = V + cs.to(tl.int64) * stride_vt + hk64 * stride_vh
            desc_k = _seq_desc(k_base, L, stride_kt, D, BLOCK_N, BLOCK_D, TMA)
            desc_v = _seq_desc(v_base, L, stride_vt, D, BLOCK_N, BLOCK_D, TMA)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, q_loc, 0, hi1,
                                       qk_scale, offs_d, desc_k, desc_v, D, BLOCK_D, BLOCK_N, False, CAUSAL,
                                       DOT_PREC, TMA)
            acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, q_loc, hi1, hi2,
                                       qk_scale, offs_d, desc_k, desc_v, D, BLOCK_D, BLOCK_N, True, CAUSAL,
                                       DOT_PREC, TMA)
            seg = (rows >= t) & (rows < seg_hi)
            l_i = tl.where(l_i > 0.0, l_i, 1.0)  # l_i is 0 only in an empty segment (a zero-length sequence)
            out = acc / l_i[:, None]
            r64 = rows.to(tl.int64)
            o_ptrs = Out + h64 * stride_oh + r64[:, None] * stride_ot + offs_d[None, :]
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=seg[:, None] & (offs_d[None, :] < D))
            tl.store(LSE + h64 * T + r64, m_i + tl.log2(l_i), mask=seg)
            t = seg_hi
            s += 1

    # ---------------------------------------------------------------- backward

    @triton.jit(do_not_specialize=["T"])
    def _bwd_delta_kernel(Out, DO, LSE, DELTA, LD, T, stride_ot, stride_oh, stride_dot, stride_doh,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        # DELTA[h, t] = sum_d dO[t, h, d] * O[t, h, d], fp32, (Hq, T); LD[h, t] = (LSE[h, t], DELTA[h, t]),
        # (Hq, T, 2), for the dK/dV kernel's 8-byte pair loads
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        h64 = tl.program_id(1).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        r64 = rows.to(tl.int64)
        o = _load_rows(Out + h64 * stride_oh, r64, stride_ot, offs_d, rows < T, D, BLOCK_D, True).to(tl.float32)
        do = _load_rows(DO + h64 * stride_doh, r64, stride_dot, offs_d, rows < T, D, BLOCK_D, True).to(tl.float32)
        delta = tl.sum(o * do, 1)
        tl.store(DELTA + h64 * T + r64, delta, mask=rows < T)
        lse = tl.load(LSE + h64 * T + r64, mask=rows < T, other=0.0)
        ld_ptrs = LD + (h64 * T + r64)[:, None] * 2 + tl.arange(0, 2)[None, :]
        tl.store(ld_ptrs, tl.join(lse, delta), mask=(rows < T)[:, None])

    @triton.jit
    def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, q_loc, lo, hi, qk_scale,
                  offs_d, desc_k, desc_v, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                  TMA: tl.constexpr):
        """dQ of a query tile over key blocks [lo, hi) of one sequence (MASK, TMA: as in _fwd_inner)."""
        offs_n = tl.arange(0, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            kn = n0 + offs_n
            kmask = kn < hi
            if TMA:
                kT = tl.trans(desc_k.load([n0, 0]))  # (BLOCK_D, BLOCK_N)
                vT = tl.trans(desc_v.load([n0, 0]))
            else:
                kT = _load_rows_t(k_base, kn, stride_kt, offs_d, kmask, D, BLOCK_D, MASK)  # (BLOCK_D, BLOCK_N)
                vT = _load_rows_t(v_base, kn, stride_vt, offs_d, kmask, D, BLOCK_D, MASK)  # (BLOCK_D, BLOCK_N)
            p = tl.exp2(tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
            if MASK:
                ok = kmask[None, :]
                if CAUSAL:
                    ok = ok & (kn[None, :] <= q_loc[:, None])
                p = tl.where(ok, p, 0.0)
            dp = tl.dot(do, vT, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PREC)
        return dq

    @triton.jit(do_not_specialize=["T", "n_seqs", "t_bucket"])
    def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, T, n_seqs, t_bucket, n_heads, qk_scale,
                       sm_scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot,
                       stride_doh, stride_dqt, stride_dqh,
                       GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr):
        # program (query tile of packed rows, query head): dQ = scale * sum_keys dS K
        t0, h = _tile_of(n_heads, T, BLOCK_M, CAUSAL)
        hk = h // GROUP
        h64, hk64 = h.to(tl.int64), hk.to(tl.int64)  # per-head bases in int64: h * head stride can pass 2^31
        rows = t0 + tl.arange(0, BLOCK_M)
        r64 = rows.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        in_t = rows < T
        q = _load_rows(Q + h64 * stride_qh, r64, stride_qt, offs_d, in_t, D, BLOCK_D, True)
        do = _load_rows(DO + h64 * stride_doh, r64, stride_dot, offs_d, in_t, D, BLOCK_D, True)
        lse = tl.load(LSE + h64 * T + r64, mask=in_t, other=0.0)
        delta = tl.load(DELTA + h64 * T + r64, mask=in_t, other=0.0)
        t_end = tl.minimum(t0 + BLOCK_M, T)
        s = _seq_of(CU, n_seqs, t0)
        t = t0
        while t < t_end:
            cs = tl.load(CU + s)
            ce = tl.load(CU + s + 1)
            seg_hi = tl.minimum(ce, t_end)
            L = ce - cs
            q_loc = rows - cs
            hi1, hi2 = _key_bounds(t - cs, seg_hi - cs, L, BLOCK_N, CAUSAL)
            k_base = K + cs.to(tl.int64) * stride_kt + hk64 * stride_kh
            v_base = V + cs.to(tl.int64) * stride_vt + hk64 * stride_vh
            desc_k = _seq_desc(k_base, L, stride_kt, D, BLOCK_N, BLOCK_D, TMA)
            desc_v = _seq_desc(v_base, L, stride_vt, D, BLOCK_N, BLOCK_D, TMA)
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, q_loc, 0, hi1, qk_scale,
                           offs_d, desc_k, desc_v, D, BLOCK_D, BLOCK_N, False, CAUSAL, DOT_PREC, TMA)
            dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, q_loc, hi1, hi2, qk_scale,
                           offs_d, desc_k, desc_v, D, BLOCK_D, BLOCK_N, True, CAUSAL, DOT_PREC, TMA)
            seg = (rows >= t) & (rows < seg_hi)
            ptrs = DQ + h64 * stride_dqh + r64[:, None] * stride_dqt + offs_d[None, :]
            tl.store(ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=seg[:, None] & (offs_d[None, :] < D))
            t = seg_hi
            s += 1

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, ld_base, stride_qt, stride_dot, k_loc, lo,
                    hi, L, qk_scale, offs_d, dq_base, stride_dqt, kvalid, sm_scale, desc_q, desc_do, desc_dq, dq_row0,
                    dq_col0,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASK: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr,
                    TMA_DQ: tl.constexpr):
        """Accumulate dK, dV of a key tile over query blocks [lo, hi) of one sequence and one query head
        (transposed form: the score tile is (BLOCK_N keys, BLOCK_M queries)). MASK: 1 = queries >= L masked,
        2 = also the causal mask (diagonal blocks), 0 = whole blocks below L (no query mask; TMA only).
        ATOMIC_DQ: also add this key tile's share of dQ (sm_scale * dS K) into the fp32 rows at dq_base with
        atomics; the tile's keys outside the segment (kvalid False: another sequence's rows) are masked out,
        since their rows would otherwise reach dQ. TMA: the Q and dO blocks come through the sequence's tensor
        descriptors (_seq_desc: rows >= L read as zeros). TMA_DQ: the dQ tile is added by one bulk reduction
        through desc_dq (all of DQ32 as (T, Hq * D), built once per program: a bulk reduction still in flight
        may read its descriptor, so per-head descriptors rewritten in the head loop are not safe there; rows
        dq_row0 + m, columns dq_col0 ..) instead of per-element atomics.
        """
        offs_m = tl.arange(0, BLOCK_M)
        # pair loads at the tiles where sm_90 ptxas measured fewer spills with them (64x32, 128x32, 128x16, and
        # the interpreter's 32x16; see DKDV_CONFIGS); two 4-byte loads per query elsewhere
        PAIR: tl.constexpr = BLOCK_M < BLOCK_N and BLOCK_M <= 32
        for m0 in range(lo, hi, BLOCK_M):
            qi = m0 + offs_m
            qmask = qi < L
            if TMA:
                qT = tl.trans(desc_q.load([m0, 0]))  # (BLOCK_D, BLOCK_M)
                do = desc_do.load([m0, 0])  # (BLOCK_M, BLOCK_D)
            else:
                qT = _load_rows_t(q_base, qi, stride_qt, offs_d, qmask, D, BLOCK_D, True)  # (BLOCK_D, BLOCK_M)
                do = _load_rows(do_base, qi, stride_dot, offs_d, qmask, D, BLOCK_D, True)  # (BLOCK_M, BLOCK_D)
            if PAIR:  # one 8-byte load of (lse, delta) per query, split by bit casts
                pair_ptrs = ld_base.to(tl.pointer_type(tl.uint64)) + qi
                if MASK > 0:
                    pair = tl.load(pair_ptrs, mask=qmask, other=0)
                else:
                    pair = tl.load(pair_ptrs)
                lse = pair.to(tl.uint32).to(tl.float32, bitcast=True)
                delta = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
            elif MASK > 0:
                lse = tl.load(lse_base + qi, mask=qmask, other=0.0)
                delta = tl.load(delta_base + qi, mask=qmask, other=0.0)
            else:
                lse = tl.load(lse_base + qi)
                delta = tl.load(delta_base + qi)
            pT = tl.exp2(tl.dot(k, qT, input_precision=DOT_PREC) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
            if MASK > 0:
                ok = qmask[None, :]
                if MASK == 2:
                    ok = ok & (qi[None, :] >= k_loc[:, None])
                if ATOMIC_DQ:
                    ok = ok & kvalid[:, None]
                pT = tl.where(ok, pT, 0.0)
            elif ATOMIC_DQ:
                pT = tl.where(kvalid[:, None], pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PREC)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PREC) * sm_scale  # (BLOCK_M, BLOCK_D)
                if TMA_DQ:
                    # one bulk reduction of the tile (cp.reduce.async.bulk.tensor): its rows >= L are other
                    # sequences' (or past T, dropped) and get exact zeros (a select, so not even a NaN of dP
                    # there reaches them)
                    if MASK > 0:
                        dq = tl.where(qmask[:, None], dq, 0.0)
                    desc_dq.atomic_add([dq_row0 + m0, dq_col0], dq)
                else:
                    # int64 rows: dQ32's row stride is Hq * D, which the int32 guard on q/k/v strides does not
                    # bound; relaxed order: nothing reads dQ32 before the kernel ends (acq_rel costs fences)
                    dq_ptrs = dq_base + qi.to(tl.int64)[:, None] * stride_dqt + offs_d[None, :]
                    if MASK > 0:
                        tl.atomic_add(dq_ptrs, dq, mask=qmask[:, None] & (offs_d[None, :] < D), sem="relaxed")
                    else:
                        tl.atomic_add(dq_ptrs, dq, mask=offs_d[None, :] < D, sem="relaxed")
        return dk, dv

    @triton.jit(do_not_specialize=["T", "n_seqs", "t_bucket"])
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, LD, DK, DV, DQ32, CU, T, n_seqs, t_bucket, n_heads, qk_scale,
                         sm_scale,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                         stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dq32t, stride_dq32h,
                         GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                         ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr, TMA_DQ: tl.constexpr,
                         WIDE_HEADS: tl.constexpr):
        # program (key tile of packed rows, KV head): sums over the GROUP query heads that share this KV head,
        # so dK/dV are written once, without atomics. ATOMIC_DQ: dQ is also formed here (fp32 atomics into DQ32,
        # zeroed by the caller), so no dQ kernel recomputes QK^T and dO V^T: 5 matrix products instead of 7.
        t0, hk = _tile_of(n_heads, T, BLOCK_N, False)
        # WIDE_HEADS: per-head bases in int64 (a head stride times the head index, or Hq * T * 2, can pass 2^31);
        # int32 otherwise (int64 costs this kernel spills, 12 -> 20 bytes at the default tile under sm_90 ptxas)
        hk64 = hk.to(tl.int64) if WIDE_HEADS else hk
        rows = t0 + tl.arange(0, BLOCK_N)
        r64 = rows.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        in_t = rows < T
        if not ATOMIC_DQ:  # the atomic backward loads them per segment (below)
            k = _load_rows(K + hk64 * stride_kh, r64, stride_kt, offs_d, in_t, D, BLOCK_D, True)  # (BLOCK_N, BLOCK_D)
            v = _load_rows(V + hk64 * stride_vh, r64, stride_vt, offs_d, in_t, D, BLOCK_D, True)
        t_end = tl.minimum(t0 + BLOCK_N, T)
        if TMA_DQ:  # DQ32 is a contiguous (T, Hq, D) fp32 buffer
            desc_dq = tl.make_tensor_descriptor(DQ32, shape=[T, n_heads * GROUP * D], strides=[stride_dq32t, 1],
                                                block_shape=[BLOCK_M, BLOCK_D])
        else:
            desc_dq = DQ32
        s = _seq_of(CU, n_seqs, t0)
        t = t0
        while t < t_end:
            cs = tl.load(CU + s)
            ce = tl.load(CU + s + 1)
            seg_hi = tl.minimum(ce, t_end)
            L = ce - cs
            k_loc = rows - cs
            klo = t - cs
            if CAUSAL:
                a0 = (klo // BLOCK_M) * BLOCK_M  # query blocks that straddle the diagonal of the segment's keys
                a1 = a0 + ((seg_hi - cs - a0 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
            else:
                a0 = 0
                a1 = 0
            cs64 = cs.to(tl.int64)
            kvalid = (rows >= t) & (rows < seg_hi)
            if ATOMIC_DQ:
                # the tile's rows of other sequences would reach this sequence's dQ through dS^T K (and dO V^T):
                # zeros there, not their values (an inf or NaN times a zero probability is NaN)
                k_s = _load_rows(K + hk64 * stride_kh, r64, stride_kt, offs_d, kvalid, D, BLOCK_D, True)
                v_s = _load_rows(V + hk64 * stride_vh, r64, stride_vt, offs_d, kvalid, D, BLOCK_D, True)
            else:
                k_s = k
                v_s = v
            # TMA: whole query blocks below L in a loop without query masks, the last partial block apart
            a_full = a1 + tl.maximum(L - a1, 0) // BLOCK_M * BLOCK_M if TMA else a1
            dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for g in range(GROUP):
                h = hk * GROUP + g
                hb = h.to(tl.int64) if WIDE_HEADS else h  # for the bases; h itself (int32) for TMA coordinates
                q_base = Q + cs64 * stride_qt + hb * stride_qh
                do_base = DO + cs64 * stride_dot + hb * stride_doh
                lse_base = LSE + hb * T + cs64
                delta_base = DELTA + hb * T + cs64
                ld_base = LD + (hb * T + cs64) * 2
                dq_base = DQ32 + cs64 * stride_dq32t + hb * stride_dq32h
                desc_q = _seq_desc(q_base, L, stride_qt, D, BLOCK_M, BLOCK_D, TMA)
                desc_do = _seq_desc(do_base, L, stride_dot, D, BLOCK_M, BLOCK_D, TMA)
                if CAUSAL:
                    dk, dv = _dkdv_inner(dk, dv, k_s, v_s, q_base, do_base, lse_base, delta_base, ld_base, stride_qt,
                                         stride_dot, k_loc, a0, a1, L, qk_scale, offs_d, dq_base, stride_dq32t, kvalid,
                                         sm_scale, desc_q, desc_do, desc_dq, cs, h * D, D, BLOCK_D, BLOCK_N, BLOCK_M, 2,
                                         DOT_PREC, ATOMIC_DQ, TMA, TMA_DQ)
                if TMA:
                    dk, dv = _dkdv_inner(dk, dv, k_s, v_s, q_base, do_base, lse_base, delta_base, ld_base, stride_qt,
                                         stride_dot, k_loc, a1, a_full, L, qk_scale, offs_d, dq_base, stride_dq32t,
                                         kvalid, sm_scale, desc_q, desc_do, desc_dq, cs, h * D, D, BLOCK_D, BLOCK_N,
                                         BLOCK_M, 0, DOT_PREC, ATOMIC_DQ, TMA, TMA_DQ)
                dk, dv = _dkdv_inner(dk, dv, k_s, v_s, q_base, do_base, lse_base, delta_base, ld_base, stride_qt,
                                     stride_dot, k_loc, a_full, L, L, qk_scale, offs_d, dq_base, stride_dq32t, kvalid,
                                     sm_scale, desc_q, desc_do, desc_dq, cs, h * D, D, BLOCK_D, BLOCK_N, BLOCK_M, 1,
                                     DOT_PREC, ATOMIC_DQ, TMA, TMA_DQ)
            seg = kvalid[:, None] & (offs_d[None, :] < D)
            tl.store(DK + hk64 * stride_dkh + r64[:, None] * stride_dkt + offs_d[None, :],
                     (dk * sm_scale).to(DK.dtype.element_ty), mask=seg)
            tl.store(DV + hk64 * stride_dvh + r64[:, None] * stride_dvt + offs_d[None, :],
                     dv.to(DV.dtype.element_ty), mask=seg)
            t = seg_hi
            s += 1

    # ---------------------------------------------------------------- launchers

    # Block sizes. Interpreter: small fixed tiles (tl.dot needs >= 16) with unequal query/key tiles so that
    # the tests cross tile and segment boundaries in every kernel. GPU: autotuned over short lists, keyed on
    # the head dim, causality, GQA group and a log2 bucket of T (never on per-batch lengths).
    # The lists keep configs that compile for sm_90 (triton 3.6, bf16, D=128, causal) without or with few
    # register spills, from `python -m bench.bench_varlen_attention --aot` (ptxas -v, no GPU needed):
    #   fwd  128x64 w8 s3: 208 regs, 0 spill | 128x64 w8 s2: 225, 0 | 128x128 w8 s2: 255, 4 B | 64x32 w4 s3: 239, 0
    #        (128x64 w4 s3 spills 2.6 kB: dropped)
    #   dq   128x32 w8 s3: 197, 0 | 128x64 w8 s2: 231, 0 | 64x32 w4 s3: 240, 0 (128x32 w4 s3 spills: dropped)
    #   dkdv (BLOCK_N x BLOCK_M) 64x32 w8 s2: 255, 56 B | 32x32 w4 s2: 234, 0 (mma.sync) | 128x32 w8 s2: 176 B
    #        (64x64 and 128x64 spill 0.4-1.4 kB: dropped)
    # The dK/dV kernel is the register-bound one (two fp32 (BLOCK_N, D) accumulators plus K and V kept for the
    # whole program). First GPU run (H100, 2026-11-26, 16k and 64k tokens, D=128, GQA 4, causal): autotune chose
    # fwd 128x64 w8 s3, dq 128x64 w8 s2 and dkdv 128x32 w8 s2 (its 176 B of spills beat the 56 B config), for
    # 400 / 283 TFLOP/s fwd / fwd+bwd at 16k. Candidates added after it (ptxas, same setting):
    #   fwd  128x64 w8 s4: 255 regs, 0 spill | 128x32 w8 s3: 206, 0
    #   dq   128x64 w8 s3: 254, 0 | 64x64 w8 s3: 229, 0
    #   dkdv 128x16 w8 s2: 24 B | 128x64 w8 s1: 208 B (the bigger key tile at one stage)
    # The atomic-dQ variant (dkdv+dq) spills more: 0 B (32x32 w4) to 376 B (128x64 s1).
    # dK/dV spill stores in B now (ptxas sm_90a, bf16, D=128, causal, GQA 4), split pointer / TMA / atomic-dQ /
    # atomic-dQ TMA: 64x32 w8 s2 12 / 0 / 120 / 152 | 32x32 w4 s2 0 / 0 / 56 / 32 | 128x32 w8 s2 128 / 220 / 316 /
    # 352 | 128x16 w8 s2 0 / 84 / 104 / 224 | 128x64 w8 s1 196 / 164 / 536 / 424. The hot query loop itself barely
    # spills; the LSE and delta vectors cost the most (fewer elements than threads: Triton loads them in the MMA
    # layout, one cp.async per element and thread), so the 64x32, 128x32 and 128x16 tiles load them as one 8-byte
    # (lse, delta) pair per query (LD), which cut their spills from 48 / 20 / 172 / 176, 152 / 268 / 452 / 424 and
    # 0 / 160 / 256 / 292; the other two tiles spilled more with pairs.
    # The bench records every config's time per autotune key (row field "autotune"): prune with it.
    _INTERP = {"fwd": (32, 16), "dq": (32, 16), "dkdv": (32, 16)}  # (rows of the program's tile, inner step)

    def _cfgs(pairs):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in pairs]

    def _cfgs_kv(pairs):
        return [triton.Config({"BLOCK_N": n, "BLOCK_M": m}, num_warps=w, num_stages=st) for n, m, w, st in pairs]

    # (the last two from the second session of 2026-11-26: pointer / TMA loads, 128x128 w8 s3 255 regs 44 B spill /
    # 225 regs 0 B, 225-230 kB shared memory; 64x64 w4 s3 255 / 202 regs, no spills)
    FWD_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 32, 4, 3), (128, 64, 8, 4),
                   (128, 32, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
    DQ_CONFIGS = [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3)]
    DKDV_CONFIGS = [(64, 32, 8, 2), (32, 32, 4, 2), (128, 32, 8, 2), (128, 16, 8, 2), (128, 64, 8, 1)]
    _KEY = ["D", "CAUSAL", "GROUP", "t_bucket"]
    # TUNED[(kernel, tma)]: one autotuner per kernel and load mode (tma: R4B_VARLEN_LOADS=tma, the blocks the inner
    # loops walk loaded through TMA; a mode is not part of the key, so each tunes on its own). "dkdv+dq": the dK/dV
    # kernel that also adds dQ with atomics (R4B_VARLEN_BWD=atomic): DQ32 is zeroed before every config's timing
    # run and before the real launch.
    _KERNELS = {"fwd": (_fwd_kernel, _cfgs(FWD_CONFIGS), {}), "dq": (_bwd_dq_kernel, _cfgs(DQ_CONFIGS), {}),
                "dkdv": (_bwd_dkdv_kernel, _cfgs_kv(DKDV_CONFIGS), {}),
                "dkdv+dq": (_bwd_dkdv_kernel, _cfgs_kv(DKDV_CONFIGS), {"reset_to_zero": ["DQ32"]})}
    TUNED = {(name, tma): triton.autotune(cfgs, key=_KEY, **kw)(kern)
             for name, (kern, cfgs, kw) in _KERNELS.items() for tma in (False, True)}
    # fp32 on a GPU (the IEEE reference mode: products as fp32 FMAs, not tensor cores) runs one fixed config per
    # kernel, never the lists above: their fp32 compiles take 4-60 s each (sm_90 ptxas on 2 cores: the forward's
    # eight 220 s, 128x128 alone 60 s) and three of them do not fit in shared memory, so autotuning a first fp32
    # call stalled for minutes (H200, 2026-11-27: a GPU test cut at its step's 170 s limit). These 8-warp tiles
    # compile in 4-7 s each with at most 56 B of spills (fp32, D=128, causal; 4 warps spill 1.4-42 kB).
    F32_CONFIGS = {"fwd": (64, 32, 8, 2), "dq": (64, 32, 8, 2), "dkdv": (32, 32, 8, 2), "dkdv+dq": (32, 32, 8, 2)}
    TUNED_F32 = {name: triton.autotune((_cfgs_kv if name.startswith("dkdv") else _cfgs)([F32_CONFIGS[name]]),
                                       key=_KEY, **kw)(kern)
                 for name, (kern, _, kw) in _KERNELS.items()}

    def _tuned(name: str, tma: bool, dtype: torch.dtype):
        """The launcher of one kernel: the autotuned one, or for fp32 (never TMA) the fixed fp32 config."""
        return TUNED_F32[name] if dtype == torch.float32 else TUNED[name, tma]

    def _meta(q: Tensor, k: Tensor, causal: bool) -> dict:
        D = q.shape[2]
        return dict(
            GROUP=q.shape[1] // k.shape[1], D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=causal,
            DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        )

    def _loads_mode() -> str:
        mode = os.environ.get(ENV_LOADS, "pointer")
        if mode not in ("pointer", "tma"):
            raise ValueError(f"${ENV_LOADS} must be 'pointer' or 'tma', got {mode!r}")
        return mode

    def _tma_ok(*tensors: Tensor, block_d: int) -> bool:
        """Whether R4B_VARLEN_LOADS=tma is set and TMA can address every (T, H, D) tensor given: a head dim that
        is the (power-of-two) block, a unit last stride, and a row stride, head stride and base address that are
        multiples of 16 bytes (the kernels build one descriptor per sequence and head on the device). A tensor
        with a row stride 0 (a broadcast gradient) takes the pointer loads too, and so do fp32 tensors on a GPU
        (sm_90 ptxas: the fp32 TMA forward spills 32 kB; fp32 is the IEEE reference mode, not the fast path)."""
        if _loads_mode() != "tma":
            return False
        if any(t.device.type == "cuda" and t.element_size() > 2 for t in tensors):
            return False
        return all(t.shape[2] == block_d and t.stride(2) == 1 and t.stride(0) > 0
                   and (t.stride(0) * t.element_size()) % 16 == 0 and (t.stride(1) * t.element_size()) % 16 == 0
                   and t.data_ptr() % 16 == 0 for t in tensors)

    def _descriptor_scratch(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda")

    def _ensure_allocator() -> None:
        """Device-built TMA descriptors need triton's global scratch allocator. Set one (torch's caching
        allocator) when none is set: it is a context variable, so autograd's backward thread needs its own."""
        from triton.runtime import _allocation

        if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            triton.set_allocator(_descriptor_scratch)

    def _interpreter_reduces() -> bool:
        """Whether this triton's interpreter runs descriptor reductions (triton 3.6's does not; the tests add it)."""
        from triton.runtime.interpreter import InterpreterBuilder

        return hasattr(InterpreterBuilder, "create_descriptor_reduce")

    def _fwd_mode() -> str:
        mode = os.environ.get(ENV_FWD, "triton")
        if mode not in FWD_MODES:
            raise ValueError(f"${ENV_FWD} must be one of {', '.join(repr(m) for m in FWD_MODES)}, got {mode!r}")
        return mode

    def _ws_module(interp: bool, q: Tensor, k: Tensor, v: Tensor, env: str = ENV_FWD):
        """r4b.kernels._varlen_ws when its kernel can run these tensors; None when it cannot run these inputs (dtype,
        head dim, alignment: the Triton kernel takes them, as with the Gluon ones); a RuntimeError naming the
        variable where no input could run (a GPU other than Hopper)."""
        from . import _varlen_ws

        why = _varlen_ws.device_problem(q.device, interp, "fwd" if env == ENV_FWD else "bwd")
        if why is not None:
            raise RuntimeError(f"${env}=ws cannot run here: {why}")
        if _varlen_ws.input_problem(q, k, v, interp) is not None:
            return None
        if not interp:
            _ensure_allocator()
        return _varlen_ws

    def _fwd(q, k, v, cu, scale, causal):
        T, Hq, _ = q.shape
        n = cu.numel() - 1
        o = torch.empty_like(q, memory_format=torch.contiguous_format)  # (T, Hq, D)
        lse = torch.empty((Hq, T), dtype=torch.float32, device=q.device)  # log2 units
        meta = _meta(q, k, causal)
        interp = _dispatch.triton_interpret() or q.device.type != "cuda"
        mode = _fwd_mode()
        gluon = _gluon_module(ENV_FWD, interp, q, k, v) if mode in ("gluon", "gluon-ws") else None
        if gluon is not None and mode == "gluon-ws":
            from . import _varlen_gluon_ws

            why = _varlen_gluon_ws.device_problem(q.device, "fwd")
            if why is not None:
                raise RuntimeError(f"${ENV_FWD}=gluon-ws cannot run here: {why}")
            _varlen_gluon_ws.forward(q, k, v, o, lse, cu, scale * _LOG2E, causal)
            return o, lse
        if gluon is not None:
            gluon.forward(q, k, v, o, lse, cu, scale * _LOG2E, causal)
            return o, lse
        ws = _ws_module(interp, q, k, v) if mode == "ws" else None
        if ws is not None:
            ws.forward(q, k, v, o, lse, cu, scale * _LOG2E, causal, interp)
            return o, lse
        tma = _tma_ok(k, v, block_d=meta["BLOCK_D"])
        args = (q, k, v, o, lse, cu, T, n, T.bit_length(), Hq, scale * _LOG2E,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1))
        if interp:
            bm, bn = _INTERP["fwd"]
            _fwd_kernel[(triton.cdiv(T, bm) * Hq,)](*args, BLOCK_M=bm, BLOCK_N=bn, TMA=tma, **meta)
        else:
            if tma:
                _ensure_allocator()
            _tuned("fwd", tma, q.dtype)[lambda m: (triton.cdiv(T, m["BLOCK_M"]) * Hq,)](*args, TMA=tma, **meta)
        return o, lse

    def _bwd_mode() -> str:
        """$R4B_VARLEN_BWD, or "auto" when it is not set (see ENV_BWD)."""
        mode = os.environ.get(ENV_BWD)
        if mode is None:
            return "auto"
        if mode not in BWD_MODES:
            raise ValueError(f"${ENV_BWD} must be one of {', '.join(repr(m) for m in BWD_MODES)}, got {mode!r}")
        return mode

    def _gluon_module(env: str, interp: bool, *tensors: Tensor):
        """r4b.kernels._varlen_gluon when it can run these tensors; None when it cannot run these inputs (dtype,
        head dim, alignment: the Triton kernels take them, as R4B_VARLEN_LOADS=tma leaves what TMA cannot address
        to pointer loads, so a model can set the variable once although e.g. its vision tower's head dim is 72);
        a RuntimeError naming the variable where no input could run (not a Hopper GPU, the interpreter)."""
        name = os.environ.get(env, "gluon")
        if interp:
            raise RuntimeError(f"${env}={name} needs a Hopper GPU: the Triton interpreter cannot run Gluon")
        try:
            from . import _varlen_gluon
        except ImportError as ex:  # a triton without Gluon's Hopper API (r4b pins 3.6)
            raise RuntimeError(f"${env}={name} needs triton's Gluon with its Hopper API (triton 3.6): {ex}") from ex

        why = _varlen_gluon.device_problem(tensors[0].device)
        if why is not None:
            raise RuntimeError(f"${env}={name} cannot run here: {why}")
        if _varlen_gluon.input_problem(*tensors) is not None:
            return None
        _ensure_allocator()
        return _varlen_gluon

    def _default_gluon_dkdv(interp: bool, q: Tensor, k: Tensor, v: Tensor):
        """The Gluon module when the unset $R4B_VARLEN_BWD takes the Gluon dK/dV kernel for this call (a Hopper
        GPU, a triton with Gluon's Hopper API, bf16, a head dim its backward is verified at, TMA-addressable
        q / k / v), else None: no error, the Triton kernels run."""
        if interp or q.device.type != "cuda" or q.dtype != torch.bfloat16:
            return None
        try:  # the checks of the variable asked for by name, whose refusals here mean "not this call"
            gluon = _gluon_module(ENV_BWD, interp, q, k, v)
        except RuntimeError:
            return None
        return None if gluon is None or gluon.bwd_problem(q) is not None else gluon

    def _bwd(do, q, k, v, o, lse, cu, scale, causal):
        T, Hq, D = q.shape
        Hkv = k.shape[1]
        n = cu.numel() - 1
        meta = _meta(q, k, causal)
        interp = _dispatch.triton_interpret() or q.device.type != "cuda"
        mode = _bwd_mode()
        if mode == "auto":
            gluon = _default_gluon_dkdv(interp, q, k, v)
            mode = "split" if gluon is None else "gluon-dkdv"
        else:
            takes = mode in ("gluon", "gluon-dkdv") or mode in _GLUON_WS_BWD
            gluon = _gluon_module(ENV_BWD, interp, q, k, v) if takes else None
        if gluon is not None and gluon.bwd_problem(q) is not None:
            gluon = None  # a head dim the Gluon backward is not verified at: the Triton kernels
        ws_dq, ws_dkdv = _GLUON_WS_BWD.get(mode, (False, False)) if gluon is not None else (False, False)
        if ws_dq or ws_dkdv:  # refused by name before any kernel runs
            from . import _varlen_gluon_ws

            for kernel, used in (("dq", ws_dq), ("dkdv", ws_dkdv)):
                why = _varlen_gluon_ws.device_problem(q.device, kernel) if used else None
                if why is not None:
                    raise RuntimeError(f"${ENV_BWD}={mode} cannot run here: {why}")
        if gluon is not None and gluon.input_problem(do) is not None:
            # a broadcast or odd-strided (or misaligned) gradient: a fresh copy has 16-byte rows and base for TMA
            do = do.clone(memory_format=torch.contiguous_format)
        ws = _ws_module(interp, q, k, v, env=ENV_BWD) if mode == "ws" else None
        if ws is not None and q.stride(1) != D:
            ws = None  # q's head stride is not D (the dK/dV kernel's (L, Hq * D) view): the Triton kernels
        if ws is not None and ws.padded_problem(T, Hq, n) is not None:
            ws = None  # the padded LSE / delta rows would pass int32 offsets: the Triton kernels
        if ws is not None and (ws.input_problem(do, k, v, interp) is not None
                               or ws.bwd_input_problem(q, do) is not None):
            do = do.clone(memory_format=torch.contiguous_format)  # broadcast, odd-strided or misaligned
        delta = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
        ld = torch.empty((Hq, T, 2), dtype=torch.float32, device=q.device)  # (lse, delta) per row
        bm = 16 if interp else 64
        _bwd_delta_kernel[(triton.cdiv(T, bm), Hq)](
            o, do, lse, delta, ld, T, o.stride(0), o.stride(1), do.stride(0), do.stride(1), D=D,
            BLOCK_D=meta["BLOCK_D"], BLOCK_M=bm)
        if gluon is not None and mode == "gluon":
            return gluon.backward(do, q, k, v, lse, delta, cu, scale, causal)
        if ws_dq:  # the warp-specialised dQ kernel, with its dK/dV kernel or the Gluon one
            dq = torch.empty_like(q, memory_format=torch.contiguous_format)
            _varlen_gluon_ws.backward_dq(do, q, k, v, lse, delta, dq, cu, scale, causal)
            if ws_dkdv:
                dk, dv = _varlen_gluon_ws.backward_dkdv(do, q, k, v, lse, delta, cu, scale, causal)
            else:
                _, dk, dv = gluon.backward(do, q, k, v, lse, delta, cu, scale, causal, with_dq=False)
            return dq, dk, dv
        if ws is not None:
            return ws.backward(do, q, k, v, lse, delta, cu, scale, causal, interp)
        atomic = mode == "atomic"
        # the Triton dQ kernel with the Gluon dK/dV kernel (gluon-dkdv) or the warp-specialised one (gluon-ws-dkdv)
        gluon_dkdv = gluon if mode in ("gluon-dkdv", "gluon-ws-dkdv") else None
        # dk / dv of the Triton dK/dV kernel (the Gluon one allocates its own)
        dk = None if gluon_dkdv is not None else torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = None if gluon_dkdv is not None else torch.empty_like(v, memory_format=torch.contiguous_format)
        # atomic: dQ accumulates in fp32 (T, Hq, D) rows that the dK/dV kernel adds into; split: an unused stand-in
        dq32 = torch.zeros((T, Hq, D), dtype=torch.float32, device=q.device) if atomic else delta
        dq32_strides = (dq32.stride(0), dq32.stride(1)) if atomic else (0, 0)
        strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
                   do.stride(1))
        # TMA (R4B_VARLEN_LOADS=tma): the dK/dV kernel walks Q / dO blocks, the dQ kernel K / V blocks; the
        # atomic backward also adds each dQ tile with one bulk reduction into DQ32
        tma_qdo = _tma_ok(q, do, block_d=meta["BLOCK_D"])
        tma_dq = atomic and tma_qdo and (not interp or _interpreter_reduces())
        tma_kv = not atomic and _tma_ok(k, v, block_d=meta["BLOCK_D"])  # the dQ kernel's, split backward only
        if (tma_qdo or tma_kv) and not interp:
            _ensure_allocator()
        if gluon_dkdv is None:
            kv_args = (q, k, v, do, lse, delta, ld, dk, dv, dq32, cu, T, n, T.bit_length(), Hkv, scale * _LOG2E,
                       scale, *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *dq32_strides)
            kv_meta = dict(ATOMIC_DQ=atomic, TMA=tma_qdo, TMA_DQ=tma_dq, WIDE_HEADS=_wide_heads(q, k, v, do), **meta)
        if not atomic:
            dq = torch.empty_like(q, memory_format=torch.contiguous_format)
            dq_args = (q, k, v, do, lse, delta, dq, cu, T, n, T.bit_length(), Hq, scale * _LOG2E, scale, *strides,
                       dq.stride(0), dq.stride(1))
        if interp:
            if not atomic:
                bm, bn = _INTERP["dq"]
                _bwd_dq_kernel[(triton.cdiv(T, bm) * Hq,)](*dq_args, BLOCK_M=bm, BLOCK_N=bn, TMA=tma_kv, **meta)
            if gluon_dkdv is None:
                bn, bm = _INTERP["dkdv"]
                _bwd_dkdv_kernel[(triton.cdiv(T, bn) * Hkv,)](*kv_args, BLOCK_N=bn, BLOCK_M=bm, **kv_meta)
        else:
            if not atomic:
                _tuned("dq", tma_kv, q.dtype)[lambda m: (triton.cdiv(T, m["BLOCK_M"]) * Hq,)](*dq_args, TMA=tma_kv,
                                                                                            **meta)
            if gluon_dkdv is None:
                _tuned("dkdv+dq" if atomic else "dkdv", tma_qdo, q.dtype)[
                    lambda m: (triton.cdiv(T, m["BLOCK_N"]) * Hkv,)](*kv_args, **kv_meta)
        if gluon_dkdv is not None and ws_dkdv:
            dk, dv = _varlen_gluon_ws.backward_dkdv(do, q, k, v, lse, delta, cu, scale, causal)
        elif gluon_dkdv is not None:
            _, dk, dv = gluon_dkdv.backward(do, q, k, v, lse, delta, cu, scale, causal, with_dq=False)
        if atomic:
            dq = dq32.to(q.dtype)
        return dq, dk, dv

    class _VarlenAttentionFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, cu, scale: float, causal: bool):
            q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
            o, lse = _fwd(q, k, v, cu, scale, causal)
            ctx.save_for_backward(q, k, v, o, lse, cu)
            ctx.scale, ctx.causal = scale, causal
            return o

        @staticmethod
        @torch.autograd.function.once_differentiable  # a double backward raises instead of dropping its terms
        def backward(ctx, do):
            q, k, v, o, lse, cu = ctx.saved_tensors
            dq, dk, dv = _bwd(_int32_rows_grad(_unit_last(do)), q, k, v, o, lse, cu, ctx.scale, ctx.causal)
            return dq, dk, dv, None, None, None

    # under torch.compile (r4b/kernels/_compile.py): the same forward and backward as custom ops
    @_compile.custom_op("varlen_attention")
    def _varlen_attention_op(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float,
                             causal: bool) -> tuple[Tensor, Tensor]:
        return _compile.contiguous(*_fwd(_unit_last(q), _unit_last(k), _unit_last(v), cu, scale, causal))

    @_varlen_attention_op.register_fake
    def _(q, k, v, cu, scale, causal):
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)

    @_compile.custom_op("varlen_attention_backward")
    def _varlen_attention_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cu: Tensor,
                                      scale: float, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
        return _compile.contiguous(*_bwd(_int32_rows_grad(_unit_last(do)), _unit_last(q), _unit_last(k),
                                         _unit_last(v), o, lse, cu, scale, causal))

    @_varlen_attention_backward_op.register_fake
    def _(do, q, k, v, o, lse, cu, scale, causal):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _varlen_attention_setup(ctx, inputs, output):
        q, k, v, cu, ctx.scale, ctx.causal = inputs
        ctx.save_for_backward(q, k, v, *output, cu)
        ctx.mark_non_differentiable(output[1])

    def _varlen_attention_grads(ctx, do, _dlse):
        dq, dk, dv = _varlen_attention_backward_op(do, *ctx.saved_tensors, ctx.scale, ctx.causal)
        return dq, dk, dv, None, None, None

    _varlen_attention_op.register_autograd(_varlen_attention_grads, setup_context=_varlen_attention_setup)


def _wide_heads(*tensors: Tensor) -> bool:
    """Whether a per-head base of the dK/dV kernel (head index times head stride of q, k, v or dO, or the (Hq, T, 2)
    LSE/delta pairs' head * T * 2) can pass 2^31 elements: it then computes them in int64."""
    q = tensors[0]
    return max((t.shape[1] - 1) * abs(t.stride(1)) for t in tensors) >= 2**31 or 2 * q.shape[1] * q.shape[0] >= 2**31


def _int32_rows_ok(t: Tensor) -> bool:
    return t.shape[0] * abs(t.stride(0)) < 2**31


def _check_int32_offsets(q: Tensor, k: Tensor, v: Tensor) -> None:
    """The Triton kernels index rows inside a sequence in int32 (int64 costs the dK/dV kernel register spills;
    per-head and per-sequence bases are int64): refuse a packed batch where that could overflow, rather than read
    wrong rows. Call it on the tensors the kernels get (after _unit_last)."""
    if not all(_int32_rows_ok(t) for t in (q, k, v)):
        row_stride = max(abs(t.stride(0)) for t in (q, k, v))
        raise ValueError(f"varlen_attention (triton): T * row stride must be < 2^31 for int32 in-sequence offsets, "
                         f"got T={q.shape[0]} and row stride {row_stride}; split the packed batch")


def _int32_rows_grad(do: Tensor) -> Tensor:
    """The output's gradient as the backward kernels can index it: itself, or, when T * its row stride could
    overflow their int32 in-sequence offsets (a gradient narrowed from a wider buffer), a head-major copy (row
    stride D: T * D fits whenever q passed _check_int32_offsets with rows of at least D elements)."""
    if _int32_rows_ok(do):
        return do
    do = do.transpose(0, 1).contiguous().transpose(0, 1)
    if not _int32_rows_ok(do):
        raise ValueError(f"varlen_attention (triton) backward: T * D must be < 2^31 for int32 in-sequence offsets, "
                         f"got the output gradient's shape {tuple(do.shape)}; split the packed batch")
    return do


@_dispatch.on_tensor_device
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

    q: (T, Hq, D), k and v: (T, Hkv, D) with Hq % Hkv == 0, one float dtype and device, any strides with a
    unit last stride; cu_seqlens: (n+1,) int32, 0 .. T; max_seqlen: the longest sequence (checked against
    cu_seqlens on the CPU; the Triton kernels do not need it). Returns (T, Hq, D) in q.dtype, contiguous.
    softmax_scale defaults to 1/sqrt(D). The Triton path computes in fp32 (bf16/fp16 tensor-core products
    with fp32 accumulation on a GPU), saves the log-sum-exp and has its own backward.
    backend: None (auto: triton > torch), "triton", "torch", or the opt-in peers "flash_attn" (GPU, fp16/bf16;
    max_seqlen sizes its grid, so it must be right) and "xformers" (GPU; reads cu_seqlens on the host);
    R4B_ATTN_BACKEND sets it for every call that passes None (r4b/kernels/_dispatch.py).
    """
    _checks.tensor("q", q, dtypes=_checks.FLOAT_DTYPES, ndim=3)
    _checks.tensor("k", k, dtypes=(q.dtype,), ndim=3)
    _checks.tensor("v", v, dtypes=(q.dtype,), ndim=3)
    _checks.same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k and v must be (T, Hkv, D) matching q (T, Hq, D), got q={tuple(q.shape)} "
                         f"k={tuple(k.shape)} v={tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[2] == 0:
        raise ValueError(f"k must have at least one head and the head dim must be >= 1, got q={tuple(q.shape)} "
                         f"k={tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"the number of query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    _checks.cu_seqlens("cu_seqlens", cu_seqlens, total=q.shape[0])
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if cu_seqlens.device.type == "cpu" and cu_seqlens.numel() > 1 and not _compile.compiling():
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if longest > max_seqlen:
            raise ValueError(f"max_seqlen must be >= the longest sequence in cu_seqlens ({longest}), got {max_seqlen}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    if not scale > 0:
        raise ValueError(f"softmax_scale must be > 0, got {softmax_scale}")
    chosen = _dispatch.pick(OP, backend, q)
    if chosen == "torch":
        return varlen_attention_ref(q, k, v, cu_seqlens, causal, softmax_scale)
    if q.shape[0] == 0 or q.shape[1] == 0:
        return _empty_out(q, k, v)
    cu = cu_seqlens.contiguous()
    # the kernels' layouts (unit last stride) before the offset guard: a copy's row stride is what they index
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if chosen == "triton":
        _check_int32_offsets(q, k, v)
        if _compile.compiling():
            return _varlen_attention_op(q, k, v, cu, float(scale), bool(causal))[0]
        return _VarlenAttentionFn.apply(q, k, v, cu, float(scale), bool(causal))
    if chosen == "flash_attn":
        return _flash_attn(q, k, v, cu, int(max_seqlen), float(scale), bool(causal))
    return _xformers(q, k, v, cu, float(scale), bool(causal))
