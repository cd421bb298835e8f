"""torch.compile of the ops (r4b/kernels/_compile.py): under dynamo the Triton paths run as torch.library custom ops,
so a function or model built from them compiles with ``fullgraph=True`` and its compiled graph calls the kernels
the eager path calls: outputs and gradients bit-identical to eager (the CPU runs the Triton interpreter), and the
compiled graph holds the custom ops (not a trace of the kernels' Python). The fused-linear losses run eagerly
inside a compiled function (a graph break) with eager's results."""

from __future__ import annotations

import pytest
import torch
from tiny_models import grads, packed, randomize, rel_err, siglip_hf_config, tiny_qwen3

from r4b import kernels
from r4b.kernels import _compile

pytestmark = pytest.mark.skipif(kernels.available_backends("rms_norm", "cpu" if not torch.cuda.is_available()
                                                           else "cuda")[0] != "triton",
                                reason="the Triton backend cannot run here")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _graph_ops(fn, *args) -> set[str]:
    """The custom ops (namespace r4b_triton) in the forward graph dynamo captures for fn(*args), fullgraph."""
    seen: set[str] = set()

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            target = str(node.target)
            if node.op == "call_function" and _compile.NAMESPACE in target:
                seen.add(target.split(".")[-2] if target.count(".") >= 2 else target)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen


def _check_compiled(fn, inputs: tuple, grads_of: tuple, *, backend: str = "aot_eager") -> None:
    """fn compiled (fullgraph) gives eager's outputs and input gradients bit for bit."""
    torch._dynamo.reset()
    eager = fn(*inputs)
    eager = eager if isinstance(eager, tuple) else (eager,)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    dys = tuple(torch.randn(o.shape, dtype=o.dtype, device=DEVICE, generator=gen) for o in eager)
    g_eager = torch.autograd.grad(eager, grads_of, dys)
    out = torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    g_out = torch.autograd.grad(out, grads_of, dys)
    for a, b in zip(out + g_out, eager + g_eager, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()


def _t(*shape, grad=True, dtype=torch.float32, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, dtype=dtype, device=DEVICE, generator=gen).requires_grad_(grad)


def test_rms_norm_compiles_to_custom_ops():
    x, w = _t(2, 5, 32), _t(32, seed=1)
    fn = lambda x, w: kernels.rms_norm(x, w, 1e-5)  # noqa: E731
    assert _graph_ops(fn, x, w) == {"rms_norm"}
    _check_compiled(fn, (x, w), (x, w))
    # strided rows (a view of a wider tensor) reaching the op, and inductor around it
    wide = _t(6, 64)
    _check_compiled(lambda x, w: kernels.rms_norm(x[:, :32], w) + 1, (wide, w), (wide, w), backend="inductor")


def test_add_rms_norm_compiles_to_custom_ops():
    x, r, w = _t(3, 4, 32), _t(3, 4, 32, seed=1), _t(32, seed=2)
    fn = lambda x, r, w: kernels.add_rms_norm(x, r, w)  # noqa: E731
    assert _graph_ops(fn, x, r, w) == {"add_rms_norm"}
    _check_compiled(fn, (x, r, w), (x, r, w))
    # only the normalised output used (the model's final norm): the sum's gradient is a zero one
    _check_compiled(lambda x, r, w: kernels.add_rms_norm(x, r, w)[0], (x, r, w), (x, r, w))


def test_rope_and_swiglu_compile_to_custom_ops():
    x, pos = _t(7, 3, 16), torch.tensor([0, 1, 2, 0, 1, 5, 9], device=DEVICE)
    fn = lambda x, p: kernels.rope(x, p, 1e4)  # noqa: E731
    assert _graph_ops(fn, x, pos) == {"rope"}
    _check_compiled(fn, (x, pos), (x,))
    g, u = _t(4, 5, 24), _t(4, 5, 24, seed=1)
    assert _graph_ops(kernels.swiglu, g, u) == {"swiglu"}
    _check_compiled(kernels.swiglu, (g, u), (g, u))
    # the halves of a fused gate_up projection (strided rows), and a 0-dim pair
    gu = _t(6, 48)
    _check_compiled(lambda t: kernels.swiglu(t[:, :24], t[:, 24:]), (gu,), (gu,))
    g0, u0 = _t(), _t(seed=1)
    _check_compiled(kernels.swiglu, (g0, u0), (g0, u0))


def test_qk_norm_rope_compiles_to_custom_ops():
    q, k = _t(9, 4, 16), _t(9, 2, 16, seed=1)
    wq, wk = _t(16, seed=2), _t(16, seed=3)
    pos = torch.arange(9, device=DEVICE) % 5
    fn = lambda q, k, wq, wk, p: kernels.qk_norm_rope(q, k, wq, wk, p, 1e-6, 1e4)  # noqa: E731
    assert _graph_ops(fn, q, k, wq, wk, pos) == {"qk_norm_rope"}
    _check_compiled(fn, (q, k, wq, wk, pos), (q, k, wq, wk))
    # head slices of one fused projection (strided rows)
    qkv = _t(9, 8, 16)
    _check_compiled(lambda t, wq, wk, p: kernels.qk_norm_rope(t[:, :4], t[:, 4:6], wq, wk, p),
                    (qkv, wq, wk, pos), (qkv, wq, wk))


def _packed(lengths, hq=4, hkv=2, d=16, seed=0):
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return (_t(T, hq, d, seed=seed), _t(T, hkv, d, seed=seed + 1), _t(T, hkv, d, seed=seed + 2), cu,
            max(lengths))


def test_varlen_attention_compiles_to_custom_ops():
    q, k, v, cu, mx = _packed([5, 1, 17, 9])
    fn = lambda q, k, v, cu, mx: kernels.varlen_attention(q, k, v, cu, mx)  # noqa: E731
    assert _graph_ops(fn, q, k, v, cu, mx) == {"varlen_attention"}
    _check_compiled(fn, (q, k, v, cu, mx), (q, k, v))
    # non-causal with a scale, q a strided head slice
    qq = _t(32, 6, 16)
    _check_compiled(lambda q, k, v, cu: kernels.varlen_attention(q[:, :4], k, v, cu, 17, causal=False,
                                                                 softmax_scale=0.3),
                    (qq, k, v, cu), (qq, k, v))


def _opcheck_cases() -> dict:
    """name -> (custom op, arguments): every op over what its public function accepts (mixed dtypes, 1-D / 3-D /
    strided / zero-size inputs), and the backward ops with mixed dtypes."""
    ops = torch.ops.r4b_triton
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

    def t(*shape, dtype=f32, grad=True):
        return _t(*shape, dtype=dtype, grad=grad, seed=len(shape) + sum(shape))

    def frozen(*shape, dtype=f32):
        return t(*shape, dtype=dtype, grad=False)

    pos = torch.tensor([0, 1, 2, 0, 1], device=DEVICE)
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32, device=DEVICE)
    wide = t(4, 32)
    cases = {
        "rms_norm f16 x, f32 w": (ops.rms_norm, (t(3, 5, 16, dtype=f16), t(16), 1e-6)),
        "rms_norm f32 x, f16 w": (ops.rms_norm, (t(3, 16), t(16, dtype=f16), 1e-6)),
        "rms_norm f16 x, bf16 w": (ops.rms_norm, (t(4, 16, dtype=f16), t(16, dtype=bf16), 1e-6)),
        "rms_norm 1-D": (ops.rms_norm, (t(16), t(16), 1e-6)),
        "rms_norm zero rows": (ops.rms_norm, (t(2, 0, 16), t(16), 1e-6)),
        "rms_norm strided rows": (ops.rms_norm, (wide[:, :16], t(16), 1e-6)),
        "rms_norm column-major": (ops.rms_norm, (t(16, 4).t(), t(16), 1e-6)),
        "add_rms_norm f16, f32 w": (ops.add_rms_norm, (t(3, 5, 16, dtype=f16), t(3, 5, 16, dtype=f16), t(16),
                                                       1e-6)),
        "add_rms_norm strided": (ops.add_rms_norm, (wide[:, :16], wide[:, 16:], t(16, dtype=f16), 1e-6)),
        "add_rms_norm zero rows": (ops.add_rms_norm, (t(0, 16), t(0, 16), t(16), 1e-6)),
        "rope f16 head slice": (ops.rope, (t(5, 6, 8, dtype=f16)[:, :3], pos.int(), 1e4, False)),
        "rope zero rows": (ops.rope, (t(0, 3, 8), pos[:0], 1e4, False)),
        "swiglu f16 gate, f32 up": (ops.swiglu, (t(4, 6, dtype=f16), t(4, 6))),
        "swiglu 3-D": (ops.swiglu, (t(2, 3, 6), t(2, 3, 6))),
        "swiglu halves of one row": (ops.swiglu, (wide[:, :12], wide[:, 20:])),
        "swiglu zero columns": (ops.swiglu, (t(3, 0), t(3, 0))),
        "qk_norm_rope f16, mixed w": (ops.qk_norm_rope, (t(5, 4, 8, dtype=f16), t(5, 2, 8, dtype=f16), t(8),
                                                         t(8, dtype=f16), pos, 1e-6, 1e4)),
        "qk_norm_rope no heads": (ops.qk_norm_rope, (t(5, 0, 8), t(5, 0, 8), t(8), t(8), pos, 1e-6, 1e4)),
        "varlen_attention": (ops.varlen_attention, (t(9, 4, 16), t(9, 2, 16), t(9, 2, 16), cu, 0.25, True)),
        "varlen_attention f16 non-causal": (ops.varlen_attention, (t(9, 2, 16, dtype=f16), t(9, 2, 16, dtype=f16),
                                                                   t(9, 2, 16, dtype=f16), cu, 0.3, False)),
    }
    # the backward ops (no autograd of their own: frozen inputs), mixed dtypes
    x16, w32 = frozen(6, 16, dtype=f16), frozen(16)
    rstd = ops.rms_norm(x16, w32, 1e-6)[1]
    cases["rms_norm_backward f16 x, f32 w"] = (ops.rms_norm_backward, (frozen(6, 16), x16, w32, rstd))
    _, summed, rstd2 = ops.add_rms_norm(x16, x16 * 2, w32, 1e-6)
    cases["add_rms_norm_backward"] = (ops.add_rms_norm_backward, (frozen(6, 16), frozen(6, 16, dtype=f16), summed,
                                                                  w32, rstd2))
    cases["swiglu_backward mixed"] = (ops.swiglu_backward, (frozen(4, 6), frozen(4, 6, dtype=f16), frozen(4, 6)))
    cases["qk_norm_rope_backward mixed"] = (ops.qk_norm_rope_backward, (
        frozen(5, 4, 8), frozen(5, 2, 8), frozen(5, 4, 8, dtype=f16), frozen(5, 2, 8, dtype=f16), frozen(8),
        frozen(8, dtype=f16), pos, 1e-6, 1e4))
    q, k, v = frozen(9, 4, 16), frozen(9, 2, 16), frozen(9, 2, 16)
    o, lse = ops.varlen_attention(q, k, v, cu, 0.25, True)
    cases["varlen_attention_backward"] = (ops.varlen_attention_backward, (frozen(9, 4, 16), q, k, v, o, lse, cu, 0.25,
                                                                          True))
    return cases


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_custom_ops_pass_opcheck(name):
    """torch.library.opcheck of each case: the schema, the autograd registration, the fake kernel against the real
    one (shapes, dtypes, strides: a fake that drops the dtype promotion fails here, where fp32-only compiles ran
    on), and AOTAutograd with dynamic shapes against eager."""
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                 "test_aot_dispatch_dynamic"))


def _on_device(batch: dict) -> dict:
    """A packed batch (tiny_models.packed) with its tensors on DEVICE."""
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _qwen3_step(model, batch, dy):
    """step(fn): zeroed gradients, hidden = fn(**batch), backward of sum(hidden * dy); [hidden] + the gradients."""
    def step(fn):
        model.zero_grad(set_to_none=True)
        hidden = fn(**batch)
        (hidden * dy).sum().backward()
        return [hidden.detach().clone()] + grads(model)

    return step


def test_qwen3_forward_compiles_fullgraph_and_matches_eager():
    model = tiny_qwen3().to(DEVICE)
    batch = _on_device(packed([5, 1, 9, 3], model.config.vocab_size)[1])
    ops = _graph_ops(lambda b: model(**b), batch)
    assert ops == {"rms_norm", "add_rms_norm", "qk_norm_rope", "swiglu", "varlen_attention"}
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    dy = torch.randn(18, model.config.hidden_size, device=DEVICE, generator=gen)
    step = _qwen3_step(model, batch, dy)
    want = step(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = step(compiled)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()
    # other packings (token counts, lengths, max_seqlen): one recompile with dynamic sizes, then none
    for lengths in ([7, 2, 4], [3, 3, 3, 3, 3], [10, 8]):
        other = _on_device(packed(lengths, model.config.vocab_size, seed=len(lengths))[1])
        with torch.no_grad():
            assert torch.equal(compiled(**other), model(**other))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    # with activation checkpointing (each layer recomputed in the backward): fullgraph too, the same results
    model.gradient_checkpointing_enable()
    torch._dynamo.reset()
    for a, b in zip(step(torch.compile(model, backend="aot_eager", fullgraph=True)), want, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()
    model.gradient_checkpointing_enable(False)


def test_compiled_training_step_runs_the_fused_loss_eagerly():
    model = tiny_qwen3(seed=1).to(DEVICE)
    batch = _on_device(packed([7, 4, 6], model.config.vocab_size, seed=1)[1])
    targets = torch.roll(batch["input_ids"], -1)
    targets[torch.tensor([6, 10, 16])] = -100  # each sequence's last token has no next token

    def step(model, batch, targets):
        hidden = model(**batch)
        ce = kernels.fused_linear_cross_entropy(hidden, model.lm_head.weight, targets)
        lp = kernels.fused_linear_logprobs(hidden.detach(), model.lm_head.weight.detach(), targets)
        adv = torch.linspace(-1, 1, hidden.shape[0], device=hidden.device)
        seq_ids = torch.repeat_interleave(torch.arange(3, device=hidden.device), torch.tensor([7, 4, 6],
                                                                                              device=hidden.device))
        grpo, _, _ = kernels.fused_linear_grpo_loss(hidden, model.lm_head.weight, targets, adv,
                                                    old_logprobs=lp + 0.01, seq_ids=seq_ids)
        return ce + grpo, lp

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss, lp = fn(model, batch, targets)
        loss.backward()
        return [loss.detach(), lp] + grads(model)

    want = run(step)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    got = run(compiled)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()
    # the losses ran eagerly: dynamo broke the graph around each of them, and did not fall over
    expl = torch._dynamo.explain(step)(model, batch, targets)
    assert expl.graph_break_count >= 1


def _gpu_case(seed: int, lengths: list[int], head_dim: int = 16):
    model = tiny_qwen3(seed=seed, head_dim=head_dim, hidden_size=4 * head_dim).to(DEVICE)
    batch = _on_device(packed(lengths, model.config.vocab_size, seed=seed)[1])
    dy = torch.randn(sum(lengths), model.config.hidden_size, device=DEVICE,
                     generator=torch.Generator(DEVICE).manual_seed(seed))
    return model, batch, dy


def _compiled(model, mode: str):
    if mode == "aot_eager":
        return torch.compile(model, backend="aot_eager", fullgraph=True)
    return torch.compile(model, fullgraph=True, mode=None if mode == "inductor" else mode)


def _same(got, want, exact: bool) -> None:
    for a, b in zip(got, want, strict=True):
        if exact:
            assert torch.equal(a, b), (a - b).abs().max()
        elif b.numel():
            assert rel_err(a, b) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["aot_eager", "inductor", "reduce-overhead"])
def test_qwen3_step_compiled_on_gpu(mode):
    """The tiny Qwen3's forward + backward compiled on a GPU, fp32: with aot_eager bit for bit eager's (the same
    kernels, now with the custom ops' device guards and CUDA launches); with inductor, and with its CUDA graphs
    (reduce-overhead: warm-up, record, two replays, each compared, and no graph skipped), within 1e-5 of eager
    (inductor generates the code around the ops)."""
    model, batch, dy = _gpu_case(2, [6, 2, 11, 5])
    step = _qwen3_step(model, batch, dy)
    want = step(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _compiled(model, mode)
    for _ in range(4):
        _same(step(compiled), want, exact=mode == "aot_eager")
    if mode == "reduce-overhead":
        assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0


@pytest.mark.gpu
def test_qwen3_step_compiled_first_with_cuda_graphs():
    """The compiled step's first calls come before any eager call, at a head dim no other test uses, so that the
    kernels' autotuning and every tensor the ops allocate happen inside inductor's CUDA-graph warm-up (a tensor
    kept from there would live in the graph's pool); then a second packing (new token count): replays compared with
    eager's step, which runs last."""
    model, batch, dy = _gpu_case(5, [9, 3, 14], head_dim=48)
    other = _gpu_case(5, [4, 12, 1, 7], head_dim=48)[1:]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _compiled(model, "reduce-overhead")
    got = [[_qwen3_step(model, b, d)(compiled) for _ in range(3)] for b, d in ((batch, dy), other, (batch, dy))]
    want = [_qwen3_step(model, b, d)(model) for b, d in ((batch, dy), other, (batch, dy))]
    for runs, w in zip(got, want, strict=True):
        for g in runs:
            _same(g, w, exact=False)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0


def test_group_advantages_runs_eagerly_under_compile():
    """group_advantages reads values on the host: under torch.compile it runs eagerly (a graph break, and with it
    its device guard), with eager's result."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 2.0], device=DEVICE)
    groups = torch.tensor([3, 3, 7, 7, 7, 3], device=DEVICE)
    fn = lambda r, g: kernels.group_advantages(r * 2, g) + 1  # noqa: E731
    want = fn(rewards, groups)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, backend="aot_eager")(rewards, groups), want)
    assert torch._dynamo.explain(fn)(rewards, groups).graph_break_count == 1


def test_siglip_tower_compiles_fullgraph_and_matches_eager():
    """The vision tower (its attention is varlen_attention, one sequence per tile) compiled fullgraph: eager's
    features and gradients bit for bit (aot_eager)."""
    from r4b.engine.model import SiglipConfig, SiglipVisionModel

    model = randomize(SiglipVisionModel(SiglipConfig.from_hf(siglip_hf_config(layers=2).to_dict())), 3).to(DEVICE)
    px = torch.randn(2, 3, 28, 28, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    assert "varlen_attention" in _graph_ops(model, px)

    def step(fn):
        model.zero_grad(set_to_none=True)
        out = fn(px)
        out.square().sum().backward()
        return [out.detach()] + grads(model)

    want = step(model)
    torch._dynamo.reset()
    for a, b in zip(step(torch.compile(model, backend="aot_eager", fullgraph=True)), want, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()


def test_importing_the_ops_does_not_import_dynamo():
    """The custom ops and the eager-under-compile wrappers are registered without importing torch._dynamo (about a
    second of import time), and an eager call of a wrapped loss does not import it either."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "import r4b.kernels as K\n"
            "before = 'torch._dynamo' in sys.modules\n"
            "h, w = torch.randn(4, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)\n"
            "K.fused_linear_cross_entropy(h, w, torch.tensor([1, 2, -100, 3]), backend='torch').backward()\n"
            "print(before, 'torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "False"], r.stdout
