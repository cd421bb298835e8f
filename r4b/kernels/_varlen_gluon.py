"""Hopper (sm_90) forward of varlen attention written in Gluon, with the softmax overlapping the tensor cores.

Why it exists: in the Triton forward (varlen_attention._fwd_kernel) every wgmma is followed by
``wgmma.wait_group 0`` (sm_90 PTX, triton 3.6): the QK^T product's result is needed at once by the softmax, and
waiting for it also waits for the P@V product issued before it, so the CUDA cores and the tensor cores take
turns. Here the order is explicit (FlashAttention-3's intra-warpgroup pipelining):

    S_0 = Q K_0^T; P_0 = softmax(S_0)
    for j >= 1:  issue S_j = Q K_j^T, issue O += P_{j-1} V_{j-1};  wait until only the newest (P V) is in flight;
                 softmax of S_j on the CUDA cores while O += P_{j-1} V_{j-1} runs;  wait for it;  rescale O
    O += P_last V_last

K and V blocks come through TMA into a STAGES-deep ring of shared-memory buffers (one mbarrier per slot), from a
tensor descriptor built on the device for each (sequence, KV head): rows past the sequence's end are zero-filled
by the hardware, so no key or value of another sequence is ever read. Q's tile is one TMA load per program.

Program layout, segments and masks are those of the Triton forward: a program is (tile of BLOCK_M packed query
rows, query head); a tile that spans several sequences walks them one segment at a time; key blocks wholly below
the segment's first query row need no mask (causal), the rest are masked per element.

Opt-in (``R4B_VARLEN_FWD=gluon``) until a GPU run has checked it against the float64 reference and timed it:
the Triton interpreter cannot run Gluon, so on a machine without a GPU this file is only compiled (tests
compile it for sm_90 and check that the PTX really keeps one wgmma group in flight during the softmax).
Supported: CUDA capability 9.x, bf16 / fp16, head dim 64 or 128, TMA-addressable (T, H, D) tensors.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from .varlen_attention import _seq_of, _tile_of  # (triton.jit helpers: Gluon calls them as its own)

# score of a masked pair: finite, so a row that is fully masked in one block never makes NaN
_NEG = gl.constexpr(-1.0e30)

# (BLOCK_M, BLOCK_N, num_warps, STAGES): 8 warps are two warpgroups of 64 query rows each, 4 warps one. The slot of
# block j - 1 is refilled (with block j - 1 + STAGES) at the end of iteration j, so STAGES - 2 blocks are in
# flight ahead of the one being waited for: STAGES >= 3. sm_90 ptxas (bf16, D=128), registers causal / not:
# 128x64 w8 s3 and s4 185 / 200, no spills, 131 / 164 kB shared memory; 128x128 w8 s3 255, spills 44 B causal,
# 230 kB; 64x64 w4 s3 168 / 190, no spills, 115 kB: two programs fit on one SM (2 x (115 + 1) kB of its 228 kB),
# whose warpgroups then run unsynchronised (the barriers around the TMA ops hold both warpgroups of one program
# together); s4 147 kB. 64x128 w4 s3 spilled 44 B: dropped.
CONFIGS = [(128, 64, 8, 4), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4)]
HEAD_DIMS = (64, 128)


@gluon.jit
def _softmax_block(s, m_i, kn, lim, qk_scale, MASK: gl.constexpr):
    """(P, new row maximum) of one block of raw scores s, in log2 units. MASK: keys kn >= lim (per row) are cut."""
    if MASK:
        s = gl.where(gl.expand_dims(kn, 0) < gl.expand_dims(lim, 1), s * qk_scale, _NEG)
        m_new = gl.maximum(m_i, gl.max(s, 1))
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
    else:
        # scale the row maximum, not every score: s * scale - m is then one FMA per score
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    return p, m_new


@gluon.jit
def _segment_keys(t, cs, seg_hi, L, CAUSAL: gl.constexpr):
    """(kv_hi, free_hi) of the segment of query rows [t, seg_hi) of the sequence starting at cs, of length L (local
    key indices): keys [0, kv_hi) are seen by some row, blocks ending at or below free_hi by every row (no mask)."""
    if CAUSAL:
        kv_hi = seg_hi - cs
        free_hi = t - cs
    else:
        kv_hi = L
        free_hi = L
    return kv_hi, free_hi


@gluon.jit
def _seq_kv_descs(K, V, cs, L, hk, stride_kt, stride_kh, stride_vt, stride_vh, BLOCK_N: gl.constexpr,
                  D: gl.constexpr, smem_layout: gl.constexpr):
    """TMA descriptors of one sequence's keys and values of KV head hk (L rows of D from row cs): built on the
    device, so rows past the sequence's end read as zeros."""
    k_desc = tma.make_tensor_descriptor(K + cs.to(gl.int64) * stride_kt + hk * stride_kh, shape=[L, D],
                                        strides=[stride_kt, 1], block_shape=[BLOCK_N, D], layout=smem_layout)
    v_desc = tma.make_tensor_descriptor(V + cs.to(gl.int64) * stride_vt + hk * stride_vh, shape=[L, D],
                                        strides=[stride_vt, 1], block_shape=[BLOCK_N, D], layout=smem_layout)
    return k_desc, v_desc


@gluon.jit
def _load_kv(k_desc, v_desc, block, slot, bars, k_smem, v_smem, pred, BLOCK_N: gl.constexpr, D: gl.constexpr):
    """Start the TMA loads of key block ``block`` (K and V rows [block * BLOCK_N, +BLOCK_N) of the sequence) into
    ring slot ``slot``; its mbarrier completes when both have landed. Nothing happens where pred is false."""
    bar = bars.index(slot)
    mbarrier.expect(bar, 2 * BLOCK_N * D * k_desc.dtype.primitive_bitwidth // 8, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [block * BLOCK_N, 0], bar, k_smem.index(slot), pred=pred)
    tma.async_copy_global_to_shared(v_desc, [block * BLOCK_N, 0], bar, v_smem.index(slot), pred=pred)


@gluon.jit(do_not_specialize=["T", "n_seqs", "t_bucket"])
def _fwd_kernel(Q, K, V, Out, LSE, CU, T, n_seqs, t_bucket, n_heads, qk_scale,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                GROUP: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                CAUSAL: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
    dtype: gl.constexpr = Q.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    # program: (query tile, head), tile-major; causal walks the tiles backwards (heavy tiles first), as in Triton's
    t0, h = _tile_of(n_heads, T, BLOCK_M, CAUSAL)
    hk = h // GROUP

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], smem_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], smem_layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    mbarrier.init(q_bar, count=1)
    fence_async_shared()

    # the tile's query rows (rows >= T are zero-filled); rows of other sequences are computed and never stored
    q_desc = tma.make_tensor_descriptor(Q + h * stride_qh, shape=[T, D], strides=[stride_qt, 1],
                                        block_shape=[BLOCK_M, D], layout=smem_layout)
    mbarrier.expect(q_bar, BLOCK_M * D * dtype.primitive_bitwidth // 8)
    tma.async_copy_global_to_shared(q_desc, [t0, 0], q_bar, q_smem)

    rows_s = t0 + gl.arange(0, BLOCK_M, layout=row_s)
    rows_o = t0 + gl.arange(0, BLOCK_M, layout=row_o)
    offs_n = gl.arange(0, BLOCK_N, layout=col_s)
    offs_d = gl.arange(0, D, layout=col_o)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    t_end = gl.minimum(t0 + BLOCK_M, T)
    seq = _seq_of(CU, n_seqs, t0)
    t = t0
    it = 0  # key blocks consumed so far by this program: ring slot it % STAGES, mbarrier phase (it // STAGES) & 1
    while t < t_end:  # one segment (the tile's rows of sequence seq) per iteration
        cs = gl.load(CU + seq)
        ce = gl.load(CU + seq + 1)
        seg_hi = gl.minimum(ce, t_end)
        L = ce - cs
        kv_hi, free_hi = _segment_keys(t, cs, seg_hi, L, CAUSAL)
        nb = (kv_hi + BLOCK_N - 1) // BLOCK_N
        if nb > 0:  # an empty sequence has no rows and nothing to do
            # every warp is done with the ring (last segment's products) before its slots are refilled
            gl.thread_barrier()
            k_desc, v_desc = _seq_kv_descs(K, V, cs, L, hk, stride_kt, stride_kh, stride_vt, stride_vh, BLOCK_N, D,
                                           smem_layout)
            for i in gl.static_range(STAGES):
                _load_kv(k_desc, v_desc, i, (it + i) % STAGES, bars, k_smem, v_smem, i < nb, BLOCK_N, D)
            q_loc = rows_s - cs
            if CAUSAL:
                lim = q_loc + 1
            else:
                lim = q_loc * 0 + L

            # block 0: scores, then its softmax (nothing to overlap with yet)
            mbarrier.wait(q_bar, 0)  # Q's one phase (a no-op after the first segment): K/V loads started first
            slot = it % STAGES
            mbarrier.wait(bars.index(slot), (it // STAGES) & 1)
            sc = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False)
            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
            if BLOCK_N > free_hi:
                p, m_i = _softmax_block(sc, m_i, offs_n, lim, qk_scale, True)
            else:
                p, m_i = _softmax_block(sc, m_i, offs_n, lim, qk_scale, False)
            l_i = gl.sum(p, 1)
            p16 = gl.convert_layout(p.to(dtype), p_layout)
            acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)

            for j in range(1, nb):
                cur = it + j
                slot = cur % STAGES
                prev = (cur - 1) % STAGES
                mbarrier.wait(bars.index(slot), (cur // STAGES) & 1)
                # two groups in flight: S_j = Q K_j^T, then O += P_{j-1} V_{j-1}
                sc = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False,
                                   is_async=True)
                acc = warpgroup_mma(p16, v_smem.index(prev), acc, is_async=True)
                sc = warpgroup_mma_wait(num_outstanding=1, deps=(sc, ))  # S_j is done; P V may still run
                if j * BLOCK_N + BLOCK_N > free_hi:
                    p, m_new = _softmax_block(sc, m_i, j * BLOCK_N + offs_n, lim, qk_scale, True)
                else:
                    p, m_new = _softmax_block(sc, m_i, j * BLOCK_N + offs_n, lim, qk_scale, False)
                alpha = gl.exp2(m_i - m_new)
                l_i = l_i * alpha + gl.sum(p, 1)
                p_next = gl.convert_layout(p.to(dtype), p_layout)
                # P_{j-1}'s registers stay alive until the product reading them is done
                acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
                m_i = m_new
                p16 = p_next
                # slot prev (block j - 1) is read by nothing any more, in any warp: refill it with block j-1+STAGES
                gl.thread_barrier()
                _load_kv(k_desc, v_desc, j - 1 + STAGES, prev, bars, k_smem, v_smem, j - 1 + STAGES < nb,
                         BLOCK_N, D)

            last = (it + nb - 1) % STAGES
            acc = warpgroup_mma(p16, v_smem.index(last), acc, is_async=True)
            acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
            it += nb

            l_o = gl.convert_layout(l_i, row_o)
            out = acc / gl.expand_dims(l_o, 1)
            seg_o = (rows_o >= t) & (rows_o < seg_hi)
            r64 = rows_o.to(gl.int64)
            o_ptrs = Out + h * stride_oh + gl.expand_dims(r64 * stride_ot, 1) + gl.expand_dims(offs_d, 0)
            gl.store(o_ptrs, out.to(dtype), mask=gl.expand_dims(seg_o, 1) & gl.expand_dims(offs_d < D, 0))
            seg_s = (rows_s >= t) & (rows_s < seg_hi)
            gl.store(LSE + h * T + rows_s.to(gl.int64), m_i + gl.log2(l_i), mask=seg_s)
        t = seg_hi
        seq += 1

    mbarrier.wait(q_bar, 0)  # (a no-op: every program has a non-empty segment; never invalidate under a load)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    mbarrier.invalidate(q_bar)


def device_problem(device) -> str | None:
    """Why these kernels cannot run on ``device`` at all (not a Hopper GPU), or None."""
    import torch

    if device.type != "cuda":
        return f"tensors on {device.type}, not a GPU"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return f"CUDA capability {torch.cuda.get_device_capability(device)}, not 9.x (Hopper)"
    return None


def input_problem(*tensors) -> str | None:
    """Why these kernels cannot run these (T, H, D) tensors on a Hopper GPU (dtype, head dim, TMA alignment), or
    None when they can. The dtype and head dim are the first tensor's: varlen_attention already requires k and v
    to match q, and autograd gives dO q's dtype and shape."""
    import torch

    t0 = tensors[0]
    if t0.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {t0.dtype}, not bf16 / fp16"
    if t0.shape[2] not in HEAD_DIMS:
        return f"head dim {t0.shape[2]}, not one of {HEAD_DIMS}"
    for i, t in enumerate(tensors):
        if t.stride(2) != 1 or t.stride(0) <= 0 or (t.stride(0) * t.element_size()) % 16 \
                or (t.stride(1) * t.element_size()) % 16 or t.data_ptr() % 16:
            return f"tensor {i} is not TMA-addressable (strides {tuple(t.stride())}, 16-byte rows and base needed)"
    if max((t.shape[1] - 1) * abs(t.stride(1)) for t in tensors) >= 2**31 or 2 * t0.shape[1] * t0.shape[0] >= 2**31:
        return "per-head offsets (head index times head stride, or Hq * T) reach 2^31 elements: int32 head bases"
    return None


# The backward's head dims: on an H200 (2026-11-27) the dK/dV kernel's first config (128x16 w8 s3) gave dK error
# 0.013054 at D 64 (GQA 1, causal, lengths 1 / 37 / 1 / 16 / 5 / 0 / 300, seed 6) where the rule allows 2 x 0.003892
# (plain SDPA's error) + 1e-3 x 3.45 = 0.011240 (the test stopped at that first failure), while every config passed
# at D 128. A CPU emulation of this kernel's arithmetic (fp32 P and dS, dS rounded to bf16 for the dK product, fp32
# accumulation, one scale and rounding at the end: also the Triton kernels' arithmetic) reproduces 0.0130537009466365
# at the same element (session 12). Over 150 seeds of that case the emulation breaks the rule 2 times at D 64 and 1
# time at D 128: the rule's baseline, SDPA on 3-D tensors, runs PyTorch's math backend, which computes bf16 in fp32,
# so "plain" is only the output's rounding. So no D 64 bug is known; D 64 backwards stay on the Triton kernels until
# a GPU run settles the baseline (tests/test_varlen_attention.py::_sdpa_bf16_per_doc).
BWD_HEAD_DIMS = (128,)


def bwd_problem(q) -> str | None:
    """Why the backward kernels cannot take q's head dim (beyond :func:`input_problem`), or None."""
    if q.shape[2] not in BWD_HEAD_DIMS:
        return f"head dim {q.shape[2]}: the Gluon backward is verified at {BWD_HEAD_DIMS} only"
    return None


def supported(q, k, v) -> str | None:
    """Why these kernels cannot run these (T, H, D) tensors, or None when they can."""
    return device_problem(q.device) or input_problem(q, k, v)


def _configs():
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "STAGES": st, "NUM_WARPS": w}, num_warps=w)
            for m, n, w, st in CONFIGS]


# one autotuner, keyed like the Triton kernels' (t_bucket = T.bit_length(): one tuning per size class, the kernel
# itself never reads it)
TUNED = triton.autotune(_configs(), key=["D", "CAUSAL", "GROUP", "t_bucket"])(_fwd_kernel)


def forward(q, k, v, o, lse, cu, scale_log2: float, causal: bool, config=None) -> None:
    """Write o (T, Hq, D) and lse (Hq, T, log2 units) of varlen attention. config: one of CONFIGS to run, or
    None to let the autotuner pick. The caller checks :func:`supported` and sets triton's scratch allocator
    (the kernel builds TMA descriptors on the device)."""
    T, Hq, D = q.shape
    args = (q, k, v, o, lse, cu, T, cu.numel() - 1, T.bit_length(), Hq, scale_log2,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1))
    meta = dict(GROUP=Hq // k.shape[1], D=D, CAUSAL=causal)
    if config is None:
        TUNED[lambda m: (triton.cdiv(T, m["BLOCK_M"]) * Hq, )](*args, **meta)
    else:
        bm, bn, warps, stages = config
        _fwd_kernel[(triton.cdiv(T, bm) * Hq, )](*args, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, NUM_WARPS=warps,
                                                 num_warps=warps, **meta)


# ---------------------------------------------------------------------------------------------------- backward
# R4B_VARLEN_BWD=gluon: the Triton delta kernel (delta = rowsum(dO * O)), then the two kernels below, the split
# backward of the Triton path in Gluon. Both issue their two independent products of a block together and do the
# elementwise work of one while the other runs on the tensor cores; the products that accumulate (dK, dV; dQ)
# stay in flight into the next block. A ring slot is refilled once the products of the step that read it are
# retired, at the next step's first wait, so STAGES - 2 steps are prefetched ahead: STAGES >= 3.
# (BLOCK_N keys per program, BLOCK_M queries per step, num_warps, STAGES) for dK/dV; (BLOCK_M, BLOCK_N, ...) for dQ
# sm_90 ptxas (bf16, D=128, GQA 4), registers causal / not: dkdv 128x16 w8 s3 / s4 227 / 218, no spills;
# 128x32 w8 s3 / s4 255 / 255, 20 B spilled (causal); 64x32 w4 s3 255, 12 B (causal) (128x64 w8 and 64x64 w4
# spilled 48-120 B before the dK and dV products were kept in flight across steps: dropped);
# dq 128x64 w8 s3 196 / 194, 128x32 w8 s3 / s4 155 / 153, 64x64 w4 s3 195 / 193, no spills
DKDV_CONFIGS = [(128, 16, 8, 3), (128, 32, 8, 3), (128, 16, 8, 4), (128, 32, 8, 4), (64, 32, 4, 3)]
DQ_CONFIGS = [(128, 64, 8, 3), (128, 32, 8, 4), (128, 32, 8, 3), (64, 64, 4, 3)]


@gluon.jit
def _load_qdo(q_desc, do_desc, row, col, slot, bars, q_smem, do_smem, pred, BLOCK_M: gl.constexpr,
              D: gl.constexpr):
    """TMA loads of one query block of Q and dO (rows [row, +BLOCK_M), columns [col, +D) of the descriptors'
    (L, GROUP * D) view of one sequence's query heads) into ring slot ``slot``."""
    bar = bars.index(slot)
    mbarrier.expect(bar, 2 * BLOCK_M * D * q_desc.dtype.primitive_bitwidth // 8, pred=pred)
    tma.async_copy_global_to_shared(q_desc, [row, col], bar, q_smem.index(slot), pred=pred)
    tma.async_copy_global_to_shared(do_desc, [row, col], bar, do_smem.index(slot), pred=pred)


@gluon.jit(do_not_specialize=["T", "n_seqs", "t_bucket"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, T, n_seqs, t_bucket, n_kv_heads, qk_scale, sm_scale,
                     stride_qt, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     GROUP: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                     CAUSAL: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
    """dK, dV of a tile of BLOCK_N packed key rows and one KV head, summed over the GROUP query heads that share
    it (no atomics), in the transposed form: S^T = K Q^T (BLOCK_N, BLOCK_M). Q and dO must have head stride D
    (the descriptor reads one sequence's GROUP query heads as an (L, GROUP * D) matrix)."""
    dtype: gl.constexpr = Q.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, D, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    # program: (key tile, KV head), tile-major, tiles forwards (a causal key tile's work shrinks towards the end)
    t0, hk = _tile_of(n_kv_heads, T, BLOCK_N, False)

    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], smem_layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], smem_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], smem_layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    mbarrier.init(kv_bar, count=1)
    fence_async_shared()

    # the tile's keys and values (rows >= T zero-filled; rows of other sequences are computed and never stored)
    k_desc = tma.make_tensor_descriptor(K + hk * stride_kh, shape=[T, D], strides=[stride_kt, 1],
                                        block_shape=[BLOCK_N, D], layout=smem_layout)
    v_desc = tma.make_tensor_descriptor(V + hk * stride_vh, shape=[T, D], strides=[stride_vt, 1],
                                        block_shape=[BLOCK_N, D], layout=smem_layout)
    mbarrier.expect(kv_bar, 2 * BLOCK_N * D * dtype.primitive_bitwidth // 8)
    tma.async_copy_global_to_shared(k_desc, [t0, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [t0, 0], kv_bar, v_smem)

    rows_s = t0 + gl.arange(0, BLOCK_N, layout=row_s)
    rows_o = t0 + gl.arange(0, BLOCK_N, layout=row_o)
    offs_m = gl.arange(0, BLOCK_M, layout=col_s)
    offs_d = gl.arange(0, D, layout=col_o)
    zero_s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    t_end = gl.minimum(t0 + BLOCK_N, T)
    seq = _seq_of(CU, n_seqs, t0)
    t = t0
    it = 0  # query blocks consumed so far: ring slot it % STAGES, phase (it // STAGES) & 1
    mbarrier.wait(kv_bar, 0)
    while t < t_end:  # one segment (the tile's keys of sequence seq) per iteration
        cs = gl.load(CU + seq)
        ce = gl.load(CU + seq + 1)
        seg_hi = gl.minimum(ce, t_end)
        L = ce - cs
        k_lo = t - cs  # local keys [k_lo, k_hi) of the segment
        k_hi = seg_hi - cs
        if CAUSAL:
            q_start = (k_lo // BLOCK_M) * BLOCK_M  # queries below the segment's first key see none of its keys
        else:
            q_start = k_lo * 0
        nq = (L - q_start + BLOCK_M - 1) // BLOCK_M
        total = nq * GROUP  # (query head, query block) steps, head-major
        if total > 0:  # (0 only for an empty sequence, which has no key rows to store)
            gl.thread_barrier()  # every warp is done with the ring before its slots are refilled
            base = cs.to(gl.int64) * stride_qt + hk * GROUP * D
            q_desc = tma.make_tensor_descriptor(Q + base, shape=[L, GROUP * D], strides=[stride_qt, 1],
                                                block_shape=[BLOCK_M, D], layout=smem_layout)
            base_do = cs.to(gl.int64) * stride_dot + hk * GROUP * D
            do_desc = tma.make_tensor_descriptor(DO + base_do, shape=[L, GROUP * D], strides=[stride_dot, 1],
                                                 block_shape=[BLOCK_M, D], layout=smem_layout)
            for i in gl.static_range(STAGES):
                _load_qdo(q_desc, do_desc, q_start + (i % nq) * BLOCK_M, (i // nq) * D, (it + i) % STAGES, bars,
                          q_smem, do_smem, i < total, BLOCK_M, D)
            k_loc = rows_s - cs
            # dV += P^T dO and dK += dS^T Q of a step stay in flight into the next step, during its S^T and dP^T
            # products: carried as async tokens, with P^T's and dS^T's registers kept alive until they are done
            dk = warpgroup_mma_init(gl.zeros([BLOCK_N, D], gl.float32, o_layout))
            dv = warpgroup_mma_init(gl.zeros([BLOCK_N, D], gl.float32, o_layout))
            pT16 = gl.zeros([BLOCK_N, BLOCK_M], dtype, a_layout)
            dsT16 = gl.zeros([BLOCK_N, BLOCK_M], dtype, a_layout)
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
                mbarrier.wait(bars.index(slot), (cur // STAGES) & 1)
                # S^T = K Q^T, then dP^T = V dO^T, behind the previous step's dV and dK
                sT = warpgroup_mma(k_smem, q_smem.index(slot).permute((1, 0)), zero_s, use_acc=False,
                                   is_async=True)
                dpT = warpgroup_mma(v_smem, do_smem.index(slot).permute((1, 0)), zero_s, use_acc=False,
                                    is_async=True)
                # retires the previous step's dV and dK and this S^T; dP^T may still run
                sT, dv, dk, pT16, dsT16 = warpgroup_mma_wait(num_outstanding=1, deps=(sT, dv, dk, pT16, dsT16))
                if step > 0:  # the previous step's slot is read by nothing any more, in any warp: refill it
                    gl.thread_barrier()
                    nxt = step - 1 + STAGES
                    g2 = nxt // nq
                    _load_qdo(q_desc, do_desc, q_start + (nxt - g2 * nq) * BLOCK_M, g2 * D, (cur - 1) % STAGES,
                              bars, q_smem, do_smem, nxt < total, BLOCK_M, D)
                pT = gl.exp2(sT * qk_scale - gl.expand_dims(lse, 0))
                if CAUSAL:
                    if m0 < k_hi or m0 + BLOCK_M > L:  # the diagonal or the sequence's end in this block
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
            it += total
            seg_o = (rows_o >= t) & (rows_o < seg_hi)
            r64 = gl.expand_dims(rows_o.to(gl.int64), 1)
            smask = gl.expand_dims(seg_o, 1) & gl.expand_dims(offs_d < D, 0)
            gl.store(DK + hk * stride_dkh + r64 * stride_dkt + gl.expand_dims(offs_d, 0), (dk * sm_scale).to(dtype),
                     mask=smask)
            gl.store(DV + hk * stride_dvh + r64 * stride_dvt + gl.expand_dims(offs_d, 0), dv.to(dtype), mask=smask)
        t = seg_hi
        seq += 1

    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    mbarrier.invalidate(kv_bar)


@gluon.jit(do_not_specialize=["T", "n_seqs", "t_bucket"])
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, T, n_seqs, t_bucket, n_heads, qk_scale, sm_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dqt, stride_dqh,
                   GROUP: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   CAUSAL: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
    """dQ of a tile of BLOCK_M packed query rows and one query head: the forward's walk over key blocks, with
    dS = P * (dP - delta) and dQ += dS K."""
    dtype: gl.constexpr = Q.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, D, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    t0, h = _tile_of(n_heads, T, BLOCK_M, CAUSAL)
    hk = h // GROUP

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], smem_layout)
    do_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], smem_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], smem_layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    mbarrier.init(q_bar, count=1)
    fence_async_shared()

    q_desc = tma.make_tensor_descriptor(Q + h * stride_qh, shape=[T, D], strides=[stride_qt, 1],
                                        block_shape=[BLOCK_M, D], layout=smem_layout)
    do_desc = tma.make_tensor_descriptor(DO + h * stride_doh, shape=[T, D], strides=[stride_dot, 1],
                                         block_shape=[BLOCK_M, D], layout=smem_layout)
    mbarrier.expect(q_bar, 2 * BLOCK_M * D * dtype.primitive_bitwidth // 8)
    tma.async_copy_global_to_shared(q_desc, [t0, 0], q_bar, q_smem)
    tma.async_copy_global_to_shared(do_desc, [t0, 0], q_bar, do_smem)

    rows_s = t0 + gl.arange(0, BLOCK_M, layout=row_s)
    rows_o = t0 + gl.arange(0, BLOCK_M, layout=row_o)
    offs_n = gl.arange(0, BLOCK_N, layout=col_s)
    offs_d = gl.arange(0, D, layout=col_o)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    lse = gl.load(LSE + h * T + rows_s, mask=rows_s < T, other=0.0)
    delta = gl.load(DELTA + h * T + rows_s, mask=rows_s < T, other=0.0)
    t_end = gl.minimum(t0 + BLOCK_M, T)
    seq = _seq_of(CU, n_seqs, t0)
    t = t0
    it = 0
    mbarrier.wait(q_bar, 0)
    while t < t_end:
        cs = gl.load(CU + seq)
        ce = gl.load(CU + seq + 1)
        seg_hi = gl.minimum(ce, t_end)
        L = ce - cs
        kv_hi, free_hi = _segment_keys(t, cs, seg_hi, L, CAUSAL)
        nb = (kv_hi + BLOCK_N - 1) // BLOCK_N
        if nb > 0:
            gl.thread_barrier()
            k_desc, v_desc = _seq_kv_descs(K, V, cs, L, hk, stride_kt, stride_kh, stride_vt, stride_vh, BLOCK_N, D,
                                           smem_layout)
            for i in gl.static_range(STAGES):
                _load_kv(k_desc, v_desc, i, (it + i) % STAGES, bars, k_smem, v_smem, i < nb, BLOCK_N, D)
            q_loc = rows_s - cs
            if CAUSAL:
                lim = q_loc + 1
            else:
                lim = q_loc * 0 + L
            # dQ += dS_j K_j stays in flight into the next block, during its S and dP products (FA3's order):
            # the accumulator is carried as an async token, P_j's registers (ds16) kept alive until it is done
            dq = warpgroup_mma_init(gl.zeros([BLOCK_M, D], gl.float32, o_layout))
            ds16 = gl.zeros([BLOCK_M, BLOCK_N], dtype, a_layout)
            for j in range(nb):
                cur = it + j
                slot = cur % STAGES
                mbarrier.wait(bars.index(slot), (cur // STAGES) & 1)
                s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                dp = warpgroup_mma(do_smem, v_smem.index(slot).permute((1, 0)), zero_s, use_acc=False,
                                   is_async=True)
                # retires dQ += dS_{j-1} K_{j-1} (issued before) and S_j; dP_j may still run
                s, dq, ds16 = warpgroup_mma_wait(num_outstanding=1, deps=(s, dq, ds16))
                if j > 0:  # block j-1's slot is read by nothing any more, in any warp: refill it
                    gl.thread_barrier()
                    _load_kv(k_desc, v_desc, j - 1 + STAGES, (cur - 1) % STAGES, bars, k_smem, v_smem,
                             j - 1 + STAGES < nb, BLOCK_N, D)
                p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 1))
                if j * BLOCK_N + BLOCK_N > free_hi:
                    kn = j * BLOCK_N + offs_n
                    p = gl.where(gl.expand_dims(kn, 0) < gl.expand_dims(lim, 1), p, 0.0)
                dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp, ))
                ds = p * (dp - gl.expand_dims(delta, 1))
                ds16 = gl.convert_layout(ds.to(dtype), a_layout)
                dq = warpgroup_mma(ds16, k_smem.index(slot), dq, is_async=True)
            dq, ds16 = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ds16))
            it += nb
            seg_o = (rows_o >= t) & (rows_o < seg_hi)
            r64 = gl.expand_dims(rows_o.to(gl.int64), 1)
            gl.store(DQ + h * stride_dqh + r64 * stride_dqt + gl.expand_dims(offs_d, 0), (dq * sm_scale).to(dtype),
                     mask=gl.expand_dims(seg_o, 1) & gl.expand_dims(offs_d < D, 0))
        t = seg_hi
        seq += 1

    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    mbarrier.invalidate(q_bar)


def _tuned(kern, cfgs, tile):
    configs = [triton.Config({tile[0]: a, tile[1]: b, "STAGES": st, "NUM_WARPS": w}, num_warps=w)
               for a, b, w, st in cfgs]
    return triton.autotune(configs, key=["D", "CAUSAL", "GROUP", "t_bucket"])(kern)


TUNED_DKDV = _tuned(_bwd_dkdv_kernel, DKDV_CONFIGS, ("BLOCK_N", "BLOCK_M"))
TUNED_DQ = _tuned(_bwd_dq_kernel, DQ_CONFIGS, ("BLOCK_M", "BLOCK_N"))


def backward(do, q, k, v, lse, delta, cu, scale: float, causal: bool, dkdv_config=None, dq_config=None,
             with_dq: bool = True):
    """(dq, dk, dv) of varlen attention from the forward's lse and delta = rowsum(dO * O), both (Hq, T) fp32
    (lse in log2 units); with_dq=False: (None, dk, dv), the dK/dV kernel only (R4B_VARLEN_BWD=gluon-dkdv, beside
    the Triton dQ kernel). A config of None lets the autotuner pick. The caller checks :func:`supported` for q, k,
    v and do and sets triton's scratch allocator. The dK/dV kernel reads one sequence's query heads of a group
    as one (L, GROUP * D) matrix, so it gets copies of q and dO where their head stride is not D."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    q_kv = q if q.stride(1) == D else q.contiguous()  # for the dK/dV kernel only; dQ reads any head stride
    do_kv = do if do.stride(1) == D else do.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if with_dq else None
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    n, tb, qk_scale = cu.numel() - 1, T.bit_length(), scale * 1.4426950408889634
    meta = dict(GROUP=Hq // Hkv, D=D, CAUSAL=causal)
    kv_args = (q_kv, k, v, do_kv, lse, delta, dk, dv, cu, T, n, tb, Hkv, qk_scale, scale, q_kv.stride(0),
               k.stride(0), k.stride(1), v.stride(0), v.stride(1), do_kv.stride(0), dk.stride(0), dk.stride(1),
               dv.stride(0), dv.stride(1))
    if dkdv_config is None:
        TUNED_DKDV[lambda m: (triton.cdiv(T, m["BLOCK_N"]) * Hkv, )](*kv_args, **meta)
    else:
        bn, bm, w, st = dkdv_config
        _bwd_dkdv_kernel[(triton.cdiv(T, bn) * Hkv, )](*kv_args, BLOCK_N=bn, BLOCK_M=bm, STAGES=st, NUM_WARPS=w,
                                                       num_warps=w, **meta)
    if not with_dq:
        return None, dk, dv
    dq_args = (q, k, v, do, lse, delta, dq, cu, T, n, tb, Hq, qk_scale, scale, q.stride(0), q.stride(1),
               k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1), dq.stride(0),
               dq.stride(1))
    if dq_config is None:
        TUNED_DQ[lambda m: (triton.cdiv(T, m["BLOCK_M"]) * Hq, )](*dq_args, **meta)
    else:
        bm, bn, w, st = dq_config
        _bwd_dq_kernel[(triton.cdiv(T, bm) * Hq, )](*dq_args, BLOCK_M=bm, BLOCK_N=bn, STAGES=st, NUM_WARPS=w,
                                                    num_warps=w, **meta)
    return dq, dk, dv
