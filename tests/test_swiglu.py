"""swiglu: the Triton path against a float64 reference (output, dgate, dup), strided halves, input errors."""

import pytest
import torch

from r4b.kernels import swiglu, swiglu_ref


def _run(gate, up, backend):
    gate = gate.detach().clone().requires_grad_(True)
    up = up.detach().clone().requires_grad_(True)
    y = swiglu(gate, up, backend=backend) if backend else gate * torch.sigmoid(gate) * up
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dy = dy.to(device=y.device, dtype=y.dtype)
    y.backward(dy)
    return y.detach(), gate.grad, up.grad


@pytest.mark.parametrize("shape", [(1,), (97, 33), (3, 4, 1030), (2, 0, 5)])
def test_swiglu_matches_float64(shape):
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(shape, generator=g) * 4
    up = torch.randn(shape, generator=g)
    y, dg, du = _run(gate, up, "triton")
    y64, dg64, du64 = _run(gate.double(), up.double(), None)
    assert y.shape == shape and dg.dtype == torch.float32
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dg, dg64.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(du, du64.float(), rtol=1e-5, atol=1e-6)


def test_swiglu_fused_gate_up_chunks():
    gate_up = torch.randn(13, 2 * 48, dtype=torch.float32)
    gate, up = gate_up.chunk(2, dim=-1)  # (13, 48) views with row stride 96
    y, dg, du = _run(gate, up, "triton")
    y64, dg64, du64 = _run(gate.double(), up.double(), None)
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dg, dg64.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(du, du64.float(), rtol=1e-5, atol=1e-6)


def test_swiglu_bad_inputs():
    with pytest.raises(ValueError, match="gate and up must have one shape"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5), backend="triton")
    with pytest.raises(TypeError, match="up must have dtype"):
        swiglu(torch.randn(3), torch.arange(3), backend="triton")


@pytest.mark.gpu
def test_swiglu_bf16_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    gate = torch.randn(16384, 9728, device="cuda", generator=g)
    up = torch.randn(16384, 9728, device="cuda", generator=g)
    ref = _run(gate, up, None)
    got = _run(gate.bfloat16(), up.bfloat16(), "triton")
    gb, ub = gate.bfloat16().requires_grad_(True), up.bfloat16().requires_grad_(True)
    yb = swiglu_ref(gb, ub)
    yb.backward(torch.randn(yb.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(yb))
    for t, b, r in zip(got, (yb.detach(), gb.grad, ub.grad), ref, strict=True):
        err = (t.float() - r).abs().max()
        assert err <= 2 * (b.float() - r).abs().max() + 1e-3 * r.abs().max()


def test_double_backward_raises_and_zero_width_is_refused():
    gate = torch.randn(5, 8, requires_grad=True)
    up = torch.randn(5, 8)
    (dg,) = torch.autograd.grad(swiglu(gate, up, backend="triton").pow(3).sum(), gate, create_graph=True)
    with pytest.raises(RuntimeError):
        dg.pow(2).sum().backward()
    with pytest.raises(ValueError, match="last dimension"):
        swiglu(torch.zeros(5, 0), torch.zeros(5, 0), backend="triton")


def test_small_op_autotuning_keys_on_a_row_bucket():
    """The GPU autotuners key on a bucket of the row count (one bucket below 4096 rows, then powers of two), so a
    decode-sized first call does not pick the tile of a 16k-token training step."""
    import importlib

    from r4b.kernels._dispatch import rows_bucket

    assert [rows_bucket(n) for n in (0, 1, 4095, 4096, 8191, 8192, 16384 * 32)] == [0, 0, 0, 1, 1, 2, 8]
    swi = importlib.import_module("r4b.kernels.swiglu")
    rope = importlib.import_module("r4b.kernels.rope")
    assert "rows_bucket" in swi._fwd_tuned.keys and "rows_bucket" in swi._bwd_tuned.keys
    assert "t_bucket" in rope._rope_tuned.keys


def test_small_op_launchers_find_the_autotuners_choice(monkeypatch):
    """On a GPU the launchers look up the config their autotuner chose (its cache, keyed on the key values then
    every tensor argument's dtype) and launch it directly. Here each autotuner chooses (timings faked, launches
    no-ops) for arguments laid out as the launchers pass them, and _dispatch.tuned_config with the key values and
    tensors the launchers pick from those arguments must find that choice: a key built differently would miss on
    every call and fall back to the autotuner, losing the saving. (The launchers' GPU branch cannot run here.)"""
    import importlib

    from r4b.kernels import _dispatch

    swi = importlib.import_module("r4b.kernels.swiglu")
    rope = importlib.import_module("r4b.kernels.rope")
    rms = importlib.import_module("r4b.kernels.rms_norm")
    qkr = importlib.import_module("r4b.kernels.qk_norm_rope")
    n, i = 5000, 96
    g, u, y = torch.zeros(n, i), torch.zeros(n, i, dtype=torch.bfloat16), torch.zeros(n, i)
    dy, dg, du = torch.zeros(n, i), torch.zeros(n, i), torch.zeros(n, i, dtype=torch.bfloat16)
    x, pos, inv = torch.zeros(7, 3, 64, dtype=torch.bfloat16), torch.zeros(7, dtype=torch.int64), torch.zeros(32)
    yr = torch.zeros(7, 3, 64, dtype=torch.bfloat16)
    w, rstd, part = torch.zeros(i, dtype=torch.bfloat16), torch.zeros(n), torch.zeros(4, i)
    w64 = torch.zeros(64, dtype=torch.bfloat16)
    cases = [  # (autotuner, args, kwargs, the launcher's key values, its tensor arguments)
        (swi._fwd_tuned, (g, u, y, n, i, 1, i, i, i), {}, (i, 1), (g, u, y)),
        (swi._bwd_tuned, (dy, g, u, dg, du, n, i, 1, i, i, i, i), {}, (i, 1), (dy, g, u, dg, du)),
        (rope._rope_tuned, (x, pos, inv, yr, 7, 3, 0, 192, 64, 192, 64),
         {"HALF": 32, "BLOCK_HALF": 32, "INVERSE": False}, (3, 32, 0), (x, pos, inv, yr)),
        (rms._bwd_tuned, (y, g, w, rstd, dg, part, y, n, i, i, i, i), {"D": i, "BLOCK_D": 128, "ADD_DS": False},
         (i,), (y, g, w, rstd, dg, part, y)),
        (rms._bwd_add_tuned, (y, g, w, rstd, dg, part, dy, n, i, i, i, i), {"D": i, "BLOCK_D": 128, "ADD_DS": True},
         (i,), (y, g, w, rstd, dg, part, dy)),
        # qk_norm_rope: forward (8 tensors) and backward (11), keyed on heads, half dim and the row bucket
        (qkr._fwd_tuned, (x, x, w64, w64, pos, inv, yr, yr, 7, 3, 3, 0, 192, 64, 192, 64, 192, 64, 192, 64, 1e-6),
         {"HALF": 32, "BLOCK_HALF": 32}, (3, 3, 32, 0), (x, x, w64, w64, pos, inv, yr, yr)),
        (qkr._bwd_tuned, (yr, yr, x, x, w64, w64, pos, inv, yr, yr, part, 7, 3, 3, 0, *[192, 64] * 6, 1e-6),
         {"HALF": 32, "BLOCK_HALF": 32}, (3, 3, 32, 0), (yr, yr, x, x, w64, w64, pos, inv, yr, yr, part)),
    ]
    for tuned, args, kwargs, key, tensors in cases:
        monkeypatch.setattr(tuned, "cache", {})
        monkeypatch.setattr(tuned, "_bench", lambda *a, config, **k: [float(config.num_warps)] * 3)
        monkeypatch.setattr(tuned.fn, "run", lambda *a, **k: None)
        assert _dispatch.tuned_config(tuned, key, tensors) is None
        tuned[lambda m: (1,)](*args, **kwargs)
        assert len(tuned.cache) == 1
        assert _dispatch.tuned_config(tuned, key, tensors) is next(iter(tuned.cache.values()))


def test_swiglu_grid_is_one_axis(monkeypatch):
    """The launch grid has one axis (2^31 - 1 programs) holding row blocks x column blocks: a 2-D grid put the
    column blocks on axis 1, which CUDA caps at 65,535, so a flattened input past 33.5M elements failed to launch
    (the interpreter has no such limit; the GPU test below runs one)."""
    import importlib

    swi = importlib.import_module("r4b.kernels.swiglu")
    grids = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(swi, "_swiglu_fwd_kernel", Spy(swi._swiglu_fwd_kernel))
    monkeypatch.setattr(swi, "_swiglu_bwd_kernel", Spy(swi._swiglu_bwd_kernel))
    gate, up = torch.randn(12, 1030), torch.randn(12, 1030)
    got = _run(gate, up, "triton")
    ref = _run(gate.double(), up.double(), None)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-6)
    bm, bn = swi._grid_blocks(1030)
    assert grids == [(-(-12 // bm) * -(-1030 // bn),)] * 2


@pytest.mark.gpu
def test_swiglu_flattened_past_the_second_grid_axis_gpu():
    """A 1-D input of 2^28 + 3 bf16 elements: past 65,535 column blocks for every config's tile (the largest is
    4096 wide), by the bf16 rule against an fp32 reference."""
    g = torch.Generator(device="cuda").manual_seed(0)
    gate = torch.randn(2**28 + 3, device="cuda", generator=g)
    up = torch.randn(2**28 + 3, device="cuda", generator=g)
    ref = swiglu_ref(gate, up)
    got = swiglu(gate.bfloat16(), up.bfloat16(), backend="triton").float()
    plain = swiglu_ref(gate.bfloat16(), up.bfloat16()).float()
    assert (got - ref).abs().max() <= 2 * (plain - ref).abs().max() + 1e-3 * ref.abs().max()
