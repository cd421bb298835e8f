"""fused_linear_grpo_loss against a float64 reference with materialised logits (loss, log-probs, stats,
d hidden, d weight, d bias), on every backend available here, plus input validation and GPU-only checks."""

import pytest
import torch

from r4b.kernels import available_backends, fused_linear_grpo_loss, fused_linear_grpo_loss_ref
from tests._aot import run_aot_report
from tests._lowprec import assert_within_twice_plain

OP = "fused_linear_grpo_loss"
BACKENDS = available_backends(OP, "cpu")


def reference64(hidden, weight, bias, targets, adv, old, ref, loss_mask, seq_ids, eps_low, eps_high, beta,
                temperature, aggregation):
    """The formula written out in float64 with full logits; returns (loss, logp, stats, grads)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_() if bias is not None else None
    logits = h @ w.T
    if b is not None:
        logits = logits + b
    logsm = torch.log_softmax(logits / temperature, dim=-1)
    v = weight.shape[0]
    has_t = (targets >= 0) & (targets < v)
    picked = logsm.gather(1, targets.clamp(0, v - 1)[:, None])[:, 0]
    logp = torch.where(has_t, picked, torch.zeros((), dtype=torch.float64))
    m = has_t if loss_mask is None else has_t & loss_mask
    losses, ratios, kls, low, high = [], [], [], 0, 0
    for i in range(len(targets)):
        if not m[i]:
            losses.append(None)
            continue
        a = float(adv[i])
        o = logp[i].detach() if old is None else float(old[i])
        r = torch.exp(logp[i] - o)
        lt = -torch.min(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
        if ref is not None:
            kl = torch.exp(float(ref[i]) - logp[i]) - (float(ref[i]) - logp[i]) - 1
            kls.append(kl.item())
            lt = lt + beta * kl
        ratios.append(r.item())
        low += int(r.item() < 1 - eps_low and a < 0)
        high += int(r.item() > 1 + eps_high and a > 0)
        losses.append(lt)
    trained = [x for x in losses if x is not None]
    zero = (h.sum() + w.sum()) * 0.0
    if aggregation == "token_mean":
        loss = sum(trained) / len(trained) if trained else zero
    else:
        per_seq = []
        for s in sorted(set(seq_ids.tolist())):
            toks = [losses[i] for i in range(len(targets)) if int(seq_ids[i]) == s and losses[i] is not None]
            if toks:
                per_seq.append(sum(toks) / (len(toks) if aggregation == "seq_mean_token_mean" else 1))
        loss = sum(per_seq) / len(per_seq) if per_seq else zero
    loss = loss + zero
    loss.backward()
    n = max(len(trained), 1)
    stats = {
        "clip_frac_low": low / n,
        "clip_frac_high": high / n,
        "clip_frac": (low + high) / n,
        "ratio_mean": sum(ratios) / n,
        "ratio_max": max(ratios) if ratios else 0.0,
        "kl_mean": sum(kls) / n if kls else 0.0,
    }
    grads = (h.grad, w.grad, b.grad if b is not None else None)
    return loss.detach(), logp.detach(), stats, grads


def close(got, want, rtol=1e-5, what=""):
    """|got - want| <= rtol * (|want| + max|want|): relative, with an absolute floor at the tensor's scale."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


def make_inputs(n, h, v, *, mask_kind, adv_kind, old_given, beta, bias, temperature, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = (torch.randn(v, h, generator=g) * (2.0 / h**0.5)).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    n_seq = max(1, n // 13)
    seq_ids = torch.sort(torch.randint(0, n_seq, (n,), generator=g)).values.to(torch.int32)
    if mask_kind == "all":
        loss_mask = None
    elif mask_kind == "none_trained":
        loss_mask = torch.zeros(n, dtype=torch.bool)
    else:  # random holes, and every third sequence fully masked (with no-target -100 labels inside)
        loss_mask = torch.rand(n, generator=g) < 0.7
        dead = (seq_ids % 3) == 1
        loss_mask &= ~dead
        targets = torch.where(dead & (torch.rand(n, generator=g) < 0.5), -100, targets)
    if adv_kind == "zero":
        adv = torch.zeros(n)
    else:
        adv = torch.randn(n_seq, generator=g)[seq_ids.long()]
    with torch.no_grad():
        logits = (hidden.double() @ weight.double().T + (b.double() if bias else 0.0)) / temperature
        true = torch.log_softmax(logits, -1).gather(1, targets.clamp(0)[:, None])[:, 0].float()
    old = (true + 0.4 * torch.randn(n, generator=g)) if old_given else None
    ref = (true + 0.3 * torch.randn(n, generator=g)) if (beta > 0 or old_given) else None
    if old is not None and loss_mask is not None:
        old = torch.where(loss_mask, old, float("-inf"))  # garbage where masked must not leak
    return dict(hidden=hidden, weight=weight, bias=b, targets=targets, adv=adv, old=old, ref=ref,
                loss_mask=loss_mask, seq_ids=seq_ids)


# (N, H, V, aggregation, beta, old_logprobs given, temperature, mask, advantages, bias): odd shapes, every
# aggregation, beta 0 / 0.04, on/off-policy, fully masked sequences, zero advantages, temperature != 1.
CASES = [
    (1, 16, 300, "token_mean", 0.0, False, 1.0, "all", "rand", False),
    (1, 16, 300, "seq_mean_token_mean", 0.04, True, 0.7, "all", "rand", True),
    (97, 16, 300, "seq_mean_token_mean", 0.0, True, 1.0, "partial", "rand", False),
    (97, 16, 300, "seq_mean_token_sum", 0.04, False, 1.3, "partial", "rand", False),
    (97, 96, 300, "token_mean", 0.04, True, 0.7, "partial", "zero", False),
    (97, 96, 300, "seq_mean_token_mean", 0.0, False, 1.0, "partial", "zero", False),
    (97, 96, 4097, "seq_mean_token_sum", 0.0, True, 0.7, "partial", "rand", True),
    (97, 16, 4097, "seq_mean_token_mean", 0.04, False, 1.0, "none_trained", "rand", False),
    (1025, 16, 300, "token_mean", 0.0, False, 0.7, "partial", "rand", False),
    (1025, 96, 4097, "seq_mean_token_mean", 0.04, True, 0.7, "partial", "rand", False),
    (1025, 96, 4097, "seq_mean_token_sum", 0.0, True, 1.0, "all", "rand", True),
]


def run_case(backend, case, seed=0):
    n, h, v, agg, beta, old_given, temp, mask_kind, adv_kind, bias = case
    x = make_inputs(n, h, v, mask_kind=mask_kind, adv_kind=adv_kind, old_given=old_given, beta=beta, bias=bias,
                    temperature=temp, seed=seed)
    hidden = x["hidden"].clone().requires_grad_()
    weight = x["weight"].clone().requires_grad_()
    b = x["bias"].clone().requires_grad_() if bias else None
    kw = dict(old_logprobs=x["old"], ref_logprobs=x["ref"], loss_mask=x["loss_mask"], seq_ids=x["seq_ids"],
              eps_low=0.2, eps_high=0.28, beta=beta, temperature=temp, aggregation=agg, bias=b)
    loss, logp, stats = fused_linear_grpo_loss(hidden, weight, x["targets"], x["adv"], backend=backend, **kw)
    loss.backward()
    want = reference64(x["hidden"], x["weight"], x["bias"], x["targets"], x["adv"], x["old"], x["ref"],
                       x["loss_mask"], x["seq_ids"], 0.2, 0.28, beta, temp, agg)
    return (loss, logp, stats, (hidden.grad, weight.grad, b.grad if bias else None)), want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_float64_reference(backend, case):
    (loss, logp, stats, grads), (w_loss, w_logp, w_stats, w_grads) = run_case(backend, case)
    assert loss.dtype == torch.float32 and loss.shape == () and logp.dtype == torch.float32
    assert not logp.requires_grad
    close(loss, w_loss, what="loss")
    close(logp, w_logp, what="logprobs")
    for k, want in w_stats.items():
        close(stats[k], want, what=k)
    for name, got, want in zip(("d hidden", "d weight", "d bias"), grads, w_grads, strict=True):
        if want is None:
            assert got is None
            continue
        assert torch.isfinite(got).all(), name
        close(got, want, what=name)


def test_cases_exercise_clipping_and_masking():
    """The parametrization is not vacuous: clipping on both sides, and non-zero gradients, do occur."""
    (_, _, stats, grads), _ = run_case("torch", CASES[6])
    assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0
    assert grads[0].abs().max() > 0 and grads[1].abs().max() > 0


def test_fully_masked_and_zero_advantages_give_zero_not_nan():
    for case in (CASES[5], CASES[7]):
        for backend in BACKENDS:
            (loss, _, stats, grads), _ = run_case(backend, case)
            assert loss.item() == 0.0
            assert all(torch.isfinite(s) for s in stats.values())
            assert float(grads[0].abs().max()) == 0.0 and float(grads[1].abs().max()) == 0.0


def token_mean_reference64(hidden, weight, targets, adv, old, ref, loss_mask, beta, temperature, eps=(0.2, 0.2)):
    """Vectorised float64 token_mean loss (for many rows, where the per-token loop above is too slow)."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    logsm = torch.log_softmax((h @ w.T) / temperature, dim=-1)
    m = loss_mask & (targets >= 0)
    logp = logsm.gather(1, targets.clamp(0)[:, None])[:, 0]
    r = torch.exp(torch.where(m, logp - old.double(), 0.0))
    a = adv.double()
    per = -torch.minimum(r * a, r.clamp(1 - eps[0], 1 + eps[1]) * a)
    dk = ref.double() - logp
    per = per + beta * (torch.exp(dk) - dk - 1)
    loss = torch.where(m, per, 0.0).sum() / m.sum()
    loss.backward()
    return loss.detach(), torch.where(targets >= 0, logp, 0.0).detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_rows_than_grid_y_limit(backend):
    """N > 65,535 rows: no launch dimension is per row."""
    x = make_inputs(70_001, 16, 37, mask_kind="partial", adv_kind="rand", old_given=True, beta=0.04, bias=False,
                    temperature=0.9)
    hidden = x["hidden"].clone().requires_grad_()
    weight = x["weight"].clone().requires_grad_()
    loss, logp, _ = fused_linear_grpo_loss(hidden, weight, x["targets"], x["adv"], old_logprobs=x["old"],
                                           ref_logprobs=x["ref"], loss_mask=x["loss_mask"], beta=0.04,
                                           temperature=0.9, aggregation="token_mean", backend=backend)
    loss.backward()
    w_loss, w_logp, w_dh, w_dw = token_mean_reference64(x["hidden"], x["weight"], x["targets"], x["adv"], x["old"],
                                                        x["ref"], x["loss_mask"], 0.04, 0.9)
    close(loss, w_loss, what="loss")
    close(logp, w_logp, what="logprobs")
    close(hidden.grad, w_dh, what="d hidden")
    close(weight.grad, w_dw, what="d weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_hidden_requires_grad(backend):
    x = make_inputs(97, 16, 300, mask_kind="partial", adv_kind="rand", old_given=True, beta=0.0, bias=False,
                    temperature=1.0)
    hidden = x["hidden"].clone().requires_grad_()
    loss, _, _ = fused_linear_grpo_loss(hidden, x["weight"], x["targets"], x["adv"], old_logprobs=x["old"],
                                        loss_mask=x["loss_mask"], aggregation="token_mean", backend=backend)
    loss.backward()
    _, _, _, w_grads = reference64(x["hidden"], x["weight"], None, x["targets"], x["adv"], x["old"], None,
                                   x["loss_mask"], None, 0.2, 0.2, 0.0, 1.0, "token_mean")
    close(hidden.grad, w_grads[0], what="d hidden")


def test_ref_is_the_torch_backend():
    x = make_inputs(97, 16, 300, mask_kind="partial", adv_kind="rand", old_given=True, beta=0.04, bias=False,
                    temperature=0.7)
    kw = dict(old_logprobs=x["old"], ref_logprobs=x["ref"], loss_mask=x["loss_mask"], seq_ids=x["seq_ids"],
              beta=0.04, temperature=0.7)
    a = fused_linear_grpo_loss_ref(x["hidden"], x["weight"], x["targets"], x["adv"], **kw)
    b = fused_linear_grpo_loss(x["hidden"], x["weight"], x["targets"], x["adv"], backend="torch", **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_batch():
    for backend in BACKENDS:
        hidden = torch.zeros(0, 16, requires_grad=True)
        weight = torch.randn(300, 16, requires_grad=True)
        loss, logp, stats = fused_linear_grpo_loss(hidden, weight, torch.zeros(0, dtype=torch.long), torch.zeros(0),
                                                   aggregation="token_mean", backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and logp.shape == (0,) and float(stats["ratio_max"]) == 0.0
        assert float(weight.grad.abs().max()) == 0.0


def _good():
    return dict(hidden=torch.randn(5, 8), weight=torch.randn(11, 8), targets=torch.randint(0, 11, (5,)),
                advantages=torch.randn(5))


@pytest.mark.parametrize(
    "change, kwargs, err, text",
    [
        (dict(hidden=torch.ones(5, 8, dtype=torch.int64)), {}, TypeError, "hidden"),
        (dict(hidden=torch.randn(5, 8, 1)), {}, ValueError, "hidden"),
        (dict(weight=torch.randn(11, 8, dtype=torch.float64)), {}, TypeError, "weight"),
        (dict(weight=torch.randn(11, 7)), {}, ValueError, "weight"),
        (dict(targets=torch.zeros(5)), {}, TypeError, "targets"),
        (dict(targets=torch.tensor([0, 1, 11, 2, 3])), {}, ValueError, "targets[2]=11"),
        (dict(targets=torch.zeros(4, dtype=torch.long)), {}, ValueError, "targets"),
        (dict(advantages=torch.randn(6)), {}, ValueError, "advantages"),
        (dict(advantages=torch.ones(5, dtype=torch.int64)), {}, TypeError, "advantages"),
        ({}, dict(old_logprobs=torch.randn(4)), ValueError, "old_logprobs"),
        ({}, dict(loss_mask=torch.ones(5)), TypeError, "loss_mask"),
        ({}, dict(seq_ids=torch.zeros(5)), TypeError, "seq_ids"),
        ({}, dict(aggregation="seq_mean_token_mean"), ValueError, "seq_ids"),
        ({}, dict(aggregation="mean", seq_ids=torch.zeros(5, dtype=torch.int32)), ValueError, "aggregation"),
        ({}, dict(temperature=0.0), ValueError, "temperature"),
        ({}, dict(eps_low=-0.1), ValueError, "eps_low"),
        ({}, dict(beta=0.1), ValueError, "ref_logprobs"),
        ({}, dict(bias=torch.randn(10)), ValueError, "bias"),
        ({}, dict(ref_logprobs=torch.randn(5, device="meta")), ValueError, "ref_logprobs"),
        ({}, dict(backend="cuda"), RuntimeError, "cuda"),
    ],
)
def test_bad_inputs_raise(change, kwargs, err, text):
    args = {**_good(), **change}
    kw = dict(aggregation="token_mean")
    kw.update(kwargs)
    with pytest.raises(err, match=__import__("re").escape(text)):
        fused_linear_grpo_loss(args["hidden"], args["weight"], args["targets"], args["advantages"], **kw)


# ------------------------------------------------------------------------------------------------ GPU


def _eager(hidden, weight, targets, adv, old, mask, seq_ids, upcast_logits):
    """Plain PyTorch: materialised logits (bf16 GEMM), softmax in fp32 if upcast_logits."""
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits.float() if upcast_logits else logits, -1).float()
    logp = logp.gather(1, targets[:, None])[:, 0]
    r = torch.exp(logp - old)
    per = -torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv)
    per = torch.where(mask, per, 0.0)
    return per.sum() / mask.sum(), logp


@pytest.mark.gpu
@pytest.mark.parametrize("n, h, v", [(1025, 256, 4097), (4096, 2560, 151936)])
def test_bf16_within_twice_torch_bf16_error(n, h, v):
    """STYLE.md rule: |r4b bf16 - fp32| <= 2 |torch bf16 - fp32| + atol, for loss, logprobs and gradients."""
    bf16_rule(n, h, v)


def bf16_rule(n, h, v):
    """The STYLE.md check of the GRPO loss (token mean, off-policy, masked rows) on a GPU at (N, H, V), bf16
    against fp32, plain PyTorch bf16 (materialised logits, fp32 log-softmax) as the baseline."""
    torch.manual_seed(0)
    dev = "cuda"
    h32 = torch.randn(n, h, device=dev)
    w32 = torch.randn(v, h, device=dev) / h**0.5
    targets = torch.randint(0, v, (n,), device=dev)
    adv = torch.randn(n, device=dev)
    mask = torch.rand(n, device=dev) < 0.8
    with torch.no_grad():
        old = torch.log_softmax(h32 @ w32.T, -1).gather(1, targets[:, None])[:, 0] + 0.1 * torch.randn(n, device=dev)

    def grads(fn, hh, ww):
        hh, ww = hh.detach().clone().requires_grad_(), ww.detach().clone().requires_grad_()
        loss, logp = fn(hh, ww)
        loss.backward()
        return loss.float(), logp.float(), hh.grad.float(), ww.grad.float()

    want = grads(lambda a, b: _eager(a, b, targets, adv, old, mask, None, True), h32, w32)
    plain = grads(lambda a, b: _eager(a, b, targets, adv, old, mask, None, True), h32.bfloat16(), w32.bfloat16())
    ours = grads(lambda a, b: fused_linear_grpo_loss(a, b, targets, adv, old_logprobs=old, loss_mask=mask,
                                                     aggregation="token_mean", backend="triton")[:2],
                 h32.bfloat16(), w32.bfloat16())
    assert_within_twice_plain(ours, plain, want, ("loss", "logprobs", "d hidden", "d weight"), atol_rel=1e-5)


@pytest.mark.gpu
def test_anchor_shape_runs_without_nv_buffer():
    """16384 tokens, H 2560, V 151936, bf16: fwd + bwd run, finite, and peak extra memory far below [N, V]."""
    n, h, v = 16384, 2560, 151936
    dev = "cuda"
    hidden = (torch.randn(n, h, device=dev) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device=dev) / h**0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n,), device=dev)
    adv = torch.randn(n, device=dev)
    seq_ids = torch.arange(n, device=dev, dtype=torch.int32) // 1024
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, logp, stats = fused_linear_grpo_loss(hidden, weight, targets, adv, seq_ids=seq_ids, backend="triton")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert bool((logp <= 0).all())
    assert extra < n * v * 2 / 2, f"peak extra {extra / 2**30:.2f} GiB: looks like an [N, V] buffer"


def test_kernels_compile_for_sm90():
    """The interpreter cannot catch what only the GPU compiler rejects: compile the forward and backward kernels
    with the GPU tile configs for sm_90 (triton's bundled ptxas, no GPU needed) in a process without
    TRITON_INTERPRET."""
    out = run_aot_report("bench.bench_grpo_loss")
    assert sum("registers" in line for line in out.splitlines()) == 11, out  # 6 tiled + 3 chunked rows + 2 scale
    for line in (line for line in out.splitlines() if line.startswith("scale_rows ")):
        # the row scale moves its rows as 16-byte vectors: no scalar loads or stores of the [K, H] rows
        assert "'st.global.v4.b32'" in line and "st.global.b16" not in line and "ld.global.b16" not in line, line
        assert "0 bytes spill stores" in line, line
