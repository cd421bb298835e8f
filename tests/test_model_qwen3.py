"""Qwen3 decoder parity with transformers' Qwen3ForCausalLM: packed batch vs each sequence alone, fp32 (logits
and a training step's gradients), and bf16 on a GPU."""

import copy

import pytest
import torch
from tiny_models import packed, qwen3_hf_config, randomize, rel_err

from r4b.engine.model import Qwen3ForCausalLM, from_pretrained, last_rows
from tests._lowprec import assert_within_twice_plain

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory):
    """(transformers model, r4b model loaded from the checkpoint transformers saved)."""
    torch.manual_seed(0)
    ref = randomize(transformers.Qwen3ForCausalLM(qwen3_hf_config(tie=request.param)).eval())
    if request.param:
        assert ref.lm_head.weight is ref.model.embed_tokens.weight
    path = tmp_path_factory.mktemp("qwen3")
    ref.save_pretrained(path)
    return ref, from_pretrained(path)


def test_packed_logits_match_transformers_per_sequence(pair):
    ref, model = pair
    assert isinstance(model, Qwen3ForCausalLM)
    assert model.config.tie_word_embeddings == ref.config.tie_word_embeddings
    seqs, batch = packed([5, 1, 9, 3], ref.config.vocab_size)
    with torch.no_grad():
        hidden = model(**batch)
        assert hidden.shape == (18, 64)
        logits = model.compute_logits(hidden)
        want = torch.cat([ref(input_ids=s[None]).logits[0] for s in seqs])
    assert rel_err(logits, want) <= 1e-5


def _hf_ce_step(model, seqs, targets, lengths, names, device="cpu"):
    """transformers run per sequence: (logits (T, V) float, gradients of ``names``) of the summed cross-entropy."""
    model.zero_grad(set_to_none=True)
    logits = [model(input_ids=s[None].to(device)).logits[0] for s in seqs]
    loss = sum(torch.nn.functional.cross_entropy(lg.float(), t.to(device), ignore_index=-100, reduction="sum")
               for lg, t in zip(logits, targets.split(lengths), strict=True))
    loss.backward()
    params = dict(model.named_parameters())
    return [torch.cat(logits).detach().float()] + [params[n].grad.float() for n in names]


def _r4b_ce_step(model, batch, targets, names, device="cpu"):
    """r4b on the packed row with the fused cross-entropy: (logits, gradients of ``names``)."""
    from r4b.kernels import fused_linear_cross_entropy

    model.zero_grad(set_to_none=True)
    hidden = model(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
    loss = fused_linear_cross_entropy(hidden, model.lm_head.weight, targets.to(device), reduction="sum")
    loss.backward()
    params = dict(model.named_parameters())
    return [model.compute_logits(hidden).detach().float()] + [params[n].grad.float() for n in names]


def _next_tokens(seqs):
    return torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs])  # none after a sequence's end


def test_packed_training_step_gradients_match_transformers(pair):
    """A training step through r4b's kernels (packed varlen attention, rms_norm, rope, swiglu backward, fused
    cross-entropy) gives the weight gradients transformers (float64, one sequence at a time) gives."""
    ref, model = pair
    lengths = [5, 1, 9, 3]
    seqs, batch = packed(lengths, ref.config.vocab_size, seed=2)
    targets = _next_tokens(seqs)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_norm.weight",
             "model.layers.1.mlp.gate_proj.weight", "model.norm.weight", "model.embed_tokens.weight"]
    if not ref.config.tie_word_embeddings:
        names.append("lm_head.weight")
    want = _hf_ce_step(copy.deepcopy(ref).double(), seqs, targets, lengths, names)
    ours = _r4b_ce_step(model, batch, targets, names)
    for name, o, w in zip(("logits", *names), ours, want, strict=True):
        assert rel_err(o, w) <= 1e-5, (name, rel_err(o, w))


def test_compute_logits_rows_selects_last_tokens(pair):
    _, model = pair
    _, batch = packed([4, 2, 7], model.config.vocab_size, seed=1)
    with torch.no_grad():
        hidden = model(**batch)
        rows = last_rows(batch["cu_seqlens"])
        assert rows.tolist() == [3, 5, 12]
        torch.testing.assert_close(model.compute_logits(hidden, rows), model.compute_logits(hidden)[rows])


def test_last_rows_refuses_empty_sequences():
    with pytest.raises(ValueError, match="non-empty"):
        last_rows(torch.tensor([0, 0, 3], dtype=torch.int32))


def test_tied_head_shares_storage(pair):
    ref, model = pair
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == ref.config.tie_word_embeddings


def test_norm_with_residual_promotes_mixed_dtypes_as_the_add_would():
    """The decoder's fused add + norm gets a layer's output and the residual stream; with different dtypes (bf16
    outputs onto fp32 embeddings) they are promoted as ``x + residual`` promotes them, not refused."""
    from r4b.engine.model.qwen3 import RMSNorm

    norm = RMSNorm(16, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, r = torch.randn(5, 16).bfloat16(), torch.randn(5, 16)
    y, s = norm(x, r)
    assert s.dtype == torch.float32 and torch.equal(s, x + r)
    assert torch.equal(y, norm(x + r))


def test_bad_packed_inputs_raise(pair):
    _, model = pair
    _, batch = packed([3, 2], model.config.vocab_size)
    with pytest.raises(ValueError, match="input_ids"):
        model(**{**batch, "input_ids": batch["input_ids"].int()})
    with pytest.raises(ValueError, match="position_ids"):
        model(**{**batch, "position_ids": batch["position_ids"][:-1]})
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(**{**batch, "cu_seqlens": batch["cu_seqlens"].long()})


@pytest.mark.gpu
@pytest.mark.timeout(240)  # its first call autotunes every kernel at its shapes (over 60 s on an H200, 2026-11-27)
def test_gpu_bf16_packed_training_step_within_twice_torch_bf16_error(tmp_path):
    """On a GPU the model runs r4b's kernels by default (Triton varlen attention, rms_norm, rope, swiglu; on Hopper
    the backward's dK/dV in Gluon) and the loss is the fused cross-entropy: in bf16, at head_dim 128 and GQA 2, on
    one packed row, the logits and the gradients of a few weights are judged by STYLE.md's rule against
    transformers in fp32 run per sequence (transformers in bf16 gives the plain low-precision error)."""
    from r4b.kernels import available_backends

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert "triton" in available_backends("varlen_attention", "cuda")
    cfg = transformers.Qwen3Config(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-6,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                   max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = randomize(transformers.Qwen3ForCausalLM(cfg).eval())
    ref.save_pretrained(tmp_path)
    lengths = [300, 1, 77, 640, 129]
    seqs, batch = packed(lengths, cfg.vocab_size, seed=3)
    targets = _next_tokens(seqs)
    names = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight")
    want = _hf_ce_step(ref.cuda().float(), seqs, targets, lengths, names, "cuda")
    plain = _hf_ce_step(ref.cuda().to(torch.bfloat16), seqs, targets, lengths, names, "cuda")
    model = from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda").train()
    ours = _r4b_ce_step(model, batch, targets, names, "cuda")
    assert_within_twice_plain(ours, plain, want, ("logits", *names), atol_rel=1e-3)
