"""paged_decode_attention on every backend against a float64 loop over the pages, split-K included; that a
decode step equals the prefill's attention at that token (store_kv + the cache vs varlen_attention); isolation
between sequences; the fp16 rule; its errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from r4b.kernels import varlen_attention
from r4b.kernels.paged_decode_attention import auto_num_splits, paged_decode_attention
from r4b.kernels.store_kv import store_kv
from tests._backends import backend_params
from tests._lowprec import assert_within_twice_plain

BACKENDS = backend_params("paged_decode_attention")


def reference(q, k_cache, v_cache, block_tables, context_lens, scale):
    """float64, token by token through the block table (independent of the module's reference)."""
    B, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        n = int(context_lens[b])
        if n == 0:
            continue
        rows = [int(block_tables[b, j // bs]) * bs + j % bs for j in range(n)]
        k = k_cache.reshape(-1, Hkv, D)[rows].double()  # (n, Hkv, D)
        v = v_cache.reshape(-1, Hkv, D)[rows].double()
        for h in range(Hq):
            s = k[:, h // G] @ q[b, h].double() * scale  # (n,)
            p = torch.softmax(s, 0)
            out[b, h] = p @ v[:, h // G]
    return out


def make(lens, Hq, Hkv, D, bs, dtype=torch.float32, seed=0, spare_blocks=3, table_width=None, strided_q=False):
    """A cache whose blocks are handed out in a random order; table entries past a context hold a huge id that
    must never be read."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    width = table_width or max(1, max(need))
    num_blocks = sum(need) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), width), 10**9, dtype=torch.int32)
    at = 0
    for b, m in enumerate(need):
        tables[b, :m] = order[at : at + m].to(torch.int32)
        at += m
    k_cache = torch.randn(num_blocks, bs, Hkv, D, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, bs, Hkv, D, generator=gen).to(dtype)
    if strided_q:
        q = torch.randn(len(lens), Hq + 3, D, generator=gen).to(dtype)[:, 1 : Hq + 1]
        assert len(lens) == 1 or not q.is_contiguous()  # (one row of one head is contiguous anyway)
    else:
        q = torch.randn(len(lens), Hq, D, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


CASES = [  # (lens, Hq, Hkv, D, block_size)
    ([1], 1, 1, 16, 1),
    ([0, 1, 17, 96, 50], 8, 2, 80, 16),  # empty context, one token, not a block multiple; GQA 4, D 80
    ([33, 200, 7], 8, 1, 64, 32),  # GQA 8
    ([130, 64, 5, 1], 4, 4, 128, 16),  # GQA 1, D 128
    ([41, 19], 6, 2, 48, 1),  # block size 1, GQA 3, D 48
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [None, 1, 3, 40])  # 40: more splits than any context needs
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"lens{c[0]}-Hq{c[1]}-Hkv{c[2]}-D{c[3]}-bs{c[4]}")
def test_matches_float64_loop(backend, num_splits, case):
    lens, Hq, Hkv, D, bs = case
    q, kc, vc, bt, cl = make(lens, Hq, Hkv, D, bs, seed=sum(lens) + D, strided_q=num_splits == 3)
    want = reference(q, kc, vc, bt, cl, 1 / math.sqrt(D))
    got = paged_decode_attention(q, kc, vc, bt, cl, num_splits=num_splits, backend=backend)
    assert got.shape == q.shape and got.dtype == q.dtype and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    assert torch.equal(got[cl == 0], torch.zeros_like(got[cl == 0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale_and_wide_block_table(backend):
    # a table far wider than the contexts (the engine sizes it for max_model_len) and a custom scale
    q, kc, vc, bt, cl = make([9, 70], 4, 2, 32, 8, seed=5, table_width=40)
    want = reference(q, kc, vc, bt, cl, 0.3)
    got = paged_decode_attention(q, kc, vc, bt, cl, softmax_scale=0.3, backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_information_crosses_sequences(backend):
    # perturbing the blocks of sequence 1 (and the spare blocks) leaves the others' outputs bit-identical
    q, kc, vc, bt, cl = make([23, 40, 17], 4, 2, 32, 8, seed=6, spare_blocks=4)
    base = paged_decode_attention(q, kc, vc, bt, cl, num_splits=2, backend=backend)
    used = {int(x) for b in (0, 2) for x in bt[b, : -(-int(cl[b]) // 8)]}
    other = [i for i in range(kc.shape[0]) if i not in used]
    kc2, vc2, q2 = kc.clone(), vc.clone(), q.clone()
    kc2[other] = torch.randn_like(kc2[other]) * 5
    vc2[other] = torch.randn_like(vc2[other]) * 5
    q2[1] = torch.randn_like(q2[1])
    out = paged_decode_attention(q2, kc2, vc2, bt, cl, num_splits=2, backend=backend)
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert not torch.equal(out[1], base[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_equals_prefill_attention(backend):
    """The engine's contract: the prompt's K/V stored with store_kv into scattered blocks, then each sequence's
    last token decoded from the cache equals varlen_attention's (causal, packed prefill) output at that token."""
    gen = torch.Generator().manual_seed(7)
    lens, Hq, Hkv, D, bs = [5, 33, 16, 1], 8, 2, 64, 4
    T = sum(lens)
    q = torch.randn(T, Hq, D, generator=gen)
    k = torch.randn(T, Hkv, D, generator=gen)
    v = torch.randn(T, Hkv, D, generator=gen)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    prefill = varlen_attention(q, k, v, cu, max(lens), backend="torch")
    _, kc, vc, bt, cl = make(lens, Hq, Hkv, D, bs, seed=8)
    slots = torch.cat([bt[b, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs for b, n in enumerate(lens)])
    store_kv(k, v, kc, vc, slots, backend=backend)
    last = cu[1:].long() - 1
    got = paged_decode_attention(q[last], kc, vc, bt, cl, num_splits=2, backend=backend)
    torch.testing.assert_close(got, prefill[last], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_within_twice_plain_fp16_error(backend):
    """STYLE.md's low-precision rule (fp16 on the CPU: the interpreter computes bf16 wrongly): the baseline is
    plain PyTorch SDPA in fp16 on the gathered pages."""
    if backend == "torch":
        pytest.skip("the torch backend is the fp32 reference path itself")
    lens, Hq, Hkv, D, bs = [77, 3, 130], 8, 2, 64, 16
    q, kc, vc, bt, cl = make(lens, Hq, Hkv, D, bs, seed=9)
    want = reference(q, kc, vc, bt, cl, D**-0.5)
    qh, kh, vh = q.half(), kc.half(), vc.half()
    got = paged_decode_attention(qh, kh, vh, bt, cl, num_splits=3, backend=backend)
    base = []
    for b, n in enumerate(lens):
        j = torch.arange(n)
        k = kh[bt[b, j // bs].long(), j % bs].transpose(0, 1)  # (Hkv, n, D)
        v = vh[bt[b, j // bs].long(), j % bs].transpose(0, 1)
        base.append(F.scaled_dot_product_attention(qh[b][:, None], k, v, enable_gqa=True)[:, 0])
    assert got.dtype == torch.float16
    assert_within_twice_plain([got], [torch.stack(base)], [want], ["out"], atol_rel=1e-4)


def _kernel_paths():
    """The kernels without the public function's host checks (what a GPU call runs with unchecked values)."""
    from r4b.kernels import available_backends
    from r4b.kernels.paged_decode_attention import _paged_decode_triton

    paths = []
    if "triton" in available_backends("paged_decode_attention"):
        paths.append(pytest.param(lambda *a: _paged_decode_triton(*a), id="triton"))
    if "cpp" in available_backends("paged_decode_attention"):
        paths.append(pytest.param(lambda *a: torch.ops.r4b.paged_decode_attention(*a), id="cpp"))
    return paths


@pytest.mark.parametrize("kernel", _kernel_paths())
def test_unchecked_values_never_read_outside_the_cache(kernel):
    # context_lens past the table's capacity is clamped to it; a block id outside the cache leaves its tokens out
    q, kc, vc, bt, cl = make([10, 12, 7], 4, 2, 16, 4, seed=15, spare_blocks=0)  # 3 blocks of 4 a table, 9 blocks
    bt[1, 1] = 10**6
    bt[2, 0] = -5
    cl = torch.tensor([10**6, 12, 7], dtype=torch.int32)
    got = kernel(q, kc, vc, bt, cl, 0.25, 2)
    keep = [[0, 1, 2], [0, 2], [1]]  # the table positions of the blocks each sequence can read
    for b in range(3):
        n = 12 if b == 0 else int(cl[b])
        rows = [int(bt[b, j // 4]) * 4 + j % 4 for j in range(n) if j // 4 in keep[b]]
        k = kc.reshape(-1, 2, 16)[rows].double()
        v = vc.reshape(-1, 2, 16)[rows].double()
        for h in range(4):
            p = torch.softmax(k[:, h // 2] @ q[b, h].double() * 0.25, 0)
            torch.testing.assert_close(got[b, h].double(), p @ v[:, h // 2], rtol=2e-5, atol=2e-5)


def test_auto_num_splits():
    assert auto_num_splits(1, 8, 4096, sms=132) == 16  # one sequence: 33 programs per KV head wanted, 16 ranges
    assert auto_num_splits(32, 8, 4096, sms=132) == 2  # 256 programs already: two splits fill 2 waves
    assert auto_num_splits(128, 8, 1024, sms=132) == 1
    assert auto_num_splits(1, 8, 100, sms=132) == 1  # a short context is never cut below 256 tokens a range


def test_argument_errors_name_the_argument():
    q, kc, vc, bt, cl = make([5, 9], 4, 2, 16, 4, seed=10)
    with pytest.raises(TypeError, match="q must have dtype"):
        paged_decode_attention(q.half(), kc, vc, bt, cl)
    with pytest.raises(ValueError, match="Hq a multiple"):
        paged_decode_attention(q[:, :3], kc, vc, bt, cl)
    with pytest.raises(ValueError, match="D=16"):
        paged_decode_attention(q[..., :8], kc, vc, bt, cl)
    wide = make([5, 9], 4, 2, 264, 4, seed=10)
    with pytest.raises(ValueError, match=r"head dim must be <= 256, got q=\(2, 4, 264\)"):
        paged_decode_attention(*wide)
    with pytest.raises(TypeError, match="block_tables must have dtype"):
        paged_decode_attention(q, kc, vc, bt.long(), cl)
    with pytest.raises(TypeError, match="context_lens must have dtype"):
        paged_decode_attention(q, kc, vc, bt, cl.long())
    with pytest.raises(ValueError, match="context_lens has 1 rows but q has 2"):
        paged_decode_attention(q, kc, vc, bt, cl[:1])
    with pytest.raises(ValueError, match=r"context_lens\[1\]=13"):
        paged_decode_attention(q, kc, vc, bt, torch.tensor([5, 13], dtype=torch.int32))  # 3 blocks of 4 = 12
    with pytest.raises(ValueError, match=r"context_lens\[0\]=-1"):
        paged_decode_attention(q, kc, vc, bt, torch.tensor([-1, 9], dtype=torch.int32))
    bad = bt.clone()
    bad[1, 2] = kc.shape[0]
    with pytest.raises(ValueError, match=rf"block_tables\[1, 2\]={kc.shape[0]}"):
        paged_decode_attention(q, kc, vc, bad, cl)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(q, kc, vc, bt, cl, num_splits=0)
    with pytest.raises(ValueError, match="softmax_scale"):
        paged_decode_attention(q, kc, vc, bt, cl, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="v_cache must match"):
        paged_decode_attention(q, kc, vc.half(), bt, cl)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params("paged_decode_attention", "cuda"))
@pytest.mark.parametrize("ragged", [False, True])
def test_gpu_bf16_anchor_within_twice_plain(backend, ragged):
    # the decode anchor: 32 sequences x 4096 tokens (or ragged 1..4096), 32 q / 8 kv heads of 128, blocks of 16
    if backend == "torch":
        pytest.skip("the torch backend is the fp32 reference path itself")
    gen = torch.Generator().manual_seed(11)
    lens = torch.randint(1, 4097, (32,), generator=gen).tolist() if ragged else [4096] * 32
    q, kc, vc, bt, cl = (t.cuda() for t in make(lens, 32, 8, 128, 16, seed=12, spare_blocks=100))
    want = paged_decode_attention(q, kc, vc, bt, cl, backend="torch")  # fp32
    qb, kb, vb = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    got = paged_decode_attention(qb, kb, vb, bt, cl, backend=backend)
    base = []
    for b, n in enumerate(lens):
        j = torch.arange(n, device="cuda")
        rows = bt[b, j // 16].long()
        base.append(F.scaled_dot_product_attention(qb[b][:, None], kb[rows, j % 16].transpose(0, 1),
                                                   vb[rows, j % 16].transpose(0, 1), enable_gqa=True)[:, 0])
    assert_within_twice_plain([got], [torch.stack(base)], [want], ["out"], atol_rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params("paged_decode_attention", "cuda"))
def test_gpu_fp32_anchor_geometry_against_float64(backend):
    # the anchor's heads and blocks with long contexts (many tiles, split boundaries), fp32 (IEEE products)
    lens = [4096, 4095, 2049, 1]
    q, kc, vc, bt, cl = make(lens, 32, 8, 128, 16, seed=16)
    want = reference(q, kc, vc, bt, cl, 128**-0.5)
    for ns in (None, 2, 7):
        got = paged_decode_attention(q.cuda(), kc.cuda(), vc.cuda(), bt.cuda(), cl.cuda(), num_splits=ns,
                                     backend=backend)
        torch.testing.assert_close(got.cpu().double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params("paged_decode_attention", "cuda"))
def test_gpu_fp32_many_shapes_and_cuda_graph(backend):
    for case in CASES:
        lens, Hq, Hkv, D, bs = case
        q, kc, vc, bt, cl = make(lens, Hq, Hkv, D, bs, seed=13)
        want = reference(q, kc, vc, bt, cl, D**-0.5)
        for ns in (None, 1, 3):
            got = paged_decode_attention(q.cuda(), kc.cuda(), vc.cuda(), bt.cuda(), cl.cuda(), num_splits=ns,
                                         backend=backend)
            torch.testing.assert_close(got.cpu().double(), want, rtol=2e-5, atol=2e-5)
    if backend == "torch":  # the reference reads the lengths on the host: it cannot be captured
        return
    # a decode step captured in a CUDA graph (split-K and its merge) and replayed with new context lengths (no host
    # read of them)
    q, kc, vc, bt, cl = (t.cuda() for t in make([64, 100], 8, 2, 64, 16, seed=14))
    paged_decode_attention(q, kc, vc, bt, cl, num_splits=3, backend=backend)  # warm-up: compiles outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = paged_decode_attention(q, kc, vc, bt, cl, num_splits=3, backend=backend)
    cl.copy_(torch.tensor([3, 97], dtype=torch.int32))
    g.replay()
    want = reference(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), cl.cpu(), 64**-0.5)
    torch.testing.assert_close(out.cpu().double(), want, rtol=2e-5, atol=2e-5)
