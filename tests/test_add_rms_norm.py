"""add_rms_norm: the fused Triton path against float64 (both outputs, dx = dresidual, dweight), with either output
unused, against the unfused Triton ops in fp16, strided inputs, no rows, input errors; a bf16 GPU check."""

import pytest
import torch

from r4b.kernels import add_rms_norm, add_rms_norm_ref, rms_norm
from tests._lowprec import assert_within_twice_plain

NAMES = ("normed", "summed", "dx", "dresidual", "dweight")


def _want64(x, r, w, eps):
    s = x.double() + r.double()
    return w.double() * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps), s


def _run(fn, x, r, w, eps=1e-6, use=(True, True), seed=7):
    """fn's two outputs and the gradients of x, residual, weight when the used outputs get random gradients."""
    xs = [t.detach().clone().requires_grad_(True) for t in (x, r, w)]
    outs = fn(*xs, eps)
    g = torch.Generator().manual_seed(seed)
    dys = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(device=o.device, dtype=o.dtype) for o in outs]
    torch.autograd.backward([o for o, u in zip(outs, use, strict=True) if u],
                            [d for d, u in zip(dys, use, strict=True) if u])
    return [o.detach() for o in outs] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in xs]


def _fused(x, r, w, eps):
    return add_rms_norm(x, r, w, eps, backend="triton")


def _inputs(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(shape, generator=g) * 3).to(dtype), torch.randn(shape, generator=g).to(dtype),
            (torch.rand(shape[-1], generator=g) + 0.5).to(dtype))


def _assert_matches_float64(got, x, r, w, eps=1e-6, use=(True, True)):
    want = _run(_want64, x.double(), r.double(), w.double(), eps, use)
    for name, o, wt in zip(NAMES, got, want, strict=True):
        scale = max(1.0, wt.abs().max().item() if wt.numel() else 0.0)
        torch.testing.assert_close(o.double(), wt, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("shape", [(1, 64), (97, 80), (3, 5, 128), (2, 1000), (130, 8)])
def test_matches_float64(shape):
    x, r, w = _inputs(shape)
    got = _run(_fused, x, r, w)
    assert torch.equal(got[2], got[3])  # x and residual get the same gradient
    _assert_matches_float64(got, x, r, w)


@pytest.mark.parametrize("use", [(True, False), (False, True)])
def test_one_output_unused(use):
    # (True, False): the final norm (the sum is not used again: no gradient to add); (False, True): the sum alone
    x, r, w = _inputs((33, 48), seed=2)
    got = _run(_fused, x, r, w, use=use)
    _assert_matches_float64(got, x, r, w, use=use)
    if not use[0]:
        assert torch.equal(got[4], torch.zeros_like(w))


def test_large_eps_and_strided_rows():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(9, 2, 64, generator=g) * 0.1
    x, r = base[:, 1, :], base[:, 0, :] * 0.5  # (9, 64) views with row stride 128
    w = torch.rand(64, generator=g) + 0.5
    _assert_matches_float64(_run(_fused, x, r, w, eps=0.05), x, r, w, eps=0.05)


def test_matches_the_unfused_triton_ops_in_fp16():
    """The same roundings as rms_norm(x + residual): both outputs bit-identical in fp16 (fp32 weights promote the
    normalised output to fp32, as rms_norm does); dx within two fp16 roundings (the unfused path rounds the norm's
    dx to fp16 before the add, the fused kernel adds in fp32 and rounds once); dweight is a sum in another order."""
    for wdtype in (torch.float32, torch.float16):
        x, r, w = _inputs((37, 256), seed=3, dtype=torch.float16)
        w = w.to(wdtype)
        got = _run(_fused, x, r, w)
        base = _run(lambda x, r, w, eps: (rms_norm(x + r, w, eps, backend="triton"), x + r), x, r, w)
        assert got[0].dtype == base[0].dtype == torch.promote_types(torch.float16, wdtype)
        for name, o, b in zip(NAMES[:2], got[:2], base[:2], strict=True):
            assert torch.equal(o, b), (name, wdtype, (o != b).sum().item())
        ulp = 2.0 ** -10
        for name, o, b in zip(NAMES[2:], got[2:], base[2:], strict=True):
            assert o.dtype == b.dtype, name
            torch.testing.assert_close(o.double(), b.double(), rtol=2 * ulp, atol=2 * ulp * b.abs().max().item(),
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_torch_backend_is_the_composition():
    x, r, w = _inputs((5, 16))
    y, s = add_rms_norm(x, r, w, backend="torch")
    assert torch.equal(s, x + r) and torch.equal(y, rms_norm(x + r, w, backend="torch"))
    y2, s2 = add_rms_norm_ref(x, r, w)
    assert torch.equal(y2, y) and torch.equal(s2, s)


def test_no_rows():
    x, r, w = _inputs((0, 8))
    got = _run(_fused, x, r, w)
    assert got[0].shape == (0, 8) and got[1].shape == (0, 8) and torch.equal(got[4], torch.zeros(8))


def test_double_backward_raises():
    x, r, w = _inputs((4, 8))
    x.requires_grad_(True)
    y, _ = add_rms_norm(x, r, w, backend="triton")
    (dx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        dx.pow(2).sum().backward()


def test_bad_inputs_name_the_argument():
    x, r, w = _inputs((4, 8))
    with pytest.raises(ValueError, match=r"residual must have x's shape and dtype, got residual \(4, 7\)"):
        add_rms_norm(x, r[:, :7], w, backend="triton")
    with pytest.raises(ValueError, match="residual must have x's shape and dtype, got residual .* float16"):
        add_rms_norm(x, r.half(), w, backend="triton")
    with pytest.raises(ValueError, match="weight's size 7"):
        add_rms_norm(x, r, w[:7], backend="triton")
    with pytest.raises(TypeError, match="residual must have dtype"):
        add_rms_norm(x, r.long(), w, backend="triton")
    with pytest.raises(ValueError, match="eps must be > 0, got 0"):
        add_rms_norm(x, r, w, 0.0, backend="triton")


@pytest.mark.gpu
def test_bf16_hidden_gpu_within_twice_plain():
    """Qwen3-4B's hidden states on a 16k packed row, bf16, both outputs differentiated, judged by STYLE.md's rule
    against fp32 eager torch: at most twice eager bf16's error (plus 1e-3 of the largest value)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16384, 2560, device="cuda", generator=g) * 3
    r = torch.randn(16384, 2560, device="cuda", generator=g)
    w = torch.rand(2560, device="cuda", generator=g) + 0.5
    ref = lambda *a: add_rms_norm(*a, backend="torch")  # noqa: E731
    want = _run(ref, x, r, w)
    bf = [t.bfloat16() for t in (x, r, w)]
    plain = _run(ref, *bf)
    ours = _run(lambda *a: add_rms_norm(*a, backend="triton"), *bf)
    assert all(o.dtype == torch.bfloat16 for o in ours)
    assert_within_twice_plain(ours, plain, want, NAMES, atol_rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(37, 2560), (16389, 2560), (1000, 128)])
def test_every_backward_config_gpu(shape, monkeypatch):
    """Every backward config that add_rms_norm's autotuner keeps at this width (ADD_DS, two programs an SM, up to
    4 pipeline stages) through the direct-launch path (the autotuner's choice faked), fp32 on the GPU against
    float64, at row counts under and past one wave. The bf16 test above runs only the autotuner's pick."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import importlib

    from r4b.kernels import _dispatch

    rms = importlib.import_module("r4b.kernels.rms_norm")
    D = shape[-1]
    kept = rms._bwd_add_prune(rms._bwd_add_tuned.configs, {}, D=D, BLOCK_D=1 << (D - 1).bit_length())
    assert kept
    x, r, w = (t.cuda() for t in _inputs(shape, seed=5))
    for cfg in kept:
        monkeypatch.setattr(_dispatch, "tuned_config", lambda *a, cfg=cfg: cfg)
        _assert_matches_float64(_run(_fused, x, r, w), x, r, w)
