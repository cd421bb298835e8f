"""Hopper (sm_90) forward of varlen attention in Gluon with explicit warp specialisation (FlashAttention-3's
layout): a producer warp issues every TMA load, two consumer warpgroups of 64 query rows each run the products
and the softmax, so loads, tensor-core products and softmax of the two warpgroups overlap without any
``thread_barrier`` holding the warpgroups together (the plain Gluon forward, _varlen_gluon._fwd_kernel, is one
instruction stream that waits for its own loads and refills).

A program is (tile of 128 packed query rows, query head), tile-major with the heavy causal tiles first, as in the
other forwards. Partitions (``gl.warp_specialize``):

* consumer 0 (the default partition, 4 warps): rows [t0, t0 + 64) of the tile;
* consumer 1 (a worker, 4 warps): rows [t0 + 64, t0 + 128);
* producer (a worker, 1 warp): the two Q halves (one TMA load each, ``q_bar``), then the key / value blocks of
  every segment of the tile (the rows of one sequence inside it), in order, into a STAGES-deep ring.

Ring protocol, per slot s: ``full[s]`` (count 1: the producer's expect-tx arrival; completes when K and V have
landed) and ``empty[s]`` (count 2: one arrival per consumer once nothing it issued reads the slot). Block i of the
program (over all its segments, in order) uses slot i % STAGES, phase (i // STAGES) & 1: consumers wait ``full``
on that parity, the producer waits ``empty`` on the other one (a fresh barrier's previous phase counts as done,
so the first round does not wait). Every block is waited for and released by both consumers, also by a consumer
that has no rows in the block's segment or for which a causal block lies wholly above its rows: those only wait
and release (no products), so each consumer does the work of its own rows only.

The producer rebuilds the K / V descriptors for each segment in place, after the last segment's loads landed (it
waits for their full barriers too). Inside a consumer the products are pipelined as in the plain Gluon forward:
S_j = Q K_j^T and O += P_{j-1} V_{j-1} are in flight together, the softmax of S_j runs while P_{j-1} V_{j-1} does.

Opt-in (``R4B_VARLEN_FWD=gluon-ws``) and refused on GPUs until its GPU tests pass (``GPU_BROKEN``; the variable
R4B_VARLEN_WS_UNVERIFIED=1 runs it for that check): it has never run on a GPU. Without one, the suite compiles it
for sm_90, checks the compiled partitions and a float64 transcription of its logic
(tests/test_varlen_gluon_ws.py).
Supported: CUDA capability 9.x, bf16 / fp16, head dim 64 or 128, TMA-addressable (T, H, D) tensors.

The backward's dQ kernel (``_bwd_dq_kernel``, ``R4B_VARLEN_BWD=gluon-ws`` with _varlen_gluon's dK/dV kernel; session
13) has the same layout: the producer loads each half's Q and dO, then the same key / value ring; each consumer
computes S and dP per block, dS = P (dP - delta) from the forward's LSE, and dQ += dS K, releasing the block once
that product retired. Refused on GPUs like the forward (``GPU_BROKEN_DQ``) until its GPU tests pass, checked the
same ways without one.

A dK/dV kernel of the same layout (commit 5ec2822: two consumer warpgroups of 64 keys with dV and dK in flight
across steps, the producer streaming the GQA group's Q / dO blocks) was withdrawn the same day: ptxas serialised
every one of its products (C7512, "insufficient register resources") under the 232 / 232 / 40 register split, so
it could only be slower than _varlen_gluon's; this forward's compile is checked for that warning.
"""
from __future__ import annotations

import os

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ._varlen_gluon import HEAD_DIMS, _segment_keys, _seq_kv_descs, _softmax_block
from .varlen_attention import _seq_of, _tile_of

BLOCK_M = gl.constexpr(128)  # query rows of a program: two consumers of HALF rows
HALF = gl.constexpr(64)
# (BLOCK_N, STAGES): shared memory = Q (2 x 64 x D) + STAGES x (K + V) blocks of BLOCK_N x D. BLOCK_N 128 is
# FlashAttention-3's key block at D 128: S = Q K^T takes both operands from shared memory, and at 64 keys a
# 64 x 64 x 16 product reads as many operand bytes (4 kB) as the tensor cores take cycles to multiply them at
# 128 B of shared memory a cycle, where 64 x 128 x 16 reads 6 kB for twice the work. sm_90 ptxas (D 128): the
# 128-key configs spill 112 B causal / 32 B not, all of it in the segment's prologue and epilogue (the SASS's key
# loops hold no local memory access: the report's loop_local); 128 x 3 stages uses 229.7 of the 227 kB (232448 B).
CONFIGS = [(64, 3), (64, 4), (64, 2), (128, 2), (128, 3)]
# the dQ kernel's (BLOCK_N, STAGES): shared memory = Q and dO (2 x 2 x 64 x D) + STAGES x (K + V) blocks
DQ_CONFIGS = [(64, 3), (64, 2), (64, 4), (128, 2)]
# registers per thread of each worker partition: consumer 1 as many as consumer 0 may take, the producer few
CONSUMER_REGS = gl.constexpr(232)
PRODUCER_REGS = gl.constexpr(40)

GPU_BROKEN = ("the warp-specialised Gluon forward (R4B_VARLEN_FWD=gluon-ws) has never run on a GPU: refused until "
              "its GPU tests pass (R4B_VARLEN_WS_UNVERIFIED=1 runs it for that check)")
GPU_BROKEN_DQ = ("the warp-specialised Gluon dQ kernel (R4B_VARLEN_BWD=gluon-ws) has never run on a GPU: refused "
                 "until its GPU tests pass (R4B_VARLEN_WS_UNVERIFIED=1 runs it for that check)")
ENV_UNVERIFIED = "R4B_VARLEN_WS_UNVERIFIED"


@gluon.jit
def _segment(CU, seq, t, t_end, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """(first row cs, length L, end seg_hi, free_hi, key blocks nb) of the segment of sequence seq from row t in a
    tile ending at t_end: the producer and both consumers walk the same segments and blocks."""
    cs = gl.load(CU + seq)
    ce = gl.load(CU + seq + 1)
    seg_hi = gl.minimum(ce, t_end)
    L = ce - cs
    kv_hi, free_hi = _segment_keys(t, cs, seg_hi, L, CAUSAL)
    return cs, L, seg_hi, free_hi, (kv_hi + BLOCK_N - 1) // BLOCK_N


@gluon.jit
def _producer(Q, K, V, CU, T, n_seqs, t0, h, hk, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
              q_smem, k_smem, v_smem, full, empty, q_bar, D: gl.constexpr, BLOCK_N: gl.constexpr,
              CAUSAL: gl.constexpr, STAGES: gl.constexpr):
    dtype: gl.constexpr = Q.dtype.element_ty
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    # the tile's two halves of query rows (rows >= T read as zeros)
    q_desc = tma.make_tensor_descriptor(Q + h * stride_qh, shape=[T, D], strides=[stride_qt, 1],
                                        block_shape=[HALF, D], layout=smem_layout)
    for c in gl.static_range(2):
        # none for a half wholly past T (the last tile's second half): its consumer has no rows and does not wait
        has_rows = t0 + c * HALF < T
        mbarrier.expect(q_bar.index(c), HALF * D * dtype.primitive_bitwidth // 8, pred=has_rows)
        tma.async_copy_global_to_shared(q_desc, [t0 + c * HALF, 0], q_bar.index(c), q_smem.index(c), pred=has_rows)
    _produce_kv(K, V, CU, T, n_seqs, t0, hk, stride_kt, stride_kh, stride_vt, stride_vh, k_smem, v_smem, full, empty,
                D, BLOCK_N, CAUSAL, STAGES)


@gluon.jit
def _produce_kv(K, V, CU, T, n_seqs, t0, hk, stride_kt, stride_kh, stride_vt, stride_vh, k_smem, v_smem, full, empty,
                D: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr):
    """The producer's ring: the key / value blocks of every segment of the tile from t0, in order (block i of the
    program into slot i % STAGES once both consumers released its previous use)."""
    dtype: gl.constexpr = K.dtype.element_ty
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    t_end = gl.minimum(t0 + BLOCK_M, T)
    seq = _seq_of(CU, n_seqs, t0)
    t = t0
    it = 0
    while t < t_end:
        cs, L, seg_hi, free_hi, nb = _segment(CU, seq, t, t_end, BLOCK_N, CAUSAL)
        if nb > 0:
            # the descriptors are rebuilt in place (each is one tensormap in the program's global scratch): the
            # loads that read the last segment's must have landed first. Only the newest STAGES blocks can be in
            # flight (block i - STAGES's slot was refilled only after both consumers released it), and no newer
            # load is in their slots, so each full barrier's phase is still that block's.
            for i in range(gl.maximum(it - STAGES, 0), it):
                mbarrier.wait(full.index(i % STAGES), (i // STAGES) & 1)
            k_desc, v_desc = _seq_kv_descs(K, V, cs, L, hk, stride_kt, stride_kh, stride_vt, stride_vh, BLOCK_N, D,
                                           smem_layout)
            for j in range(nb):
                slot = it % STAGES
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                bar = full.index(slot)
                mbarrier.expect(bar, 2 * BLOCK_N * D * dtype.primitive_bitwidth // 8)
                tma.async_copy_global_to_shared(k_desc, [j * BLOCK_N, 0], bar, k_smem.index(slot))
                tma.async_copy_global_to_shared(v_desc, [j * BLOCK_N, 0], bar, v_smem.index(slot))
                it += 1
        t = seg_hi
        seq += 1


@gluon.jit
def _consumer(C: gl.constexpr, Out, LSE, CU, T, n_seqs, t0, h, qk_scale, stride_ot, stride_oh,
              q_smem, k_smem, v_smem, full, empty, q_bar, D: gl.constexpr, BLOCK_N: gl.constexpr,
              CAUSAL: gl.constexpr, STAGES: gl.constexpr):
    dtype: gl.constexpr = Out.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)

    r0 = t0 + C * HALF  # this consumer's first row
    q = q_smem.index(C)
    rows_s = r0 + gl.arange(0, HALF, layout=row_s)
    rows_o = r0 + gl.arange(0, HALF, layout=row_o)
    offs_n = gl.arange(0, BLOCK_N, layout=col_s)
    offs_d = gl.arange(0, D, layout=col_o)
    zero_s = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)
    t_end = gl.minimum(t0 + BLOCK_M, T)
    my_end = gl.minimum(r0 + HALF, T)  # this consumer's rows are [r0, my_end) (none when r0 >= T)
    seq = _seq_of(CU, n_seqs, t0)
    t = t0
    it = 0
    mbarrier.wait(q_bar.index(C), 0, pred=r0 < T)  # (no rows at all: no Q load, and nothing computed below)
    while t < t_end:
        cs, L, seg_hi, free_hi, nb = _segment(CU, seq, t, t_end, BLOCK_N, CAUSAL)  # nb: blocks the producer loads
        lo, hi, mine, free = _my_blocks(t, cs, seg_hi, free_hi, nb, r0, my_end, BLOCK_N, CAUSAL)
        if mine > 0:
            q_loc = rows_s - cs
            if CAUSAL:
                lim = q_loc + 1
            else:
                lim = q_loc * 0 + L
            slot = it % STAGES
            mbarrier.wait(full.index(slot), (it // STAGES) & 1)
            sc = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False)
            m_i = gl.full([HALF], float("-inf"), gl.float32, row_s)
            if BLOCK_N > free:
                p, m_i = _softmax_block(sc, m_i, offs_n, lim, qk_scale, True)
            else:
                p, m_i = _softmax_block(sc, m_i, offs_n, lim, qk_scale, False)
            l_i = gl.sum(p, 1)
            p16 = gl.convert_layout(p.to(dtype), p_layout)
            acc = gl.zeros([HALF, D], gl.float32, o_layout)
            for j in range(1, mine):
                cur = it + j
                slot = cur % STAGES
                prev = (cur - 1) % STAGES
                mbarrier.wait(full.index(slot), (cur // STAGES) & 1)
                sc = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                acc = warpgroup_mma(p16, v_smem.index(prev), acc, is_async=True)
                sc = warpgroup_mma_wait(num_outstanding=1, deps=(sc, ))
                if j * BLOCK_N + BLOCK_N > free:
                    p, m_new = _softmax_block(sc, m_i, j * BLOCK_N + offs_n, lim, qk_scale, True)
                else:
                    p, m_new = _softmax_block(sc, m_i, j * BLOCK_N + offs_n, lim, qk_scale, False)
                alpha = gl.exp2(m_i - m_new)
                l_i = l_i * alpha + gl.sum(p, 1)
                p_next = gl.convert_layout(p.to(dtype), p_layout)
                acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
                # block j - 1 is read by nothing this consumer issued any more: release its slot
                mbarrier.arrive(empty.index(prev))
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
                m_i = m_new
                p16 = p_next
            last = (it + mine - 1) % STAGES
            acc = warpgroup_mma(p16, v_smem.index(last), acc, is_async=True)
            acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
            mbarrier.arrive(empty.index(last))
            l_o = gl.convert_layout(l_i, row_o)
            out = acc / gl.expand_dims(l_o, 1)
            seg_o = (rows_o >= lo) & (rows_o < hi)
            r64 = rows_o.to(gl.int64)
            o_ptrs = Out + h * stride_oh + gl.expand_dims(r64 * stride_ot, 1) + gl.expand_dims(offs_d, 0)
            gl.store(o_ptrs, out.to(dtype), mask=gl.expand_dims(seg_o, 1) & gl.expand_dims(offs_d < D, 0))
            seg_s = (rows_s >= lo) & (rows_s < hi)
            gl.store(LSE + h * T + rows_s.to(gl.int64), m_i + gl.log2(l_i), mask=seg_s)
        _release_rest(full, empty, it, mine, nb, STAGES)
        it += nb
        t = seg_hi
        seq += 1


@gluon.jit
def _my_blocks(t, cs, seg_hi, free_hi, nb, r0, my_end, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """(lo, hi, mine, free) of a consumer with rows [r0, my_end) in the segment [t, seg_hi) of the sequence from cs
    (nb blocks loaded): its rows of the segment [lo, hi), the blocks it computes [0, mine) (those its last row
    sees; none without rows), and free: blocks ending at or below it are unmasked for every row of the consumer."""
    lo = gl.maximum(t, r0)
    hi = gl.minimum(seg_hi, my_end)
    if CAUSAL:
        mine = gl.minimum((hi - cs + BLOCK_N - 1) // BLOCK_N, nb)
        free = lo - cs
    else:
        mine = nb
        free = free_hi
    mine = gl.where(hi > lo, mine, 0)
    return lo, hi, mine, free


@gluon.jit
def _release_rest(full, empty, it, mine, nb, STAGES: gl.constexpr):
    """The segment's blocks [mine, nb) a consumer does not compute (none of its rows, or causal blocks above its
    last row): wait for each and release it, so that the ring's phases stay the producer's."""
    for j in range(mine, nb):
        cur = it + j
        slot = cur % STAGES
        mbarrier.wait(full.index(slot), (cur // STAGES) & 1)
        mbarrier.arrive(empty.index(slot))


@gluon.jit(do_not_specialize=["T", "n_seqs", "t_bucket"])
def _fwd_kernel(Q, K, V, Out, LSE, CU, T, n_seqs, t_bucket, n_heads, qk_scale,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                GROUP: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                STAGES: gl.constexpr):
    dtype: gl.constexpr = Q.dtype.element_ty
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    t0, h = _tile_of(n_heads, T, BLOCK_M, CAUSAL)
    hk = h // GROUP
    q_smem = gl.allocate_shared_memory(dtype, [2, HALF, D], smem_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], smem_layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    for c in gl.static_range(2):
        mbarrier.init(q_bar.index(c), count=1)
    fence_async_shared()
    gl.warp_specialize([
        (_consumer, (0, Out, LSE, CU, T, n_seqs, t0, h, qk_scale, stride_ot, stride_oh, q_smem, k_smem, v_smem,
                     full, empty, q_bar, D, BLOCK_N, CAUSAL, STAGES)),
        (_consumer, (1, Out, LSE, CU, T, n_seqs, t0, h, qk_scale, stride_ot, stride_oh, q_smem, k_smem, v_smem,
                     full, empty, q_bar, D, BLOCK_N, CAUSAL, STAGES)),
        (_producer, (Q, K, V, CU, T, n_seqs, t0, h, hk, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                     stride_vh, q_smem, k_smem, v_smem, full, empty, q_bar, D, BLOCK_N, CAUSAL, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(full.index(i))
        mbarrier.invalidate(empty.index(i))
    for c in gl.static_range(2):
        mbarrier.invalidate(q_bar.index(c))


# ---------------------------------------------------------------- dQ (the backward's query side)


@gluon.jit
def _dq_producer(Q, K, V, DO, CU, T, n_seqs, t0, h, hk, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                 stride_vh, stride_dot, stride_doh, q_smem, do_smem, k_smem, v_smem, full, empty, q_bar,
                 D: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr):
    """The forward's producer with dO: each half of the tile's query rows and of its output gradient (one barrier
    per half), then the same key / value ring."""
    dtype: gl.constexpr = Q.dtype.element_ty
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    q_desc = tma.make_tensor_descriptor(Q + h * stride_qh, shape=[T, D], strides=[stride_qt, 1],
                                        block_shape=[HALF, D], layout=smem_layout)
    do_desc = tma.make_tensor_descriptor(DO + h * stride_doh, shape=[T, D], strides=[stride_dot, 1],
                                         block_shape=[HALF, D], layout=smem_layout)
    for c in gl.static_range(2):
        has_rows = t0 + c * HALF < T
        mbarrier.expect(q_bar.index(c), 2 * HALF * D * dtype.primitive_bitwidth // 8, pred=has_rows)
        tma.async_copy_global_to_shared(q_desc, [t0 + c * HALF, 0], q_bar.index(c), q_smem.index(c), pred=has_rows)
        tma.async_copy_global_to_shared(do_desc, [t0 + c * HALF, 0], q_bar.index(c), do_smem.index(c),
                                        pred=has_rows)
    _produce_kv(K, V, CU, T, n_seqs, t0, hk, stride_kt, stride_kh, stride_vt, stride_vh, k_smem, v_smem, full, empty,
                D, BLOCK_N, CAUSAL, STAGES)


@gluon.jit
def _dq_consumer(C: gl.constexpr, DQ, LSE, DELTA, CU, T, n_seqs, t0, h, qk_scale, sm_scale, stride_dqt, stride_dqh,
                 q_smem, do_smem, k_smem, v_smem, full, empty, q_bar, D: gl.constexpr, BLOCK_N: gl.constexpr,
                 CAUSAL: gl.constexpr, STAGES: gl.constexpr):
    """dQ of this consumer's 64 query rows: per key block S = Q K^T and dP = dO V^T (in flight together; dP
    during P's exponentials), P = exp2(S scale - lse), dS = P (dP - delta), dQ += dS K, and the block's slot is
    released once that product retired. The dS K product is waited for inside the block: kept in flight into the
    next block's S and dP (as _varlen_gluon._bwd_dq_kernel does), sm_90 ptxas serialised every product of the
    kernel (C7512, insufficient registers under the 232-register split); the other consumer's products fill the
    tensor cores meanwhile."""
    dtype: gl.constexpr = DQ.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)

    r0 = t0 + C * HALF
    q = q_smem.index(C)
    do = do_smem.index(C)
    rows_s = r0 + gl.arange(0, HALF, layout=row_s)
    rows_o = r0 + gl.arange(0, HALF, layout=row_o)
    offs_n = gl.arange(0, BLOCK_N, layout=col_s)
    offs_d = gl.arange(0, D, layout=col_o)
    zero_s = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)
    lse = gl.load(LSE + h * T + rows_s, mask=rows_s < T, other=0.0)
    delta = gl.load(DELTA + h * T + rows_s, mask=rows_s < T, other=0.0)
    t_end = gl.minimum(t0 + BLOCK_M, T)
    my_end = gl.minimum(r0 + HALF, T)
    seq = _seq_of(CU, n_seqs, t0)
    t = t0
    it = 0
    mbarrier.wait(q_bar.index(C), 0, pred=r0 < T)
    while t < t_end:
        cs, L, seg_hi, free_hi, nb = _segment(CU, seq, t, t_end, BLOCK_N, CAUSAL)
        lo, hi, mine, free = _my_blocks(t, cs, seg_hi, free_hi, nb, r0, my_end, BLOCK_N, CAUSAL)
        if mine > 0:
            q_loc = rows_s - cs
            if CAUSAL:
                lim = q_loc + 1
            else:
                lim = q_loc * 0 + L
            dq = gl.zeros([HALF, D], gl.float32, o_layout)
            for j in range(mine):
                cur = it + j
                slot = cur % STAGES
                mbarrier.wait(full.index(slot), (cur // STAGES) & 1)
                s = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                dp = warpgroup_mma(do, v_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))  # S_j is done; dP_j may still run
                p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 1))
                if j * BLOCK_N + BLOCK_N > free:
                    kn = j * BLOCK_N + offs_n
                    p = gl.where(gl.expand_dims(kn, 0) < gl.expand_dims(lim, 1), p, 0.0)
                dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp, ))
                ds = p * (dp - gl.expand_dims(delta, 1))
                ds16 = gl.convert_layout(ds.to(dtype), a_layout)
                dq = warpgroup_mma(ds16, k_smem.index(slot), dq, is_async=True)
                dq, ds16 = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ds16))
                mbarrier.arrive(empty.index(slot))  # block j is read by nothing this consumer issued any more
            seg_o = (rows_o >= lo) & (rows_o < hi)
            r64 = gl.expand_dims(rows_o.to(gl.int64), 1)
            gl.store(DQ + h * stride_dqh + r64 * stride_dqt + gl.expand_dims(offs_d, 0), (dq * sm_scale).to(dtype),
                     mask=gl.expand_dims(seg_o, 1) & gl.expand_dims(offs_d < D, 0))
        _release_rest(full, empty, it, mine, nb, STAGES)
        it += nb
        t = seg_hi
        seq += 1


@gluon.jit(do_not_specialize=["T", "n_seqs", "t_bucket"])
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, T, n_seqs, t_bucket, n_heads, qk_scale, sm_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dqt, stride_dqh,
                   GROUP: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                   STAGES: gl.constexpr):
    """dQ of a tile of 128 packed query rows and one query head, in the forward's layout (two consumers of 64 rows,
    a producer warp): lse (log2 units) and delta = rowsum(dO * O) are (Hq, T) fp32."""
    dtype: gl.constexpr = Q.dtype.element_ty
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    t0, h = _tile_of(n_heads, T, BLOCK_M, CAUSAL)
    hk = h // GROUP
    q_smem = gl.allocate_shared_memory(dtype, [2, HALF, D], smem_layout)
    do_smem = gl.allocate_shared_memory(dtype, [2, HALF, D], smem_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], smem_layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    for c in gl.static_range(2):
        mbarrier.init(q_bar.index(c), count=1)
    fence_async_shared()
    gl.warp_specialize([
        (_dq_consumer, (0, DQ, LSE, DELTA, CU, T, n_seqs, t0, h, qk_scale, sm_scale, stride_dqt, stride_dqh, q_smem,
                        do_smem, k_smem, v_smem, full, empty, q_bar, D, BLOCK_N, CAUSAL, STAGES)),
        (_dq_consumer, (1, DQ, LSE, DELTA, CU, T, n_seqs, t0, h, qk_scale, sm_scale, stride_dqt, stride_dqh, q_smem,
                        do_smem, k_smem, v_smem, full, empty, q_bar, D, BLOCK_N, CAUSAL, STAGES)),
        (_dq_producer, (Q, K, V, DO, CU, T, n_seqs, t0, h, hk, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                        stride_vh, stride_dot, stride_doh, q_smem, do_smem, k_smem, v_smem, full, empty, q_bar, D,
                        BLOCK_N, CAUSAL, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(full.index(i))
        mbarrier.invalidate(empty.index(i))
    for c in gl.static_range(2):
        mbarrier.invalidate(q_bar.index(c))


def _configs(cfgs=None):
    return [triton.Config({"BLOCK_N": n, "STAGES": st}, num_warps=4) for n, st in (cfgs or CONFIGS)]


TUNED = triton.autotune(_configs(), key=["D", "CAUSAL", "GROUP", "t_bucket"])(_fwd_kernel)
TUNED_DQ = triton.autotune(_configs(DQ_CONFIGS), key=["D", "CAUSAL", "GROUP", "t_bucket"])(_bwd_dq_kernel)


def device_problem(device, kernel: str = "fwd") -> str | None:
    """Why the forward (kernel "fwd") or the dQ kernel ("dq") cannot run on ``device`` (not a Hopper GPU; any GPU
    while its GPU_BROKEN / GPU_BROKEN_DQ is set, unless $R4B_VARLEN_WS_UNVERIFIED is 1), or None."""
    from ._varlen_gluon import device_problem as hopper_problem

    why = hopper_problem(device)
    if why is not None:
        return why
    broken = {"fwd": GPU_BROKEN, "dq": GPU_BROKEN_DQ}[kernel]
    return None if broken is None or os.environ.get(ENV_UNVERIFIED) == "1" else broken


def forward(q, k, v, o, lse, cu, scale_log2: float, causal: bool, config=None) -> None:
    """Write o (T, Hq, D) and lse (Hq, T, log2 units) of varlen attention. config: one of CONFIGS, or None to
    let the autotuner pick. The caller checks :func:`device_problem` and _varlen_gluon.input_problem and sets
    triton's scratch allocator (the kernel builds TMA descriptors on the device)."""
    T, Hq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not one of {HEAD_DIMS}")
    args = (q, k, v, o, lse, cu, T, cu.numel() - 1, T.bit_length(), Hq, scale_log2,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1))
    meta = dict(GROUP=Hq // k.shape[1], D=D, CAUSAL=causal)
    grid = (triton.cdiv(T, BLOCK_M) * Hq, )
    if config is None:
        TUNED[grid](*args, **meta)
    else:
        n, stages = config
        _fwd_kernel[grid](*args, BLOCK_N=n, STAGES=stages, num_warps=4, **meta)


def backward_dq(do, q, k, v, lse, delta, dq, cu, scale: float, causal: bool, config=None) -> None:
    """Write dq (T, Hq, D) of varlen attention from the forward's lse (log2 units) and delta = rowsum(dO * O), both
    (Hq, T) fp32. config: one of DQ_CONFIGS, or None to let the autotuner pick. The caller checks
    :func:`device_problem` and _varlen_gluon.input_problem for q, k, v and do, and sets triton's scratch allocator."""
    T, Hq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not one of {HEAD_DIMS}")
    args = (q, k, v, do, lse, delta, dq, cu, T, cu.numel() - 1, T.bit_length(), Hq, scale * 1.4426950408889634, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dq.stride(0), dq.stride(1))
    meta = dict(GROUP=Hq // k.shape[1], D=D, CAUSAL=causal)
    grid = (triton.cdiv(T, BLOCK_M) * Hq, )
    if config is None:
        TUNED_DQ[grid](*args, **meta)
    else:
        n, stages = config
        _bwd_dq_kernel[grid](*args, BLOCK_N=n, STAGES=stages, num_warps=4, **meta)
