"""qk_norm_rope: the fused Triton path against float64 (outputs, dq, dk, both weight gradients), against the unfused
Triton ops it replaces, strided inputs, one output unused, no tokens, input errors; a bf16 GPU check."""

import pytest
import torch

from r4b.kernels import qk_norm_rope, qk_norm_rope_ref, rms_norm, rope
from tests._lowprec import assert_within_twice_plain

NAMES = ("q out", "k out", "dq", "dk", "dq_weight", "dk_weight")


def _rope64(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Float64 rotate-half RoPE from fp32 angles (pos * inv_freq formed in fp32, as transformers does)."""
    D = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    ang = (pos.float()[:, None] * inv[None, :].to(pos.device)).double()
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


def _want64(q, k, wq, wk, pos, eps, theta):
    """The formula in float64: w * x / sqrt(mean(x^2) + eps) per head, then RoPE."""
    def one(x, w):
        x = x.double()
        return _rope64(w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), pos, theta)

    return one(q, wq), one(k, wk)


def _run(fn, q, k, wq, wk, pos, eps=1e-6, theta=1e6, seed=3):
    """fn's outputs and the gradients of q, k, wq, wk for fixed random output gradients (float64 drawn)."""
    xs = [t.detach().clone().requires_grad_(True) for t in (q, k, wq, wk)]
    yq, yk = fn(*xs, pos, eps, theta)
    g = torch.Generator().manual_seed(seed)
    dys = [torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype) for y in (yq, yk)]
    torch.autograd.backward((yq, yk), dys)
    return [yq.detach(), yk.detach()] + [x.grad for x in xs]


def _fused(q, k, wq, wk, pos, eps, theta):
    return qk_norm_rope(q, k, wq, wk, pos, eps, theta, backend="triton")


def _inputs(T, HQ, HK, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, HQ, D, generator=g) * 3
    k = torch.randn(T, HK, D, generator=g) + 0.5
    wq = torch.rand(D, generator=g) + 0.5
    wk = torch.randn(D, generator=g)
    # positions restart per packed sequence; large values check the angles
    pos = torch.cat([torch.arange(T // 2), torch.arange(T - T // 2) * 251 + 7])
    return q.to(dtype), k.to(dtype), wq.to(dtype), wk.to(dtype), pos


def _assert_matches_float64(got, q, k, wq, wk, pos, eps=1e-6, theta=1e6, seed=3):
    want = _run(_want64, q.double(), k.double(), wq.double(), wk.double(), pos, eps, theta, seed=seed)
    for name, o, w in zip(NAMES, got, want, strict=True):
        scale = max(1.0, w.abs().max().item() if w.numel() else 0.0)
        torch.testing.assert_close(o.double(), w, rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


# (T, Hq, Hkv, D): one token; GQA 2, 4 and 8 with T not a multiple of the token block; D whose half is not a power of
# two (80: 40; 6: 3); no k heads
@pytest.mark.parametrize("T,HQ,HK,D", [(1, 1, 1, 64), (37, 4, 2, 80), (21, 8, 2, 128), (10, 8, 1, 32), (5, 2, 2, 6),
                                       (9, 3, 0, 16)])
def test_matches_float64(T, HQ, HK, D):
    q, k, wq, wk, pos = _inputs(T, HQ, HK, D)
    _assert_matches_float64(_run(_fused, q, k, wq, wk, pos), q, k, wq, wk, pos)


def test_eps_and_theta_reach_the_kernels():
    # rows of tiny values make eps matter; a small theta makes high frequencies turn
    q, k, wq, wk, pos = _inputs(11, 2, 1, 16, seed=4)
    q, k = q * 1e-3, k * 1e-3
    _assert_matches_float64(_run(_fused, q, k, wq, wk, pos, eps=1e-4, theta=500.0), q, k, wq, wk, pos, eps=1e-4,
                            theta=500.0)


def test_matches_the_unfused_triton_ops_in_fp16():
    """The same roundings as rope(rms_norm(x)) on the Triton path, fp16 inputs: the outputs are bit-identical to the
    composition's (fp32 weights promote them to fp32 as the composition does; fp16 weights keep fp16), and so are
    dq and dk with fp32 weights; with fp16 weights the unfused path rounds the rotated gradient to fp16 before the
    norm's backward where the fused kernel keeps it in fp32, so dq and dk agree within two roundings. The weight
    gradients are sums in another order."""
    for wdtype in (torch.float32, torch.float16):
        q, k, wq, wk, pos = _inputs(19, 4, 2, 64, seed=1, dtype=torch.float16)
        wq, wk = wq.to(wdtype), wk.to(wdtype)

        def unfused(q, k, wq, wk, pos, eps, theta):
            return (rope(rms_norm(q, wq, eps, backend="triton"), pos, theta, backend="triton"),
                    rope(rms_norm(k, wk, eps, backend="triton"), pos, theta, backend="triton"))

        got, base = _run(_fused, q, k, wq, wk, pos), _run(unfused, q, k, wq, wk, pos)
        assert got[0].dtype == base[0].dtype == torch.promote_types(torch.float16, wdtype)
        exact = 4 if wdtype == torch.float32 else 2
        for name, o, b in zip(NAMES[:exact], got[:exact], base[:exact], strict=True):
            assert torch.equal(o, b), (name, wdtype, (o != b).sum().item())
        ulp = 2.0 ** -10  # fp16's relative spacing
        for name, o, b in zip(NAMES[exact:], got[exact:], base[exact:], strict=True):
            assert o.dtype == b.dtype, name
            torch.testing.assert_close(o.double(), b.double(), rtol=2 * ulp, atol=2 * ulp * b.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_torch_backend_is_the_composition():
    q, k, wq, wk, pos = _inputs(7, 2, 1, 16)
    got = qk_norm_rope(q, k, wq, wk, pos, 1e-6, 1e4, backend="torch")
    want = (rope(rms_norm(q, wq, backend="torch"), pos, 1e4, backend="torch"),
            rope(rms_norm(k, wk, backend="torch"), pos, 1e4, backend="torch"))
    for o, w in zip(got, want, strict=True):
        assert torch.equal(o, w)
    assert all(torch.equal(o, w) for o, w in zip(qk_norm_rope_ref(q, k, wq, wk, pos, 1e-6, 1e4), want, strict=True))


def test_strided_head_slices_of_a_fused_qkv_and_a_head_major_view():
    g = torch.Generator().manual_seed(6)
    T, HQ, HK, D = 13, 4, 2, 32
    qkv = torch.randn(T, HQ + 2 * HK, D, generator=g)  # q, k, v heads of one projection: views along heads
    q, k = qkv[:, :HQ], qkv[:, HQ:HQ + HK]
    wq, wk, pos = torch.rand(D, generator=g) + 0.5, torch.rand(D, generator=g) + 0.5, torch.arange(T) * 5
    _assert_matches_float64(_run(_fused, q, k, wq, wk, pos), q, k, wq, wk, pos)
    kt = torch.randn(HK, T, D, generator=g).transpose(0, 1)  # (T, HK, D) with head stride T * D
    _assert_matches_float64(_run(_fused, q, kt, wq, wk, pos), q, kt, wq, wk, pos)


def test_one_output_unused_gets_zero_gradients():
    q, k, wq, wk, pos = _inputs(9, 2, 2, 16)
    xs = [t.clone().requires_grad_(True) for t in (q, k, wq, wk)]
    yq, _ = qk_norm_rope(*xs, pos, backend="triton")
    yq.sum().backward()
    assert torch.equal(xs[1].grad, torch.zeros_like(k)) and torch.equal(xs[3].grad, torch.zeros_like(wk))
    assert xs[0].grad.abs().sum() > 0 and xs[2].grad.abs().sum() > 0


def test_no_tokens():
    q, k, wq, wk, _ = _inputs(0, 2, 1, 8)
    out = _run(_fused, q, k, wq, wk, torch.zeros(0, dtype=torch.int64))
    assert out[0].shape == (0, 2, 8) and out[1].shape == (0, 1, 8)
    assert torch.equal(out[4], torch.zeros(8)) and torch.equal(out[5], torch.zeros(8))


def test_double_backward_raises():
    q, k, wq, wk, pos = _inputs(5, 2, 1, 8)
    q.requires_grad_(True)
    yq, yk = qk_norm_rope(q, k, wq, wk, pos, backend="triton")
    (dq,) = torch.autograd.grad(yq.pow(3).sum() + yk.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        dq.pow(2).sum().backward()


def test_bad_inputs_name_the_argument():
    q, k, wq, wk, pos = _inputs(4, 2, 1, 8)
    cases = [
        ((q, k[:3], wq, wk, pos), ValueError, "k has 3 rows but q has 4"),
        ((q, k, wq, wk, pos[:3]), ValueError, "position_ids has 3 rows"),
        ((q, torch.randn(4, 1, 6), wq, wk, pos), ValueError, "share the head dimension"),
        ((torch.randn(4, 2, 7), torch.randn(4, 1, 7), torch.ones(7), torch.ones(7), pos), ValueError, "even"),
        ((q, k, wq[:6], wk, pos), ValueError, "q_weight must have the head dimension's size 8"),
        ((q, k, wq, torch.ones(2, 8), pos), ValueError, "k_weight must be 1-D"),
        ((q, k, wq, wk, pos.float()), TypeError, "position_ids must have dtype"),
        ((q[0], k, wq, wk, pos), ValueError, "q must be 3-D"),
        ((q.long(), k, wq, wk, pos), TypeError, "q must have dtype"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            qk_norm_rope(*args, backend="triton")
    with pytest.raises(ValueError, match="eps must be > 0, got 0"):
        qk_norm_rope(q, k, wq, wk, pos, 0.0, backend="triton")
    with pytest.raises(ValueError, match="theta must be > 0, got -1"):
        qk_norm_rope(q, k, wq, wk, pos, 1e-6, -1.0, backend="triton")


@pytest.mark.gpu
def test_bf16_anchor_gpu_within_twice_plain():
    """Qwen3-4B's attention input on a 16k packed row (32 q / 8 kv heads of 128), bf16, judged by STYLE.md's rule:
    against fp32 eager torch, at most twice eager bf16's error (plus 1e-3 of the largest value)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    T, HQ, HK, D = 16384, 32, 8, 128
    q = torch.randn(T, HQ, D, device="cuda", generator=g)
    k = torch.randn(T, HK, D, device="cuda", generator=g)
    wq = torch.rand(D, device="cuda", generator=g) + 0.5
    wk = torch.rand(D, device="cuda", generator=g) + 0.5
    pos = torch.cat([torch.arange(n, device="cuda") for n in (4096, 4096, 4096, 2048, 2048)])
    ref = lambda *a: qk_norm_rope(*a, backend="torch")
    want = _run(ref, q, k, wq, wk, pos)
    bf = [t.bfloat16() for t in (q, k, wq, wk)]
    plain = _run(ref, *bf, pos)
    ours = _run(lambda *a: qk_norm_rope(*a, backend="triton"), *bf, pos)
    assert all(o.dtype == torch.bfloat16 for o in ours)
    assert_within_twice_plain(ours, plain, want, NAMES, atol_rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("T,HK", [(37, 8), (16389, 0), (16389, 8)])
def test_every_config_gpu(T, HK, monkeypatch):
    """Every (BLOCK_T, warps, STAGES) of CONFIGS through the op's direct-launch path (the autotuner's choice faked),
    forward and backward, fp32 on the GPU against float64: a ragged last token block, the pipelined configs'
    masked tail loads, no k heads (a loop of zero trips). The bf16 test above runs only the autotuner's pick."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import importlib

    import triton

    from r4b.kernels import _dispatch

    qkr = importlib.import_module("r4b.kernels.qk_norm_rope")
    q, k, wq, wk, pos = (t.cuda() for t in _inputs(T, 32, HK, 128, seed=9))
    for t, w, st in qkr.CONFIGS:
        cfg = triton.Config({"BLOCK_T": t, "STAGES": st}, num_warps=w)
        monkeypatch.setattr(_dispatch, "tuned_config", lambda *a, cfg=cfg: cfg)
        _assert_matches_float64(_run(_fused, q, k, wq, wk, pos), q, k, wq, wk, pos)


def test_trains_after_its_first_call_under_inference_mode():
    """The engine's steps run under inference_mode; a training step after them (BPO: a rollout, then its update)
    must still backpropagate: the RoPE frequencies cached at the first call are a normal tensor, not an inference
    tensor that autograd cannot save. (A head dim and theta no other test uses, so this call fills the cache.)"""
    import importlib

    rope_mod = importlib.import_module("r4b.kernels.rope")  # (r4b.kernels.rope is also the op)

    q, k, wq, wk, pos = _inputs(6, 2, 1, 24)
    theta = 12345.0
    rope_mod._INV_FREQ.clear()
    with torch.inference_mode():
        qk_norm_rope(q, k, wq, wk, pos, 1e-6, theta, backend="triton")
        rope(q, pos, theta, backend="triton")
    assert rope_mod._INV_FREQ and not any(t.is_inference() for t in rope_mod._INV_FREQ.values())
    _assert_matches_float64(_run(_fused, q, k, wq, wk, pos, theta=theta), q, k, wq, wk, pos, theta=theta)
