"""varlen_attention's opt-in peer backends (flash_attn, xformers).

Neither package installs here, so the plumbing is tested with fake peer modules put in sys.modules: each
implements the peer's documented signature with a plain float64 torch computation of its own, built only from
the arguments it receives (cu_seqlens / block lengths, max_seqlen, causal, scale, head layout), checks what
the real peer would reject, and records what it got. A wrong argument from r4b therefore gives a wrong output
or gradient, not just a failed record check. The fakes run on the CPU through the one test hook of
_dispatch (PEER_DEVICES). On a GPU with the package installed, the real peers run in bf16 against the fp32
reference under STYLE.md's rule (error <= 2x plain PyTorch bf16 error + atol).
"""

import math
import sys
import types
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from r4b.kernels import _dispatch, available_backends, rms_norm, varlen_attention, varlen_attention_ref
from tests._lowprec import assert_within_twice_plain

OP = "varlen_attention"


def _cu(lens: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _inputs(lens, Hq, Hkv, D, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    return [torch.randn(T, h, D, generator=g).to(device=device, dtype=dtype) for h in (Hq, Hkv, Hkv, Hq)]


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o.detach(), dq, dk, dv


def _attend64(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """One block in float64: q, k, v (L, H, D) with matching heads -> (L, H, D)."""
    s = torch.einsum("ihd,jhd->hij", q.double(), k.double()) * scale  # (H, Lq, Lk)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[1:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.einsum("hij,jhd->ihd", s.softmax(-1), v.double())


# ---------------------------------------------------------------- fake peers


def _fake_flash_attn() -> types.ModuleType:
    """flash_attn with flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p, softmax_scale, causal, ...): packed (T, H, D), GQA by q head h -> kv head h // (Hq // Hkv)."""
    mod = types.ModuleType("flash_attn")
    mod.calls = []

    def flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        block_table=None,
    ):
        mod.calls.append(
            dict(
                q=q,
                k=k,
                v=v,
                cu_q=cu_seqlens_q,
                cu_k=cu_seqlens_k,
                max_q=max_seqlen_q,
                max_k=max_seqlen_k,
                dropout_p=dropout_p,
                scale=softmax_scale,
                causal=causal,
            )
        )
        # what the real one rejects (flash_api.cpp checks)
        assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and cu_seqlens_q.is_contiguous()
        assert cu_seqlens_q.device == q.device and cu_seqlens_k.device == q.device
        assert q.dim() == k.dim() == v.dim() == 3 and q.shape[1] % k.shape[1] == 0
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        T, Hq, D = q.shape
        kv_head = torch.arange(Hq) // (Hq // k.shape[1])
        scale = softmax_scale if softmax_scale is not None else D**-0.5
        bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        pieces = [q.new_zeros(bq[0], Hq, D, dtype=torch.float64)]
        for (sq, eq), (sk, ek) in zip(pairwise(bq), pairwise(bk), strict=True):
            # the grid covers max_seqlen rows / keys per sequence: anything past them is never computed
            lq, lk = min(eq - sq, max_seqlen_q), min(ek - sk, max_seqlen_k)
            ks, vs = k[sk : sk + lk].double(), v[sk : sk + lk].double()  # upcast first: one rounding of dk, dv
            o = _attend64(q[sq : sq + lq], ks[:, kv_head], vs[:, kv_head], causal, scale)
            pieces += [o, o.new_zeros(eq - sq - lq, Hq, D)]
        pieces.append(q.new_zeros(T - bq[-1], Hq, D, dtype=torch.float64))
        return torch.cat(pieces).to(q.dtype)

    mod.flash_attn_varlen_func = flash_attn_varlen_func
    return mod


def _fake_xformers() -> dict[str, types.ModuleType]:
    """xformers.ops.memory_efficient_attention(query, key, value, attn_bias, p, scale) on [B, M, H, K] or the
    GQA form [B, M, G, H, K], with xformers.ops.fmha.attn_bias.BlockDiagonal(Causal)Mask.from_seqlens."""
    root, ops, fmha, attn_bias = (
        types.ModuleType(n) for n in ("xformers", "xformers.ops", "xformers.ops.fmha", "xformers.ops.fmha.attn_bias")
    )
    root.ops, ops.fmha, fmha.attn_bias = ops, fmha, attn_bias
    ops.calls = []

    class BlockDiagonalMask:
        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None, *, device=None):
            assert kv_seqlen is None or list(kv_seqlen) == list(q_seqlen)
            bias = cls()
            bias.seqlens, bias.device = [int(n) for n in q_seqlen], device
            return bias

    class BlockDiagonalCausalMask(BlockDiagonalMask):
        pass

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None):
        ops.calls.append(dict(query=query, key=key, value=value, bias=attn_bias, p=p, scale=scale))
        assert query.dim() == key.dim() == value.dim() and query.dim() in (4, 5) and key.shape == value.shape
        assert query.shape[0] == 1 and isinstance(attn_bias, BlockDiagonalMask)  # block-diagonal: batch of one
        assert all(n > 0 for n in attn_bias.seqlens) and sum(attn_bias.seqlens) == query.shape[1]
        assert query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        M, D = query.shape[1], query.shape[-1]
        q3, k3, v3 = (t.double().reshape(M, -1, D) for t in (query, key, value))  # (M, heads, D), paired as given
        assert q3.shape == k3.shape
        causal = isinstance(attn_bias, BlockDiagonalCausalMask)
        scale = scale if scale is not None else D**-0.5
        starts = [0, *torch.tensor(attn_bias.seqlens).cumsum(0).tolist()]
        o = torch.cat([_attend64(q3[s:e], k3[s:e], v3[s:e], causal, scale) for s, e in pairwise(starts)])
        return o.to(query.dtype).reshape(query.shape)

    attn_bias.BlockDiagonalMask, attn_bias.BlockDiagonalCausalMask = BlockDiagonalMask, BlockDiagonalCausalMask
    ops.memory_efficient_attention = memory_efficient_attention
    return {m.__name__: m for m in (root, ops, fmha, attn_bias)}


@pytest.fixture
def peers_on_cpu(monkeypatch):
    """The test hook: let the peers accept CPU tensors (their fakes compute in plain torch)."""
    monkeypatch.setattr(_dispatch, "PEER_DEVICES", ("cuda", "cpu"))
    monkeypatch.delenv("R4B_ATTN_BACKEND", raising=False)
    monkeypatch.delenv("R4B_BACKEND", raising=False)


@pytest.fixture
def fake_flash(monkeypatch, peers_on_cpu):
    mod = _fake_flash_attn()
    monkeypatch.setitem(sys.modules, "flash_attn", mod)
    return mod


@pytest.fixture
def fake_xformers(monkeypatch, peers_on_cpu):
    mods = _fake_xformers()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return mods["xformers.ops"]


def _check_against_ref(got, q, k, v, do, cu, causal, scale, rtol, atol):
    ref = _grads(
        lambda a, b, c: varlen_attention_ref(a, b, c, cu, causal, scale),
        q.double(),
        k.double(),
        v.double(),
        do.double(),
    )
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert a.dtype == q.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# (lens, Hq, Hkv, D, causal, softmax_scale): empty and one-token sequences, GQA 1/4/8, default and set scales
CASES = [
    ([1, 37, 0, 16, 5], 8, 2, 16, True, None),
    ([20, 1, 3], 4, 1, 32, False, None),
    ([9, 0, 14], 2, 2, 16, True, 0.3),
    ([6, 11], 8, 1, 16, False, 0.7),
]


def _peer_grads(backend, lens, Hq, Hkv, D, causal, scale, dtype):
    """(output and q/k/v gradients through r4b's ``backend``, (q, k, v, do, cu_seqlens))."""
    q, k, v, do = _inputs(lens, Hq, Hkv, D, dtype)
    cu = _cu(lens)

    def fwd(a, b, c):
        return varlen_attention(a, b, c, cu, max(lens), causal=causal, softmax_scale=scale, backend=backend)

    return _grads(fwd, q, k, v, do), (q, k, v, do, cu)


@pytest.mark.parametrize("lens,Hq,Hkv,D,causal,scale", CASES)
def test_flash_attn_backend_calls_and_gradients(fake_flash, lens, Hq, Hkv, D, causal, scale):
    # fp16: flash-attn takes fp16/bf16 only; the fake computes in float64 and rounds once, so fp16 rounding of
    # the output and the gradients (half an ulp, 2^-11 relative) is the whole error.
    got, (q, k, v, do, cu) = _peer_grads("flash_attn", lens, Hq, Hkv, D, causal, scale, torch.float16)
    _check_against_ref(got, q, k, v, do, cu, causal, scale, rtol=1e-3, atol=1e-4)
    (call,) = fake_flash.calls
    assert call["cu_q"] is call["cu_k"] and torch.equal(call["cu_q"], cu) and call["cu_q"].dtype == torch.int32
    assert call["cu_q"].device == q.device
    assert call["max_q"] == call["max_k"] == max(lens) and isinstance(call["max_q"], int)
    assert call["causal"] is causal and call["dropout_p"] == 0.0
    assert call["scale"] == pytest.approx(scale if scale is not None else 1 / math.sqrt(D), rel=1e-12)
    # GQA handled by flash-attn itself: K and V go in as they are, (T, Hkv, D), no repeat and no copy
    assert call["k"].shape == (sum(lens), Hkv, D) and call["v"].shape == (sum(lens), Hkv, D)


@pytest.mark.parametrize("lens,Hq,Hkv,D,causal,scale", CASES)
def test_xformers_backend_calls_and_gradients(fake_xformers, lens, Hq, Hkv, D, causal, scale):
    got, (q, k, v, do, cu) = _peer_grads("xformers", lens, Hq, Hkv, D, causal, scale, torch.float32)  # fp32 too
    _check_against_ref(got, q, k, v, do, cu, causal, scale, rtol=1e-5, atol=2e-5)
    (call,) = fake_xformers.calls
    bias = call["bias"]
    assert type(bias).__name__ == ("BlockDiagonalCausalMask" if causal else "BlockDiagonalMask")
    assert bias.seqlens == [n for n in lens if n > 0] and bias.device == q.device
    assert call["p"] == 0.0
    assert call["scale"] == pytest.approx(scale if scale is not None else 1 / math.sqrt(D), rel=1e-12)
    T, G = sum(lens), Hq // Hkv
    if G == 1:
        assert call["query"].shape == call["key"].shape == (1, T, Hq, D)
    else:  # xformers' GQA form: (1, T, Hkv, G, D), K/V expanded over the group without a copy
        assert call["query"].shape == call["key"].shape == call["value"].shape == (1, T, Hkv, G, D)
        assert call["key"].stride(3) == 0 and call["value"].stride(3) == 0


def test_peers_take_strided_head_slices(fake_flash, fake_xformers):
    # q, k, v as head slices of one fused (T, Hq + 2 Hkv, D) projection, as the model passes them. xformers in
    # fp32: with K/V expanded over the group, autograd sums the group's dK/dV after the per-head values were
    # rounded to the input dtype (the real xformers does the same), which fp16 would blur.
    lens, Hq, Hkv, D = [13, 1, 8], 4, 2, 16
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(sum(lens), Hq + 2 * Hkv, D, generator=g)
    do = torch.randn(sum(lens), Hq, D, generator=g)
    cu = _cu(lens)
    for backend, dtype, tol in (("flash_attn", torch.float16, 1e-3), ("xformers", torch.float32, 1e-5)):
        fused, dout = qkv.to(dtype), do.to(dtype)
        q, k, v = fused[:, :Hq], fused[:, Hq : Hq + Hkv], fused[:, Hq + Hkv :]
        got = _grads(lambda a, b, c, be=backend: varlen_attention(a, b, c, cu, 13, backend=be), q, k, v, dout)
        _check_against_ref(got, q, k, v, dout, cu, True, None, rtol=tol, atol=tol / 10)
    (call,) = fake_xformers.calls
    assert call["key"].stride(3) == 0 and call["query"].stride(-1) == 1


def test_peers_are_never_picked_automatically(fake_flash, fake_xformers):
    lens = [5, 12]
    q, k, v, _ = _inputs(lens, 2, 1, 16, torch.float16)
    assert available_backends(OP, "cpu") == ["triton", "torch", "flash_attn", "xformers"]  # importable, "GPU"
    assert _dispatch.pick(OP, None, q) == "triton"  # TRITON_INTERPRET=1 on the CPU
    varlen_attention(q.float(), k.float(), v.float(), _cu(lens), 12)
    assert fake_flash.calls == [] and fake_xformers.calls == []


def test_peers_unavailable_without_a_gpu(monkeypatch):
    monkeypatch.delenv("R4B_ATTN_BACKEND", raising=False)
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())  # even when the package imports
    assert available_backends(OP, "cpu") == ["triton", "torch"]
    q, k, v, _ = _inputs([4], 2, 1, 16, torch.float16)
    with pytest.raises(RuntimeError, match=r"backend='flash_attn' cannot run: the tensors are on cpu.*GPU"):
        varlen_attention(q, k, v, _cu([4]), 4, backend="flash_attn")


@pytest.mark.parametrize(
    "backend,module,package", [("flash_attn", "flash_attn", "flash-attn"), ("xformers", "xformers.ops", "xformers")]
)
def test_forcing_a_missing_peer_names_the_package(monkeypatch, peers_on_cpu, backend, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import fails, installed or not
    q, k, v, _ = _inputs([4], 2, 1, 16, torch.float16)
    assert backend not in available_backends(OP, "cpu")
    with pytest.raises(RuntimeError, match=rf"backend='{backend}' cannot run: the {package} package does not import"):
        varlen_attention(q, k, v, _cu([4]), 4, backend=backend)
    assert _dispatch.why_unavailable(OP, backend, "cpu").startswith(f"the {package} package does not import")


def test_flash_attn_refuses_fp32(fake_flash):
    q, k, v, _ = _inputs([4], 2, 1, 16, torch.float32)
    with pytest.raises(RuntimeError, match=r"flash-attn needs dtype in \(float16, bfloat16\), got dtype=float32"):
        varlen_attention(q, k, v, _cu([4]), 4, backend="flash_attn")
    assert fake_flash.calls == []


def test_attn_backend_env(monkeypatch, fake_flash):
    lens = [3, 6]
    q, k, v, _ = _inputs(lens, 4, 2, 16, torch.float16)
    cu = _cu(lens)
    x, w = torch.randn(3, 16), torch.ones(16)
    # R4B_ATTN_BACKEND moves attention only, and wins over R4B_BACKEND for it; backend= wins over both
    monkeypatch.setenv("R4B_BACKEND", "torch")
    monkeypatch.setenv("R4B_ATTN_BACKEND", "flash_attn")
    varlen_attention(q, k, v, cu, 6)
    assert len(fake_flash.calls) == 1
    assert _dispatch.pick("rms_norm", None, x) == "torch"
    rms_norm(x, w)
    varlen_attention(q, k, v, cu, 6, backend="torch")
    assert len(fake_flash.calls) == 1
    monkeypatch.setenv("R4B_ATTN_BACKEND", "flash")
    with pytest.raises(
        ValueError,
        match=r"R4B_ATTN_BACKEND='flash' is not a backend of varlen_attention; "
        r"expected one of \('triton', 'torch', 'flash_attn', 'xformers'\)",
    ):
        varlen_attention(q, k, v, cu, 6)
    monkeypatch.setenv("R4B_ATTN_BACKEND", "xformers")  # a real backend whose package is missing: says so
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(RuntimeError, match=r"R4B_ATTN_BACKEND='xformers' cannot run: the xformers package"):
        varlen_attention(q, k, v, cu, 6)
    # R4B_BACKEND applies to every op, so it refuses the per-op peers and names the variable to use
    monkeypatch.delenv("R4B_ATTN_BACKEND")
    monkeypatch.setenv("R4B_BACKEND", "flash_attn")
    with pytest.raises(ValueError, match=r"R4B_BACKEND='flash_attn' is not a backend of every op.*R4B_ATTN_BACKEND"):
        varlen_attention(q, k, v, cu, 6)


# ---------------------------------------------------------------- the real peers (GPU)


def _sdpa_bf16_per_doc(q, k, v, lens, causal):
    """Plain PyTorch bf16 (the STYLE.md baseline): SDPA per document in the input dtype."""
    outs, s = [], 0
    for L in lens:
        o = F.scaled_dot_product_attention(
            q[s : s + L].transpose(0, 1),
            k[s : s + L].transpose(0, 1),
            v[s : s + L].transpose(0, 1),
            is_causal=causal,
            enable_gqa=True,
        )
        outs.append(o.transpose(0, 1))  # (L, Hq, D)
        s += L
    return torch.cat(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend,module", [("flash_attn", "flash_attn"), ("xformers", "xformers.ops")])
def test_real_peer_bf16_gpu(backend, module, causal):
    pytest.importorskip(module)
    lens = [1, 300, 0, 1000, 77, 513, 1]
    q, k, v, do = _inputs(lens, 8, 2, 128, torch.float32, device="cuda")
    cu = _cu(lens, "cuda")
    ref = _grads(lambda a, b, c: varlen_attention_ref(a, b, c, cu, causal), q, k, v, do)  # fp32
    bf = [t.bfloat16() for t in (q, k, v, do)]
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 1000, causal=causal, backend=backend), *bf)
    base = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, [n for n in lens if n], causal), *bf)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert g.dtype == torch.bfloat16 and g.shape == r.shape, name
    assert_within_twice_plain(got, base, ref, ("out", "dq", "dk", "dv"), atol_rel=1e-3)
