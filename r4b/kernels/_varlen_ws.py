"""Warp-specialised varlen attention kernels for Hopper (opt-in: ``R4B_VARLEN_FWD=ws``, ``R4B_VARLEN_BWD=ws``).

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
  device by :func:`_tile_table_kernel` from cu_seqlens (no host sync): item i -> (sequence, tile index), within each
  sequence its heavy tiles first (the last query tile of a causal sequence has the most keys; across sequences the
  packed order is only reversed, so the first sequence's tiles start last: a tail to fix); the grid is its upper bound
  cdiv(T, BLOCK_M) + n_seqs items times the heads, the few items past the real count are empty programs;
- one loop over the key blocks [0, hi) with the causal mask (or the key-length mask) applied in every block
  (one compare and select per score: the masked-diagonal split of the default forward would need a second loop);
- Q, K and V of the (sequence, head) come through TMA descriptors built on the device over that sequence's rows
  only, so a block reaching past its end reads zeros, never a neighbour; O and the LSE are stored with masks.

The LSE is the default forward's ((Hq, T) fp32, log2 units), so either backward follows either forward. The
backward (below) has the same shape. The interpreter runs the same kernels with the specialisation ignored (the
CPU tests check their maths and masks, in fp32 / fp16); the sm_90 compile test checks that the pass really
specialised every config (``setmaxnreg`` in the PTX, 12 warps).
Supported on a GPU: CUDA capability 9.x, bf16 / fp16, head dim 64 or 128, TMA-addressable (T, H, D) tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# (BLOCK_N, STAGES). BLOCK_M is 128 (two consumer warpgroups of 64 rows) and num_warps 4 (per warpgroup: the pass
# leaves 8 unspecialised). sm_90 ptxas, bf16, D=128, causal: 128x64 s2 168 registers (consumers 232 by setmaxnreg),
# no spills, 115 kB shared memory; 128x128 s2 168, no spills, 181 kB. DROPPED_CONFIGS: gave NaN on an H200 (third
# GPU run, below); bench.gpu_diag ws --all-configs still runs them, to tell a config's failure from the kernel's.
CONFIGS = [(64, 2), (128, 2)]
DROPPED_CONFIGS = [(64, 3)]
BLOCK_M = 128
NUM_WARPS = 4
HEAD_DIMS = (64, 128)
_INTERP_BLOCK = (32, 16)  # (BLOCK_M, BLOCK_N) under the interpreter: tiles and key blocks cross sequence ends


@triton.jit(do_not_specialize=["n_seqs", "n_items"])
def _tile_table_kernel(CU, TAB, n_seqs, n_items, BLOCK_M: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
                       REVERSE: tl.constexpr):
    """TAB[0, i] = the sequence of work item i and TAB[1, i] its tile (of BLOCK_M rows), for i < n_items; items
    past the real tile count get sequence -1. REVERSE: item i is tile j = total - 1 - i in packed order
    (sequence-major, tiles ascending), so a causal sequence's heaviest query tile (its last) starts before its others;
    otherwise j = i, for key tiles (a causal sequence's first key tile sees the most queries). One program;
    NP >= n_seqs."""
    seqs = tl.arange(0, NP)
    lo = tl.load(CU + seqs, mask=seqs < n_seqs, other=0)
    hi = tl.load(CU + seqs + 1, mask=seqs < n_seqs, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M  # 0 past n_seqs and for empty sequences
    ends = tl.cumsum(tiles, 0)  # tiles of sequences 0..s
    total = tl.sum(tiles, 0)
    for i0 in range(0, n_items, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        if REVERSE:
            j = total - 1 - i
        else:
            j = tl.where(i < total, i, -1)
        before = ends[None, :] <= j[:, None]  # (BLOCK, NP): sequences wholly before tile j
        seq = tl.sum(before.to(tl.int32), 1)
        first = tl.sum(tl.where(before, tiles[None, :], 0), 1)  # tile index of seq's first tile
        ok = j >= 0
        tl.store(TAB + i, tl.where(ok, seq, -1), mask=i < n_items)
        tl.store(TAB + n_items + i, tl.where(ok, j - first, 0), mask=i < n_items)


@triton.jit
def _work_item(TAB, CU, item, n_items):
    """(tile, first row, length, sequence) of work item ``item`` of a tile table; an empty item (sequence -1) has
    length 0 (no key block, every store masked) and reads sequence 0's start."""
    s = tl.load(TAB + item)
    tile = tl.load(TAB + n_items + item)
    real = s >= 0
    s = tl.maximum(s, 0)
    cs = tl.load(CU + s)
    L = tl.where(real, tl.load(CU + s + 1) - cs, 0)
    return tile, cs, L, s


@triton.jit
def _padded_start(cs, s):
    """Where sequence s (first packed row cs) starts in the backward's padded LSE / delta rows: a multiple of 4
    (16 bytes, as TMA coordinates must be), 4 * ceil(cs / 4) + 4 * s (see padded_rows)."""
    return (cs + 3) // 4 * 4 + 4 * s


@triton.jit(do_not_specialize=["T", "n_items", "t_bucket"])
def _ws_fwd_kernel(Q, K, V, Out, LSE, CU, TAB, T, n_items, t_bucket, n_heads, qk_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                   GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, WS: tl.constexpr):
    # program (work item of the tile table, query head), head fastest; no control flow around the loop (above)
    pid = tl.program_id(0)
    h = pid % n_heads
    item = pid // n_heads
    tile, cs, L, _ = _work_item(TAB, CU, item, n_items)
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
    # The Q tile's row coordinate is its own SSA value (m0 + 0 that the compiler cannot fold): triton 3.6's data
    # partitioning (two consumer warpgroups of BLOCK_M / 2 rows) gives the second consumer the coordinate plus
    # BLOCK_M / 2 by remapping that value in all of the consumer's code. With m0 itself as the coordinate, its
    # q_loc = m0 + arange(BLOCK_M / 2, BLOCK_M) was offset twice (causal mask and stores 64 rows off: rows 64-127
    # of every tile wrong on an H200, 2026-11-27); with the constant 0 (a descriptor from the tile's first row),
    # the column coordinate, the same constant, moved to 64. (TTGIR checked by tests/test_varlen_ws.py.)
    q_row = m0 + tl.minimum(L, 0)
    q = q_desc.load([q_row, 0])  # rows past L read as zeros
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


# First GPU run (an H200, triton 3.6, 2026-11-27, by a review helper): the warp-specialised compiles gave wrong
# results, while the same kernels compiled with WS=False were right. Forward: rows 64-127 of every 128-row tile
# wrong. dQ: a launch failure. dK/dV: NaN or 0.1-0.4 relative error, and an illegal instruction when a sequence
# starts at a row that is not a multiple of 4. Causes, found the same day in the pass's TTGIR (sm_90 compiles, no
# GPU): (1) the pass's data partitioning gives the second consumer warpgroup a TMA block's row coordinate plus
# BLOCK / 2 by remapping that SSA value in all of the consumer's code, so where the coordinate was the tile's first
# row m0 (or n0), the consumer's row indices m0 + arange(BLOCK / 2, BLOCK) were offset twice (forward and dQ: the
# causal mask and the stores 64 rows off; dK/dV: kn and the first query block too); (2) the [1, BLOCK_M] LSE /
# delta blocks were split along their first (head) dimension into slots half their size (dQ's launch failure);
# (3) their TMA column offset cs + m0 was not 16-byte aligned for such sequence starts (the illegal instruction).
# Fixed: each row coordinate is its own value (m0 + min(L, 0)); LSE / delta are 1-D blocks of padded rows in which
# every sequence starts at a multiple of 4 (padded_rows). bench.bench_varlen_attention.ws_ir_problems looks for
# (1) and (2) in every config's TTGIR (tests/test_varlen_ws.py). Until their GPU tests pass, GPUs refuse these
# kernels by name (R4B_VARLEN_WS_UNVERIFIED=1 runs them, for that check); the interpreter runs them, TMA loads of
# the padded rows included.
# Second GPU run (H200, 2026-11-27, session 10, R4B_VARLEN_WS_UNVERIFIED=1, 18 of the 29 GPU tests before the
# step's limit): the forward passed all it ran (boundary isolation with finite and inf / NaN changes, the bf16
# anchor rule; causal and not); the backward passed them causal and failed the boundary isolation non-causal
# (4 of 4, with either forward). Not yet run: many short + one long, every config. So each direction has its own
# refusal, lifted when its GPU tests all pass.
# Third GPU run (H200, 2026-11-27, R4B_VARLEN_WS_UNVERIFIED=1): test_ws_every_config_gpu: config (64, 3) gave NaN
# (not causal: every row; causal: some), (128, 2) and (64, 2) passed, each run once. With the autotuner (its pick
# unknown, the first run finite) the non-causal boundary test failed once of several: "out differs between two
# runs ... sequence 1 (rows 100..399): 64 rows differ, local 64..127, heads [3], max diff inf" (the second
# consumer's 64 rows of one tile, one head). compute-sanitizer on bench.gpu_diag ws (CONFIGS[0] = (64, 3), not
# causal, twice): racecheck "Write access at _ws_fwd_kernel+0x9810 in _varlen_ws.py:127 [64 hazards]" and
# "+0xb1f0 in _varlen_ws.py:160 [68 hazards]"; synccheck and memcheck 0 errors; every run inf error (non-finite).
# The ws backward passed all its tests after the plain Triton forward (its earlier failure was this forward's).
# Read from the sm_90 compiles (no GPU; the AOT cubin of that launch has the same two instructions at the same
# offsets): the two racecheck sites are the warp-specialise dispatch state, STS.64 [0x24198] = shared byte 147864
# (the function's allocation.offset, up to ttg.shared = 147872), the partition numbers written before the
# partitions start (the location is the region's first op, line 127) and the exit code after them (line 160), by
# all 128 threads of the producer warpgroup, the same bytes each, read by the other 8 warps after BAR.SYNC 1: a
# benign write-write between warps of one warpgroup, in every config, not the NaN. Shared memory after allocation
# (bench.bench_varlen_attention.ws_smem_problems, every config, both masks) has no overlap between buffers the
# partitions use at once: (64, 3) = K ring [0, 48K), V ring [48K, 96K), Q halves [96K, 112K) and [112K, 128K)
# (one per consumer), the consumers' epilogue scratch (O and LSE layout conversions) [128K, 136K) and
# [136K, 144K), the descriptors' tensormap scratch at 144K, the mbarriers from 147584, the dispatch state at
# 147864; (64, 2) and (128, 2) are the same layout with their ring sizes. The only shared bytes: the pass's unused
# partner mbarrier arrays get offset 0 (inside the K ring's first stage), initialised (mbarrier.init) and never
# invalidated before TMA writes K there: in every config. The TTGIR after allocation of (64, 3) and (64, 2) differs
# only in the ring depth (barrier arrays, the stage index i % 3 and phase (i / 3) & 1). So no cause was found in
# the IR: (64, 3) is dropped on the GPU's evidence alone (DROPPED_CONFIGS), and the intermittent 64-row difference,
# whose config is unknown, may be in the kept configs too: test_ws_every_config_gpu now runs each config twice
# (finite, then the same bits, then against float64), bench.gpu_diag ws --all-configs reports each config,
# dropped ones included.
GPU_BROKEN_FWD = ("the warp-specialised forward has not passed all its GPU tests yet (H200, triton 3.6, "
                  "2026-11-27: passed those that ran): see r4b/kernels/_varlen_ws.py")
GPU_BROKEN_BWD = ("the warp-specialised backward has not passed all its GPU tests yet (H200, triton 3.6, "
                  "2026-11-27: after the Triton forward it passed those that ran; its every-config tests have not "
                  "run): see r4b/kernels/_varlen_ws.py")
PARTS = {"fwd": "GPU_BROKEN_FWD", "bwd": "GPU_BROKEN_BWD"}


# R4B_VARLEN_WS_UNVERIFIED=1 lets a GPU run them while their GPU_BROKEN_* is set: for the GPU check that verifies a
# fix (bench/gpu_check.sh), never for training
ENV_UNVERIFIED = "R4B_VARLEN_WS_UNVERIFIED"


def gpu_broken(part: str) -> str | None:
    """Why GPUs refuse the ``part`` ("fwd" or "bwd") kernels (GPU_BROKEN_FWD / GPU_BROKEN_BWD), or None."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {tuple(PARTS)}, got {part!r}")
    return globals()[PARTS[part]]


def device_problem(device: torch.device, interpreted: bool, part: str) -> str | None:
    """Why the ``part`` ("fwd" or "bwd") kernels cannot run on ``device`` (not a Hopper GPU, and not the
    interpreter; on any GPU while their GPU_BROKEN_* is set, unless $R4B_VARLEN_WS_UNVERIFIED is 1), or None."""
    broken = gpu_broken(part)
    if interpreted:
        return None
    if device.type != "cuda":
        return f"tensors on {device.type}, not a GPU"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return f"CUDA capability {torch.cuda.get_device_capability(device)}, not 9.x (Hopper)"
    return None if os.environ.get(ENV_UNVERIFIED) == "1" else broken


def parts_problem(device: torch.device, interpreted: bool, parts) -> str | None:
    """The first of :func:`device_problem`'s reasons for the directions in ``parts`` ("fwd", "bwd"), or None."""
    return next(filter(None, (device_problem(device, interpreted, part) for part in parts)), None)


def input_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, interpreted: bool) -> str | None:
    """Why this kernel cannot run these (T, H, D) tensors (dtype, head dim, TMA alignment, int32 coordinates),
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


def tile_table(cu: torch.Tensor, T: int, block_m: int, heavy_last: bool = True) -> torch.Tensor:
    """(2, cdiv(T, block_m) + n_seqs) int32 on cu's device: per work item its sequence (-1: none) and tile;
    heavy_last: in reversed packed order (query tiles), else in packed order (key tiles). One launch, no host
    synchronisation (the item count is the bound the lengths cannot pass)."""
    n = cu.numel() - 1
    items = triton.cdiv(T, block_m) + n
    if n > _TABLE_KERNEL_MAX_SEQS:  # the kernel holds every sequence in registers: torch ops past that
        return _tile_table_torch(cu, items, block_m, heavy_last)
    tab = torch.empty((2, items), dtype=torch.int32, device=cu.device)
    np2 = max(16, triton.next_power_of_2(n))
    _tile_table_kernel[(1,)](cu, tab, n, items, BLOCK_M=block_m, NP=np2, BLOCK=max(16, 4096 // np2),
                             REVERSE=heavy_last)
    return tab


_TABLE_KERNEL_MAX_SEQS = 1024


def _tile_table_torch(cu: torch.Tensor, items: int, block_m: int, heavy_last: bool) -> torch.Tensor:
    """:func:`tile_table` with torch ops (about ten small launches, still no host synchronisation), for batches
    of more sequences than the one-program kernel holds."""
    cu = cu.long()
    tiles = (cu[1:] - cu[:-1] + block_m - 1) // block_m
    ends = tiles.cumsum(0)
    total = ends[-1:]
    i = torch.arange(items, device=cu.device)
    j = total - 1 - i if heavy_last else torch.where(i < total, i, -1)
    ok = j >= 0
    seq = torch.searchsorted(ends, j.clamp(min=0), right=True).clamp(max=tiles.numel() - 1)
    first = ends[seq] - tiles[seq]
    return torch.stack([torch.where(ok, seq, -1), torch.where(ok, j - first, 0)]).to(torch.int32)


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


# ---------------------------------------------------------------------------------------------------- backward
# R4B_VARLEN_BWD=ws: the Triton delta kernel (delta = rowsum(dO * O)), then a dQ kernel and a dK/dV kernel in the
# forward's shape (one warp-specialised loop at the top level, a device-built tile table). The dK/dV kernel sums
# the GQA group of its KV head without atomics: its one loop walks (query head of the group, query block) pairs,
# reading Q and dO through descriptors over the sequence's (L, Hq * D) rows, so q and dO need a head stride of D
# (the op's own dO is contiguous; q may be a slice of a fused projection). sm_90 ptxas (bf16, D=128, GQA 4,
# causal): every config specialised (12 warps, setmaxnreg); dK/dV 128x32 s3 / s2 no spills, 132 / 115 kB, 128x64
# s2 36 B spilled; dQ 128x64 s3 / s2 no spills, 182 / 149 kB, 128x128 s2 8 B spilled.
DQ_CONFIGS = [(64, 3), (128, 2), (64, 2)]  # (BLOCK_N, STAGES), BLOCK_M 128
DKDV_CONFIGS = [(32, 3), (64, 2), (32, 2)]  # (BLOCK_M, STAGES), BLOCK_N 128
_INTERP_BWD = {"dq": (32, 16), "dkdv": (32, 16)}  # (rows of the program's tile, inner step) under the interpreter


@triton.jit(do_not_specialize=["T", "n_items", "t_bucket"])
def _ws_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, TAB, T, n_items, t_bucket, n_heads, qk_scale, sm_scale,
                  Tp, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                  stride_dqt, stride_dqh,
                  GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, WS: tl.constexpr):
    # program (query tile of one sequence, query head): dQ = scale * sum over key blocks of dS K. LSE and DELTA
    # are (Hq, Tp) in padded rows (padded_rows: each sequence starts at a multiple of 4), read through TMA as
    # [BLOCK_M] blocks: the pass fails on a pointer load before the loop whose result the loop uses (as the rows'
    # LSE would be)
    pid = tl.program_id(0)
    h = pid % n_heads
    item = pid // n_heads
    tile, cs, L, s = _work_item(TAB, CU, item, n_items)
    m0 = tile * BLOCK_M
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    cs64 = cs.to(tl.int64)
    rows_d = tl.maximum(L, 1)
    q_desc = tl.make_tensor_descriptor(Q + cs64 * stride_qt + h64 * stride_qh, shape=[rows_d, D],
                                       strides=[stride_qt, 1], block_shape=[BLOCK_M, D])
    do_desc = tl.make_tensor_descriptor(DO + cs64 * stride_dot + h64 * stride_doh, shape=[rows_d, D],
                                        strides=[stride_dot, 1], block_shape=[BLOCK_M, D])
    k_desc = tl.make_tensor_descriptor(K + cs64 * stride_kt + hk64 * stride_kh, shape=[rows_d, D],
                                       strides=[stride_kt, 1], block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V + cs64 * stride_vt + hk64 * stride_vh, shape=[rows_d, D],
                                       strides=[stride_vt, 1], block_shape=[BLOCK_N, D])
    q_row = m0 + tl.minimum(L, 0)  # the tile's row coordinate as its own value (see _ws_fwd_kernel)
    q = q_desc.load([q_row, 0])
    do = do_desc.load([q_row, 0])
    q_loc = m0 + tl.arange(0, BLOCK_M)
    keep = q_loc < L
    rows = cs64 + q_loc.to(tl.int64)
    # 1-D blocks: the pass splits them between the consumers along their one dimension (a [1, BLOCK_M] block of
    # (Hq, T) rows was split along the head coordinate into slots half its size: a launch failure on an H200,
    # 2026-11-27); rows past L: another sequence's or head's (not stored)
    lse_desc = tl.make_tensor_descriptor(LSE, shape=[n_heads * Tp], strides=[1], block_shape=[BLOCK_M])
    delta_desc = tl.make_tensor_descriptor(DELTA, shape=[n_heads * Tp], strides=[1], block_shape=[BLOCK_M])
    lrow = h * Tp + _padded_start(cs, s) + m0
    lse = lse_desc.load([lrow])
    delta = delta_desc.load([lrow])
    # rows past L are another sequence's (or head's) padded rows: zeroed, so no neighbour's value (nor a NaN or an
    # inf of it: exp2(0 - lse) overflows for lse < -128) enters any arithmetic of this program, stored or not
    lse = tl.where(keep, lse, 0.0)
    delta = tl.where(keep, delta, 0.0)
    offs_n = tl.arange(0, BLOCK_N)
    if CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M, L)
    else:
        hi = L
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for n0 in tl.range(0, hi, BLOCK_N, warp_specialize=WS):
        k = k_desc.load([n0, 0])
        v = v_desc.load([n0, 0])
        kn = n0 + offs_n
        if CAUSAL:  # valid rows have q_loc < L: this also cuts the zero-filled keys past L
            ok = kn[None, :] <= q_loc[:, None]
        else:
            ok = (kn < L)[None, :]
        p = tl.where(ok, tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    offs_d = tl.arange(0, D)
    tl.store(DQ + h64 * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=keep[:, None])


@triton.jit(do_not_specialize=["T", "n_items", "t_bucket"])
def _ws_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, TAB, T, n_items, t_bucket, n_kv_heads, qk_scale, sm_scale,
                    Tp, stride_qt, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_dkt, stride_dkh,
                    stride_dvt, stride_dvh,
                    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                    CAUSAL: tl.constexpr, WS: tl.constexpr):
    # program (key tile of one sequence, KV head): dK, dV summed over the GROUP query heads sharing the KV head
    pid = tl.program_id(0)
    hk = pid % n_kv_heads
    item = pid // n_kv_heads
    tile, cs, L, s = _work_item(TAB, CU, item, n_items)
    n0 = tile * BLOCK_N
    hk64 = hk.to(tl.int64)
    cs64 = cs.to(tl.int64)
    rows_d = tl.maximum(L, 1)
    k_desc = tl.make_tensor_descriptor(K + cs64 * stride_kt + hk64 * stride_kh, shape=[rows_d, D],
                                       strides=[stride_kt, 1], block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V + cs64 * stride_vt + hk64 * stride_vh, shape=[rows_d, D],
                                       strides=[stride_vt, 1], block_shape=[BLOCK_N, D])
    # the sequence's rows of all query heads, (L, Hq * D): a block at column h * D is head h's (head stride D)
    width = n_kv_heads * GROUP * D
    q_desc = tl.make_tensor_descriptor(Q + cs64 * stride_qt, shape=[rows_d, width], strides=[stride_qt, 1],
                                       block_shape=[BLOCK_M, D])
    do_desc = tl.make_tensor_descriptor(DO + cs64 * stride_dot, shape=[rows_d, width], strides=[stride_dot, 1],
                                        block_shape=[BLOCK_M, D])
    lse_desc = tl.make_tensor_descriptor(LSE, shape=[n_kv_heads * GROUP * Tp], strides=[1], block_shape=[BLOCK_M])
    delta_desc = tl.make_tensor_descriptor(DELTA, shape=[n_kv_heads * GROUP * Tp], strides=[1],
                                           block_shape=[BLOCK_M])
    ps = _padded_start(cs, s)
    # the key tile's row coordinate as its own value (see _ws_fwd_kernel: with n0 itself the second consumer's n0
    # would move by BLOCK_N / 2 everywhere, in kn and in the first query block lo too)
    k_row = n0 + tl.minimum(L, 0)
    k = k_desc.load([k_row, 0])  # zeros past L: those rows' dK / dV are not stored
    v = v_desc.load([k_row, 0])
    kn = n0 + tl.arange(0, BLOCK_N)
    if CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M  # the first query block that sees a key of the tile
    else:
        lo = n0 * 0
    nb = tl.where(L > lo, (L - lo + BLOCK_M - 1) // BLOCK_M, 0)  # query blocks per head
    offs_m = tl.arange(0, BLOCK_M)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for i in tl.range(0, GROUP * nb, warp_specialize=WS):  # (query head of the group, query block) pairs
        g = i // nb
        m0 = lo + (i - g * nb) * BLOCK_M
        h = hk * GROUP + g
        q = q_desc.load([m0, h * D])  # (BLOCK_M, D), zeros past L
        do = do_desc.load([m0, h * D])
        qi = m0 + offs_m
        qmask = qi < L
        # through the producer's TMA (as pointer loads they sat in the consumers' loop)
        lrow = h * Tp + ps + m0
        lse = lse_desc.load([lrow])
        delta = delta_desc.load([lrow])
        # rows past L are another sequence's or head's: a NaN delta there would reach dK through 0 * NaN
        lse = tl.where(qmask, lse, 0.0)
        delta = tl.where(qmask, delta, 0.0)
        if CAUSAL:
            ok = qmask[None, :] & (qi[None, :] >= kn[:, None])
        else:  # keys past L too (zeros, not stored), as the causal mask cuts them: pT exactly 0 there
            ok = qmask[None, :] & (kn < L)[:, None]
        pT = tl.where(ok, tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :]), 0.0)  # (BLOCK_N, BLOCK_M)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    keep = kn < L
    r = cs64 + kn.to(tl.int64)
    offs_d = tl.arange(0, D)
    tl.store(DK + hk64 * stride_dkh + r[:, None] * stride_dkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=keep[:, None])
    tl.store(DV + hk64 * stride_dvh + r[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=keep[:, None])


TUNED_DQ = triton.autotune([triton.Config({"BLOCK_N": n}, num_warps=NUM_WARPS, num_stages=st) for n, st in DQ_CONFIGS],
                           key=["D", "CAUSAL", "GROUP", "t_bucket"])(_ws_dq_kernel)
TUNED_DKDV = triton.autotune([triton.Config({"BLOCK_M": m}, num_warps=NUM_WARPS, num_stages=st)
                              for m, st in DKDV_CONFIGS], key=["D", "CAUSAL", "GROUP", "t_bucket"])(_ws_dkdv_kernel)


def bwd_input_problem(q: torch.Tensor, do: torch.Tensor) -> str | None:
    """Why the dK/dV kernel cannot read q and dO through its (L, Hq * D) descriptors (a head stride other than
    D), or None."""
    for name, t in (("q", q), ("the output gradient", do)):
        if t.stride(1) != t.shape[2]:
            return f"{name} has head stride {t.stride(1)}, not the head dim {t.shape[2]}"
    return None


def _padded_len(T: int, n_seqs: int) -> int:
    """Tp, the length of the padded LSE / delta rows of T packed rows in n_seqs sequences (padded_rows)."""
    return -(-T // 4) * 4 + 4 * (n_seqs + 1)


def padded_problem(T: int, n_heads: int, n_seqs: int) -> str | None:
    """Why the backward's padded LSE / delta rows (padded_rows: up to 4 more per sequence) would pass the
    kernels' int32 offsets (n_heads * Tp >= 2^31: many short sequences in a huge batch), or None."""
    rows = n_heads * _padded_len(T, n_seqs)
    return f"Hq * padded rows = {rows} reaches 2^31 (int32 LSE / delta offsets)" if rows >= 2**31 else None


def padded_rows(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """x (..., T) per packed row -> (..., Tp), zeros but for sequence s's rows, which start at 4 * ceil(cs / 4) + 4 * s
    (cs its first packed row; Tp = 4 * ceil(T / 4) + 4 * (n_seqs + 1), a multiple of 4): the backward kernels read
    a sequence's LSE / delta as 1-D TMA blocks, whose coordinates must be 16-byte aligned. No host sync."""
    T = x.shape[-1]
    n = cu.numel() - 1
    cu = cu.long()
    starts = (cu[:-1] + 3) // 4 * 4 + 4 * torch.arange(n, device=cu.device)
    pos = torch.arange(T, device=cu.device) + torch.repeat_interleave(starts - cu[:-1], cu[1:] - cu[:-1],
                                                                      output_size=T)
    out = x.new_zeros((*x.shape[:-1], _padded_len(T, n)))
    out[..., pos] = x
    return out


def backward(do, q, k, v, lse, delta, cu, scale: float, causal: bool, interpreted: bool, dq_config=None,
             dkdv_config=None):
    """(dq, dk, dv) from the output gradient, the forward's LSE (log2 units) and delta = rowsum(dO * O), both
    (Hq, T) fp32. Configs: one of DQ_CONFIGS / DKDV_CONFIGS, or None for the autotuners. The caller checks
    :func:`input_problem` (q, k, v, dO) and :func:`bwd_input_problem`, and sets triton's scratch allocator."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    meta = dict(GROUP=Hq // Hkv, D=D, CAUSAL=causal, WS=not interpreted)
    bm = _INTERP_BWD["dq"][0] if interpreted else BLOCK_M
    bn = _INTERP_BWD["dkdv"][0] if interpreted else BLOCK_M
    qtab = tile_table(cu, T, bm, heavy_last=True)
    ktab = tile_table(cu, T, bn, heavy_last=False)
    lse_p, delta_p = padded_rows(torch.stack([lse, delta]), cu)
    Tp = lse_p.shape[1]
    common = (q, k, v, do, lse_p, delta_p)
    dq_args = (*common, dq, cu, qtab, T, qtab.shape[1], T.bit_length(), Hq, scale * 1.4426950408889634, scale,
               Tp, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1), dq.stride(0), dq.stride(1))
    kv_args = (*common, dk, dv, cu, ktab, T, ktab.shape[1], T.bit_length(), Hkv, scale * 1.4426950408889634, scale,
               Tp, q.stride(0), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
               dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1))
    dq_grid = (qtab.shape[1] * Hq,)
    kv_grid = (ktab.shape[1] * Hkv,)
    if interpreted:
        _ws_dq_kernel[dq_grid](*dq_args, BLOCK_M=bm, BLOCK_N=_INTERP_BWD["dq"][1], **meta)
        _ws_dkdv_kernel[kv_grid](*kv_args, BLOCK_N=bn, BLOCK_M=_INTERP_BWD["dkdv"][1], **meta)
        return dq, dk, dv
    if dq_config is None:
        TUNED_DQ[dq_grid](*dq_args, BLOCK_M=bm, **meta)
    else:
        _ws_dq_kernel[dq_grid](*dq_args, BLOCK_M=bm, BLOCK_N=dq_config[0], num_warps=NUM_WARPS,
                               num_stages=dq_config[1], **meta)
    if dkdv_config is None:
        TUNED_DKDV[kv_grid](*kv_args, BLOCK_N=bn, **meta)
    else:
        _ws_dkdv_kernel[kv_grid](*kv_args, BLOCK_N=bn, BLOCK_M=dkdv_config[0], num_warps=NUM_WARPS,
                                 num_stages=dkdv_config[1], **meta)
    return dq, dk, dv
