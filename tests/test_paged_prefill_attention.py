"""paged_prefill_attention on every backend against a float64 loop through the block tables; that each row equals
paged_decode_attention at its position and that a chunk with no cached prefix equals varlen_attention; isolation
between sequences; the fp16 rule; its errors."""

from __future__ import annotations

import math

import pytest
import torch

from r4b.kernels import paged_decode_attention, paged_prefill_attention, store_kv, varlen_attention
from tests._backends import backend_params
from tests._lowprec import assert_within_twice_plain

BACKENDS = backend_params("paged_prefill_attention")


def reference(q, k_cache, v_cache, tables, cu, ctx, scale):
    """float64, row by row: row i of sequence s (position ctx[s] - L_s + i) over cache positions 0..that."""
    T, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    flat_k = k_cache.reshape(-1, Hkv, D).double()
    flat_v = v_cache.reshape(-1, Hkv, D).double()
    for s in range(len(ctx)):
        a, b, c = int(cu[s]), int(cu[s + 1]), int(ctx[s])
        for t in range(a, b):
            pos = c - (b - a) + (t - a)
            slots = [int(tables[s, j // bs]) * bs + j % bs for j in range(pos + 1)]
            for h in range(Hq):
                p = torch.softmax(flat_k[slots, h // G] @ q[t, h].double() * scale, 0)
                out[t, h] = p @ flat_v[slots, h // G]
    return out


def make(chunks, ctx, Hq, Hkv, D, bs, dtype=torch.float32, seed=0):
    """Caches with blocks in a random order; table entries past a context hold a huge id never to be read."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-c // bs) for c in ctx]
    width = max(1, max(need))
    num_blocks = sum(need) + 2
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(ctx), width), 10**9, dtype=torch.int32)
    at = 0
    for s, m in enumerate(need):
        tables[s, :m] = order[at : at + m].to(torch.int32)
        at += m
    kc = torch.randn(num_blocks, bs, Hkv, D, generator=gen).to(dtype)
    vc = torch.randn(num_blocks, bs, Hkv, D, generator=gen).to(dtype)
    q = torch.randn(sum(chunks), Hq, D, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()], dtype=torch.int32)
    return q, kc, vc, tables, cu, torch.tensor(ctx, dtype=torch.int32)


CASES = [  # (chunk lengths, context lengths, Hq, Hkv, D, block_size)
    ([1], [1], 1, 1, 16, 1),
    ([3, 1, 17, 5, 0], [7, 40, 17, 5, 9], 8, 2, 80, 4),  # prefix + chunk, decode-like row, no prefix, empty chunk
    ([33, 2, 40], [50, 2, 90], 8, 1, 64, 16),  # chunks over several BLOCK_M tiles; GQA 8
    ([20, 9], [20, 31], 6, 2, 48, 1),  # block size 1, GQA 3
    ([4, 12], [130, 12], 4, 4, 128, 32),  # GQA 1, D 128
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{c[0]}-ctx{c[1]}-Hq{c[2]}-Hkv{c[3]}-D{c[4]}-bs{c[5]}")
def test_matches_float64_loop(backend, case):
    chunks, ctx, Hq, Hkv, D, bs = case
    q, kc, vc, bt, cu, cl = make(chunks, ctx, Hq, Hkv, D, bs, seed=sum(ctx) + D)
    want = reference(q, kc, vc, bt, cu, cl, 1 / math.sqrt(D))
    got = paged_prefill_attention(q, kc, vc, bt, cu, cl, max(chunks), backend=backend)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    got = paged_prefill_attention(q, kc, vc, bt, cu, cl, max(chunks), softmax_scale=0.3, backend=backend)
    want = reference(q, kc, vc, bt, cu, cl, 0.3)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_row_is_a_decode_step_at_its_position(backend):
    chunks, ctx = [5, 1, 12], [9, 30, 12]
    q, kc, vc, bt, cu, cl = make(chunks, ctx, 8, 2, 64, 4, seed=3)
    got = paged_prefill_attention(q, kc, vc, bt, cu, cl, 12, backend=backend)
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(chunks))
    pos = torch.cat([torch.arange(c - n, c) for n, c in zip(chunks, ctx, strict=True)])
    dec = paged_decode_attention(q, kc, vc, bt[seq], (pos + 1).to(torch.int32), backend="torch")
    assert (got - dec).abs().max() <= 1e-5 * dec.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_chunk_without_prefix_is_varlen_attention_and_a_prefix_extends_it(backend):
    """Keys/values of packed prompts stored with store_kv into scattered blocks: attending over the cache with no
    prefix equals varlen_attention; the same prompts split into a cached first part and a chunk give the chunk's
    rows of that same output."""
    gen = torch.Generator().manual_seed(5)
    lens, Hq, Hkv, D, bs = [13, 1, 30], 4, 2, 32, 4
    T = sum(lens)
    q = torch.randn(T, Hq, D, generator=gen)
    k = torch.randn(T, Hkv, D, generator=gen)
    v = torch.randn(T, Hkv, D, generator=gen)
    cu = torch.tensor([0, 13, 14, 44], dtype=torch.int32)
    want = varlen_attention(q, k, v, cu, max(lens), causal=True, backend="torch")
    need = [-(-n // bs) for n in lens]
    order = torch.randperm(sum(need) + 3, generator=gen).to(torch.int32)
    kc = torch.zeros(sum(need) + 3, bs, Hkv, D)
    vc = torch.zeros_like(kc)
    tables = torch.zeros(3, max(need), dtype=torch.int32)
    slots, at = [], 0
    for s, n in enumerate(lens):
        tables[s, : need[s]] = order[at : at + need[s]]
        at += need[s]
        slots += [int(tables[s, j // bs]) * bs + j % bs for j in range(n)]
    store_kv(k, v, kc, vc, torch.tensor(slots), backend="torch")
    cl = torch.tensor(lens, dtype=torch.int32)
    got = paged_prefill_attention(q, kc, vc, tables, cu, cl, max(lens), backend=backend)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # the last 4 / 1 / 11 tokens as chunks over their cached prefixes
    tail = [4, 1, 11]
    rows = torch.cat([torch.arange(int(cu[s + 1]) - t, int(cu[s + 1])) for s, t in enumerate(tail)])
    cu_t = torch.tensor([0, 4, 5, 16], dtype=torch.int32)
    part = paged_prefill_attention(q[rows], kc, vc, tables, cu_t, cl, 11, backend=backend)
    assert (part - want[rows]).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequences_are_isolated(backend):
    """Changing one sequence's cached blocks and queries leaves the others' outputs bit-identical."""
    chunks, ctx = [6, 3, 9], [20, 3, 40]
    q, kc, vc, bt, cu, cl = make(chunks, ctx, 4, 2, 32, 4, seed=9)
    base = paged_prefill_attention(q, kc, vc, bt, cu, cl, 9, backend=backend)
    kc2, vc2, q2 = kc.clone(), vc.clone(), q.clone()
    mine = bt[1, : -(-3 // 4)].long()
    kc2[mine] += 1.0
    vc2[mine] -= 2.0
    q2[6:9] *= 3
    other = paged_prefill_attention(q2, kc2, vc2, bt, cu, cl, 9, backend=backend)
    keep = torch.cat([torch.arange(0, 6), torch.arange(9, 18)])
    assert torch.equal(base[keep], other[keep])
    assert not torch.allclose(base[6:9], other[6:9])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "torch"])
def test_fp16_by_the_low_precision_rule(backend):
    chunks, ctx = [7, 16], [30, 16]
    q, kc, vc, bt, cu, cl = make(chunks, ctx, 8, 2, 64, 16, seed=4)
    want = reference(q, kc, vc, bt, cu, cl, 0.125)
    h = [t.half() for t in (q, kc, vc)]
    ours = paged_prefill_attention(*h, bt, cu, cl, 16, backend=backend)
    plain = paged_prefill_attention(*h, bt, cu, cl, 16, backend="torch")  # the reference in fp16 storage
    assert_within_twice_plain([ours], [plain], [want], ["out"], 1e-3)


def test_errors_name_the_argument():
    q, kc, vc, bt, cu, cl = make([3, 2], [5, 2], 4, 2, 16, 4)
    with pytest.raises(ValueError, match=r"context_lens values must be in \[chunk length, 8\].*context_lens\[1\]=1"):
        paged_prefill_attention(q, kc, vc, bt, cu, torch.tensor([5, 1], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="cu_seqlens_q must rise from 0 to q's T=5"):
        paged_prefill_attention(q, kc, vc, bt, torch.tensor([0, 3, 4], dtype=torch.int32), cl, 3)
    with pytest.raises(ValueError, match="max_seqlen_q=2 is below the longest chunk"):
        paged_prefill_attention(q, kc, vc, bt, cu, cl, 2)
    with pytest.raises(ValueError, match=r"block_tables values a context uses must be in \[0, 5\)"):
        bad = bt.clone()
        bad[0, 1] = 99
        paged_prefill_attention(q, kc, vc, bad, cu, cl, 3)
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be \(n \+ 1,\)"):
        paged_prefill_attention(q, kc, vc, bt, cu[:2], cl, 3)
    with pytest.raises(ValueError, match="q must be"):
        paged_prefill_attention(q[:, :3], kc, vc, bt, cu, cl, 3)
    with pytest.raises(ValueError, match="softmax_scale must be > 0"):
        paged_prefill_attention(q, kc, vc, bt, cu, cl, 3, softmax_scale=0.0)


@pytest.mark.gpu
def test_gpu_bf16_by_the_low_precision_rule():
    chunks, ctx = [200, 1, 77, 512], [4096, 900, 77, 1500]
    q, kc, vc, bt, cu, cl = make(chunks, ctx, 32, 8, 128, 16, seed=1)
    want = paged_prefill_attention(q.cuda(), kc.cuda(), vc.cuda(), bt.cuda(), cu.cuda(), cl.cuda(), 512,
                                   backend="torch")
    h = [t.cuda().bfloat16() for t in (q, kc, vc)]
    idx = [t.cuda() for t in (bt, cu, cl)]
    ours = paged_prefill_attention(*h, *idx, 512, backend="triton")
    plain = paged_prefill_attention(*h, *idx, 512, backend="torch")
    assert_within_twice_plain([ours], [plain], [want], ["out"], 1e-3)
