"""fused_linear_logprobs against float64 log_softmax of materialised logits, every backend available here:
odd shapes, temperature, bias, no-target (-100) rows, no autograd graph, validation, GPU bf16 rule."""

import re

import pytest
import torch

from r4b.kernels import _fused_linear_chunked as chunked
from r4b.kernels import available_backends, fused_linear_logprobs, fused_linear_logprobs_ref
from tests._lowprec import assert_within_twice_plain

OP = "fused_linear_logprobs"
BACKENDS = available_backends(OP, "cpu")


@pytest.fixture(autouse=True, params=chunked.IMPLS)
def impl(request, monkeypatch):
    """Every test runs with both Triton implementations (chunked: at most 40 rows per chunk, so several run)."""
    monkeypatch.setenv(chunked.ENV_IMPL, request.param)
    monkeypatch.setattr(chunked, "_MAX_CHUNK_ROWS", 40)
    return request.param


def reference64(hidden, weight, bias, targets, temperature):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    lsm = torch.log_softmax(logits / temperature, dim=-1)
    got = lsm.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    return torch.where(targets >= 0, got, 0.0)


def make(n, h, v, bias, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (scale / h**0.5)
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.1] = -100
    return hidden, weight, b, targets


# (N, H, V, temperature, bias, logit scale): scale 8 makes peaked softmaxes (log-probs far below 0).
CASES = [
    (1, 16, 300, 1.0, False, 2.0),
    (97, 16, 300, 0.7, True, 2.0),
    (97, 96, 4097, 1.3, False, 8.0),
    (1025, 16, 4097, 1.0, True, 2.0),
    (1025, 96, 4097, 0.6, False, 2.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_float64_reference(backend, case):
    n, h, v, temp, bias, scale = case
    hidden, weight, b, targets = make(n, h, v, bias, scale=scale)
    got = fused_linear_logprobs(hidden, weight, targets, temp, bias=b, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (n,)
    want = reference64(hidden, weight, b, targets, temp)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert bool((got[targets == -100] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_graph_even_when_inputs_require_grad(backend):
    hidden, weight, _, targets = make(97, 16, 300, False)
    out = fused_linear_logprobs(hidden.requires_grad_(), weight.requires_grad_(), targets, backend=backend)
    assert not out.requires_grad and out.grad_fn is None


def test_int32_targets_and_strided_hidden():
    hidden, weight, _, targets = make(97, 16, 300, False)
    wide = torch.randn(97, 32)
    wide[:, 8:24] = hidden  # non-contiguous (97, 16) view with row stride 32
    view = wide[:, 8:24]
    want = reference64(hidden, weight, None, targets, 1.0)
    for backend in BACKENDS:
        got = fused_linear_logprobs(view, weight, targets.int(), backend=backend)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_ref_is_the_torch_backend():
    hidden, weight, b, targets = make(97, 16, 300, True)
    assert torch.equal(fused_linear_logprobs_ref(hidden, weight, targets, 0.8, bias=b),
                       fused_linear_logprobs(hidden, weight, targets, 0.8, bias=b, backend="torch"))


@pytest.mark.parametrize(
    "change, kwargs, err, text",
    [
        (dict(hidden=torch.randn(5)), {}, ValueError, "hidden must be 2-D"),
        (dict(weight=torch.randn(11, 8, dtype=torch.float64)), {}, TypeError, "weight"),
        (dict(targets=torch.tensor([0, 1, 2, 3, 11])), {}, ValueError, "targets[4]=11"),
        (dict(targets=torch.zeros(5, 1, dtype=torch.long)), {}, ValueError, "targets"),
        ({}, dict(temperature=-1.0), ValueError, "temperature"),
        ({}, dict(temperature=float("nan")), ValueError, "temperature"),
        ({}, dict(bias=torch.randn(11, device="meta")), ValueError, "bias"),
    ],
)
def test_bad_inputs_raise(change, kwargs, err, text):
    args = {**dict(hidden=torch.randn(5, 8), weight=torch.randn(11, 8), targets=torch.randint(0, 11, (5,))), **change}
    with pytest.raises(err, match=re.escape(text)):
        fused_linear_logprobs(args["hidden"], args["weight"], args["targets"], **kwargs)


@pytest.mark.gpu
def test_bf16_within_twice_torch_bf16_error():
    n, h, v = 4096, 2560, 151936
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device="cuda")
    weight = torch.randn(v, h, device="cuda") / h**0.5
    targets = torch.randint(0, v, (n,), device="cuda")
    want = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None])[:, 0]
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    plain = torch.log_softmax((hb @ wb.T).float(), -1).gather(1, targets[:, None])[:, 0]
    ours = fused_linear_logprobs(hb, wb, targets, backend="triton")
    assert_within_twice_plain([ours], [plain], [want], ["logprobs"], atol_rel=1e-5)


def test_impl_selects_the_kernels(impl, monkeypatch):
    """chunked: one row-kernel launch per chunk of at most 40 rows (GEMM + first pass only); tiled: none."""
    if "triton" not in BACKENDS:
        pytest.skip("triton backend unavailable here")
    launches = []
    real = chunked._launch_rows

    def counting(z, *args, **kwargs):
        launches.append((z.shape[0], args[-1]))  # (rows, rows given the gradient pass)
        return real(z, *args, **kwargs)

    monkeypatch.setattr(chunked, "_launch_rows", counting)
    hidden, weight, _, targets = make(97, 16, 300, False)
    got = fused_linear_logprobs(hidden, weight, targets, backend="triton")
    torch.testing.assert_close(got.double(), reference64(hidden, weight, None, targets, 1.0), rtol=1e-5, atol=1e-5)
    assert launches == ([(33, 0), (33, 0), (31, 0)] if impl == "chunked" else [])
