"""Tiny transformers reference models with random weights, shared by the model / weights tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values of a healthy scale (norm weights around 1, so they matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in**0.5)
            else:
                p.copy_(0.1 * noise)
    return model


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| (b is the reference)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def qwen3_hf_config(tie: bool, vocab: int = 97):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       max_position_embeddings=256, tie_word_embeddings=tie)


def siglip_hf_config(image_size: int = 28, layers: int = 2):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=2,
                              image_size=image_size, patch_size=7, vision_use_head=False)


def packed(lengths: list[int], vocab: int, seed: int = 0) -> tuple[list[Tensor], dict]:
    """Random sequences and their packed batch (input_ids, position_ids, cu_seqlens, max_seqlen)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    batch = dict(input_ids=torch.cat(seqs), position_ids=torch.cat([torch.arange(n) for n in lengths]),
                 cu_seqlens=cu, max_seqlen=max(lengths))
    return seqs, batch
