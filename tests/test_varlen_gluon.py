"""The Gluon attention kernels (R4B_VARLEN_FWD=gluon, R4B_VARLEN_BWD=gluon; sm_90 only): GPU tests against
float64. Their own file so that the GPU check can run them in their own step (bench/gpu_check.sh); the CPU checks
(sm_90 compile with the in-flight waits, the environment variables, the float64 model of their protocol) are in
test_varlen_attention.py and test_varlen_gluon_model.py. The tests through the op come first (a step cut at its
time limit keeps them), then every config of each kernel run directly."""

import importlib
import math

import pytest
import torch

from r4b.kernels import varlen_attention, varlen_attention_ref
from tests._lowprec import assert_within_twice_plain
from tests.test_varlen_attention import _attention64, _cu, _grads, _inputs, _scores, _sdpa_bf16_per_doc

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="the Gluon kernels run on Hopper (sm_90) only")

ANCHOR = [4096, 3072, 2560, 2048, 1536, 1280, 768, 512, 384, 128]


@pytest.fixture
def gluon_calls(monkeypatch):
    """Counts the Gluon forward / backward launches the op makes (so a test through the op knows they ran)."""
    vg = pytest.importorskip("r4b.kernels._varlen_gluon")
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        real = getattr(vg, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(vg, name, spy)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("fwd,bwd", [("gluon", "gluon"), ("gluon", "split"), ("triton", "gluon"),
                                     ("triton", "gluon-dkdv"), ("triton", "default-gluon-dkdv")])
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_kernels_through_the_op_at_the_anchor_gpu(fwd, bwd, causal, monkeypatch, gluon_calls):
    # the anchor (16384 tokens, 10 documents, 32 q / 8 kv heads, D 128) through the public op, autotuned, each
    # Gluon kernel with the other forward / backward (they share the saved LSE): outputs and gradients by
    # STYLE.md's rule against fp32. "default-gluon-dkdv": R4B_VARLEN_BWD unset, whose default on a Hopper GPU
    # at bf16 / D 128 is the gluon-dkdv pairing (the Gluon backward is called once)
    monkeypatch.setenv("R4B_VARLEN_FWD", fwd)
    if bwd.startswith("default"):
        monkeypatch.delenv("R4B_VARLEN_BWD", raising=False)
    else:
        monkeypatch.setenv("R4B_VARLEN_BWD", bwd)
    q, k, v, do = _inputs(ANCHOR, 32, 8, 128, device="cuda")
    cu = _cu(ANCHOR, "cuda")
    ref = _grads(lambda a, b, c: varlen_attention_ref(a, b, c, cu, causal), q, k, v, do)  # fp32
    bf = [t.bfloat16() for t in (q, k, v, do)]
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 4096, causal=causal, backend="triton"), *bf)
    assert gluon_calls == {"forward": int(fwd == "gluon"), "backward": int("gluon" in bwd)}
    base = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, ANCHOR, causal), *bf)
    assert_within_twice_plain(got, base, ref, ("out", "dq", "dk", "dv"), atol_rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("bwd", ["gluon", "gluon-dkdv"])
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_kernels_no_information_crosses_a_boundary_gpu(causal, bwd, monkeypatch, gluon_calls):
    # sequence 1 shares 128-row query tiles with 0 and 2 and ends inside a key block: NaN / inf planted in its
    # q, k, v and dO must leave the other sequences' outputs and gradients bit-identical (the per-sequence TMA
    # descriptors zero-fill past it). GQA 4, D 128: the anchor's kernels.
    monkeypatch.setenv("R4B_VARLEN_FWD", "gluon")
    monkeypatch.setenv("R4B_VARLEN_BWD", bwd)
    lens, Hq, Hkv, D = [70, 100, 90], 8, 2, 128
    cu = _cu(lens, "cuda")
    q, k, v, do = (t.bfloat16() for t in _inputs(lens, Hq, Hkv, D, device="cuda"))
    fn = lambda a, b, c: varlen_attention(a, b, c, cu, 100, causal=causal, backend="triton")
    base = _grads(fn, q, k, v, do)
    q2, k2, v2, do2 = (t.clone() for t in (q, k, v, do))
    for t, bad in ((q2, float("nan")), (k2, float("inf")), (v2, float("-inf")), (do2, float("nan"))):
        t[[70, 120, 169]] = bad
    pert = _grads(fn, q2, k2, v2, do2)
    assert gluon_calls == {"forward": 2, "backward": 2}
    others = torch.ones(sum(lens), dtype=torch.bool, device="cuda")
    others[70:170] = False
    for name, a, b in zip(("out", "dq", "dk", "dv"), base, pert, strict=True):
        assert torch.equal(a[others], b[others]), name
        assert not torch.equal(a[~others], b[~others]), name


@pytest.mark.gpu
@pytest.mark.parametrize("D", [128, 64])
def test_default_gluon_dkdv_backward_many_short_and_one_long_bf16_gpu(D, monkeypatch, gluon_calls):
    # think / no-think packing (one long trace, hundreds of short answers) through the defaults: on Hopper the
    # backward is the Triton dQ kernel with the Gluon dK/dV kernel at D 128 (Gluon called once) and the Triton
    # kernels at D 64 (not called); bf16 gradients by STYLE.md's rule against float64
    monkeypatch.delenv("R4B_VARLEN_FWD", raising=False)
    monkeypatch.delenv("R4B_VARLEN_BWD", raising=False)
    lens = [3000] + [1, 2, 3, 17, 40, 129] * 50
    cu = _cu(lens, "cuda")
    q, k, v, do = _inputs(lens, 8, 2, D, device="cuda")
    ref = _grads(lambda a, b, c: _attention64(a, b, c, lens, True, D**-0.5), *(t.double() for t in (q, k, v, do)))
    bf = [t.bfloat16() for t in (q, k, v, do)]
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 3000, backend="triton"), *bf)
    assert gluon_calls == {"forward": 0, "backward": int(D == 128)}
    base = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, lens, True), *bf)
    assert_within_twice_plain(got, base, ref, ("out", "dq", "dk", "dv"), atol_rel=1e-3)


@pytest.mark.gpu
def test_gluon_backward_takes_a_broadcast_gradient_gpu(monkeypatch, gluon_calls):
    # dO = a broadcast (row stride 0, as the gradient of a sum over tokens is): copied for TMA, same result
    monkeypatch.setenv("R4B_VARLEN_BWD", "gluon")
    lens = [300, 1, 77]
    cu = _cu(lens, "cuda")
    q, k, v, _ = (t.bfloat16() for t in _inputs(lens, 8, 2, 128, device="cuda"))
    row = torch.randn(1, 8, 128, device="cuda").bfloat16()
    fn = lambda a, b, c: varlen_attention(a, b, c, cu, 300, backend="triton")
    got = _grads(fn, q, k, v, row.expand(sum(lens), 8, 128))
    want = _grads(fn, q, k, v, row.expand(sum(lens), 8, 128).contiguous())
    assert gluon_calls["backward"] == 2
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gluon_variables_leave_inputs_they_do_not_take_to_the_triton_kernels_gpu(monkeypatch, gluon_calls):
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
    assert gluon_calls == {"forward": 0, "backward": 0}
    # D 64 in bf16: the Gluon forward, the Triton backward (the Gluon backward is verified at D 128 only)
    q, k, v, do = (t.bfloat16() for t in _inputs(lens, 4, 2, 64, device="cuda"))
    monkeypatch.setenv("R4B_VARLEN_BWD", "split")
    want = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 33, backend="triton"), q, k, v, do)
    monkeypatch.setenv("R4B_VARLEN_BWD", "gluon")
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 33, backend="triton"), q, k, v, do)
    assert gluon_calls == {"forward": 2, "backward": 0}
    for a, b in zip(got[1:], want[1:], strict=True):  # exactly the explicit split backward
        assert torch.equal(a, b)
    # and right: the Gluon forward's output and LSE through the Triton backward, by STYLE.md's rule vs float64
    ref = _grads(lambda a, b, c: _attention64(a, b, c, lens, True, 64**-0.5), *(t.double() for t in (q, k, v, do)))
    base = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, lens, True), q, k, v, do)
    assert_within_twice_plain(got, base, ref, ("out", "dq", "dk", "dv"), atol_rel=1e-3)


def _lse64(q, k, lens, causal, scale):
    """float64 log-sum-exp of each query row's scaled scores, (Hq, T), in log2 units (what the kernels save)."""
    out = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float64, device=q.device)
    for sl, s in _scores(q.double(), k.double(), lens, causal, scale):
        out[:, sl] = s.logsumexp(-1) / math.log(2.0)
    return out


# every config run directly: length-1 and empty sequences, lengths off every tile, tiles spanning many sequences,
# one sequence longer than a few key blocks, GQA 2 / 4 / 8, D 64 and 128, causal and not
GLUON_CASES = [
    ([1, 37, 1, 16, 5, 0, 300], 2, 2, 64, True),
    ([70, 1, 3, 1, 0, 2, 9, 700], 4, 1, 128, False),
    ([3000] + [1, 2, 3, 17, 40, 129] * 20, 8, 2, 128, True),
    # the first case's lengths at GQA 4: its dK failed at D 64 / GQA 1 on an H200 (2026-11-27), so this one tells
    # whether D 64 is the cause (every D 128 case passed)
    ([1, 37, 1, 16, 5, 0, 300], 8, 2, 64, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("lens,Hq,Hkv,D,causal", GLUON_CASES)
def test_gluon_forward_every_config_against_float64_gpu(lens, Hq, Hkv, D, causal):
    """Each Gluon config run directly: output by STYLE.md's rule against float64 (baseline: SDPA per document in
    bf16), and the saved LSE (the backward's input) within bf16 inputs' reach of float64."""
    vg = importlib.import_module("r4b.kernels._varlen_gluon")
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
    vg = importlib.import_module("r4b.kernels._varlen_gluon")
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
    failures = []  # every config and gradient judged before the test fails: one GPU run shows the whole pattern
    for i, (kv_cfg, q_cfg) in enumerate(zip(vg.DKDV_CONFIGS, vg.DQ_CONFIGS * 2, strict=False)):
        qq, dd = head_major if i == 1 else (bf[0], bf[3])
        dq, dk, dv = vg.backward(dd, qq, bf[1], bf[2], lse, delta, cu, scale, causal, dkdv_config=kv_cfg,
                                 dq_config=q_cfg)
        for got, name, p, w in zip((dq, dk, dv), (f"dq {q_cfg}", f"dk {kv_cfg}", f"dv {kv_cfg}"), plain[1:], want[1:],
                                   strict=True):
            try:
                assert_within_twice_plain([got], [p], [w], [name], atol_rel=1e-3)
            except AssertionError as ex:
                failures.append(str(ex))
    assert not failures, failures
