"""Activation checkpointing of the models (``gradient_checkpointing_enable()``): the same outputs and gradients as
without it, bit for bit (the recomputed forward runs the same kernels), and far fewer bytes kept for the backward."""

from __future__ import annotations

import pytest
import torch
from tiny_models import grads, packed, randomize, siglip_hf_config, tiny_qwen3

from r4b.engine.model import SiglipConfig, SiglipVisionModel

pytest.importorskip("transformers")


def _saved_bytes(fn) -> tuple[object, int]:
    """fn()'s result and the bytes of the tensors autograd saved for the backward while it ran (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _step(model, fn, grad_of):
    model.zero_grad(set_to_none=True)
    for t in grad_of:
        t.grad = None
    out, saved = _saved_bytes(fn)
    out.square().sum().backward()
    return [out.detach()] + grads(model) + [t.grad.clone() for t in grad_of], saved


def test_qwen3_checkpointing_same_gradients_fewer_saved_bytes():
    # 4 layers: what checkpointing keeps per layer (its inputs) shrinks against what a layer saves
    model = tiny_qwen3(seed=4, num_hidden_layers=4)
    _, batch = packed([7, 1, 12, 4], model.config.vocab_size, seed=2)
    emb = model.embed(batch["input_ids"]).detach().requires_grad_(True)

    def fn():
        return model.model(emb, batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"])

    want, full = _step(model, fn, (emb,))
    model.gradient_checkpointing_enable()
    got, kept = _step(model, fn, (emb,))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()
    assert kept * 3 < full, (kept, full)
    with torch.no_grad():  # no gradients recorded: nothing to recompute, the plain forward
        assert torch.equal(fn(), want[0])
    model.gradient_checkpointing_enable(False)
    assert _step(model, fn, (emb,))[1] == full


def test_siglip_checkpointing_same_gradients_fewer_saved_bytes():
    model = randomize(SiglipVisionModel(SiglipConfig.from_hf(siglip_hf_config(layers=4).to_dict())), 6)
    px = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    want, full = _step(model, lambda: model(px), (px,))
    model.gradient_checkpointing = True
    got, kept = _step(model, lambda: model(px), (px,))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()
    assert kept * 2 < full, (kept, full)
