"""The two Triton implementations of the fused-linear losses with gradients, each against the float64
references of test_fused_linear_grpo_loss / test_fused_linear_cross_entropy: "chunked" (3 GEMMs per row chunk,
gradient formed in the forward; chunks forced small here so that several run, the last one partial) and
"tiled" (R4B_FUSED_LINEAR_IMPL=tiled: tiled forward, backward recomputing logits with atomics). Plus
clip-bound ties, exact zeros at masked rows, the no-grad path, the env var, and GPU-only bf16/memory checks."""

import math
import re

import pytest
import test_fused_linear_cross_entropy as CE
import test_fused_linear_grpo_loss as G
import torch
import torch.nn.functional as F

from r4b.kernels import _fused_linear_chunked as chunked
from r4b.kernels import (
    available_backends,
    fused_linear_cross_entropy,
    fused_linear_grpo_loss,
    fused_linear_logprobs,
)


@pytest.fixture(autouse=True)
def _needs_triton(request):
    """Every test here needs the Triton backend of its device: the interpreter for the CPU tests, compiled
    kernels for the GPU-marked ones (a module-wide "cpu" check skipped the GPU tests on the H100 machine, where
    TRITON_INTERPRET is unset)."""
    dev = "cuda" if request.node.get_closest_marker("gpu") else "cpu"
    if "triton" not in available_backends("fused_linear_grpo_loss", dev):
        pytest.skip(f"triton backend unavailable on {dev} here")

CHUNK = 40  # at most 40 rows per chunk in these tests: N=97 -> 3 balanced chunks (33, 33, 31), N=1025 -> 26


@pytest.fixture(params=chunked.IMPLS)
def impl(request, monkeypatch):
    """Selects the implementation via the env var; counts row-kernel launches (one per chunk)."""
    monkeypatch.setenv(chunked.ENV_IMPL, request.param)
    monkeypatch.setattr(chunked, "_MAX_CHUNK_ROWS", CHUNK)
    launches = []
    real = chunked._launch_rows

    def counting(z, *args, **kwargs):
        launches.append(z.shape[0])
        return real(z, *args, **kwargs)

    monkeypatch.setattr(chunked, "_launch_rows", counting)
    return request.param, launches


def _expect_launches(impl, n, passes=1):
    """One row-kernel launch per chunk (and per pass over the rows: reduction="none" cross-entropy runs the chunk
    loop in its forward for the log-probs and again in its backward)."""
    name, launches = impl
    if name == "tiled":
        assert launches == []
    else:
        step = chunked.chunk_rows(n, 300, 4)
        assert step <= CHUNK and -(-n // step) == -(-n // CHUNK)  # the fewest chunks, balanced
        assert launches == [min(step, n - s) for s in range(0, n, step)] * passes


@pytest.mark.parametrize("case", G.CASES, ids=lambda c: "-".join(map(str, c)))
def test_grpo_matches_float64_reference(impl, case):
    (loss, logp, stats, grads), (w_loss, w_logp, w_stats, w_grads) = G.run_case("triton", case)
    _expect_launches(impl, case[0])
    assert loss.dtype == torch.float32 and loss.shape == () and not logp.requires_grad
    G.close(loss, w_loss, what="loss")
    G.close(logp, w_logp, what="logprobs")
    for k, want in w_stats.items():
        G.close(stats[k], want, what=k)
    for name, got, want in zip(("d hidden", "d weight", "d bias"), grads, w_grads, strict=True):
        if want is None:
            assert got is None
            continue
        assert torch.isfinite(got).all(), name
        G.close(got, want, what=name)


def test_grpo_masked_rows_get_exactly_zero_gradient(impl):
    n, h, v, agg, beta, old_given, temp, mask_kind, adv_kind, bias = G.CASES[3]
    x = G.make_inputs(n, h, v, mask_kind=mask_kind, adv_kind=adv_kind, old_given=old_given, beta=beta, bias=bias,
                      temperature=temp)
    hidden = x["hidden"].clone().requires_grad_()
    loss, _, _ = fused_linear_grpo_loss(hidden, x["weight"], x["targets"], x["adv"], old_logprobs=x["old"],
                                        ref_logprobs=x["ref"], loss_mask=x["loss_mask"], seq_ids=x["seq_ids"],
                                        beta=beta, temperature=temp, aggregation=agg, backend="triton")
    loss.backward()
    trained = x["loss_mask"] & (x["targets"] >= 0)
    assert (~trained).sum() > 0 and trained.sum() > 0
    assert float(hidden.grad[~trained].abs().max()) == 0.0
    assert float(hidden.grad[trained].abs().max()) > 0.0


@pytest.mark.parametrize("eps", [(0.0, 0.0), (0.0, 0.28), (0.2, 0.0)])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_grpo_on_policy_ratio_at_clip_bounds(impl, eps, agg):
    """On-policy the ratio is exactly 1: with eps 0 it sits on a clip bound (clamp passes the gradient there,
    bounds included) and ratio*A ties with clip(ratio)*A (torch.minimum splits the gradient in half): the
    chunked kernel must reproduce autograd's rules, the float64 reference applies them too."""
    x = G.make_inputs(97, 16, 300, mask_kind="partial", adv_kind="rand", old_given=False, beta=0.04, bias=True,
                      temperature=0.8, seed=5)
    hidden = x["hidden"].clone().requires_grad_()
    weight = x["weight"].clone().requires_grad_()
    b = x["bias"].clone().requires_grad_()
    loss, logp, stats = fused_linear_grpo_loss(hidden, weight, x["targets"], x["adv"], ref_logprobs=x["ref"],
                                               loss_mask=x["loss_mask"], seq_ids=x["seq_ids"], eps_low=eps[0],
                                               eps_high=eps[1], beta=0.04, temperature=0.8, aggregation=agg,
                                               bias=b, backend="triton")
    loss.backward()
    _expect_launches(impl, 97)
    w_loss, w_logp, w_stats, w_grads = G.reference64(x["hidden"], x["weight"], x["bias"], x["targets"], x["adv"],
                                                     None, x["ref"], x["loss_mask"], x["seq_ids"], eps[0], eps[1],
                                                     0.04, 0.8, agg)
    G.close(loss, w_loss, what="loss")
    G.close(logp, w_logp, what="logprobs")
    assert float(stats["ratio_max"]) == 1.0 and float(stats["clip_frac"]) == 0.0
    for name, got, want in zip(("d hidden", "d weight", "d bias"), (hidden.grad, weight.grad, b.grad), w_grads,
                               strict=True):
        G.close(got, want, what=name)


def test_grpo_no_grad_runs_forward_only(impl):
    x = G.make_inputs(97, 16, 300, mask_kind="partial", adv_kind="rand", old_given=True, beta=0.0, bias=False,
                      temperature=1.0)
    hidden = x["hidden"].clone().requires_grad_()
    kw = dict(old_logprobs=x["old"], loss_mask=x["loss_mask"], aggregation="token_mean", backend="triton")
    with torch.no_grad():
        loss, logp, _ = fused_linear_grpo_loss(hidden, x["weight"], x["targets"], x["adv"], **kw)
    assert impl[1] == [] and not loss.requires_grad
    w_loss, w_logp, _, _ = G.reference64(x["hidden"], x["weight"], None, x["targets"], x["adv"], x["old"], None,
                                         x["loss_mask"], None, 0.2, 0.2, 0.0, 1.0, "token_mean")
    G.close(loss, w_loss, what="loss")
    G.close(logp, w_logp, what="logprobs")


def test_grpo_retained_graph_second_backward(impl):
    """The tiled implementation supports a second backward through a retained graph (gradients add up); the
    chunked one hands its forward-computed gradients over in the first backward (no copy of the [V, H] buffer)
    and says so if asked again."""
    x = G.make_inputs(97, 16, 300, mask_kind="partial", adv_kind="rand", old_given=True, beta=0.0, bias=False,
                      temperature=1.0)
    weight = x["weight"].clone().requires_grad_()
    loss, _, _ = fused_linear_grpo_loss(x["hidden"], weight, x["targets"], x["adv"], old_logprobs=x["old"],
                                        loss_mask=x["loss_mask"], aggregation="token_mean", backend="triton")
    (loss * 3.0).backward(retain_graph=True)
    once = weight.grad.clone()
    _, _, _, w_grads = G.reference64(x["hidden"], x["weight"], None, x["targets"], x["adv"], x["old"], None,
                                     x["loss_mask"], None, 0.2, 0.2, 0.0, 1.0, "token_mean")
    G.close(once, 3 * w_grads[1], what="d weight")
    if impl[0] == "tiled":
        (loss * 3.0).backward()
        torch.testing.assert_close(weight.grad, 2 * once, rtol=1e-6, atol=0)
    else:
        with pytest.raises(RuntimeError, match="retain_graph"):
            (loss * 3.0).backward()


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty fills its tensors with NaN (deterministic mode, warnings only): the chunked path allocates
    d weight uninitialised, so a buffer that no chunk writes (nothing trained) must still come back as zeros and
    the first chunk that writes it must not read it."""
    was = torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("kind", ["partial", "zero_adv", "zero_adv_kl", "all", "none_trained"])
def test_chunked_skips_the_backward_of_rows_without_gradient(monkeypatch, nan_empty, kind):
    """Rows whose gradient is zero by construction (masked, ignored target, zero advantage without KL) are sorted
    behind the others and skip the gradient pass and the backward GEMMs: the row kernel is told how many leading
    rows of each chunk have a gradient, those add up to the rows that can have one, and everything (log-probs
    in the original order, gradients) still equals the float64 reference."""
    monkeypatch.setenv(chunked.ENV_IMPL, "chunked")
    monkeypatch.setattr(chunked, "_MAX_CHUNK_ROWS", CHUNK)
    grad_rows = []
    real = chunked._launch_rows

    def counting(z, *args):
        grad_rows.append(args[-1])
        return real(z, *args)

    monkeypatch.setattr(chunked, "_launch_rows", counting)
    mask_kind = {"all": "all", "none_trained": "none_trained"}.get(kind, "partial")
    adv_kind = "zero" if kind.startswith("zero_adv") else "rand"
    beta = 0.04 if kind == "zero_adv_kl" else 0.0
    x = G.make_inputs(97, 16, 300, mask_kind=mask_kind, adv_kind=adv_kind, old_given=True, beta=beta, bias=True,
                      temperature=0.9, seed=4)
    hidden = x["hidden"].clone().requires_grad_()
    weight = x["weight"].clone().requires_grad_()
    b = x["bias"].clone().requires_grad_()
    loss, logp, _ = fused_linear_grpo_loss(hidden, weight, x["targets"], x["adv"], old_logprobs=x["old"],
                                           ref_logprobs=x["ref"], loss_mask=x["loss_mask"], seq_ids=x["seq_ids"],
                                           beta=beta, temperature=0.9, aggregation="seq_mean_token_mean", bias=b,
                                           backend="triton")
    loss.backward()
    trained = (x["targets"] >= 0) if x["loss_mask"] is None else x["loss_mask"] & (x["targets"] >= 0)
    expect = int((trained & ((x["adv"] != 0) | (beta > 0))).sum())
    assert sum(grad_rows) == expect and len(grad_rows) == 3
    want_rows = {"zero_adv": 0, "all": 97, "none_trained": 0, "zero_adv_kl": int(trained.sum())}
    if kind in want_rows:
        assert expect == want_rows[kind]
    else:
        assert 0 < expect < 97
    w_loss, w_logp, _, w_grads = G.reference64(x["hidden"], x["weight"], x["bias"], x["targets"], x["adv"],
                                               x["old"], x["ref"], x["loss_mask"], x["seq_ids"], 0.2, 0.2, beta,
                                               0.9, "seq_mean_token_mean")
    G.close(loss, w_loss, what="loss")
    G.close(logp, w_logp, what="logprobs")
    for name, got, want in zip(("d hidden", "d weight", "d bias"), (hidden.grad, weight.grad, b.grad), w_grads,
                               strict=True):
        if want is None:  # nothing trained: the reference's graph does not reach this input
            assert got is None or not got.any(), name
            continue
        G.close(got, want, what=name)


@pytest.mark.parametrize("case", CE.CASES, ids=lambda c: "-".join(map(str, c)))
def test_cross_entropy_matches_float64_reference(impl, case):
    n, h, v, reduction, ignore, ignore_index, bias = case
    hidden, weight, b, targets = CE.make(n, h, v, ignore, ignore_index, bias)
    if ignore_index == 5:
        targets[:7] = 5
    hg, wg = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    bg = b.clone().requires_grad_() if bias else None
    loss = fused_linear_cross_entropy(hg, wg, targets, ignore_index, reduction, bias=bg, backend="triton")
    (loss.sum() if reduction == "none" else loss).backward()
    _expect_launches(impl, n, passes=2 if reduction == "none" else 1)
    w_loss, w_dh, w_dw, w_db = CE.reference64(hidden, weight, b, targets, ignore_index, reduction)
    CE.close(loss, w_loss, what="loss")
    CE.close(hg.grad, w_dh, what="d hidden")
    CE.close(wg.grad, w_dw, what="d weight")
    if bias:
        CE.close(bg.grad, w_db, what="d bias")
    ignored = (targets == ignore_index) | (targets < 0)
    if ignored.any():
        assert float(hg.grad[ignored].abs().max()) == 0.0


def test_cross_entropy_none_weighted_grad_output(impl):
    """reduction="none" with a non-uniform grad_output (the chunked path recomputes in the backward)."""
    hidden, weight, _, targets = CE.make(97, 16, 300, "some", -100, False, seed=2)
    g = torch.randn(97, generator=torch.Generator().manual_seed(9))
    hg, wg = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (fused_linear_cross_entropy(hg, wg, targets, reduction="none", backend="triton") * g).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (F.cross_entropy(h64 @ w64.T, targets, reduction="none") * g.double()).sum().backward()
    CE.close(hg.grad, h64.grad, what="d hidden")
    CE.close(wg.grad, w64.grad, what="d weight")


@pytest.mark.parametrize("fp32_dw", [True, False], ids=["fp32-accum", "bf16-accum"])
def test_cross_entropy_bf16_within_twice_torch_bf16_error(monkeypatch, nan_empty, fp32_dw):
    """STYLE.md rule with bf16 inputs, several chunks, and dweight accumulated in fp32 or (as at the anchor shape)
    in the weight's dtype. The row kernel only loads bf16 (exact upcast in the interpreter) and stores it rounded
    to nearest by its RNE step (the interpreter's own cast truncates); its maths is fp32."""
    monkeypatch.setenv(chunked.ENV_IMPL, "chunked")
    monkeypatch.setattr(chunked, "_MAX_CHUNK_ROWS", 128)
    if not fp32_dw:
        monkeypatch.setattr(chunked, "_FP32_DW_MAX_BYTES", 0)
    hidden, weight, _, targets = CE.make(1025, 96, 4097, "some", -100, False, seed=3)
    assert chunked.dweight_dtype(weight.bfloat16()) == (torch.float32 if fp32_dw else torch.bfloat16)
    CE.low_precision_rule(hidden, weight, targets, torch.bfloat16, "triton", atol_rel=1e-6)


def test_bad_impl_env_var_names_it(monkeypatch):
    monkeypatch.setenv(chunked.ENV_IMPL, "atomics")
    x = G.make_inputs(5, 16, 30, mask_kind="all", adv_kind="rand", old_given=False, beta=0.0, bias=False,
                      temperature=1.0)
    with pytest.raises(ValueError, match=re.escape(chunked.ENV_IMPL)):
        fused_linear_grpo_loss(x["hidden"].requires_grad_(), x["weight"], x["targets"], x["adv"],
                               aggregation="token_mean", backend="triton")


def test_chunk_size_at_anchor_shape():
    """The [C, V] buffer stays within _CHUNK_BYTES, C a multiple of 256 at big V, chunks balanced; dweight
    accumulates in bf16 there (an fp32 [V, H] buffer alone would be 1.56 GB)."""
    rows = chunked.chunk_rows(16384, 151936, 2)
    assert rows * 151936 * 2 <= chunked._CHUNK_BYTES and rows % 256 == 0
    assert rows == 3328 and math.ceil(16384 / rows) == 5  # 4 x 3328 + 3072
    assert chunked.chunk_rows(4096, 151936, 2) == 2048  # 2 equal chunks, not 3328 + 768
    w = torch.empty(151936, 2560, dtype=torch.bfloat16, device="meta")
    assert chunked.dweight_dtype(w) == torch.bfloat16
    assert chunked.dweight_dtype(torch.empty(151936, 2560, device="meta")) == torch.float32
    assert chunked.chunk_rows(1, 151936, 2) == 1


def _strided(x):
    """The same values as ``x`` (1-D) in a non-contiguous view (every other element of a 2x longer buffer)."""
    buf = torch.empty(2 * x.shape[0], dtype=x.dtype)
    buf[::2] = x
    return buf[::2]


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_non_contiguous_targets_and_bias(impl, grad):
    """Strided targets and bias (e.g. a column of a bigger tensor) give the float64 results in all three ops."""
    x = G.make_inputs(97, 16, 300, mask_kind="partial", adv_kind="rand", old_given=True, beta=0.0, bias=True,
                      temperature=0.8, seed=6)
    t, b = _strided(x["targets"]), _strided(x["bias"])
    assert not t.is_contiguous() and not b.is_contiguous()
    hidden = x["hidden"].clone().requires_grad_(grad)
    loss, logp, _ = fused_linear_grpo_loss(hidden, x["weight"], t, x["adv"], old_logprobs=x["old"],
                                           loss_mask=x["loss_mask"], seq_ids=x["seq_ids"], temperature=0.8,
                                           bias=b, backend="triton")
    w_loss, w_logp, _, w_grads = G.reference64(x["hidden"], x["weight"], x["bias"], x["targets"], x["adv"],
                                               x["old"], None, x["loss_mask"], x["seq_ids"], 0.2, 0.2, 0.0, 0.8,
                                               "seq_mean_token_mean")
    G.close(loss, w_loss, what="loss")
    G.close(logp, w_logp, what="logprobs")
    if grad:
        loss.backward()
        G.close(hidden.grad, w_grads[0], what="d hidden")
    lp = fused_linear_logprobs(x["hidden"], x["weight"], t, 0.8, bias=b, backend="triton")
    G.close(lp, w_logp, what="logprobs op")
    for reduction in ("mean", "none"):
        h = x["hidden"].clone().requires_grad_(grad)
        ce = fused_linear_cross_entropy(h, x["weight"], t, reduction=reduction, bias=b, backend="triton")
        w_ce = CE.reference64(x["hidden"], x["weight"], x["bias"], x["targets"], -100, reduction)
        CE.close(ce, w_ce[0], what=f"CE {reduction}")
        if grad:
            (ce.sum() if reduction == "none" else ce).backward()
            CE.close(h.grad, w_ce[1], what=f"CE {reduction} d hidden")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp32_inputs_under_autocast_keep_fp32_maths(impl, backend):
    """Under torch.autocast(bfloat16) the ops still compute in fp32 for fp32 inputs, masked rows included (the
    chunked path's row sort used to index-put an autocast bf16 product into the fp32 gradient)."""
    x = G.make_inputs(97, 16, 300, mask_kind="partial", adv_kind="rand", old_given=True, beta=0.04, bias=False,
                      temperature=1.0, seed=8)
    hidden = x["hidden"].clone().requires_grad_()
    weight = x["weight"].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logp, _ = fused_linear_grpo_loss(hidden, weight, x["targets"], x["adv"], old_logprobs=x["old"],
                                               ref_logprobs=x["ref"], loss_mask=x["loss_mask"],
                                               seq_ids=x["seq_ids"], beta=0.04, backend=backend)
    loss.backward()
    w_loss, w_logp, _, w_grads = G.reference64(x["hidden"], x["weight"], None, x["targets"], x["adv"], x["old"],
                                               x["ref"], x["loss_mask"], x["seq_ids"], 0.2, 0.2, 0.04, 1.0,
                                               "seq_mean_token_mean")
    G.close(loss, w_loss, what="loss")
    G.close(logp, w_logp, what="logprobs")
    G.close(hidden.grad, w_grads[0], what="d hidden")
    G.close(weight.grad, w_grads[1], what="d weight")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_gradient_into_advantages_or_old_and_ref_logprobs(impl, backend):
    """Advantages and old / reference log-probs are data: they get no gradient even when they require one."""
    x = G.make_inputs(97, 16, 300, mask_kind="partial", adv_kind="rand", old_given=True, beta=0.04, bias=False,
                      temperature=1.0, seed=9)
    hidden = x["hidden"].clone().requires_grad_()
    adv, old, ref = (x[k].clone().requires_grad_() for k in ("adv", "old", "ref"))
    loss, _, _ = fused_linear_grpo_loss(hidden, x["weight"], x["targets"], adv, old_logprobs=old, ref_logprobs=ref,
                                        loss_mask=x["loss_mask"], beta=0.04, aggregation="token_mean",
                                        backend=backend)
    loss.backward()
    assert hidden.grad is not None and adv.grad is None and old.grad is None and ref.grad is None


def test_fp16_takes_the_tiled_path_and_survives_loss_scaling(impl):
    """fp16 losses with gradients run the tiled implementation even under chunked (the chunked one writes dz before
    the loss scale is known): a GradScaler-like scale of 65536 gives finite gradients equal to the scaled float64
    ones; no chunk of the chunked path runs."""
    x = G.make_inputs(97, 16, 300, mask_kind="partial", adv_kind="rand", old_given=True, beta=0.0, bias=False,
                      temperature=1.0, seed=10)
    hidden = x["hidden"].half().requires_grad_()
    loss, _, _ = fused_linear_grpo_loss(hidden, x["weight"].half(), x["targets"], x["adv"], old_logprobs=x["old"],
                                        loss_mask=x["loss_mask"], aggregation="token_mean", backend="triton")
    (loss * 65536.0).backward()
    assert impl[1] == []
    _, _, _, w_grads = G.reference64(x["hidden"].half().float(), x["weight"].half().float(), None, x["targets"],
                                     x["adv"], x["old"], None, x["loss_mask"], None, 0.2, 0.2, 0.0, 1.0,
                                     "token_mean")
    assert torch.isfinite(hidden.grad).all()
    want = 65536.0 * w_grads[0]
    err = (hidden.grad.double() - want).abs().max() / want.abs().max()
    assert err < 2e-3, err  # fp16 rounding of the gradient and of the logits' inputs


def test_chunked_scales_by_a_non_unit_grad_output_in_fp32(monkeypatch):
    """(loss / 3).backward() scales the forward-computed gradients by exactly 1/3 (a half-precision 1/3 would bias
    every gradient by its rounding, 2.6e-3 relative in bf16)."""
    monkeypatch.setenv(chunked.ENV_IMPL, "chunked")
    x = G.make_inputs(97, 16, 300, mask_kind="all", adv_kind="rand", old_given=True, beta=0.0, bias=False,
                      temperature=1.0, seed=11)

    def grad(scale):
        h = x["hidden"].bfloat16().requires_grad_()
        loss, _, _ = fused_linear_grpo_loss(h, x["weight"].bfloat16(), x["targets"], x["adv"], old_logprobs=x["old"],
                                            aggregation="token_mean", backend="triton")
        (loss * scale).backward()
        return h.grad.double()

    one, third = grad(1.0), grad(1.0 / 3.0)
    nz = one.abs() > 1e-3 * one.abs().max()
    ratio = (third[nz] / one[nz]).mean().item()
    assert abs(ratio * 3 - 1) < 5e-5, ratio


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("impl_name", chunked.IMPLS)
def test_gpu_bf16_grpo_within_twice_torch_bf16_error(monkeypatch, impl_name):
    """STYLE.md rule at N=4096, H=2560, V=151936 for each implementation; chunked with 4 chunks and dweight
    accumulated in bf16, as at the anchor shape."""
    monkeypatch.setenv(chunked.ENV_IMPL, impl_name)
    monkeypatch.setattr(chunked, "_MAX_CHUNK_ROWS", 1024)
    monkeypatch.setattr(chunked, "_FP32_DW_MAX_BYTES", 0)
    G.bf16_rule(4096, 2560, 151936)


@pytest.mark.gpu
def test_gpu_anchor_shape_chunked_peak_memory(monkeypatch):
    """16384 tokens, H 2560, V 151936, bf16, chunked: fwd + bwd finite, peak extra memory over the inputs (and
    including the returned gradients) below Liger chunked's 2.19 GiB (../shared/ANCHORS.md)."""
    monkeypatch.setenv(chunked.ENV_IMPL, "chunked")
    n, h, v = 16384, 2560, 151936
    dev = "cuda"
    hidden = (torch.randn(n, h, device=dev) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device=dev) / h**0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n,), device=dev)
    adv = torch.randn(n, device=dev)
    old = -torch.rand(n, device=dev) * 5 - 8
    mask = torch.rand(n, device=dev) < 0.9
    seq_ids = torch.arange(n, device=dev, dtype=torch.int32) // 1024
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, logp, _ = fused_linear_grpo_loss(hidden, weight, targets, adv, old_logprobs=old, loss_mask=mask,
                                           seq_ids=seq_ids, backend="triton")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert bool((logp <= 0).all())
    assert float(hidden.grad[~mask].abs().max()) == 0.0
    assert extra < 2.19 * 2**30, f"peak extra {extra / 2**30:.2f} GiB"


def _rows_inputs(rows, v, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(rows, v, generator=g) * scale
    targets = torch.randint(0, v, (rows,), generator=g)
    targets[3] = -100
    targets[5] = v  # outside [0, V): no target either
    w = torch.rand(rows, generator=g)
    adv = torch.randn(rows, generator=g)
    old = -torch.rand(rows, generator=g) * 5 - 3
    return z0, targets, w, adv, old


def _plant_spikes(z0, targets):
    """Rows 0, 1, 2 and 31: the target is its row's maximum but for one spike 30 higher late in the row, so the
    shift is raised mid-row, after the first blocks were written at the first shift."""
    for i in (0, 1, 2, 31):
        targets[i] = 7 + i
        z0[i, 7 + i] = z0[i].max() + 1.0
        z0[i, 2500 + i] = z0[i, 7 + i] + 30.0


def _run_rows(z0, targets, w, adv, old, cfg, rows_grad, temp=0.9):
    rows = z0.shape[0]
    z, logp, c, alpha = z0.clone(), torch.empty(rows), torch.empty(rows), torch.full((rows,), float("nan"))
    chunked._launch_rows(z, targets, w, adv, old, None, logp, c, alpha, temp, 0.8, 1.28, 0.0, chunked.MODE_GRPO,
                         rows_grad=rows_grad, config=cfg)
    return z, logp, c, alpha


@pytest.mark.parametrize("config", [(1, 128, 4), (2, 64, 4), (4, 512, 2), (1, 128, 4, 3), (2, 64, 4, 5),
                                    (4, 512, 2, 1), (1, 64, 4, 0, 3), (2, 128, 4, 4, 2)])
def test_row_kernel_config_override(config):
    """bench/bench_grpo_rows.py sweeps the row kernel's (BLOCK_R, BLOCK_V, num_warps[, programs[, stages]]): any
    config computes what the default does (up to the summation order of the log-sum-exp), also with a capped grid
    whose programs walk several row blocks (37 rows: uneven walks, row blocks past rows_grad in the middle)."""
    args = _rows_inputs(37, 300, 1.0)
    z0 = args[0]
    for got, want in zip(_run_rows(*args, config, 30), _run_rows(*args, None, 30), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    z, _, _, _ = _run_rows(*args, config, 30)
    assert torch.equal(z[30:], z0[30:])  # rows past rows_grad keep their logits
    assert not torch.equal(z[:30], z0[:30])


@pytest.mark.parametrize("rescale_at", [20.0, 0.25])
@pytest.mark.parametrize("scale", [1.0, 40.0], ids=["logits~N(0,1)", "logits~N(0,1600)"])
@pytest.mark.parametrize("config", [None, (2, 256, 4), (1, 128, 4, 3, 2)], ids=["default", "2x256", "1x128-p3-s2"])
def test_row_kernel_one_pass_gives_dz_logp_and_untouched_rows(monkeypatch, rescale_at, scale, config):
    """The one-pass row kernel against float64: logp = log_softmax(z / T)[t], and alpha[:, None] * P (P written
    over z) = c (onehot - softmax(z / T)) / T for the rows given the gradient pass. Big logits (scale 40: a
    target's probability often far below e^-20) and a threshold of 0.25 run the path that raises a row's shift
    and rescales the P already written, many times per row over the vocabulary blocks. Rows without a target get
    logp 0, c 0, alpha 0 and keep their logits, as do the rows past rows_grad (which get logp, c, alpha 0)."""
    monkeypatch.setattr(chunked, "_RESCALE_AT", rescale_at)
    rows, v, temp, rows_grad = 37, 3001, 0.9, 30
    args = _rows_inputs(rows, v, scale, seed=1)
    z0, targets = args[0], args[1]
    _plant_spikes(z0, targets)
    for j, i in enumerate((6, 7, 8)):  # confident targets: 1 - p_t from about 1e-2 down to 1e-8
        z0[i, targets[i]] = z0[i].max() + 8.0 + 6.0 * j
    z, logp, c, alpha = _run_rows(*args, config, rows_grad, temp)
    has_t = (targets >= 0) & (targets < v)
    u = z0.double() / temp
    lsm = torch.log_softmax(u, -1)
    want_logp = torch.where(has_t, lsm.gather(1, targets.clamp(0, v - 1)[:, None])[:, 0], 0.0)
    G.close(logp, want_logp, what="logp")
    grad_rows = has_t & (torch.arange(rows) < rows_grad)
    onehot = F.one_hot(targets.clamp(0, v - 1), v).double()
    want_dz = c.double()[:, None] * (onehot - lsm.exp()) / temp
    got_dz = alpha.double()[:, None] * z.double()
    for i in torch.nonzero(grad_rows)[:, 0].tolist():
        G.close(got_dz[i], want_dz[i], what=f"dz row {i}")
    # the target's entry c (1 - p_t) / T relatively, also where p_t is within 1e-8 of 1 (1 - p_t as the sum of the
    # other terms: the cancelling exp(u_t - s) - S form would lose it entirely there)
    t = targets.clamp(0, v - 1)[:, None]
    one_minus = -torch.expm1(lsm.gather(1, t)[:, 0])
    want_t = c.double() * one_minus / temp
    got_t = got_dz.gather(1, t)[:, 0]
    assert float(one_minus[6:9].min()) < 1e-7
    torch.testing.assert_close(got_t[grad_rows], want_t[grad_rows], rtol=1e-5, atol=0)
    assert bool((c[~has_t] == 0).all()) and bool((alpha[~grad_rows] == 0).all())
    assert torch.equal(z[~grad_rows], z0[~grad_rows])
    assert bool(torch.isfinite(z).all())
    if scale > 1 or rescale_at < 1:  # the shift really moved: the largest P is far below exp(max u - u_t)
        assert bool((z[grad_rows].max(1).values < math.exp(rescale_at) * 1.01).all())


@pytest.mark.parametrize("case", [G.CASES[6], G.CASES[9]], ids=lambda c: "-".join(map(str, c)))
def test_grpo_with_rescales_matches_float64_reference(monkeypatch, case):
    """The whole chunked loss with the row kernel's rescale path taken over and over (threshold 0.25)."""
    monkeypatch.setenv(chunked.ENV_IMPL, "chunked")
    monkeypatch.setattr(chunked, "_MAX_CHUNK_ROWS", CHUNK)
    monkeypatch.setattr(chunked, "_RESCALE_AT", 0.25)
    (loss, logp, stats, grads), (w_loss, w_logp, w_stats, w_grads) = G.run_case("triton", case)
    G.close(loss, w_loss, what="loss")
    G.close(logp, w_logp, what="logprobs")
    for name, got, want in zip(("d hidden", "d weight", "d bias"), grads, w_grads, strict=True):
        if want is not None:
            G.close(got, want, what=name)


def test_cross_entropy_with_peaked_logits_matches_float64_reference(monkeypatch):
    """Logits with a spread of hundreds (targets with probabilities down to e^-300 and far below): the default
    threshold's rescales keep every stored value finite and the gradients equal float64's."""
    monkeypatch.setenv(chunked.ENV_IMPL, "chunked")
    monkeypatch.setattr(chunked, "_MAX_CHUNK_ROWS", CHUNK)
    hidden, weight, _, targets = CE.make(97, 16, 4097, "some", -100, False, seed=4)
    weight = weight * 30.0
    hg, wg = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(hg, wg, targets, backend="triton")
    loss.backward()
    w_loss, w_dh, w_dw, _ = CE.reference64(hidden, weight, None, targets, -100, "mean")
    spread = (hidden @ weight.T).max(1).values - (hidden @ weight.T).gather(1, targets.clamp(0)[:, None])[:, 0]
    assert float(spread.max()) > 100  # far past the threshold of 20
    CE.close(loss, w_loss, what="loss")
    CE.close(hg.grad, w_dh, what="d hidden")
    CE.close(wg.grad, w_dw, what="d weight")


def test_row_kernel_rounds_bf16_to_nearest_under_the_interpreter():
    """bf16 logits: P is stored rounded to the nearest bf16 value, as a GPU's cast does (the interpreter's own
    fp32 -> bf16 cast truncates, which would double the rounding error the CPU bf16 tests see): all but a few
    near-tie elements equal float64's exp(u - u_t) rounded by torch."""
    rows, v = 37, 3001
    z0, targets, w, adv, old = _rows_inputs(rows, v, 1.0, seed=2)
    z0 = z0.bfloat16()
    z, _, _, _ = _run_rows(z0, targets, w, adv, old, None, rows, temp=1.0)
    has_t = (targets >= 0) & (targets < v)
    u = z0.double()
    want = torch.exp(u - u.gather(1, targets.clamp(0, v - 1)[:, None])).bfloat16()
    off_t = has_t[:, None] & (torch.arange(v)[None, :] != targets[:, None])
    same = (z == want)[off_t].double().mean().item()
    assert same > 0.999, same


@pytest.mark.parametrize("rescale_at", [20.0, 0.25])
def test_row_kernel_bf16_rounds_each_value_once_also_on_rescaled_rows(monkeypatch, rescale_at):
    """bf16 logits whose shift is raised (spike rows; every row at threshold 0.25): the P stored before the raise are
    scaled by an exact power of two in the fix-up, so every alpha * P is within one bf16 rounding (2^-8) of the
    float64 dz, like the rows without a raise."""
    monkeypatch.setattr(chunked, "_RESCALE_AT", rescale_at)
    rows, v, temp, rows_grad = 37, 3001, 0.9, 30
    z0, targets, w, adv, old = _rows_inputs(rows, v, 1.0, seed=3)
    _plant_spikes(z0, targets)
    z0 = z0.bfloat16()
    z, _, c, alpha = _run_rows(z0, targets, w, adv, old, None, rows_grad, temp)
    grad_rows = (targets >= 0) & (targets < v) & (torch.arange(rows) < rows_grad)
    u = z0.double() / temp
    onehot = F.one_hot(targets.clamp(0, v - 1), v).double()
    want = (c.double()[:, None] * (onehot - torch.softmax(u, -1)) / temp)[grad_rows]
    got = (alpha.double()[:, None] * z.double())[grad_rows]
    big = want.abs() > 1e-30 * want.abs().amax(1, keepdim=True)  # leave out values below bf16's normal range
    rel = ((got - want).abs() / want.abs())[big]
    assert float(rel.max()) <= 2.0**-8 * (1 + 1e-3), float(rel.max())


def test_row_kernel_minus_inf_target_logit():
    """A target whose logit is -inf (e.g. a vocabulary mask as a bias) with a first vocabulary block of -inf: logp
    -inf and finite stored values (the shift starts at 0 instead of -inf, which made exp(-inf + inf) = NaN)."""
    rows, v = 37, 3001
    z0, targets, w, adv, old = _rows_inputs(rows, v, 1.0, seed=4)
    z0[1, :1024] = float("-inf")
    targets[1] = 100
    z, logp, c, alpha = _run_rows(z0, targets, w, adv, old, None, rows)
    assert float(logp[1]) == float("-inf")
    assert bool(torch.isfinite(z[1]).all()) and bool(torch.isfinite(alpha).all()) and bool(torch.isfinite(c).all())


def test_grpo_bf16_with_bias_near_float64(monkeypatch):
    """bf16 inputs with a bias through the chunked path (several chunks): loss, logp and all three gradients near
    the float64 results of the same bf16 values, within bf16-sized errors (d bias goes through alpha @ P)."""
    monkeypatch.setenv(chunked.ENV_IMPL, "chunked")
    monkeypatch.setattr(chunked, "_MAX_CHUNK_ROWS", CHUNK)
    x = G.make_inputs(97, 16, 3001, mask_kind="partial", adv_kind="rand", old_given=True, beta=0.04, bias=True,
                      temperature=0.9, seed=12)
    hb, wb, bb = (x[k].bfloat16() for k in ("hidden", "weight", "bias"))
    hg, wg, bg = (t.clone().requires_grad_() for t in (hb, wb, bb))
    kw = dict(old_logprobs=x["old"], ref_logprobs=x["ref"], loss_mask=x["loss_mask"], seq_ids=x["seq_ids"],
              beta=0.04, temperature=0.9)
    loss, logp, _ = fused_linear_grpo_loss(hg, wg, x["targets"], x["adv"], bias=bg, backend="triton", **kw)
    loss.backward()
    w_loss, w_logp, _, w_grads = G.reference64(hb.float(), wb.float(), bb.float(), x["targets"], x["adv"], x["old"],
                                               x["ref"], x["loss_mask"], x["seq_ids"], 0.2, 0.2, 0.04, 0.9,
                                               "seq_mean_token_mean")
    # 1e-2: the gradients are rounded to bf16 on output (up to 3.9e-3) after bf16 P and alpha * hidden; measured
    # (CPU, 2026-11-26): loss 3e-4, logp 5e-4, d hidden 4.6e-3, d weight 6.1e-3, d bias 6.6e-3
    G.close(loss, w_loss, rtol=1e-2, what="loss")
    G.close(logp, w_logp, rtol=1e-2, what="logprobs")
    for name, got, want in zip(("d hidden", "d weight", "d bias"), (hg.grad, wg.grad, bg.grad), w_grads,
                               strict=True):
        G.close(got, want, rtol=1e-2, what=name)


def test_row_kernel_keeps_row_counts_unspecialised():
    """R and R_grad (the chunk's rows, and those given a gradient) vary from chunk to chunk: specialised, each
    value 1 or multiple of 16 would compile its own kernel (up to ~9 per run). stride_z stays specialised: its
    divisibility by 16 is what lets the vocabulary loop load 16 bytes at a time."""
    import ast
    import os
    import subprocess
    import sys

    code = ("import r4b.kernels._fused_linear_chunked as c; "
            "print({p.name: p.do_not_specialize for p in c._rows_kernel.params})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiled JITFunction's parameters
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    flags = ast.literal_eval(r.stdout)
    assert flags["R"] and flags["R_grad"] and not flags["stride_z"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scatter", [False, True])
def test_scale_rows_kernel_rounds_once_to_nearest_and_scatters(dtype, scatter):
    """The backward's row-scale kernel: out[idx[i]] = x[i] * alpha[i] in fp32, rounded once (to nearest, also under
    the interpreter, whose own bf16 cast truncates) into out's dtype, bit-identical to torch's fp32 product and
    cast; rows past a program's block and a width past the column block; rows outside idx untouched."""
    g = torch.Generator().manual_seed(3)
    k, h = 131, 1100
    x = torch.randn(k, h, generator=g, dtype=torch.float32)
    alpha = torch.randn(k, generator=g) * 1e-3
    for xin in (x, x.to(dtype)):
        out = torch.full((k + 9, h), 7.0, dtype=dtype)
        idx = torch.randperm(k + 9, generator=g)[:k] if scatter else None
        chunked._scale_rows(xin, alpha, out if scatter else out[3 : 3 + k], idx)
        want = torch.full((k + 9, h), 7.0, dtype=dtype)
        y = (xin.float() * alpha[:, None]).to(dtype)
        if scatter:
            want[idx] = y
        else:
            want[3 : 3 + k] = y
        assert torch.equal(out, want), (xin.dtype, dtype)


def test_chunked_grpo_sorts_the_sequence_ids_once(monkeypatch):
    """The seq_mean aggregations' dense sequence index (a sort and a host sync) is computed once, before the chunks:
    recomputed for the loss after them, its sync would wait for every chunk's GEMMs and idle the GPU while the host
    launched the rest. The loss still equals the float64 reference."""
    import importlib

    grpo_mod = importlib.import_module("r4b.kernels.fused_linear_grpo_loss")
    monkeypatch.setenv(chunked.ENV_IMPL, "chunked")
    calls = []
    real = grpo_mod._dense_seq
    monkeypatch.setattr(grpo_mod, "_dense_seq", lambda s: (calls.append(1), real(s))[1])
    x = G.make_inputs(97, 16, 300, mask_kind="partial", adv_kind="rand", old_given=True, beta=0.0, bias=False,
                      temperature=1.0, seed=5)
    hidden = x["hidden"].clone().requires_grad_()
    loss, _, _ = fused_linear_grpo_loss(hidden, x["weight"], x["targets"], x["adv"], old_logprobs=x["old"],
                                        loss_mask=x["loss_mask"], seq_ids=x["seq_ids"],
                                        aggregation="seq_mean_token_mean", backend="triton")
    loss.backward()
    assert len(calls) == 1
    w_loss, *_ = G.reference64(x["hidden"], x["weight"], None, x["targets"], x["adv"], x["old"], None,
                               x["loss_mask"], x["seq_ids"], 0.2, 0.2, 0.0, 1.0, "seq_mean_token_mean")
    G.close(loss, w_loss, what="loss")
