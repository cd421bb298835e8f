"""Tiny transformers reference models with random weights, shared by the model / weights tests."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

IMAGE_TOKEN = 96
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84], [84, 28], [56, 84], [84, 56], [112, 112]]
MEAN = STD = (0.5, 0.5, 0.5)


class RefR4BProjector(nn.Module):
    """R-4B's projector, written against transformers' config object (stands in for LLaVA-OneVision's)."""

    def __init__(self, config):
        super().__init__()
        layers = config.vision_feature_layer
        n = 1 if isinstance(layers, int) else len(layers)
        v, t = config.vision_config.hidden_size * n, config.text_config.hidden_size
        self.pre_norm = nn.LayerNorm(v, eps=1e-6)
        self.linear_1 = nn.Linear(v, t, bias=True)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(t, t, bias=True)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(self.pre_norm(x))))


def hf_llava_config(tie: bool = False, feature_layer: int | list[int] = -1):
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        text_config=qwen3_hf_config(tie=tie).to_dict(), vision_config=siglip_hf_config().to_dict(),
        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS, vision_feature_layer=feature_layer,
        vision_feature_select_strategy="full", tie_word_embeddings=tie)


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


def tiny_qwen3(tie: bool = False, seed: int = 0, **config):
    """r4b's Qwen3ForCausalLM at qwen3_hf_config's size (``config``: config.json fields to change), random weights."""
    from r4b.engine.model import Qwen3Config, Qwen3ForCausalLM

    return randomize(Qwen3ForCausalLM(Qwen3Config.from_hf({**qwen3_hf_config(tie).to_dict(), **config})), seed)


def grads(model: nn.Module) -> list[Tensor]:
    """Every parameter's gradient, cloned (an empty tensor for one the loss does not reach, e.g. the hidden-state
    forward's lm_head)."""
    return [p.grad.clone() if p.grad is not None else torch.empty(0) for p in model.parameters()]


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


def image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def prompt(n_image_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 90, (7,), generator=g)
    return torch.cat([text[:3], torch.full((n_image_tokens,), IMAGE_TOKEN), text[3:]])


@pytest.fixture
def torch_kernels_on_cpu(monkeypatch):
    """Without a GPU, run r4b.kernels' torch backends: the Triton interpreter makes the multimodal forwards
    (hundreds of tokens) take minutes. Each kernel is checked against its reference in its own tests, and the
    Qwen3 / SigLIP parity tests keep the default dispatch, so the Triton path still meets transformers there."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("R4B_BACKEND", "torch")
