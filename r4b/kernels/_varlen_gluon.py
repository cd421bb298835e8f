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

# score of a masked pair: finite, so a row that is fully masked in one block never makes NaN
_NEG = gl.constexpr(-1.0e30)

# (BLOCK_M, BLOCK_N, num_warps, STAGES): 8 warps are two warpgroups of 64 query rows each
CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 2)]
HEAD_DIMS = (64, 128)


@gluon.jit
def _seq_of(CU, n_seqs, t):
    """The sequence holding packed token t: the largest s in [0, n_seqs) with cu[s] <= t."""
    lo = t * 0
    hi = lo + n_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        take = gl.load(CU + mid) <= t
        lo = gl.where(take, mid, lo)
        hi = gl.where(take, hi, mid)
    return lo


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
    pid = gl.program_id(0)
    h = pid % n_heads
    tile = pid // n_heads
    if CAUSAL:
        tile = (T + BLOCK_M - 1) // BLOCK_M - 1 - tile
    t0 = tile * BLOCK_M
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
    mbarrier.wait(q_bar, 0)
    while t < t_end:  # one segment (the tile's rows of sequence seq) per iteration
        cs = gl.load(CU + seq)
        ce = gl.load(CU + seq + 1)
        seg_hi = gl.minimum(ce, t_end)
        L = ce - cs
        if CAUSAL:
            kv_hi = seg_hi - cs  # keys any row of the segment sees
            free_hi = t - cs  # keys below every row of the segment: blocks ending there need no mask
        else:
            kv_hi = L
            free_hi = L
        nb = (kv_hi + BLOCK_N - 1) // BLOCK_N
        if nb > 0:  # an empty sequence has no rows and nothing to do
            # every warp is done with the ring (last segment's products) before its slots are refilled
            gl.thread_barrier()
            k_desc = tma.make_tensor_descriptor(K + cs.to(gl.int64) * stride_kt + hk * stride_kh, shape=[L, D],
                                                strides=[stride_kt, 1], block_shape=[BLOCK_N, D], layout=smem_layout)
            v_desc = tma.make_tensor_descriptor(V + cs.to(gl.int64) * stride_vt + hk * stride_vh, shape=[L, D],
                                                strides=[stride_vt, 1], block_shape=[BLOCK_N, D], layout=smem_layout)
            for i in gl.static_range(STAGES):
                _load_kv(k_desc, v_desc, i, (it + i) % STAGES, bars, k_smem, v_smem, i < nb, BLOCK_N, D)
            q_loc = rows_s - cs
            if CAUSAL:
                lim = q_loc + 1
            else:
                lim = q_loc * 0 + L

            # block 0: scores, then its softmax (nothing to overlap with yet)
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

    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    mbarrier.invalidate(q_bar)


def supported(q, k, v) -> str | None:
    """Why this kernel cannot run these (T, H, D) tensors, or None when it can."""
    import torch

    if q.device.type != "cuda":
        return f"tensors on {q.device.type}, not a GPU"
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return f"CUDA capability {torch.cuda.get_device_capability(q.device)}, not 9.x (Hopper)"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype}, not bf16 / fp16"
    if q.shape[2] not in HEAD_DIMS:
        return f"head dim {q.shape[2]}, not one of {HEAD_DIMS}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(0) <= 0 or (t.stride(0) * t.element_size()) % 16 \
                or (t.stride(1) * t.element_size()) % 16 or t.data_ptr() % 16:
            return f"{name} is not TMA-addressable (strides {tuple(t.stride())}, 16-byte rows and base needed)"
    return None


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
