"""rope: the Triton path against a float64 reference (output and dx), strided inputs, input errors."""

import math

import pytest
import torch

from r4b.kernels import rope, rope_ref


def _rope64(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Float64 RoPE (rotate-half) from the reference's fp32 angles: like transformers, the angle
    pos * inv_freq is formed in fp32 (an error of ~pos * 2^-24 rad that is part of the semantics); cos, sin
    and the rotation are float64."""
    D = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))  # fp32, as transformers
    ang = (pos.float()[:, None] * inv[None, :].to(pos.device)).double()  # (T, D/2)
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]  # (T, 1, D/2)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


def _run(x, pos, theta, backend):
    x = x.detach().clone().requires_grad_(True)
    y = rope(x, pos, theta, backend=backend) if backend else _rope64(x, pos, theta)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dy = dy.to(device=y.device, dtype=y.dtype)
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize("T,H,D", [(1, 1, 64), (37, 3, 80), (20, 4, 128), (5, 2, 6)])
def test_rope_matches_float64(T, H, D):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, D, generator=g)
    # positions restart per packed sequence; large values check the angle computation (pos * inv_freq)
    pos = torch.cat([torch.arange(T // 2), torch.arange(T - T // 2) * 251 + 7])
    y, dx = _run(x, pos, 1e6, "triton")
    y64, dx64 = _run(x.double(), pos, 1e6, None)
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx64.float(), rtol=1e-5, atol=1e-5)
    # the Triton path equals the torch reference (same fp32 angles) to rounding
    torch.testing.assert_close(y, rope_ref(x, pos, 1e6), rtol=1e-5, atol=1e-5)


def test_rope_backward_is_inverse_rotation():
    x = torch.randn(9, 2, 16, dtype=torch.float32)
    pos = torch.arange(9) * 3
    y = rope(x, pos, 10000.0, backend="triton")
    # rotating back by the same angles (what backward applies to dy) recovers x
    x.requires_grad_(True)
    out = rope(x, pos, 10000.0, backend="triton")
    (gx,) = torch.autograd.grad(out, x, y)
    torch.testing.assert_close(gx, x.detach(), rtol=1e-5, atol=1e-5)
    assert math.isclose(float(y.norm()), float(x.detach().norm()), rel_tol=1e-5)


def test_rope_strided_head_slice():
    # q taken as a slice of a fused (T, Hq + 2 Hkv, D) projection: non-contiguous along heads
    qkv = torch.randn(11, 8, 64)
    q = qkv[:, :4]
    pos = torch.arange(11)
    y, dx = _run(q, pos, 1e6, "triton")
    y64, dx64 = _run(q.double(), pos, 1e6, None)
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx64.float(), rtol=1e-5, atol=1e-5)


def test_rope_bad_inputs():
    x = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="position_ids has 3 rows"):
        rope(x, torch.arange(3), backend="triton")
    with pytest.raises(ValueError, match="even"):
        rope(torch.randn(4, 2, 7), torch.arange(4), backend="triton")
    with pytest.raises(TypeError, match="position_ids must have dtype"):
        rope(x, torch.arange(4).float(), backend="triton")


@pytest.mark.gpu
def test_rope_bf16_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16384, 32, 128, device="cuda", generator=g)
    pos = torch.cat([torch.arange(n, device="cuda") for n in (4096, 4096, 4096, 2048, 2048)])
    y_ref, dx_ref = _run(x, pos, 1e6, None)
    yt, dxt = _run(x.bfloat16(), pos, 1e6, "triton")
    xb = x.bfloat16().requires_grad_(True)
    yb = rope_ref(xb, pos, 1e6)
    yb.backward(torch.randn(yb.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(yb))
    for got, base, ref in ((yt, yb.detach(), y_ref), (dxt, xb.grad, dx_ref)):
        err = (got.float() - ref.float()).abs().max()
        assert err <= 2 * (base.float() - ref.float()).abs().max() + 1e-3 * ref.abs().max()


def test_double_backward_raises_and_zero_width_is_refused():
    x = torch.randn(5, 2, 8, requires_grad=True)
    pos = torch.arange(5)
    (dx,) = torch.autograd.grad(rope(x, pos, backend="triton").pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        dx.pow(2).sum().backward()
    with pytest.raises(ValueError, match="head dimension"):
        rope(torch.zeros(5, 2, 0), pos, backend="triton")


def test_rope_head_major_view_and_many_heads():
    """x as a transposed view of an (H, T, D) tensor (head stride T*D, the heads walked by pointer steps), with a
    head count that is not a power of two, and its backward, against float64."""
    g = torch.Generator().manual_seed(5)
    H, T, D = 17, 23, 32
    x = torch.randn(H, T, D, generator=g).transpose(0, 1)  # (T, H, D), stride (D, T*D, 1)
    pos = torch.arange(T) * 97 + 3
    y, dx = _run(x, pos, 1e6, "triton")
    y64, dx64 = _run(x.double(), pos, 1e6, None)
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx64.float(), rtol=1e-5, atol=1e-5)
