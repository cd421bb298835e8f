"""Warp-specialised forward of varlen attention for Hopper (opt-in: ``R4B_VARLEN_FWD=ws``).

Why it exists: the default Triton forward (varlen_attention._fwd_kernel) runs each program's two warpgroups in
lockstep: every wgmma is followed by ``wgmma.wait_group 0`` and the softmax, so the tensor cores idle while the
CUDA cores work. triton 3.6 ships a Hopper warp-specialisation pass (``tl.range(..., warp_specialize=True)``
with ``num_warps=4``): it splits a program into a TMA producer warpgroup and two consumer warpgroups of
BLOCK_M / 2 query rows each, with ``setmaxnreg`` moving registers from the producer to the consumers, and
mbarrier rings between them, FlashAttention-3's layout: one consumer's softmax runs while the other's products
are on the tensor cores.

What the pass takes (sm_90 compiles, triton 3.6, checked while writing this): one warp-specialised loop at the
top level of the kernel. A loop nested in another (the default forward's walk over the segments of a tile of
packed rows), a second loop after it (an unmasked loop then a masked one), a ``while`` before it (a binary
search over cu_seqlens) or an early ``return`` each make the pass fail; an ``if`` inside the loop silently turns
the specialisation off. Hence this kernel's shape:

- a program is one (query tile of one sequence, query head). The tiles come from a small table built on the
  device by :func:`_tile_table_kernel` from cu_seqlens (no host sync): item i -> (sequence, tile index), the heavy
  tiles first (the last tile of a causal sequence has the most keys); the grid is its upper bound
  cdiv(T, BLOCK_M) + n_seqs items times the heads, the few items past the real count are empty programs;
- one loop over the key blocks [0, hi) with the causal mask (or the key-length mask) applied in every block
  (one compare and select per score: the masked-diagonal split of the default forward would need a second loop);
- Q, K and V of the (sequence, head) come through TMA descriptors built on the device over that sequence's rows
  only, so a block reaching past its end reads zeros, never a neighbour; O and the LSE are stored with masks.

The LSE is the default forward's ((Hq, T) fp32, log2 units), so either backward follows. The interpreter runs
the same kernel with the specialisation ignored (the CPU tests check its maths and masks, in fp32 / fp16); the
sm_90 compile test checks that the pass really specialised it (``setmaxnreg`` in the PTX, 12 warps).
Supported on a GPU: CUDA capability 9.x, bf16 / fp16, head dim 64 or 128, TMA-addressable (T, H, D) tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_N, STAGES). BLOCK_M is 128 (two consumer warpgroups of 64 rows) and num_warps 4 (per warpgroup: the pass
# leaves 8 unspecialised). sm_90 ptxas, bf16, D=128, causal: 128x64 s3 168 registers (consumers 232 by setmaxnreg),
# no spills, 164 kB shared memory; 128x128 s2 168, no spills, 197 kB; 128x64 s2 131 kB.
CONFIGS = [(64, 3), (128, 2), (64, 2)]
BLOCK_M = 128
NUM_WARPS = 4
HEAD_DIMS = (64, 128)
_INTERP_BLOCK = (32, 16)  # (BLOCK_M, BLOCK_N) under the interpreter: tiles and key blocks cross sequence ends


@triton.jit(do_not_specialize=["n_seqs", "n_items"])
def _tile_table_kernel(CU, TAB, n_seqs, n_items, BLOCK_M: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    """TAB[0, i] = the sequence of work item i and TAB[1, i] its query tile, for i < n_items; items past the
    real tile count get sequence -1. Item i is tile j = total - 1 - i in packed order (sequence-major, tiles
    ascending), so a causal sequence's heaviest (last) tile starts first. One program; NP >= n_seqs."""
    seqs = tl.arange(0, NP)
    lo = tl.load(CU + seqs, mask=seqs < n_seqs, other=0)
    hi = tl.load(CU + seqs + 1, mask=seqs < n_seqs, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M  # 0 past n_seqs and for empty sequences
    ends = tl.cumsum(tiles, 0)  # tiles of sequences 0..s
    total = tl.sum(tiles, 0)
    for i0 in range(0, n_items, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        j = total - 1 - i
        before = ends[None, :] <= j[:, None]  # (BLOCK, NP): sequences wholly before tile j
        seq = tl.sum(before.to(tl.int32), 1)
        first = tl.sum(tl.where(before, tiles[None, :], 0), 1)  # tile index of seq's first tile
        ok = j >= 0
        tl.store(TAB + i, tl.where(ok, seq, -1), mask=i < n_items)
        tl.store(TAB + n_items + i, tl.where(ok, j - first, 0), mask=i < n_items)


@triton.jit(do_not_specialize=["T", "n_items", "t_bucket"])
def _ws_fwd_kernel(Q, K, V, Out, LSE, CU, TAB, T, n_items, t_bucket, n_heads, qk_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                   GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, WS: tl.constexpr):
    # program (work item of the tile table, query head), head fastest; no control flow around the loop (above)
    pid = tl.program_id(0)
    h = pid % n_heads
    item = pid // n_heads
    s = tl.load(TAB + item)
    tile = tl.load(TAB + n_items + item)
    real = s >= 0
    s = tl.maximum(s, 0)
    cs = tl.load(CU + s)
    L = tl.where(real, tl.load(CU + s + 1) - cs, 0)  # 0: an empty item (no key block, every store masked)
    m0 = tile * BLOCK_M
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    cs64 = cs.to(tl.int64)
    rows_d = tl.maximum(L, 1)  # descriptors over the sequence's rows (at least one: an empty item's read nothing)
    q_desc = tl.make_tensor_descriptor(Q + cs64 * stride_qt + h64 * stride_qh, shape=[rows_d, D],
                                       strides=[stride_qt, 1], block_shape=[BLOCK_M, D])
    k_desc = tl.make_tensor_descriptor(K + cs64 * stride_kt + hk64 * stride_kh, shape=[rows_d, D],
                                       strides=[stride_kt, 1], block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V + cs64 * stride_vt + hk64 * stride_vh, shape=[rows_d, D],
                                       strides=[stride_vt, 1], block_shape=[BLOCK_N, D])
    q = q_desc.load([m0, 0])  # rows past L read as zeros
    q_loc = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    if CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M, L)
    else:
        hi = L
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in tl.range(0, hi, BLOCK_N, warp_specialize=WS):
        k = k_desc.load([n0, 0])  # (BLOCK_N, D), zeros past L
        qk = tl.dot(q, tl.trans(k))
        kn = n0 + offs_n
        if CAUSAL:  # valid rows have q_loc < L, so this also cuts the zero-filled keys past L
            ok = kn[None, :] <= q_loc[:, None]
        else:
            ok = (kn < L)[None, :]
        qk = tl.where(ok, qk * qk_scale, -1.0e30)  # log2 units; finite, so no inf - inf
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([n0, 0])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # 0 only in rows that are not stored
    out = acc / l_i[:, None]
    rows = cs64 + q_loc.to(tl.int64)
    keep = q_loc < L
    offs_d = tl.arange(0, D)
    tl.store(Out + h64 * stride_oh + rows[:, None] * stride_ot + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=keep[:, None])
    tl.store(LSE + h64 * T + rows, m_i + tl.log2(l_i), mask=keep)


def _configs():
    return [triton.Config({"BLOCK_N": n}, num_warps=NUM_WARPS, num_stages=st) for n, st in CONFIGS]


# keyed like the default forward (head dim, causality, GQA group, log2 bucket of T), never on per-batch lengths
TUNED = triton.autotune(_configs(), key=["D", "CAUSAL", "GROUP", "t_bucket"])(_ws_fwd_kernel)


def device_problem(device: torch.device, interpreted: bool) -> str | None:
    """Why this kernel cannot run on ``device`` (not a Hopper GPU, and not the interpreter), or None."""
    if interpreted:
        return None
    if device.type != "cuda":
        return f"tensors on {device.type}, not a GPU"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return f"CUDA capability {torch.cuda.get_device_capability(device)}, not 9.x (Hopper)"
    return None


def input_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, interpreted: bool) -> str | None:
    """Why this kernel cannot run these (T, H, D) tensors (dtype, head dim, TMA alignment, int32 head offsets),
    or None. The interpreter also takes fp32 (the CPU tests' precision)."""
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if interpreted else (torch.bfloat16, torch.float16)
    if q.dtype not in dtypes:
        return f"dtype {q.dtype}, not one of {dtypes}"
    if q.shape[2] not in HEAD_DIMS and not (interpreted and q.shape[2] in (16, 32)):
        return f"head dim {q.shape[2]}, not one of {HEAD_DIMS}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(0) <= 0 or (t.stride(0) * t.element_size()) % 16 \
                or (t.stride(1) * t.element_size()) % 16 or t.data_ptr() % 16:
            return f"{name} is not TMA-addressable (strides {tuple(t.stride())}, 16-byte rows and base needed)"
    if 2 * q.shape[1] * q.shape[0] >= 2**31:
        return f"Hq * T = {q.shape[1] * q.shape[0]} reaches 2^30"
    return None


def tile_table(cu: torch.Tensor, T: int, block_m: int) -> torch.Tensor:
    """(2, cdiv(T, block_m) + n_seqs) int32 on cu's device: per work item its sequence (-1: none) and query
    tile. One launch, no host synchronisation (the item count is the bound the lengths cannot pass)."""
    n = cu.numel() - 1
    items = triton.cdiv(T, block_m) + n
    tab = torch.empty((2, items), dtype=torch.int32, device=cu.device)
    np2 = max(16, triton.next_power_of_2(n))
    _tile_table_kernel[(1,)](cu, tab, n, items, BLOCK_M=block_m, NP=np2, BLOCK=max(16, 4096 // np2))
    return tab


def forward(q, k, v, o, lse, cu, scale_log2: float, causal: bool, interpreted: bool, config=None) -> None:
    """Write o (T, Hq, D) and lse (Hq, T, log2 units). config: one of CONFIGS, or None for the autotuner. The
    caller checks :func:`device_problem` / :func:`input_problem` and sets triton's scratch allocator on a GPU
    (the kernel builds its TMA descriptors on the device)."""
    T, Hq, D = q.shape
    bm = _INTERP_BLOCK[0] if interpreted else BLOCK_M
    tab = tile_table(cu, T, bm)
    items = tab.shape[1]
    args = (q, k, v, o, lse, cu, tab, T, items, T.bit_length(), Hq, scale_log2, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1))
    meta = dict(GROUP=Hq // k.shape[1], D=D, CAUSAL=causal, BLOCK_M=bm, WS=not interpreted)
    grid = (items * Hq,)
    if interpreted:
        _ws_fwd_kernel[grid](*args, BLOCK_N=_INTERP_BLOCK[1], **meta)
    elif config is None:
        TUNED[grid](*args, **meta)
    else:
        bn, stages = config
        _ws_fwd_kernel[grid](*args, BLOCK_N=bn, num_warps=NUM_WARPS, num_stages=stages, **meta)
