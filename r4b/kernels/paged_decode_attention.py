"""paged_decode_attention: one query token per sequence attends to its context in the paged KV cache.

Owns the torch reference, the Triton kernels (split-K, "flash-decoding") and the public function; the C++ CPU
and CUDA kernels live in csrc/cpu/paged_kv.cpp and csrc/cuda/paged_kv.cu (torch.ops.r4b.paged_decode_attention).

Layout (the inference engine's, docs/DESIGN.md): k_cache and v_cache are (num_blocks, block_size, Hkv, D) as
store_kv writes them; sequence b's token j lives in block block_tables[b, j // block_size] at offset
j % block_size, for j < context_lens[b]. The decode step stores its own key and value first (store_kv), so the
context includes the query's token; no causal mask is needed.

Split-K: the context of each (sequence, KV head) is cut into num_splits ranges of whole BLOCK_N tiles, sized by
that sequence's own length (a short context in a wide table, as in a CUDA graph's static one, still spreads over
the splits; the splits past its end are empty and skipped by the merge); a program
per (sequence, KV head, split) runs an online softmax over its range for all the query heads of its KV head
(GQA: K/V are read once per group), and writes its normalised partial output and log-sum-exp; a second kernel
merges the splits. With one split the first kernel writes the output itself. num_splits depends only on the
shapes (never on context_lens' values, which would need a host sync), so a decode step is CUDA-graph friendly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks, _dispatch
from .store_kv import check_caches

OP = "paged_decode_attention"
_dispatch.register(OP, ("cuda", "triton", "cpp", "torch"))

_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


def paged_decode_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    softmax_scale: float | None = None,
) -> Tensor:
    """Torch reference in fp32 (float64 for float64 inputs): per sequence, gather its context from the cache and
    run softmax(q k^T * scale) v with GQA. A sequence with an empty context gets zeros. Returns q's shape and
    dtype."""
    B, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros((B, Hq, D), dtype=acc_dtype, device=q.device)
    lens = context_lens.tolist()
    for b in range(B):
        n = int(lens[b])
        if n <= 0:
            continue
        j = torch.arange(n, device=q.device)
        blocks = block_tables[b, j // bs].to(torch.int64)
        k = k_cache[blocks, j % bs].to(acc_dtype)  # (n, Hkv, D)
        v = v_cache[blocks, j % bs].to(acc_dtype)
        qb = q[b].to(acc_dtype).view(Hkv, Hq // Hkv, D)  # query heads h*G .. h*G+G-1 share KV head h
        s = torch.einsum("hgd,nhd->hgn", qb, k) * scale
        p = torch.softmax(s, dim=-1)
        out[b] = torch.einsum("hgn,nhd->hgd", p, v).reshape(Hq, D)
    return out.to(q.dtype)


_kernels = None


def _triton_kernels():
    """Build the Triton kernels on first use (triton is optional)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def decode_split_kernel(Q, KC, VC, BT, CL, Out, PO, PLSE, qk_scale, num_splits, n_heads, capacity,
                            num_blocks, stride_qb, stride_qh, stride_ob, stride_oh, stride_bt, stride_slot, stride_kh,
                            BS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                            DOT_PREC: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        # a GPU call's values are not checked on the host: a length is clamped to the table's capacity, and a token
        # whose block id is outside the cache is left out (as the CUDA kernel does), so nothing is read out of bounds
        ctx = tl.minimum(tl.maximum(tl.load(CL + b), 0), capacity)
        # this sequence's context in num_splits ranges of whole BLOCK_N tiles (a short context leaves the last
        # splits empty, which the merge skips): the split of each row follows its own length, not the table's width
        part = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
        lo = s * part
        hi = tl.minimum(lo + part, ctx)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        gmask = offs_g < GROUP
        dmask = offs_d < D
        heads = h * GROUP + offs_g  # this KV head's query heads (rows past GROUP are padding for tl.dot)
        b64 = b.to(tl.int64)
        q = tl.load(Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        kv_head = h * stride_kh
        for n0 in range(lo, hi, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N)
            blk = tl.load(BT + b64 * stride_bt + j // BS, mask=j < hi, other=0)
            jm = (j < hi) & (blk >= 0) & (blk < num_blocks)
            row = (blk.to(tl.int64) * BS + j % BS) * stride_slot + kv_head  # (BLOCK_N,) slot rows
            kvm = jm[:, None] & dmask[None, :]
            k = tl.load(KC + row[:, None] + offs_d[None, :], mask=kvm, other=0.0)
            v = tl.load(VC + row[:, None] + offs_d[None, :], mask=kvm, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_G, BLOCK_N), log2 units
            qk = tl.where(jm[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
            m_i = m_new
        # an empty range (a split past the context, or an empty context) has l_i == 0: output 0, lse -inf
        nonempty = l_i > 0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        omask = gmask[:, None] & dmask[None, :]
        if SPLIT:
            prow = (b64 * n_heads + heads) * num_splits + s  # the partials' row of (b, query head, split)
            tl.store(PO + prow[:, None] * BLOCK_D + offs_d[None, :], out, mask=omask)
            tl.store(PLSE + prow, tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf")),
                     mask=gmask)
        else:
            tl.store(Out + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(Out.dtype.element_ty), mask=omask)

    @triton.jit
    def decode_merge_kernel(PO, PLSE, Out, num_splits, stride_ob, stride_oh, n_heads, D: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.program_id(0)
        hq = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        smask = offs_s < num_splits
        prow = (b.to(tl.int64) * n_heads + hq) * num_splits + offs_s
        lse = tl.load(PLSE + prow, mask=smask, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.where(lse > float("-inf"), tl.exp2(lse - tl.where(m > float("-inf"), m, 0.0)), 0.0)
        total = tl.sum(w, 0)
        po = tl.load(PO + prow[:, None] * BLOCK_D + offs_d[None, :], mask=smask[:, None] & (offs_d[None, :] < D),
                     other=0.0)
        out = tl.sum(po * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(Out + b.to(tl.int64) * stride_ob + hq * stride_oh + offs_d, out.to(Out.dtype.element_ty),
                 mask=offs_d < D)

    _kernels = (decode_split_kernel, decode_merge_kernel)
    return _kernels


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# The GPU launch's (BLOCK_N, num_stages, num_warps): from compiling for sm_90 (2026-11-27, not yet timed): at the
# anchor (bf16, D 128, GQA 4) BLOCK_N 32 with 5 stages double-buffers the K/V tiles in 38 KB of shared memory at 96
# registers (5 programs an SM), where 64 with 3 stages single-buffers them (122 registers, 4 an SM) and 64 with 5
# needs 72 KB (3 an SM). `python -m bench.gpu_diag paged` times the alternatives on a GPU.
GPU_TILE = (32, 5, 4)
_INTERPRET_TILE = (16, 1, 4)  # the CPU interpreter: small tiles, so the tests walk several a split

# Programs aimed at per SM when choosing splits (a guess until tuned on a GPU; the interpreter counts one "SM").
_PROGS_PER_SM = 2
_MIN_PART = 256  # tokens a split reads at least: below that the merge costs more than the parallelism gains


def auto_num_splits(batch: int, kv_heads: int, max_context: int, sms: int) -> int:
    """Splits of each context so that batch * kv_heads * splits programs fill about _PROGS_PER_SM waves of
    ``sms`` SMs, each reading at least _MIN_PART tokens of ``max_context`` (the block table's capacity)."""
    want = -(-(_PROGS_PER_SM * sms) // max(1, batch * kv_heads))
    return max(1, min(want, -(-max_context // _MIN_PART)))


def _paged_decode_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
                         scale: float, num_splits: int, tile: tuple[int, int, int] | None = None) -> Tensor:
    """The split-K launch; ``tile`` = (BLOCK_N, num_stages, num_warps) overrides GPU_TILE (gpu_diag's sweep)."""
    split_k, merge_k = _triton_kernels()
    B, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    block_d = max(16, _pow2(D))
    block_g = max(16, _pow2(group))
    block_n, stages, warps = tile or (_INTERPRET_TILE if _dispatch.triton_interpret() else GPU_TILE)
    capacity = block_tables.shape[1] * bs
    num_splits = min(num_splits, -(-capacity // block_n))  # more would only add empty splits (and grid z <= 65535)
    out = torch.empty_like(q)
    split = num_splits > 1
    if split:
        po = torch.empty((B * Hq * num_splits, block_d), dtype=torch.float32, device=q.device)
        plse = torch.empty(B * Hq * num_splits, dtype=torch.float32, device=q.device)
    else:
        po = plse = out  # unused
    split_k[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, po, plse, scale * _LOG2E, num_splits, Hq,
        capacity, k_cache.shape[0], q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(1), k_cache.stride(2), BS=bs, GROUP=group, D=D, BLOCK_G=block_g, BLOCK_D=block_d,
        BLOCK_N=block_n, SPLIT=split, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps,
        num_stages=stages)
    if split:
        merge_k[(B, Hq)](po, plse, out, num_splits, out.stride(0), out.stride(1), Hq, D=D, BLOCK_D=block_d,
                         BLOCK_S=max(2, _pow2(num_splits)))
    return out


@_dispatch.on_tensor_device
def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    *,
    softmax_scale: float | None = None,
    num_splits: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Decode attention over the paged KV cache (no gradient: an inference op).

    q: (B, Hq, D), one query token per sequence, unit last stride; k_cache, v_cache: (num_blocks, block_size,
    Hkv, D) contiguous, q's dtype, Hq % Hkv == 0, D <= 256; block_tables: (B, max_blocks) int32, sequence b's blocks in
    order; context_lens: (B,) int32, 0 <= context_lens[b] <= max_blocks * block_size (entries of block_tables
    past a sequence's context are never read). Values are checked when block_tables and context_lens are on the
    CPU (a GPU call does not synchronise to read them). softmax_scale defaults to 1/sqrt(D). A sequence with an
    empty context gets zeros. Returns (B, Hq, D) in q's dtype.
    num_splits: how many ranges each context is cut into (split-K, triton and cuda backends; the others ignore
    it); None picks from the shapes and the GPU's SM count.
    backend: None (auto: cuda > triton > cpp > torch), or one of them (r4b/kernels/_dispatch.py).
    """
    check_caches(k_cache, v_cache)
    _checks.tensor("q", q, dtypes=(k_cache.dtype,), ndim=3)
    _checks.tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2)
    _checks.tensor("context_lens", context_lens, dtypes=(torch.int32,), ndim=1)
    _checks.same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens)
    B, Hq, D = q.shape
    num_blocks, bs, Hkv, _ = k_cache.shape
    check_heads(q, k_cache, "(B, Hq, D)")
    _checks.same_len(B, "q", block_tables=block_tables, context_lens=context_lens)
    if num_splits is not None and not (isinstance(num_splits, int) and num_splits >= 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if not scale > 0:
        raise ValueError(f"softmax_scale must be > 0, got {softmax_scale}")
    capacity = block_tables.shape[1] * bs
    if context_lens.device.type == "cpu" and B and not torch.compiler.is_compiling():
        _check_values(block_tables, context_lens, num_blocks, bs)
    chosen = _dispatch.pick(OP, backend, q)
    if B == 0 or capacity == 0:
        return torch.zeros_like(q)
    with torch.no_grad():
        if q.stride(-1) != 1:
            q = q.contiguous()
        bt, cl = block_tables.contiguous(), context_lens.contiguous()
        if chosen == "torch":
            return paged_decode_attention_ref(q, k_cache, v_cache, bt, cl, scale)
        if num_splits is None:
            sms = _dispatch.sm_count(q.device) if q.is_cuda else 4
            num_splits = auto_num_splits(B, Hkv, capacity, sms)
        if chosen in ("cuda", "cpp"):
            return torch.ops.r4b.paged_decode_attention(q, k_cache, v_cache, bt, cl, float(scale), int(num_splits))
        return _paged_decode_triton(q, k_cache, v_cache, bt, cl, float(scale), int(num_splits))


def _check_values(block_tables: Tensor, context_lens: Tensor, num_blocks: int, block_size: int) -> None:
    """context_lens in [0, max_blocks * block_size]; the blocks each context uses in [0, num_blocks)."""
    capacity = block_tables.shape[1] * block_size
    bad = (context_lens < 0) | (context_lens > capacity)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"context_lens values must be in [0, {capacity}] (block_tables' {block_tables.shape[1]} "
                         f"blocks of {block_size}), got context_lens[{i}]={int(context_lens[i])}")
    check_block_ids(block_tables, context_lens, num_blocks, block_size)


def check_block_ids(block_tables: Tensor, context_lens: Tensor, num_blocks: int, block_size: int) -> None:
    """The entries of block_tables (one row per context) that context_lens uses are in [0, num_blocks)."""
    used = torch.arange(block_tables.shape[1]) * block_size < context_lens[:, None].to(torch.int64)
    badb = used & ((block_tables < 0) | (block_tables >= num_blocks))
    if bool(badb.any()):
        b, j = (int(x) for x in torch.nonzero(badb)[0])
        raise ValueError(f"block_tables values a context uses must be in [0, {num_blocks}) (the caches' "
                         f"num_blocks), got block_tables[{b}, {j}]={int(block_tables[b, j])}")


def check_heads(q: Tensor, k_cache: Tensor, layout: str) -> None:
    """q's heads and head dim against the caches': (.., Hq, D) with the caches' D <= MAX_HEAD_DIM, Hq % Hkv == 0."""
    Hq, D = q.shape[-2:]
    Hkv, Dc = k_cache.shape[2:]
    if D != Dc or Hq == 0 or Hq % Hkv:
        raise ValueError(f"q must be {layout} with the caches' D={Dc} and Hq a multiple of their Hkv={Hkv}, "
                         f"got q={tuple(q.shape)}")
    if D > MAX_HEAD_DIM:  # the CUDA kernel's largest tile (flash-attn's limit too); every backend keeps to it
        raise ValueError(f"the head dim must be <= {MAX_HEAD_DIM}, got q={tuple(q.shape)}")
