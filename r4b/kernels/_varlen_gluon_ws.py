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
# registers per thread of each worker partition: consumer 1 as many as consumer 0 may take, the producer few
CONSUMER_REGS = gl.constexpr(232)
PRODUCER_REGS = gl.constexpr(40)

GPU_BROKEN = ("the warp-specialised Gluon forward (R4B_VARLEN_FWD=gluon-ws) has never run on a GPU: refused until "
              "its GPU tests pass (R4B_VARLEN_WS_UNVERIFIED=1 runs it for that check)")
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
        # this consumer's rows of the segment: [lo, hi); the blocks it computes: those its last row sees
        lo = gl.maximum(t, r0)
        hi = gl.minimum(seg_hi, my_end)
        if CAUSAL:
            mine = gl.minimum((hi - cs + BLOCK_N - 1) // BLOCK_N, nb)
            free = lo - cs  # blocks ending at or below it are unmasked for every row of this consumer
        else:
            mine = nb
            free = free_hi
        mine = gl.where(hi > lo, mine, 0)
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
        # the segment's blocks this consumer does not compute (none of its rows, or causal blocks above its last
        # row): wait for each and release it, so the ring's phases stay those of the producer
        for j in range(mine, nb):
            cur = it + j
            slot = cur % STAGES
            mbarrier.wait(full.index(slot), (cur // STAGES) & 1)
            mbarrier.arrive(empty.index(slot))
        it += nb
        t = seg_hi
        seq += 1


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


def _configs():
    return [triton.Config({"BLOCK_N": n, "STAGES": st}, num_warps=4) for n, st in CONFIGS]


TUNED = triton.autotune(_configs(), key=["D", "CAUSAL", "GROUP", "t_bucket"])(_fwd_kernel)


def device_problem(device) -> str | None:
    """Why this kernel cannot run on ``device`` (not a Hopper GPU; any GPU while GPU_BROKEN is set, unless
    $R4B_VARLEN_WS_UNVERIFIED is 1), or None."""
    from ._varlen_gluon import device_problem as hopper_problem

    why = hopper_problem(device)
    if why is not None:
        return why
    return None if os.environ.get(ENV_UNVERIFIED) == "1" else GPU_BROKEN


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
