"""paged_prefill_attention: a packed chunk of new tokens per sequence attends, causally, to its sequence's whole
context in the paged KV cache (the cached prefix and the chunk itself).

This is the inference engine's "extend" step: the later chunks of a long prompt (chunked prefill), and the mode
suffix each completion feeds after its shared prompt. The step has stored the chunk's keys and values first
(store_kv), so everything is read from the cache: sequence s's chunk is q rows cu_seqlens_q[s] ..
cu_seqlens_q[s+1] - 1, the last L_s tokens of its context_lens[s] cached tokens, and its row i (at position
context_lens[s] - L_s + i) attends to cache positions 0 .. that position. Cache layout as in store_kv /
paged_decode_attention: token j of sequence s in block block_tables[s, j // block_size] at offset j % block_size.

Triton kernel: a program per (block of BLOCK_M rows of one sequence's chunk, sequence, KV head) runs a flash
attention forward (fp32 online softmax in log2 units) over the K/V tiles of its context up to its last row's
position, gathered through the block table. Its rows are (token, query head) pairs of the KV head's group, so GQA
reads each K/V tile once per group. No gradient (an inference op).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks, _dispatch
from .paged_decode_attention import check_block_ids, check_heads
from .store_kv import check_caches

OP = "paged_prefill_attention"
_dispatch.register(OP, ("triton", "torch"))

_LOG2E = 1.4426950408889634
_kernel = None


def paged_prefill_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    cu_seqlens_q: Tensor,
    context_lens: Tensor,
    softmax_scale: float | None = None,
) -> Tensor:
    """Torch reference in fp32 (float64 for float64 inputs): per sequence, gather its context and run causal
    softmax(q k^T * scale) v with the chunk at the context's end, GQA. Returns q's shape and dtype."""
    T, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros((T, Hq, D), dtype=acc, device=q.device)
    cu, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    for s in range(len(lens)):
        a, b, ctx = cu[s], cu[s + 1], int(lens[s])
        if b == a:
            continue
        j = torch.arange(ctx, device=q.device)
        blocks = block_tables[s, j // bs].to(torch.int64)
        k = k_cache[blocks, j % bs].to(acc).repeat_interleave(G, dim=1)  # (ctx, Hq, D)
        v = v_cache[blocks, j % bs].to(acc).repeat_interleave(G, dim=1)
        pos = torch.arange(ctx - (b - a), ctx, device=q.device)  # the rows' positions
        scores = torch.einsum("thd,nhd->htn", q[a:b].to(acc), k) * scale
        scores = scores.masked_fill(j[None, None, :] > pos[None, :, None], float("-inf"))
        out[a:b] = torch.einsum("htn,nhd->thd", torch.softmax(scores, dim=-1), v)
    return out.to(q.dtype)


def _triton_kernel():
    global _kernel
    if _kernel is not None:
        return _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def prefill_kernel(Q, KC, VC, BT, CU, CL, Out, qk_scale, capacity, num_blocks, stride_qt, stride_qh, stride_ot,
                       stride_oh, stride_bt, stride_slot, stride_kh, BS: tl.constexpr, GROUP: tl.constexpr,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_PREC: tl.constexpr):
        pid_m = tl.program_id(0)
        s = tl.program_id(1)
        kvh = tl.program_id(2)
        start = tl.load(CU + s)
        L = tl.load(CU + s + 1) - start
        if pid_m * BLOCK_M < L * GROUP:
            # lengths are not checked on the host for GPU tensors: clamp to the table's capacity (and to the chunk)
            ctx = tl.maximum(tl.minimum(tl.load(CL + s), capacity), L)
            first = ctx - L  # position of the chunk's row 0
            # GQA: the block's rows are (token, query head of this KV head) pairs, token-major, so the GROUP query
            # heads that share a K/V tile read it once
            m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rows = m // GROUP  # the chunk's token of each row
            head = kvh * GROUP + m % GROUP
            rmask = rows < L
            offs_d = tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            s64 = s.to(tl.int64)
            qrow = (start + rows).to(tl.int64)
            q = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                        mask=rmask[:, None] & dmask[None, :], other=0.0)
            pos = first + rows  # (BLOCK_M,)
            # past the position of the block's last token
            hi = tl.minimum(first + (pid_m * BLOCK_M + BLOCK_M - 1) // GROUP + 1, ctx)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            kv_head = kvh * stride_kh
            for n0 in range(0, hi, BLOCK_N):
                j = n0 + tl.arange(0, BLOCK_N)
                blk = tl.load(BT + s64 * stride_bt + j // BS, mask=j < hi, other=0)
                jm = (j < hi) & (blk >= 0) & (blk < num_blocks)
                slot = (blk.to(tl.int64) * BS + j % BS) * stride_slot + kv_head
                kvm = jm[:, None] & dmask[None, :]
                k = tl.load(KC + slot[:, None] + offs_d[None, :], mask=kvm, other=0.0)
                v = tl.load(VC + slot[:, None] + offs_d[None, :], mask=kvm, other=0.0)
                qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
                qk = tl.where(jm[None, :] & (j[None, :] <= pos[:, None]), qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row with nothing yet stays at 0
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(qk - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
                m_i = m_new
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(Out + qrow[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                     out.to(Out.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])

    _kernel = prefill_kernel
    return _kernel


# (BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU: a starting point from the varlen forward's tiles, not timed
GPU_TILE = (64, 64, 4, 2)
_INTERPRET_TILE = (16, 16, 4, 1)


def _prefill_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, cu_seqlens_q: Tensor,
                    context_lens: Tensor, max_seqlen_q: int, scale: float) -> Tensor:
    kernel = _triton_kernel()
    T, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    block_m, block_n, warps, stages = _INTERPRET_TILE if _dispatch.triton_interpret() else GPU_TILE
    block_d = max(16, 1 << (D - 1).bit_length())
    out = torch.empty_like(q)
    grid = (-(-max_seqlen_q * (Hq // Hkv) // block_m), context_lens.shape[0], Hkv)
    kernel[grid](q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out, scale * _LOG2E,
                 block_tables.shape[1] * bs, k_cache.shape[0], q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                 block_tables.stride(0), k_cache.stride(1), k_cache.stride(2), BS=bs, GROUP=Hq // Hkv, D=D,
                 BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                 DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return out


@_dispatch.on_tensor_device
def paged_prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    cu_seqlens_q: Tensor,
    context_lens: Tensor,
    max_seqlen_q: int,
    *,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context (no gradient).

    q: (T, Hq, D), the chunks of n sequences packed, unit last stride; k_cache, v_cache: (num_blocks, block_size,
    Hkv, D), q's dtype, Hq % Hkv == 0, D <= 256; block_tables: (n, max_blocks) int32; cu_seqlens_q: (n + 1,) int32,
    0 .. T, the chunks' boundaries; context_lens: (n,) int32, each sequence's cached tokens, its chunk included
    (L_s <= context_lens[s] <= max_blocks * block_size); max_seqlen_q: the longest chunk. Values are checked when
    the index tensors are on the CPU (a GPU call does not synchronise to read them). softmax_scale defaults to
    1/sqrt(D). Returns (T, Hq, D) in q's dtype.
    backend: None (auto: triton > torch), or one of them (r4b/kernels/_dispatch.py).
    """
    check_caches(k_cache, v_cache)
    _checks.tensor("q", q, dtypes=(k_cache.dtype,), ndim=3)
    _checks.tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2)
    _checks.tensor("cu_seqlens_q", cu_seqlens_q, dtypes=(torch.int32,), ndim=1)
    _checks.tensor("context_lens", context_lens, dtypes=(torch.int32,), ndim=1)
    _checks.same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                        cu_seqlens_q=cu_seqlens_q, context_lens=context_lens)
    T, Hq, D = q.shape
    num_blocks, bs = k_cache.shape[:2]
    check_heads(q, k_cache, "(T, Hq, D)")
    n = context_lens.shape[0]
    if cu_seqlens_q.shape[0] != n + 1 or block_tables.shape[0] != n:
        raise ValueError(f"cu_seqlens_q must be (n + 1,) and block_tables (n, max_blocks) for n = "
                         f"context_lens.shape[0] = {n}, got cu_seqlens_q {tuple(cu_seqlens_q.shape)} and "
                         f"block_tables {tuple(block_tables.shape)}")
    if not isinstance(max_seqlen_q, int) or max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q must be an int >= 0, got {max_seqlen_q!r}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if not scale > 0:
        raise ValueError(f"softmax_scale must be > 0, got {softmax_scale}")
    if context_lens.device.type == "cpu" and n and not torch.compiler.is_compiling():
        _check_values(block_tables, cu_seqlens_q, context_lens, T, max_seqlen_q, num_blocks, bs)
    chosen = _dispatch.pick(OP, backend, q)
    if T == 0 or n == 0:
        return torch.zeros_like(q)
    with torch.no_grad():
        if q.stride(-1) != 1:
            q = q.contiguous()
        bt, cu, cl = block_tables.contiguous(), cu_seqlens_q.contiguous(), context_lens.contiguous()
        if chosen == "torch":
            return paged_prefill_attention_ref(q, k_cache, v_cache, bt, cu, cl, scale)
        return _prefill_triton(q, k_cache, v_cache, bt, cu, cl, max_seqlen_q, float(scale))


def _check_values(block_tables: Tensor, cu: Tensor, context_lens: Tensor, T: int, max_seqlen_q: int,
                  num_blocks: int, block_size: int) -> None:
    lens = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != T or bool((lens < 0).any()):
        raise ValueError(f"cu_seqlens_q must rise from 0 to q's T={T}, got {cu.tolist()}")
    if lens.numel() and int(lens.max()) > max_seqlen_q:
        raise ValueError(f"max_seqlen_q={max_seqlen_q} is below the longest chunk ({int(lens.max())})")
    capacity = block_tables.shape[1] * block_size
    bad = (context_lens < lens) | (context_lens > capacity)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"context_lens values must be in [chunk length, {capacity}] (block_tables' "
                         f"{block_tables.shape[1]} blocks of {block_size}), got context_lens[{i}]="
                         f"{int(context_lens[i])} for a chunk of {int(lens[i])}")
    check_block_ids(block_tables, context_lens, num_blocks, block_size)
