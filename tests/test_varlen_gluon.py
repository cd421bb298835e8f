"""The Gluon attention kernels (R4B_VARLEN_FWD=gluon, R4B_VARLEN_BWD=gluon; sm_90 only): GPU tests against
float64. Their own file so that the GPU check can run them in their own step (bench/gpu_check.sh); the CPU checks
(sm_90 compile with the in-flight waits, the environment variables) are in test_varlen_attention.py."""

import math

import pytest
import torch

from r4b.kernels import varlen_attention, varlen_attention_ref
from tests._lowprec import assert_within_twice_plain
from tests.test_varlen_attention import _attention64, _cu, _grads, _inputs, _sdpa_bf16_per_doc


def _lse64(q, k, lens, causal, scale):
    """float64 log-sum-exp of each query row's scaled scores, (Hq, T), in log2 units (what the kernels save)."""
    T, Hq, _ = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros(Hq, T, dtype=torch.float64, device=q.device)
    start = 0
    for L in lens:
        sl = slice(start, start + L)
        start += L
        if L == 0:
            continue
        kh = k[sl].double()[:, torch.arange(Hq, device=q.device) // group]
        s = torch.einsum("ihd,jhd->hij", q[sl].double(), kh) * scale
        if causal:
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        out[:, sl] = s.logsumexp(-1) / math.log(2.0)
    return out


# the Gluon forward's cases: length-1 and empty sequences, lengths off every tile, tiles spanning many sequences,
# one sequence longer than a few key blocks, GQA 1 / 4 / 8, D 64 and 128, causal and not
GLUON_CASES = [
    ([1, 37, 1, 16, 5, 0, 300], 2, 2, 64, True),
    ([45, 2, 1, 0, 129, 64, 1000], 8, 1, 128, True),
    ([1, 50, 13, 513], 8, 8, 64, False),
    ([70, 1, 3, 1, 0, 2, 9, 700], 4, 1, 128, False),
    ([3000] + [1, 2, 3, 17, 40, 129] * 20, 8, 2, 128, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("lens,Hq,Hkv,D,causal", GLUON_CASES)
def test_gluon_forward_every_config_against_float64_gpu(lens, Hq, Hkv, D, causal):
    """Each Gluon config run directly: output by STYLE.md's rule against float64 (baseline: SDPA per document in
    bf16), and the saved LSE (the backward's input) within bf16 inputs' reach of float64."""
    from r4b.kernels import _varlen_gluon as vg
    from r4b.kernels.varlen_attention import _ensure_allocator

    q, k, v, _ = _inputs(lens, Hq, Hkv, D, seed=5, device="cuda")
    bf = [t.bfloat16() for t in (q, k, v)]
    assert vg.supported(*bf) is None
    cu = _cu(lens, "cuda")
    scale = D**-0.5
    want = _attention64(*(t.double() for t in bf), lens, causal, scale)
    want_lse = _lse64(bf[0], bf[1], lens, causal, scale)
    plain = _sdpa_bf16_per_doc(*bf, [n for n in lens if n], causal)
    _ensure_allocator()
    for cfg in vg.CONFIGS:
        o = torch.full_like(bf[0], float("nan"))
        lse = torch.full((Hq, sum(lens)), float("nan"), device="cuda")
        vg.forward(*bf, o, lse, cu, scale / math.log(2.0), causal, config=cfg)
        assert_within_twice_plain([o], [plain], [want], (f"out {cfg}",), atol_rel=1e-3)
        torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=1e-3, msg=lambda m, c=cfg: f"lse {c}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("lens,Hq,Hkv,D,causal", GLUON_CASES)
def test_gluon_backward_every_config_against_float64_gpu(lens, Hq, Hkv, D, causal):
    """Each config of the Gluon dK/dV and dQ kernels run directly, from the float64 LSE and delta: gradients by
    STYLE.md's rule against float64 (baseline: SDPA per document in bf16); q and dO also as head-major views
    (head stride T * D: the wrapper copies them for the dK/dV kernel's (L, GROUP * D) reads)."""
    from r4b.kernels import _varlen_gluon as vg
    from r4b.kernels.varlen_attention import _ensure_allocator

    q, k, v, do = _inputs(lens, Hq, Hkv, D, seed=6, device="cuda")
    bf = [t.bfloat16() for t in (q, k, v, do)]
    cu = _cu(lens, "cuda")
    scale = D**-0.5
    want = _grads(lambda a, b, c: _attention64(a, b, c, lens, causal, scale), *(t.double() for t in bf))
    plain = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, [n for n in lens if n], causal), *bf)
    lse = _lse64(bf[0], bf[1], lens, causal, scale).float()
    delta = (want[0] * bf[3].double()).sum(-1).transpose(0, 1).float().contiguous()  # (Hq, T)
    _ensure_allocator()
    head_major = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (bf[0], bf[3])]
    for i, (kv_cfg, q_cfg) in enumerate(zip(vg.DKDV_CONFIGS, vg.DQ_CONFIGS * 2, strict=False)):
        qq, dd = head_major if i == 1 else (bf[0], bf[3])
        dq, dk, dv = vg.backward(dd, qq, bf[1], bf[2], lse, delta, cu, scale, causal, dkdv_config=kv_cfg,
                                 dq_config=q_cfg)
        assert_within_twice_plain([dq, dk, dv], plain[1:], want[1:], (f"dq {q_cfg}", f"dk {kv_cfg}", f"dv {kv_cfg}"),
                                  atol_rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_forward_and_backward_anchor_gpu(causal, monkeypatch):
    # the anchor through the public op with both Gluon kernels (autotuned), by STYLE.md's rule against fp32
    monkeypatch.setenv("R4B_VARLEN_FWD", "gluon")
    monkeypatch.setenv("R4B_VARLEN_BWD", "gluon")
    lens = [4096, 3072, 2560, 2048, 1536, 1280, 768, 512, 384, 128]
    q, k, v, do = _inputs(lens, 32, 8, 128, device="cuda")
    cu = _cu(lens, "cuda")
    ref = _grads(lambda a, b, c: varlen_attention_ref(a, b, c, cu, causal), q, k, v, do)  # fp32
    bf = [t.bfloat16() for t in (q, k, v, do)]
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 4096, causal=causal, backend="triton"), *bf)
    base = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, lens, causal), *bf)
    assert_within_twice_plain(got, base, ref, ("out", "dq", "dk", "dv"), atol_rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_forward_anchor_with_triton_backward_gpu(causal, monkeypatch):
    # the anchor through the public op with R4B_VARLEN_FWD=gluon (autotuned): outputs and gradients (the Triton
    # backward reads the Gluon forward's LSE) by STYLE.md's rule against fp32
    monkeypatch.setenv("R4B_VARLEN_FWD", "gluon")
    lens = [4096, 3072, 2560, 2048, 1536, 1280, 768, 512, 384, 128]
    q, k, v, do = _inputs(lens, 32, 8, 128, device="cuda")
    cu = _cu(lens, "cuda")
    ref = _grads(lambda a, b, c: varlen_attention_ref(a, b, c, cu, causal), q, k, v, do)  # fp32
    bf = [t.bfloat16() for t in (q, k, v, do)]
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 4096, causal=causal, backend="triton"), *bf)
    base = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, lens, causal), *bf)
    assert_within_twice_plain(got, base, ref, ("out", "dq", "dk", "dv"), atol_rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_kernels_no_information_crosses_a_boundary_gpu(causal, monkeypatch):
    # sequence 1 shares 128-row query tiles with 0 and 2 and ends inside a key block: NaN / inf planted in it
    # must leave the other sequences' outputs bit-identical (the per-sequence TMA descriptors zero-fill past it)
    # (and the Gluon backward's gradients too: dO planted as well)
    monkeypatch.setenv("R4B_VARLEN_FWD", "gluon")
    monkeypatch.setenv("R4B_VARLEN_BWD", "gluon")
    lens, Hq, Hkv, D = [70, 100, 90], 4, 2, 128
    cu = _cu(lens, "cuda")
    q, k, v, do = (t.bfloat16() for t in _inputs(lens, Hq, Hkv, D, device="cuda"))
    fn = lambda a, b, c: varlen_attention(a, b, c, cu, 100, causal=causal, backend="triton")
    base = _grads(fn, q, k, v, do)
    q2, k2, v2, do2 = (t.clone() for t in (q, k, v, do))
    for t, bad in ((q2, float("nan")), (k2, float("inf")), (v2, float("-inf")), (do2, float("nan"))):
        t[[70, 120, 169]] = bad
    pert = _grads(fn, q2, k2, v2, do2)
    others = torch.ones(sum(lens), dtype=torch.bool, device="cuda")
    others[70:170] = False
    for name, a, b in zip(("out", "dq", "dk", "dv"), base, pert, strict=True):
        assert torch.equal(a[others], b[others]), name
        assert not torch.equal(a[~others], b[~others]), name


@pytest.mark.gpu
def test_gluon_variables_leave_inputs_they_do_not_take_to_the_triton_kernels_gpu(monkeypatch):
    # a model sets R4B_VARLEN_FWD/BWD=gluon once; its SigLIP tower (head dim 72) and fp32 calls run on Triton
    lens = [33, 1, 20]
    cu = _cu(lens, "cuda")
    for D, dtype in ((72, torch.bfloat16), (64, torch.float32)):
        q, k, v, do = (t.to(dtype) for t in _inputs(lens, 4, 2, D, device="cuda"))
        monkeypatch.delenv("R4B_VARLEN_FWD", raising=False)
        monkeypatch.delenv("R4B_VARLEN_BWD", raising=False)
        want = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 33, backend="triton"), q, k, v, do)
        monkeypatch.setenv("R4B_VARLEN_FWD", "gluon")
        monkeypatch.setenv("R4B_VARLEN_BWD", "gluon")
        got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 33, backend="triton"), q, k, v, do)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), (D, dtype)
