"""varlen_attention: the Triton path against float64 references (output, dq, dk, dv), sequence isolation,
input errors; bf16 on the anchor shape on a GPU (STYLE.md: error <= 2x plain PyTorch bf16 error + atol)."""

import importlib
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from r4b.kernels import varlen_attention, varlen_attention_ref
from r4b.kernels.varlen_attention import _tile_of
from tests._aot import run_aot_report
from tests._lowprec import assert_within_twice_plain


def _cu(lens: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _scores(q, k, lens, causal, scale):
    """Per non-empty sequence: (its rows, its scaled and masked scores (Hq, L, L)), K indexed by head // group."""
    Hq = q.shape[1]
    heads = torch.arange(Hq, device=q.device) // (Hq // k.shape[1])
    start = 0
    for L in lens:
        sl = slice(start, start + L)
        start += L
        if L == 0:
            continue
        s = torch.einsum("ihd,jhd->hij", q[sl], k[sl][:, heads]) * scale
        if causal:
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        yield sl, s


def _attention64(q, k, v, lens, causal, scale):
    """Independent float64 reference: explicit softmax per sequence, K/V indexed by head // group."""
    heads = torch.arange(q.shape[1], device=q.device) // (q.shape[1] // k.shape[1])
    out = torch.zeros_like(q)
    for sl, s in _scores(q, k, lens, causal, scale):
        out[sl] = torch.einsum("hij,jhd->ihd", s.softmax(-1), v[sl][:, heads])
    return out


def _inputs(lens, Hq, Hkv, D, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v, do = (torch.randn(T, h, D, generator=g) for h in (Hq, Hkv, Hkv, Hq))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o.detach(), dq, dk, dv


# (lens, Hq, Hkv, D, causal): length-1 and empty sequences (also first and last), lengths off the 16/32-row
# tiles, one long + many short, GQA ratios 1, 4, 8, D 64, 72 (SigLIP so400m), 80 and 96 (padded to a
# power-of-two tile).
CASES = [
    ([1, 37, 1, 16, 5], 2, 2, 64, True),
    ([70, 1, 3, 1, 0, 2, 9], 8, 2, 80, True),
    ([45, 2, 1], 8, 1, 64, True),
    ([29, 1, 40], 4, 1, 80, False),
    ([1, 50, 13], 8, 8, 64, False),
    ([0, 21, 0, 18, 0], 2, 1, 72, False),
    ([0, 33, 4, 0], 4, 2, 96, True),
]


@pytest.fixture(params=[("split", "pointer"), ("atomic", "pointer"), ("split", "tma"), ("atomic", "tma")],
                ids=lambda p: "-".join(p))
def modes(request, monkeypatch):
    """The Triton kernels' variants: both backwards, "split" (dQ kernel + dK/dV kernel) and "atomic" (the dK/dV
    kernel adds dQ), each with the inner-loop blocks loaded through pointers or through TMA tensor descriptors
    (R4B_VARLEN_LOADS; the interpreter emulates them: bounds, zero fill; layouts TMA cannot address fall back to
    pointers)."""
    monkeypatch.setenv("R4B_VARLEN_BWD", request.param[0])
    monkeypatch.setenv("R4B_VARLEN_LOADS", request.param[1])
    return request.param


@pytest.mark.parametrize("lens,Hq,Hkv,D,causal", CASES)
def test_varlen_attention_matches_float64(lens, Hq, Hkv, D, causal, device, modes):
    q, k, v, do = _inputs(lens, Hq, Hkv, D, device=device)
    cu = _cu(lens, device)
    scale = 1.0 / math.sqrt(D)
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, max(lens), causal=causal, backend="triton"),
                 q, k, v, do)
    ref = _grads(lambda a, b, c: _attention64(a, b, c, lens, causal, scale), q.double(), k.double(), v.double(),
                 do.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("tile", [(32, 16), (16, 16)], ids=["pair-loads", "separate-loads"])
@pytest.mark.parametrize("lens,Hq,Hkv,D,causal", [CASES[1], CASES[6]])
def test_varlen_dkdv_lse_delta_pair_and_separate_loads(lens, Hq, Hkv, D, causal, tile, modes, monkeypatch):
    """The dK/dV kernel reads (lse, delta) as one 8-byte pair when BLOCK_M < BLOCK_N and BLOCK_M <= 32 (where sm_90
    ptxas spilled less with it) and as two 4-byte loads otherwise; the interpreter's default dK/dV tile (32 keys x
    16 queries) takes the pair path, so a 16 x 16 tile checks the other one against float64 too."""
    va = importlib.import_module("r4b.kernels.varlen_attention")
    monkeypatch.setitem(va._INTERP, "dkdv", tile)
    q, k, v, do = _inputs(lens, Hq, Hkv, D)
    cu = _cu(lens, "cpu")
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, max(lens), causal=causal, backend="triton"),
                 q, k, v, do)
    ref = _grads(lambda a, b, c: _attention64(a, b, c, lens, causal, 1.0 / math.sqrt(D)), q.double(), k.double(),
                 v.double(), do.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_varlen_attention_head_major_views_and_only_q_requiring_grad(device, modes):
    """q, k, v as transposed views of (H, T, D) tensors (row stride D, head stride T*D), only q requiring grad."""
    lens, Hq, Hkv, D = [13, 1, 22], 4, 2, 64
    g = torch.Generator().manual_seed(2)
    T = sum(lens)
    q, k, v = (torch.randn(h, T, D, generator=g).to(device).transpose(0, 1) for h in (Hq, Hkv, Hkv))
    do = torch.randn(T, Hq, D, generator=g).to(device)
    cu = _cu(lens, device)
    qg = q.detach().clone().requires_grad_()
    o = varlen_attention(qg, k, v, cu, 22, backend="triton")
    (dq,) = torch.autograd.grad(o, qg, do)
    ref = _grads(lambda a, b, c: _attention64(a, b, c, lens, True, 1 / math.sqrt(D)), q.double(), k.double(),
                 v.double(), do.double())
    torch.testing.assert_close(o.detach(), ref[0].float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(dq, ref[1].float(), rtol=1e-5, atol=2e-5)


def test_varlen_attention_strided_qkv_and_scale(device, modes):
    # q, k, v as head slices of one fused (T, Hq + 2 Hkv, D) projection, and a non-default softmax_scale
    lens, Hq, Hkv, D = [20, 1, 19], 4, 2, 64
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(sum(lens), Hq + 2 * Hkv, D, generator=g).to(device)
    q, k, v = qkv[:, :Hq], qkv[:, Hq : Hq + Hkv], qkv[:, Hq + Hkv :]
    do = torch.randn(sum(lens), Hq, D, generator=g).to(device)
    cu = _cu(lens, device)
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 20, softmax_scale=0.3, backend="triton"), q, k, v, do)
    ref = _grads(lambda a, b, c: _attention64(a, b, c, lens, True, 0.3), q.double(), k.double(), v.double(),
                 do.double())
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("change", ["finite", "inf-nan"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on the planted NaNs
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_varlen_attention_no_information_crosses_a_boundary(causal, change, device, modes):
    # sequences 0 and 2 share 32-row tiles with sequence 1 in every kernel; changing sequence 1's q, k, v and
    # dO must leave their outputs and all their gradients bit-identical, also when the change is an inf or NaN
    # (a diverged sample): a neighbour's value times a zero probability must never be computed (0 * inf = NaN).
    lens, Hq, Hkv, D = [7, 30, 11], 4, 2, 64
    cu = _cu(lens, device)
    q, k, v, do = _inputs(lens, Hq, Hkv, D, device=device)
    fn = lambda a, b, c: varlen_attention(a, b, c, cu, 30, causal=causal, backend="triton")
    base = _grads(fn, q, k, v, do)
    mid = slice(7, 37)
    q2, k2, v2, do2 = (t.clone() for t in (q, k, v, do))
    if change == "finite":
        for t in (q2, k2, v2, do2):
            t[mid] = t[mid] * 3.0 + 1.0
    else:  # first, middle and last rows of sequence 1, next to both neighbours
        for t, bad in ((q2, float("nan")), (k2, float("inf")), (v2, float("-inf")), (do2, float("nan"))):
            t[[7, 20, 36]] = bad
    pert = _grads(fn, q2, k2, v2, do2)
    others = torch.ones(sum(lens), dtype=torch.bool)
    others[mid] = False
    for name, a, b in zip(("out", "dq", "dk", "dv"), base, pert, strict=True):
        assert torch.equal(a[others], b[others]), name
        assert not torch.equal(a[mid], b[mid]), name  # the perturbation did reach sequence 1


def test_varlen_backward_mode_is_checked_by_name(monkeypatch):
    q, k, v, do = _inputs([5, 3], 2, 1, 16)
    q.requires_grad_()
    monkeypatch.setenv("R4B_VARLEN_BWD", "fast")
    out = varlen_attention(q, k, v, _cu([5, 3], "cpu"), 5, backend="triton")
    with pytest.raises(ValueError, match="R4B_VARLEN_BWD.*'fast'"):
        out.backward(do)


def test_varlen_loads_mode_is_checked_by_name_and_tma_takes_the_layouts_it_can_address(monkeypatch):
    from r4b.kernels.varlen_attention import _tma_ok

    q, k, v, _ = _inputs([5, 3], 2, 1, 16)
    monkeypatch.setenv("R4B_VARLEN_LOADS", "bulk")
    with pytest.raises(ValueError, match="R4B_VARLEN_LOADS.*'bulk'"):
        varlen_attention(q, k, v, _cu([5, 3], "cpu"), 5, backend="triton")
    T, D = 9, 64
    plain = torch.randn(T, 2, D)
    monkeypatch.setenv("R4B_VARLEN_LOADS", "pointer")
    assert not _tma_ok(plain, block_d=D)
    monkeypatch.setenv("R4B_VARLEN_LOADS", "tma")
    qkv = torch.randn(T, 4 + 2 * 2, D)  # fused projection: k and v are head slices, row stride 8 * D
    head_major = torch.randn(2, T, D).transpose(0, 1)  # head stride T * D: one descriptor per head still works
    assert _tma_ok(qkv[:, 4:6], qkv[:, 6:], plain, head_major, block_d=D)
    assert not _tma_ok(torch.randn(T, 2, 80), block_d=128)  # D below the (power-of-two) block
    odd = torch.randn(T, 2 * 32 + 1)[:, 1:].view(T, 2, 32)  # row stride 65 floats: not a multiple of 16 bytes
    assert not _tma_ok(odd, block_d=32)
    broadcast = torch.randn(1, 2, D).expand(T, 2, D)  # row stride 0, as a gradient of a sum over tokens can be
    assert not _tma_ok(broadcast, block_d=D)
    assert not _tma_ok(plain, torch.randn(T * 2 * D + 1)[1:].view(T, 2, D), block_d=D)  # a base 4 bytes off
    # and the launches take it: forward (K, V), dQ kernel (K, V), dK/dV kernel (Q, dO)
    va = importlib.import_module("r4b.kernels.varlen_attention")
    seen = []
    monkeypatch.setattr(va, "_tma_ok", lambda *t, block_d: seen.append(_tma_ok(*t, block_d=block_d)) or seen[-1])
    q, k, v, do = _inputs([5, 30], 4, 2, 32)
    q.requires_grad_()
    varlen_attention(q, k, v, _cu([5, 30], "cpu"), 30, backend="triton").backward(do)
    assert seen == [True, True, True]


def test_varlen_forward_mode_is_checked_by_name_and_gluon_says_why_it_cannot_run(monkeypatch):
    q, k, v, _ = _inputs([5, 3], 2, 1, 16)
    monkeypatch.setenv("R4B_VARLEN_FWD", "cuda")
    with pytest.raises(ValueError, match="R4B_VARLEN_FWD.*'cuda'"):
        varlen_attention(q, k, v, _cu([5, 3], "cpu"), 5, backend="triton")
    monkeypatch.setenv("R4B_VARLEN_FWD", "gluon")  # asked for by name: no silent fallback to the Triton forward
    with pytest.raises(RuntimeError, match="R4B_VARLEN_FWD=gluon needs a Hopper GPU"):
        varlen_attention(q, k, v, _cu([5, 3], "cpu"), 5, backend="triton")
    monkeypatch.setenv("R4B_VARLEN_FWD", "triton")
    monkeypatch.setenv("R4B_VARLEN_BWD", "gluon")
    q.requires_grad_()
    out = varlen_attention(q, k, v, _cu([5, 3], "cpu"), 5, backend="triton")
    with pytest.raises(RuntimeError, match="R4B_VARLEN_BWD=gluon needs a Hopper GPU"):
        out.sum().backward()
    monkeypatch.setenv("R4B_VARLEN_BWD", "gluon-dkdv")
    out = varlen_attention(q, k, v, _cu([5, 3], "cpu"), 5, backend="triton")
    with pytest.raises(RuntimeError, match="R4B_VARLEN_BWD=gluon-dkdv needs a Hopper GPU"):
        out.sum().backward()
    monkeypatch.setenv("R4B_VARLEN_BWD", "gluon_dkdv")
    out = varlen_attention(q, k, v, _cu([5, 3], "cpu"), 5, backend="triton")
    with pytest.raises(ValueError, match="R4B_VARLEN_BWD must be one of .*'gluon-dkdv'.*got 'gluon_dkdv'"):
        out.sum().backward()


def _routing_case():
    """The small causal case (GQA 2, D 16) of the tests that route a backward's gradients to stand-ins of kernels
    the interpreter cannot run: (lens, scale, q, k, v, do, cu, the float64 (out, dq, dk, dv))."""
    lens, scale = [5, 17, 1, 9], 16**-0.5
    q, k, v, do = _inputs(lens, 4, 2, 16)
    want = _grads(lambda a, b, c: _attention64(a, b, c, lens, True, scale), q.double(), k.double(), v.double(),
                  do.double())
    return lens, scale, q, k, v, do, _cu(lens), want


@pytest.mark.parametrize("how", ["env", "default"])
def test_gluon_dkdv_mode_pairs_the_triton_dq_kernel_with_the_gluon_dkdv_kernel(how, monkeypatch):
    """R4B_VARLEN_BWD=gluon-dkdv, or the variable unset where the default takes the Gluon dK/dV kernel (a Hopper
    GPU, bf16, head dim 128): dQ from the Triton dQ kernel, dK / dV from the Gluon dK/dV kernel alone
    (with_dq=False), never the Triton dK/dV kernel. Under the interpreter, which cannot run Gluon, a stand-in
    module gives the Gluon dK / dV from the float64 reference; the op's four results must match float64."""
    va = importlib.import_module("r4b.kernels.varlen_attention")
    lens, scale, q, k, v, do, cu, want = _routing_case()
    asked = []

    class StandIn:
        @staticmethod
        def bwd_problem(q):
            return None

        @staticmethod
        def input_problem(*tensors):
            return None

        @staticmethod
        def backward(do_, q_, k_, v_, lse, delta, cu_, scale_, causal, with_dq=True):
            asked.append((with_dq, scale_, causal))
            return None, want[2].to(k_.dtype), want[3].to(v_.dtype)

    if how == "env":
        monkeypatch.setattr(va, "_gluon_module", lambda env, interp, *t: StandIn)
        monkeypatch.setenv("R4B_VARLEN_BWD", "gluon-dkdv")
    else:
        monkeypatch.setattr(va, "_default_gluon_dkdv", lambda interp, *t: StandIn)
        monkeypatch.delenv("R4B_VARLEN_BWD", raising=False)
    monkeypatch.setattr(va, "_bwd_dkdv_kernel", None)  # the Triton dK/dV kernel must not be launched
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, max(lens), backend="triton"), q, k, v, do)
    assert asked == [(False, scale, True)]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-5, msg=name)


class _Gpu:
    """Stands for a (T, H, D) tensor on a GPU: what the default backward's choice reads before the Gluon checks."""

    def __init__(self, dtype=torch.bfloat16):
        self.device, self.dtype = torch.device("cuda", 0), dtype


def test_default_backward_takes_the_gluon_dkdv_kernel_only_where_it_was_verified(monkeypatch):
    """With $R4B_VARLEN_BWD unset, the Gluon dK/dV kernel runs only on a GPU that the Gluon module accepts, for bf16
    inputs it can address at a head dim its backward is verified at; anything else (the interpreter, a CPU tensor,
    fp16 / fp32, a refusal of any of the three checks, a triton without Gluon) runs the Triton kernels, without
    an error. An explicit R4B_VARLEN_BWD=split never asks."""
    va = importlib.import_module("r4b.kernels.varlen_attention")
    vg = types.ModuleType("r4b.kernels._varlen_gluon")
    why = {"device_problem": None, "input_problem": None, "bwd_problem": None}
    for name in why:
        setattr(vg, name, lambda *a, _n=name: why[_n])
    pkg = importlib.import_module("r4b.kernels")
    monkeypatch.setitem(sys.modules, "r4b.kernels._varlen_gluon", vg)
    monkeypatch.setattr(pkg, "_varlen_gluon", vg, raising=False)  # `from . import` reads the package's attribute
    monkeypatch.setattr(va, "_ensure_allocator", lambda: None)
    g = _Gpu()
    assert va._default_gluon_dkdv(False, g, g, g) is vg
    assert va._default_gluon_dkdv(True, g, g, g) is None  # the interpreter
    cpu = torch.zeros(4, 2, 128, dtype=torch.bfloat16)
    assert va._default_gluon_dkdv(False, cpu, cpu, cpu) is None
    for dtype in (torch.float16, torch.float32):
        assert va._default_gluon_dkdv(False, _Gpu(dtype), g, g) is None
    for name in why:
        why[name] = "refused"
        assert va._default_gluon_dkdv(False, g, g, g) is None, name
        why[name] = None
    monkeypatch.delattr(pkg, "_varlen_gluon")
    monkeypatch.setitem(sys.modules, "r4b.kernels._varlen_gluon", None)  # the import fails
    assert va._default_gluon_dkdv(False, g, g, g) is None
    # through the op on the CPU, variable unset: the Triton dK/dV kernel runs (it is launched, so it is looked up)
    launched = []
    real = va._bwd_dkdv_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.delenv("R4B_VARLEN_BWD", raising=False)
    monkeypatch.setattr(va, "_bwd_dkdv_kernel", Spy())
    q, k, v, do = _inputs([5, 3], 2, 1, 16)
    _grads(lambda a, b, c: varlen_attention(a, b, c, _cu([5, 3]), 5, backend="triton"), q, k, v, do)
    assert len(launched) == 1


def test_gluon_backward_without_dq_launches_its_dkdv_kernel_only(monkeypatch):
    """_varlen_gluon.backward(with_dq=False) launches the dK/dV kernel (autotuned or a given config) and not the dQ
    kernel, and returns (None, dk, dv); with_dq=True launches both (launches recorded, not run: Gluon needs sm_90)."""
    vg = pytest.importorskip("r4b.kernels._varlen_gluon")
    launched = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append(self.name)

    for attr in ("TUNED_DKDV", "TUNED_DQ", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        monkeypatch.setattr(vg, attr, Recorder(attr))
    q, k, v, do = (t.bfloat16() for t in _inputs([40, 24], 4, 2, 128))
    lse = delta = torch.zeros(4, 64)
    cu = _cu([40, 24])
    dq, dk, dv = vg.backward(do, q, k, v, lse, delta, cu, 0.1, True, with_dq=False)
    assert dq is None and dk.shape == k.shape and dv.shape == v.shape and launched == ["TUNED_DKDV"]
    launched.clear()
    vg.backward(do, q, k, v, lse, delta, cu, 0.1, True, dkdv_config=vg.DKDV_CONFIGS[0], with_dq=False)
    assert launched == ["_bwd_dkdv_kernel"]
    launched.clear()
    dq, _, _ = vg.backward(do, q, k, v, lse, delta, cu, 0.1, True)
    assert dq.shape == q.shape and launched == ["TUNED_DKDV", "TUNED_DQ"]


def test_gluon_forward_refuses_what_it_cannot_address():
    pytest.importorskip("r4b.kernels._varlen_gluon")
    from r4b.kernels._varlen_gluon import input_problem, supported

    q, k, v, _ = _inputs([5, 3], 2, 1, 64)
    assert "not a GPU" in supported(q, k, v)
    # what the Triton kernels take instead (the device itself is checked separately: CPU / non-Hopper raise)
    assert "dtype torch.float32" in input_problem(q, k, v)
    b = [t.bfloat16() for t in (q, k, v)]
    assert input_problem(*b) is None
    assert "head dim 72" in input_problem(*(torch.zeros(8, 2, 72, dtype=torch.bfloat16) for _ in range(3)))
    odd = torch.zeros(8, 2 * 64 + 1, dtype=torch.bfloat16)[:, 1:].view(8, 2, 64)  # base 2 bytes off
    assert "tensor 2 is not TMA-addressable" in input_problem(b[0], b[1], odd)
    # head 2 starts at element 2^31 (a reserved, untouched 4 GB storage): the Triton kernels' int64 bases take it
    wide = torch.empty(2**31 + 8 * 64, dtype=torch.bfloat16).as_strided((8, 3, 64), (64, 2**30, 1))
    assert "2^31" in input_problem(wide, b[1], b[2])
    assert input_problem(wide[:, :2], b[1], b[2]) is None


def test_gluon_refuses_a_gpu_other_than_hopper_by_name(monkeypatch):
    pytest.importorskip("r4b.kernels._varlen_gluon")
    from r4b.kernels._varlen_gluon import device_problem

    va = importlib.import_module("r4b.kernels.varlen_attention")

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "CUDA capability (8, 0), not 9.x (Hopper)" in device_problem(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert device_problem(torch.device("cuda", 0)) is None
    # and the op's check names the variable (interp=False: as on an A100 running the compiled Triton kernels)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(RuntimeError, match=r"R4B_VARLEN_BWD=gluon cannot run here: CUDA capability \(8, 0\)"):
        va._gluon_module("R4B_VARLEN_BWD", False, _OnFirstGpu())


class _OnFirstGpu:
    """Stands for a (T, H, D) tensor on the first GPU: only .device is read before the device check raises."""

    device = torch.device("cuda", 0)


def test_varlen_attention_dispatch_default_matches_forced():
    lens = [5, 12]
    q, k, v, _ = _inputs(lens, 2, 1, 16)
    cu = _cu(lens)
    a = varlen_attention(q, k, v, cu, 12)  # TRITON_INTERPRET=1 on the CPU: triton is picked
    b = varlen_attention(q, k, v, cu, 12, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(varlen_attention(q, k, v, cu, 12, backend="torch"), varlen_attention_ref(q, k, v, cu))


def test_varlen_attention_bad_inputs():
    q, k, v, _ = _inputs([4, 4], 4, 2, 16)
    cu = _cu([4, 4])
    with pytest.raises(TypeError, match="cu_seqlens must have dtype"):
        varlen_attention(q, k, v, cu.long(), 4, backend="triton")
    with pytest.raises(ValueError, match="cu_seqlens must end at the total token count 8"):
        varlen_attention(q, k, v, _cu([4, 3]), 4, backend="triton")
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        varlen_attention(q, k, v, torch.tensor([1, 4, 8], dtype=torch.int32), 4, backend="triton")
    with pytest.raises(ValueError, match="max_seqlen must be >= the longest sequence"):
        varlen_attention(q, k, v, cu, 3, backend="triton")
    with pytest.raises(ValueError, match="multiple of KV heads"):
        varlen_attention(q, torch.randn(8, 3, 16), torch.randn(8, 3, 16), cu, 4, backend="triton")
    with pytest.raises(TypeError, match="k must have dtype"):
        varlen_attention(q, k.double(), v, cu, 4, backend="triton")
    with pytest.raises(ValueError, match="q must be 3-D"):
        varlen_attention(q[0], k, v, cu, 4, backend="triton")
    with pytest.raises(ValueError, match="softmax_scale"):
        varlen_attention(q, k, v, cu, 4, softmax_scale=0.0, backend="triton")


def _sdpa_bf16_per_doc(q, k, v, lens, causal):
    """Plain PyTorch low precision (the STYLE.md baseline): SDPA per document in the input dtype (bf16 / fp16)."""
    outs, s = [], 0
    for L in lens:
        o = F.scaled_dot_product_attention(q[s : s + L].transpose(0, 1), k[s : s + L].transpose(0, 1),
                                           v[s : s + L].transpose(0, 1), is_causal=causal, enable_gqa=True)
        outs.append(o.transpose(0, 1))  # (L, Hq, D)
        s += L
    return torch.cat(outs)


FP16_CASE = ([33, 1, 20, 0, 9], 4, 2, 64)  # (lens, Hq, Hkv, D) of the fp16 rule check


def check_fp16_within_twice_plain(causal: bool) -> None:
    """STYLE.md's low-precision rule on the CPU with fp16 (the interpreter computes bf16 wrongly): outputs and
    gradients of varlen_attention (whatever kernels the R4B_VARLEN_* variables choose) against float64, the
    baseline being PyTorch's own SDPA per document in fp16. Also used by test_varlen_ws.py."""
    lens, Hq, Hkv, D = FP16_CASE
    q, k, v, do = _inputs(lens, Hq, Hkv, D, seed=4)
    cu = _cu(lens)
    ref = _grads(lambda a, b, c: _attention64(a, b, c, lens, causal, D**-0.5), q.double(), k.double(), v.double(),
                 do.double())
    half = [t.half() for t in (q, k, v, do)]
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 33, causal=causal, backend="triton"), *half)
    base = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, [n for n in lens if n], causal), *half)
    assert all(g.dtype == torch.float16 for g in got)
    assert_within_twice_plain(got, base, ref, ("out", "dq", "dk", "dv"), atol_rel=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_fp16_within_twice_plain_fp16_error(causal):
    check_fp16_within_twice_plain(causal)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_bf16_anchor_gpu(causal, modes):
    # anchor: 16384 packed tokens, 10 documents 128..4096, 32 query / 8 KV heads, D 128
    lens = [4096, 3072, 2560, 2048, 1536, 1280, 768, 512, 384, 128]
    assert sum(lens) == 16384
    q, k, v, do = _inputs(lens, 32, 8, 128, device="cuda")
    cu = _cu(lens, "cuda")
    ref = _grads(lambda a, b, c: varlen_attention_ref(a, b, c, cu, causal), q, k, v, do)  # fp32
    bf = [t.bfloat16() for t in (q, k, v, do)]
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 4096, causal=causal, backend="triton"), *bf)
    base = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, lens, causal), *bf)
    assert_within_twice_plain(got, base, ref, ("out", "dq", "dk", "dv"), atol_rel=1e-3)


@pytest.mark.gpu
def test_varlen_attention_many_short_and_one_long_gpu():
    # think/no-think packing: one long trace and hundreds of short answers, fp32 (IEEE products) vs float64
    lens = [3000] + [1, 2, 3, 17, 40, 129] * 50
    q, k, v, do = _inputs(lens, 8, 2, 128, device="cuda")
    cu = _cu(lens, "cuda")
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 3000, backend="triton"), q, k, v, do)
    ref = _grads(lambda a, b, c: _attention64(a, b, c, lens, True, 128**-0.5), q.double(), k.double(), v.double(),
                 do.double())
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


def test_varlen_attention_kernels_compile_for_sm90():
    # No GPU needed: the interpreter does not catch what only the compiler rejects (non-constexpr globals,
    # loop-carried type changes, dot shapes); compile fwd, dQ and dK/dV for sm_90 with triton's own ptxas.
    out = run_aot_report("bench.bench_varlen_attention", "--aot-first")
    assert all(f"{kind} " in out for kind in ("fwd", "dq", "dkdv")), out
    # ptxas keeps every kernel's tensor-core products asynchronous: no "Potential Performance Loss" (C7512-style
    # serialised wgmma, which the PTX's wait depths do not show; a withdrawn Gluon dK/dV kernel had it, 2026-11-27)
    assert "Potential Performance Loss" not in out, out
    # fp32 on a GPU runs one fixed config per kernel (an fp32 autotune compiled for minutes on an H200): each fits
    # in shared memory and spills at most a few registers' worth
    for kind in ("fwd-f32", "dq-f32", "dkdv-f32", "dkdv+dq-f32"):
        [line] = [line for line in out.splitlines() if line.startswith(kind + " ")]
        assert int(line.split("smem=")[1].split()[0]) <= 232448, line
        assert int(line.split(" bytes spill stores")[0].rsplit(maxsplit=1)[1]) <= 64, line
    # the Gluon forward (R4B_VARLEN_FWD=gluon), both masks: its point is one wgmma group (P @ V) left in flight
    # while the next block's softmax runs, i.e. a "wgmma.wait_group 1" in its PTX; the Triton forward has only 0s
    # (the backward's two kernels likewise keep one product in flight during their elementwise work)
    pytest.importorskip("r4b.kernels._varlen_gluon")
    for kind in ("fwd-gluon", "dkdv-gluon", "dq-gluon"):
        lines = [line for line in out.splitlines() if line.startswith(kind + " ")]
        assert len(lines) == 2, (kind, out)  # causal and not
        for line in lines:
            waits = [int(w) for w in line.split("wgmma waits=")[1].split(",")]
            assert 1 in waits and 0 in waits, line
            assert "0 bytes spill stores" in line, line


@triton.jit
def _order_kernel(OUT, n_heads, T, BLOCK: tl.constexpr, HEAVY_LAST: tl.constexpr):
    """Stores each program's (first row, head) from the attention kernels' ``_tile_of``."""
    t0, h = _tile_of(n_heads, T, BLOCK, HEAVY_LAST)
    pid = tl.program_id(0)
    tl.store(OUT + 2 * pid, t0)
    tl.store(OUT + 2 * pid + 1, h)


def test_grid_order_is_tile_major_with_query_tiles_backwards():
    """The kernels' program -> (tile, head) map (``_tile_of``): heads of one tile are consecutive programs, causal
    query kernels walk the tiles backwards, key kernels forwards; and in the bench's scheduling model that order
    leaves a smaller tail than the head-major grid at both bench shapes."""
    from bench.bench_varlen_attention import schedule_report

    T, block, heads = 100, 32, 3  # 4 tiles, the last one partial
    for heavy_last, tiles in ((True, [96, 64, 32, 0]), (False, [0, 32, 64, 96])):
        out = torch.full((4 * heads, 2), -1, dtype=torch.int32)
        _order_kernel[(4 * heads,)](out, heads, T, BLOCK=block, HEAVY_LAST=heavy_last)
        assert out.tolist() == [[t, h] for t in tiles for h in range(heads)]
    for shape, r in schedule_report().items():
        assert r["tile-major"] <= r["head-major"], shape


def test_double_backward_raises_on_the_triton_path():
    """The Triton backward is first-order only: create_graph=True must fail loudly, not drop second-order terms."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, 2, 16, generator=g).requires_grad_() for _ in range(3))
    o = varlen_attention(q, k, v, _cu([4, 5]), 5, backend="triton")
    (dq,) = torch.autograd.grad(o.pow(3).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|requires grad"):
        dq.pow(2).sum().backward()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch_is_part_of_the_graph(backend):
    """T = 0 (an empty micro-batch): the (0, Hq, D) output still backpropagates, with empty gradients."""
    q = torch.zeros(0, 4, 16, requires_grad=True)
    k, v = (torch.zeros(0, 2, 16, requires_grad=True) for _ in range(2))
    o = varlen_attention(q, k, v, _cu([]), 0, backend=backend)
    assert o.shape == (0, 4, 16) and o.requires_grad
    o.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_no_kv_heads_or_zero_head_dim_raise():
    q = torch.zeros(3, 2, 16)
    with pytest.raises(ValueError, match="at least one head"):
        varlen_attention(q, torch.zeros(3, 0, 16), torch.zeros(3, 0, 16), _cu([3]), 3)
    with pytest.raises(ValueError, match="head dim"):
        varlen_attention(torch.zeros(3, 2, 0), torch.zeros(3, 1, 0), torch.zeros(3, 1, 0), _cu([3]), 3)


def test_int32_offset_limit_is_refused_by_name():
    """A packed batch whose in-sequence row offsets could pass 2^31 elements is refused (meta tensors: no memory)."""
    T, H, D = 2**19, 32, 128  # 524,288 tokens x a 4096-element row
    q = torch.empty(T, H, D, device="meta")
    k = v = torch.empty(T, 8, D, device="meta")
    from r4b.kernels.varlen_attention import _check_int32_offsets

    with pytest.raises(ValueError, match="2\\^31"):
        _check_int32_offsets(q, k, v)
    _check_int32_offsets(q[: T // 2], k[: T // 2], v[: T // 2])  # 2^30 elements: fine


def test_per_head_bases_past_2_31_elements(modes):
    """Head strides that put head 2 past 2^31 elements (the row offsets stay small, so the int32 guard lets them
    through): the kernels' per-head bases are int64 (in int32 they wrapped and read another address; the
    interpreter crashed). q, k, v and dO are views into one 8.6 GB fp32 storage that is reserved, not touched
    outside their rows; output and gradients must be bit-identical to those of compact copies."""
    T, H, D = 24, 3, 16
    head = 2**30 + 64  # elements between heads: head 2 starts at 2^31 + 128
    store = torch.empty(2 * head + 4 * T * D, dtype=torch.float32)
    views = [store.as_strided((T, H, D), (D, head, 1), i * T * D) for i in range(4)]
    compact = _inputs([5, 1, 18], H, H, D)
    for view, t in zip(views, compact, strict=True):
        view.copy_(t)
    cu = _cu([5, 1, 18])

    def run(q, k, v, do):
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))  # detach keeps the strides
        o = varlen_attention(q, k, v, cu, 18, backend="triton")
        return (o.detach(), *torch.autograd.grad(o, (q, k, v), do))

    for name, a, b in zip(("out", "dq", "dk", "dv"), run(*views), run(*compact), strict=True):
        assert torch.equal(a, b), name


def test_the_offset_guard_sees_the_layout_the_kernels_get(monkeypatch):
    """A q with a non-unit last stride is copied before the kernels run: the int32 guard must judge the copy's
    row stride, not the original's (whose row stride may be 1)."""
    va = importlib.import_module("r4b.kernels.varlen_attention")  # the module: the package attribute is the op
    seen = []
    real = va._check_int32_offsets
    monkeypatch.setattr(va, "_check_int32_offsets", lambda *t: (seen.append([x.stride() for x in t]), real(*t)))
    q, k, v, _ = _inputs([7, 9], 4, 2, 16)
    q_t = q.permute(2, 1, 0).contiguous().permute(2, 1, 0)  # (T, H, D) with strides (1, T, H * T)
    out = varlen_attention(q_t, k, v, _cu([7, 9]), 9, backend="triton")
    assert seen == [[(64, 16, 1), k.stride(), v.stride()]]
    torch.testing.assert_close(out, varlen_attention(q, k, v, _cu([7, 9]), 9, backend="triton"), rtol=0, atol=0)


def test_a_gradient_whose_rows_overflow_int32_gets_a_head_major_copy(monkeypatch):
    """dO narrowed from a wide buffer (row stride 20480 at 131,072 tokens: 2.7e9 elements) is copied head-major
    (row stride D) for the backward kernels; one that fits is passed as it is; T * D past 2^31 is refused by
    name. Meta tensors: no memory. The backward passes its gradient through it."""
    va = importlib.import_module("r4b.kernels.varlen_attention")
    _int32_rows_grad = va._int32_rows_grad
    seen = []
    monkeypatch.setattr(va, "_int32_rows_grad", lambda t: (seen.append(t.shape), _int32_rows_grad(t))[1])
    q, k, v, do = _inputs([7, 9], 4, 2, 16)
    _grads(lambda a, b, c: varlen_attention(a, b, c, _cu([7, 9]), 9, backend="triton"), q, k, v, do)
    assert seen == [do.shape]

    T, H, D = 2**17, 32, 128
    wide = torch.empty(T, 160, D, device="meta")[:, :H]
    fixed = _int32_rows_grad(wide)
    assert fixed.shape == (T, H, D) and fixed.stride() == (D, T * D, 1)
    fits = torch.empty(T, H, D, device="meta")
    assert _int32_rows_grad(fits) is fits
    with pytest.raises(ValueError, match="2\\^31.*output gradient"):
        _int32_rows_grad(torch.empty(2**24, 4, 128, device="meta")[:, :2])


def test_varlen_kernels_do_not_recompile_per_batch():
    """Lengths are runtime values (issue 5): every attention kernel (Triton and Gluon, forward and backward, every
    opt-in mode) takes the batch's token count, sequence count and work-item count unspecialised (a specialised int
    compiles a variant for 1, for multiples of 16 and for the rest), and every autotuner is keyed on the head dim,
    causality, GQA group and T's power-of-two bucket only: never a per-batch length. Read from the compiled
    kernels' parameters (a process without TRITON_INTERPRET)."""
    import ast
    import os
    import subprocess

    code = """
import importlib, triton
mods = [importlib.import_module(m) for m in ("r4b.kernels.varlen_attention", "r4b.kernels._varlen_gluon",
                                             "r4b.kernels._varlen_gluon_ws", "r4b.kernels._varlen_ws")]
kernels, keys = {}, set()
for mod in mods:
    for name, obj in vars(mod).items():
        if name.endswith("_kernel") and hasattr(obj, "params"):
            kernels[mod.__name__ + "." + name] = ({p.name for p in obj.params},
                                                  {p.name for p in obj.params if p.do_not_specialize})
        for tuner in (obj.values() if isinstance(obj, dict) else [obj]):
            if isinstance(tuner, triton.runtime.Autotuner):
                keys.add(tuple(tuner.keys))
print(repr((kernels, keys)))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    kernels, keys = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    assert len(kernels) >= 12 and keys  # the forward and backward kernels of the four modules, their autotuners
    for name, (params, unspecialised) in kernels.items():
        varying = params & {"T", "n_seqs", "n_items", "max_seqlen"}
        assert "max_seqlen" not in params, name
        assert varying and varying <= unspecialised, (name, varying - unspecialised)
    assert keys == {("D", "CAUSAL", "GROUP", "t_bucket")}
