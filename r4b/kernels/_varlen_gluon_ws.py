"""Hopper (sm_90) forward, dQ and dK/dV kernels of varlen attention in Gluon with explicit warp specialisation
(FlashAttention-3's layout). The forward: a producer warp issues every TMA load, two consumer warpgroups of 64 query
rows each run the products and the softmax, so loads, tensor-core products and softmax of the two warpgroups overlap
without any ``thread_barrier`` holding the warpgroups together (the plain Gluon forward, _varlen_gluon._fwd_kernel,
is one instruction stream that waits for its own loads and refills).

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

With ``PINGPONG`` (the configs of ``PINGPONG_CONFIGS``, autotuned in place of the others with
R4B_VARLEN_WS_PINGPONG=1) the consumers take turns to
issue their products, FlashAttention-3's inter-warpgroup schedule: consumer 0 issues a block's products, passes the
turn, and runs its softmax while consumer 1's products run (``_turn``; one turn per ring block, released-only
blocks included, so both take as many). Without it the two consumers, waiting on the same ring, tend to run their
products and their softmax at the same times.

The producer rebuilds the K / V descriptors for each segment in place, after the last segment's loads landed (it
waits for their full barriers too). Inside a consumer the products are pipelined as in the plain Gluon forward:
S_j = Q K_j^T and O += P_{j-1} V_{j-1} are in flight together, the softmax of S_j runs while P_{j-1} V_{j-1} does.

Opt-in (``R4B_VARLEN_FWD=gluon-ws``) and refused on GPUs until its GPU tests pass (``GPU_BROKEN``; the variable
R4B_VARLEN_WS_UNVERIFIED=1 runs it for that check): it has never run on a GPU. Without one, the suite compiles it
for sm_90, checks the compiled partitions and a float64 transcription of its logic
(tests/test_varlen_gluon_ws.py).
Supported: CUDA capability 9.x, bf16 / fp16, head dim 64 or 128, TMA-addressable (T, H, D) tensors.

The backward (session 13; ``R4B_VARLEN_BWD=gluon-ws``: both kernels below, ``gluon-ws-dq``: the dQ kernel with
_varlen_gluon's dK/dV kernel, ``gluon-ws-dkdv``: the Triton dQ kernel with the dK/dV kernel below). The dQ kernel
(``_bwd_dq_kernel``) has the forward's layout: the producer loads each half's Q and dO, then the same key / value
ring; each consumer computes S and dP per block, dS = P (dP - delta) from the forward's LSE, and dQ += dS K,
releasing the block once that product retired. The dK/dV kernel (``_bwd_dkdv_kernel``, described above its code) is
its mirror over key tiles. Each is refused on GPUs like the forward (``GPU_BROKEN_DQ``, ``GPU_BROKEN_DKDV``) until
its GPU tests pass, and checked the same ways without one. In both, a block's products are waited for inside the
block: accumulators kept in flight into the next block (as the plain kernels keep them) made ptxas serialise every
product of the kernel (C7512, insufficient registers under the 232-register split).

A dK/dV kernel of the same layout (commit 5ec2822: two consumer warpgroups of 64 keys with dV and dK in flight
across steps, the producer streaming the GQA group's Q / dO blocks) was withdrawn the same day: ptxas serialised
every one of its products (C7512, "insufficient register resources") under the 232 / 232 / 40 register split, so
it could only be slower than _varlen_gluon's; this forward's compile is checked for that warning.
"""
from __future__ import annotations

import os

import torch
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

_LOG2E = 1.4426950408889634
BLOCK_M = gl.constexpr(128)  # query rows of a program: two consumers of HALF rows
HALF = gl.constexpr(64)
# (BLOCK_N, STAGES): shared memory = Q (2 x 64 x D) + STAGES x (K + V) blocks of BLOCK_N x D. BLOCK_N 128 is
# FlashAttention-3's key block at D 128: S = Q K^T takes both operands from shared memory, and at 64 keys a
# 64 x 64 x 16 product reads as many operand bytes (4 kB) as the tensor cores take cycles to multiply them at
# 128 B of shared memory a cycle, where 64 x 128 x 16 reads 6 kB for twice the work. sm_90 ptxas (D 128): the
# 128-key configs spill 112 B causal / 32 B not, all of it in the segment's prologue and epilogue (the SASS's key
# loops hold no local memory access: the report's loop_local); 128 x 3 stages uses 229.7 of the 227 kB (232448 B).
CONFIGS = [(64, 3), (64, 4), (64, 2), (128, 2), (128, 3)]
# the forward's configs that run with PINGPONG (the consumers take turns to issue their products, FlashAttention-3's
# inter-warpgroup schedule; _turn): (BLOCK_N, STAGES, True). Autotuned (alone, so that they are what runs and can be
# timed against CONFIGS) only with R4B_VARLEN_WS_PINGPONG=1 until their own GPU tests pass: a wrong one can neither
# be picked by default nor fail the plain configs' verdict
PINGPONG_CONFIGS = [(64, 3, True), (128, 2, True)]
ENV_PINGPONG = "R4B_VARLEN_WS_PINGPONG"
# the dQ kernel's (BLOCK_N, STAGES): shared memory = Q and dO (2 x 2 x 64 x D) + STAGES x (K + V) blocks
DQ_CONFIGS = [(64, 3), (64, 2), (64, 4), (128, 2)]
# registers per thread of each worker partition: consumer 1 as many as consumer 0 may take, the producer few
CONSUMER_REGS = gl.constexpr(232)
PRODUCER_REGS = gl.constexpr(40)

GPU_BROKEN = ("the warp-specialised Gluon forward (R4B_VARLEN_FWD=gluon-ws) has never run on a GPU: refused until "
              "its GPU tests pass (R4B_VARLEN_WS_UNVERIFIED=1 runs it for that check)")
GPU_BROKEN_DQ = ("the warp-specialised Gluon dQ kernel (R4B_VARLEN_BWD=gluon-ws / gluon-ws-dq) has never run on a "
                 "GPU: refused until its GPU tests pass (R4B_VARLEN_WS_UNVERIFIED=1 runs it for that check)")
GPU_BROKEN_DKDV = ("the warp-specialised Gluon dK/dV kernel (R4B_VARLEN_BWD=gluon-ws / gluon-ws-dkdv) has never run "
                   "on a GPU: refused until its GPU tests pass (R4B_VARLEN_WS_UNVERIFIED=1 runs it for that check)")
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
              q_smem, k_smem, v_smem, full, empty, q_bar, turn, D: gl.constexpr, BLOCK_N: gl.constexpr,
              CAUSAL: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
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
            if PINGPONG:  # this consumer's turn to issue products (_turn), passed on once they are issued
                _turn(turn, C, it)
                sc = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                mbarrier.arrive(turn.index(1 - C))
                sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc, ))
            else:
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
                if PINGPONG:
                    _turn(turn, C, cur)
                sc = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                acc = warpgroup_mma(p16, v_smem.index(prev), acc, is_async=True)
                if PINGPONG:
                    mbarrier.arrive(turn.index(1 - C))
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
        _release_rest(full, empty, it, mine, nb, STAGES, turn, C, PINGPONG)
        it += nb
        t = seg_hi
        seq += 1


@gluon.jit
def _turn(turn, C: gl.constexpr, block):
    """Wait for this consumer's turn to issue the products of ring block ``block`` (PINGPONG, FlashAttention-3's
    inter-warpgroup schedule): the consumers take turns, consumer 0 first, one turn per block of the ring, every
    block (computed or only released) of every segment, so both take the same number. Consumer 0's turn at block b
    needs consumer 1's b arrivals on turn[0], consumer 1's needs consumer 0's b + 1 on turn[1]; the two can be at
    most one turn apart, so the parity of the completed phases decides."""
    mbarrier.wait(turn.index(C), (block & 1) ^ (1 - C))


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
def _release_rest(full, empty, it, mine, nb, STAGES: gl.constexpr, turn, C: gl.constexpr, PINGPONG: gl.constexpr):
    """The segment's blocks [mine, nb) a consumer does not compute (none of its rows, or causal blocks above its
    last row): wait for each and release it, so that the ring's phases stay the producer's; with PINGPONG (the
    forward's) take and pass on the block's turn too."""
    for j in range(mine, nb):
        cur = it + j
        slot = cur % STAGES
        mbarrier.wait(full.index(slot), (cur // STAGES) & 1)
        if PINGPONG:
            _turn(turn, C, cur)
            mbarrier.arrive(turn.index(1 - C))
        mbarrier.arrive(empty.index(slot))


@gluon.jit(do_not_specialize=["T", "n_seqs", "t_bucket"])
def _fwd_kernel(Q, K, V, Out, LSE, CU, T, n_seqs, t_bucket, n_heads, qk_scale,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                GROUP: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                STAGES: gl.constexpr, PINGPONG: gl.constexpr):
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
    if PINGPONG:  # the consumers' turns (_turn): one arrival each (the other consumer's)
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for c in gl.static_range(2):
            mbarrier.init(turn.index(c), count=1)
    else:
        turn = q_bar  # unused
    fence_async_shared()
    gl.warp_specialize([
        (_consumer, (0, Out, LSE, CU, T, n_seqs, t0, h, qk_scale, stride_ot, stride_oh, q_smem, k_smem, v_smem,
                     full, empty, q_bar, turn, D, BLOCK_N, CAUSAL, STAGES, PINGPONG)),
        (_consumer, (1, Out, LSE, CU, T, n_seqs, t0, h, qk_scale, stride_ot, stride_oh, q_smem, k_smem, v_smem,
                     full, empty, q_bar, turn, D, BLOCK_N, CAUSAL, STAGES, PINGPONG)),
        (_producer, (Q, K, V, CU, T, n_seqs, t0, h, hk, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                     stride_vh, q_smem, k_smem, v_smem, full, empty, q_bar, D, BLOCK_N, CAUSAL, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(full.index(i))
        mbarrier.invalidate(empty.index(i))
    for c in gl.static_range(2):
        mbarrier.invalidate(q_bar.index(c))
        if PINGPONG:
            mbarrier.invalidate(turn.index(c))


# ---------------------------------------------------------------- dQ (the backward's query side)


@gluon.jit
def _ring_barriers(STAGES: gl.constexpr):
    """The backward kernels' mbarriers, initialised: the ring's full (count 1: the producer's expect-tx) and empty
    (count 2: one release per consumer) per slot, and one per consumer half for the tile's own blocks (count 1)."""
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    half_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    for c in gl.static_range(2):
        mbarrier.init(half_bar.index(c), count=1)
    fence_async_shared()
    return full, empty, half_bar


@gluon.jit
def _load_halves(A, B, stride_a, stride_b, T, t0, half_bar, a_smem, b_smem, D: gl.constexpr):
    """The TMA loads of the tile's two halves of rows of A and B ((T, D) rows of stride stride_a / stride_b from the
    given bases), both halves c into a_smem / b_smem slot c on half_bar c (rows >= T read as zeros; none for a half
    wholly past T: its consumer has no rows and does not wait)."""
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    a_desc = tma.make_tensor_descriptor(A, shape=[T, D], strides=[stride_a, 1], block_shape=[HALF, D],
                                        layout=smem_layout)
    b_desc = tma.make_tensor_descriptor(B, shape=[T, D], strides=[stride_b, 1], block_shape=[HALF, D],
                                        layout=smem_layout)
    for c in gl.static_range(2):
        has_rows = t0 + c * HALF < T
        mbarrier.expect(half_bar.index(c), 2 * HALF * D * A.dtype.element_ty.primitive_bitwidth // 8, pred=has_rows)
        tma.async_copy_global_to_shared(a_desc, [t0 + c * HALF, 0], half_bar.index(c), a_smem.index(c), pred=has_rows)
        tma.async_copy_global_to_shared(b_desc, [t0 + c * HALF, 0], half_bar.index(c), b_smem.index(c), pred=has_rows)


@gluon.jit
def _invalidate_barriers(full, empty, half_bar, STAGES: gl.constexpr):
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(full.index(i))
        mbarrier.invalidate(empty.index(i))
    for c in gl.static_range(2):
        mbarrier.invalidate(half_bar.index(c))


@gluon.jit
def _dq_producer(Q, K, V, DO, CU, T, n_seqs, t0, h, hk, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                 stride_vh, stride_dot, stride_doh, q_smem, do_smem, k_smem, v_smem, full, empty, q_bar,
                 D: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr):
    """The forward's producer with dO: each half of the tile's query rows and of its output gradient (one barrier
    per half), then the same key / value ring."""
    _load_halves(Q + h * stride_qh, DO + h * stride_doh, stride_qt, stride_dot, T, t0, q_bar, q_smem, do_smem, D)
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
        _release_rest(full, empty, it, mine, nb, STAGES, full, 0, False)
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
    full, empty, q_bar = _ring_barriers(STAGES)
    gl.warp_specialize([
        (_dq_consumer, (0, DQ, LSE, DELTA, CU, T, n_seqs, t0, h, qk_scale, sm_scale, stride_dqt, stride_dqh, q_smem,
                        do_smem, k_smem, v_smem, full, empty, q_bar, D, BLOCK_N, CAUSAL, STAGES)),
        (_dq_consumer, (1, DQ, LSE, DELTA, CU, T, n_seqs, t0, h, qk_scale, sm_scale, stride_dqt, stride_dqh, q_smem,
                        do_smem, k_smem, v_smem, full, empty, q_bar, D, BLOCK_N, CAUSAL, STAGES)),
        (_dq_producer, (Q, K, V, DO, CU, T, n_seqs, t0, h, hk, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                        stride_vh, stride_dot, stride_doh, q_smem, do_smem, k_smem, v_smem, full, empty, q_bar, D,
                        BLOCK_N, CAUSAL, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    _invalidate_barriers(full, empty, q_bar, STAGES)


# ---------------------------------------------------------------- dK, dV (the backward's key side)
# The warp-specialised form of _varlen_gluon._bwd_dkdv_kernel (whose 8 warps are two warpgroups of 64 keys held in
# step by the thread_barrier before each refill): a program is (tile of 128 packed key rows, KV head); the producer
# warp loads the tile's K / V halves once, then for every segment (the tile's keys of one sequence) the Q and dO
# blocks of the GROUP query heads, head-major, into the ring; consumer c (4 warps) owns keys [t0 + 64 c, +64) and
# runs the transposed products S^T = K Q^T, dP^T = V dO^T, dV += P^T dO (in flight during dS), dK += dS^T Q. A
# consumer with no keys in a segment only waits for and releases its blocks. First written with dV and dK in flight
# into the next step, as the plain kernel keeps them (commit 5ec2822): ptxas then serialised every product (C7512),
# and it was withdrawn; waited for inside each step (session 13), it compiles with its products asynchronous.
BLOCK_M_KV = gl.constexpr(128)  # key rows of a dK/dV program: two consumers of HALF rows
# (BLOCK_M query rows per step, STAGES): shared memory = K and V (2 x 2 x 64 x D) + STAGES x (Q + dO) blocks
DKDV_CONFIGS = [(16, 3), (16, 4), (32, 3), (32, 2)]


@gluon.jit
def _dkdv_segment(CU, seq, t, t_end, BLOCK_M: gl.constexpr, GROUP: gl.constexpr, CAUSAL: gl.constexpr):
    """(first row cs, length L, end seg_hi, first query block q_start, query blocks nq, steps total) of the segment
    of sequence seq from key row t in a key tile ending at t_end: the producer and both consumers walk these."""
    cs = gl.load(CU + seq)
    ce = gl.load(CU + seq + 1)
    seg_hi = gl.minimum(ce, t_end)
    L = ce - cs
    if CAUSAL:
        q_start = ((t - cs) // BLOCK_M) * BLOCK_M  # queries below the segment's first key see none of its keys
    else:
        q_start = (t - cs) * 0
    nq = (L - q_start + BLOCK_M - 1) // BLOCK_M
    return cs, L, seg_hi, q_start, nq, nq * GROUP


@gluon.jit
def _dkdv_producer(Q, K, V, DO, CU, T, n_seqs, t0, hk, stride_qt, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, k_smem, v_smem, q_smem, do_smem, full, empty, kv_bar, GROUP: gl.constexpr,
                   D: gl.constexpr, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr):
    dtype: gl.constexpr = Q.dtype.element_ty
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    _load_halves(K + hk * stride_kh, V + hk * stride_vh, stride_kt, stride_vt, T, t0, kv_bar, k_smem, v_smem, D)
    t_end = gl.minimum(t0 + BLOCK_M_KV, T)
    seq = _seq_of(CU, n_seqs, t0)
    t = t0
    it = 0
    while t < t_end:
        cs, L, seg_hi, q_start, nq, total = _dkdv_segment(CU, seq, t, t_end, BLOCK_M, GROUP, CAUSAL)
        if total > 0:
            # the Q / dO descriptors are rebuilt in place: the loads that read the last segment's landed first
            for i in range(gl.maximum(it - STAGES, 0), it):
                mbarrier.wait(full.index(i % STAGES), (i // STAGES) & 1)
            q_desc = tma.make_tensor_descriptor(Q + cs.to(gl.int64) * stride_qt + hk * GROUP * D,
                                                shape=[L, GROUP * D], strides=[stride_qt, 1],
                                                block_shape=[BLOCK_M, D], layout=smem_layout)
            do_desc = tma.make_tensor_descriptor(DO + cs.to(gl.int64) * stride_dot + hk * GROUP * D,
                                                 shape=[L, GROUP * D], strides=[stride_dot, 1],
                                                 block_shape=[BLOCK_M, D], layout=smem_layout)
            for step in range(total):
                g = step // nq
                slot = it % STAGES
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                bar = full.index(slot)
                mbarrier.expect(bar, 2 * BLOCK_M * D * dtype.primitive_bitwidth // 8)
                row = q_start + (step - g * nq) * BLOCK_M
                tma.async_copy_global_to_shared(q_desc, [row, g * D], bar, q_smem.index(slot))
                tma.async_copy_global_to_shared(do_desc, [row, g * D], bar, do_smem.index(slot))
                it += 1
        t = seg_hi
        seq += 1


@gluon.jit
def _dkdv_consumer(C: gl.constexpr, LSE, DELTA, DK, DV, CU, T, n_seqs, t0, hk, qk_scale, sm_scale, stride_dkt,
                   stride_dkh, stride_dvt, stride_dvh, k_smem, v_smem, q_smem, do_smem, full, empty, kv_bar,
                   GROUP: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr,
                   STAGES: gl.constexpr):
    dtype: gl.constexpr = DK.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)

    r0 = t0 + C * HALF  # this consumer's first key row
    k_c = k_smem.index(C)
    v_c = v_smem.index(C)
    rows_s = r0 + gl.arange(0, HALF, layout=row_s)
    rows_o = r0 + gl.arange(0, HALF, layout=row_o)
    offs_m = gl.arange(0, BLOCK_M, layout=col_s)
    offs_d = gl.arange(0, D, layout=col_o)
    zero_s = gl.zeros([HALF, BLOCK_M], gl.float32, s_layout)
    t_end = gl.minimum(t0 + BLOCK_M_KV, T)
    my_end = gl.minimum(r0 + HALF, T)
    seq = _seq_of(CU, n_seqs, t0)
    t = t0
    it = 0
    mbarrier.wait(kv_bar.index(C), 0, pred=r0 < T)  # (no keys at all: no K / V load, nothing computed below)
    while t < t_end:
        cs, L, seg_hi, q_start, nq, total = _dkdv_segment(CU, seq, t, t_end, BLOCK_M, GROUP, CAUSAL)
        lo = gl.maximum(t, r0)  # this consumer's keys of the segment: [lo, hi)
        hi = gl.minimum(seg_hi, my_end)
        if hi > lo:
            k_loc = rows_s - cs
            k_hi = hi - cs
            dk = gl.zeros([HALF, D], gl.float32, o_layout)
            dv = gl.zeros([HALF, D], gl.float32, o_layout)
            for step in range(total):
                g = step // nq
                m0 = q_start + (step - g * nq) * BLOCK_M
                cur = it + step
                slot = cur % STAGES
                h = hk * GROUP + g
                qn = m0 + offs_m  # local query index
                qmask = qn < L
                lse = gl.load(LSE + h * T + cs + qn, mask=qmask, other=0.0)
                delta = gl.load(DELTA + h * T + cs + qn, mask=qmask, other=0.0)
                mbarrier.wait(full.index(slot), (cur // STAGES) & 1)
                sT = warpgroup_mma(k_c, q_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                dpT = warpgroup_mma(v_c, do_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                sT = warpgroup_mma_wait(num_outstanding=1, deps=(sT, ))  # S^T is done; dP^T may still run
                pT = gl.exp2(sT * qk_scale - gl.expand_dims(lse, 0))
                if CAUSAL:
                    if m0 < k_hi or m0 + BLOCK_M > L:  # a key above a query, or the sequence's end, in this block
                        ok = gl.expand_dims(qmask, 0) & (gl.expand_dims(qn, 0) >= gl.expand_dims(k_loc, 1))
                        pT = gl.where(ok, pT, 0.0)
                else:
                    if m0 + BLOCK_M > L:
                        pT = gl.where(gl.expand_dims(qmask, 0), pT, 0.0)
                pT16 = gl.convert_layout(pT.to(dtype), a_layout)
                dv = warpgroup_mma(pT16, do_smem.index(slot), dv, is_async=True)  # in flight during dS
                dpT = warpgroup_mma_wait(num_outstanding=1, deps=(dpT, ))
                dsT = pT * (dpT - gl.expand_dims(delta, 0))
                dsT16 = gl.convert_layout(dsT.to(dtype), a_layout)
                dk = warpgroup_mma(dsT16, q_smem.index(slot), dk, is_async=True)
                dv, dk, pT16, dsT16 = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, pT16, dsT16))
                mbarrier.arrive(empty.index(slot))  # this step's Q / dO are read by nothing it issued any more
            seg_o = (rows_o >= lo) & (rows_o < hi)
            r64 = gl.expand_dims(rows_o.to(gl.int64), 1)
            smask = gl.expand_dims(seg_o, 1) & gl.expand_dims(offs_d < D, 0)
            gl.store(DK + hk * stride_dkh + r64 * stride_dkt + gl.expand_dims(offs_d, 0), (dk * sm_scale).to(dtype),
                     mask=smask)
            gl.store(DV + hk * stride_dvh + r64 * stride_dvt + gl.expand_dims(offs_d, 0), dv.to(dtype), mask=smask)
        else:  # none of this consumer's keys in the segment: wait for its blocks and release them
            for step in range(total):
                cur = it + step
                mbarrier.wait(full.index(cur % STAGES), (cur // STAGES) & 1)
                mbarrier.arrive(empty.index(cur % STAGES))
        it += total
        t = seg_hi
        seq += 1


@gluon.jit(do_not_specialize=["T", "n_seqs", "t_bucket"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, T, n_seqs, t_bucket, n_kv_heads, qk_scale, sm_scale,
                     stride_qt, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     GROUP: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr,
                     STAGES: gl.constexpr):
    dtype: gl.constexpr = Q.dtype.element_ty
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    # program: (key tile, KV head), tile-major, tiles forwards (a causal key tile's work shrinks towards the end)
    t0, hk = _tile_of(n_kv_heads, T, BLOCK_M_KV, False)
    k_smem = gl.allocate_shared_memory(dtype, [2, HALF, D], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, HALF, D], smem_layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], smem_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], smem_layout)
    full, empty, kv_bar = _ring_barriers(STAGES)
    gl.warp_specialize([
        (_dkdv_consumer, (0, LSE, DELTA, DK, DV, CU, T, n_seqs, t0, hk, qk_scale, sm_scale, stride_dkt, stride_dkh,
                          stride_dvt, stride_dvh, k_smem, v_smem, q_smem, do_smem, full, empty, kv_bar, GROUP, D,
                          BLOCK_M, CAUSAL, STAGES)),
        (_dkdv_consumer, (1, LSE, DELTA, DK, DV, CU, T, n_seqs, t0, hk, qk_scale, sm_scale, stride_dkt, stride_dkh,
                          stride_dvt, stride_dvh, k_smem, v_smem, q_smem, do_smem, full, empty, kv_bar, GROUP, D,
                          BLOCK_M, CAUSAL, STAGES)),
        (_dkdv_producer, (Q, K, V, DO, CU, T, n_seqs, t0, hk, stride_qt, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_dot, k_smem, v_smem, q_smem, do_smem, full, empty, kv_bar, GROUP, D, BLOCK_M,
                          CAUSAL, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    _invalidate_barriers(full, empty, kv_bar, STAGES)


def _tuned(kern, cfgs, block: str, **fixed):
    """The autotuner of ``kern`` over ``cfgs`` ((``block`` size, STAGES) pairs, 4 warps), each with the constexprs
    ``fixed``; one cache per (head dim, mask, GQA group, token-count bucket)."""
    return triton.autotune([triton.Config({block: n, "STAGES": st, **fixed}, num_warps=4) for n, st in cfgs],
                           key=["D", "CAUSAL", "GROUP", "t_bucket"])(kern)


TUNED = _tuned(_fwd_kernel, CONFIGS, "BLOCK_N", PINGPONG=False)
# R4B_VARLEN_WS_PINGPONG=1: the PINGPONG configs alone
TUNED_PINGPONG = _tuned(_fwd_kernel, [c[:2] for c in PINGPONG_CONFIGS], "BLOCK_N", PINGPONG=True)
TUNED_DQ = _tuned(_bwd_dq_kernel, DQ_CONFIGS, "BLOCK_N")
TUNED_DKDV = _tuned(_bwd_dkdv_kernel, DKDV_CONFIGS, "BLOCK_M")


def device_problem(device, kernel: str = "fwd") -> str | None:
    """Why the forward (kernel "fwd"), the dQ kernel ("dq") or the dK/dV kernel ("dkdv") cannot run on ``device``
    (not a Hopper GPU; any GPU while its GPU_BROKEN / GPU_BROKEN_DQ / GPU_BROKEN_DKDV is set, unless
    $R4B_VARLEN_WS_UNVERIFIED is 1), or None."""
    from ._varlen_gluon import device_problem as hopper_problem

    why = hopper_problem(device)
    if why is not None:
        return why
    broken = {"fwd": GPU_BROKEN, "dq": GPU_BROKEN_DQ, "dkdv": GPU_BROKEN_DKDV}[kernel]
    return None if broken is None or os.environ.get(ENV_UNVERIFIED) == "1" else broken


def forward(q, k, v, o, lse, cu, scale_log2: float, causal: bool, config=None) -> None:
    """Write o (T, Hq, D) and lse (Hq, T, log2 units) of varlen attention. config: one of CONFIGS or
    PINGPONG_CONFIGS, or None to let the autotuner pick (among CONFIGS; with R4B_VARLEN_WS_PINGPONG=1 among
    PINGPONG_CONFIGS). The caller checks :func:`device_problem` and
    _varlen_gluon.input_problem and sets triton's scratch allocator (the kernel builds TMA descriptors on the
    device)."""
    T, Hq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not one of {HEAD_DIMS}")
    args = (q, k, v, o, lse, cu, T, cu.numel() - 1, T.bit_length(), Hq, scale_log2,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1))
    meta = dict(GROUP=Hq // k.shape[1], D=D, CAUSAL=causal)
    grid = (triton.cdiv(T, BLOCK_M) * Hq, )
    if config is None:
        (TUNED_PINGPONG if os.environ.get(ENV_PINGPONG) == "1" else TUNED)[grid](*args, **meta)
    else:
        n, stages, *pingpong = config
        _fwd_kernel[grid](*args, BLOCK_N=n, STAGES=stages, PINGPONG=bool(pingpong and pingpong[0]), num_warps=4,
                          **meta)


def backward_dq(do, q, k, v, lse, delta, dq, cu, scale: float, causal: bool, config=None) -> None:
    """Write dq (T, Hq, D) of varlen attention from the forward's lse (log2 units) and delta = rowsum(dO * O), both
    (Hq, T) fp32. config: one of DQ_CONFIGS, or None to let the autotuner pick. The caller checks
    :func:`device_problem` and _varlen_gluon.input_problem for q, k, v and do, and sets triton's scratch allocator."""
    T, Hq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not one of {HEAD_DIMS}")
    args = (q, k, v, do, lse, delta, dq, cu, T, cu.numel() - 1, T.bit_length(), Hq, scale * _LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dq.stride(0), dq.stride(1))
    meta = dict(GROUP=Hq // k.shape[1], D=D, CAUSAL=causal)
    grid = (triton.cdiv(T, BLOCK_M) * Hq, )
    if config is None:
        TUNED_DQ[grid](*args, **meta)
    else:
        n, stages = config
        _bwd_dq_kernel[grid](*args, BLOCK_N=n, STAGES=stages, num_warps=4, **meta)


def backward_dkdv(do, q, k, v, lse, delta, cu, scale: float, causal: bool, config=None, out=None):
    """(dk, dv) of varlen attention from the forward's lse and delta = rowsum(dO * O), both (Hq, T) fp32 (lse in
    log2 units). config: one of DKDV_CONFIGS, or None to let the autotuner pick. out: (dk, dv) to write, contiguous
    like k and v (the GPU tests pass NaN-filled ones, so that a row left unwritten shows), else new. The caller checks
    :func:`device_problem` (kernel "dkdv") and _varlen_gluon.input_problem / bwd_problem and sets triton's scratch
    allocator. The kernel reads one sequence's query heads of a group as one (L, GROUP * D) matrix, so it gets
    copies of q and dO where their head stride is not D."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not one of {HEAD_DIMS}")
    q_kv = q if q.stride(1) == D else q.contiguous()
    do_kv = do if do.stride(1) == D else do.contiguous()
    if out is None:
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    else:
        dk, dv = out
    args = (q_kv, k, v, do_kv, lse, delta, dk, dv, cu, T, cu.numel() - 1, T.bit_length(), Hkv,
            scale * _LOG2E, scale, q_kv.stride(0), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do_kv.stride(0), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1))
    meta = dict(GROUP=Hq // Hkv, D=D, CAUSAL=causal)
    grid = (triton.cdiv(T, BLOCK_M_KV) * Hkv, )
    if config is None:
        TUNED_DKDV[grid](*args, **meta)
    else:
        m, stages = config
        _bwd_dkdv_kernel[grid](*args, BLOCK_M=m, STAGES=stages, num_warps=4, **meta)
    return dk, dv
