"""SigLIP / SigLIP2 (fixed resolution) vision transformer: patch embedding, learned positions, bidirectional
encoder layers, optional post layernorm. Tiles are packed into one (N*P, E) batch and attended per tile
with r4b.kernels.varlen_attention(causal=False). Parameter names follow the Hugging Face checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from r4b import kernels

from .config import SiglipConfig


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.image_size = cfg.image_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.grid * cfg.grid, cfg.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values (N, C, S, S) -> patch embeddings plus positions (N, P, E), P = (S / patch)^2."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, E, g, g)
        x = x.flatten(2).transpose(1, 2)  # (N, P, E)
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        e = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, e // cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, e)
        self.out_proj = nn.Linear(e, e)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)  # (T, H, D)
        k = self.k_proj(x).view(T, self.num_heads, self.head_dim)  # (T, H, D)
        v = self.v_proj(x).view(T, self.num_heads, self.head_dim)  # (T, H, D)
        o = kernels.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=False)  # (T, H, D)
        return self.out_proj(o.reshape(T, -1))  # (T, E)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.approximate = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class SiglipVisionModel(nn.Module):
    """The vision tower. ``post_layernorm=False`` builds it without the final norm (LLaVA-style feature
    extraction never uses it). ``gradient_checkpointing``: as Qwen3Model's, per encoder layer."""

    def __init__(self, cfg: SiglipConfig, *, post_layernorm: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if post_layernorm else None

    def _check(self, pixel_values: Tensor) -> None:
        s, c = self.config.image_size, self.config.num_channels
        ok = isinstance(pixel_values, Tensor) and pixel_values.dim() == 4
        if not ok or tuple(pixel_values.shape[1:]) != (c, s, s):
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be (N, {c}, {s}, {s}), got {got}")

    def hidden_states(self, pixel_values: Tensor, layers: list[int]) -> list[Tensor]:
        """The hidden states after the given layers, each (N, P, E): index 0 is the embeddings, i the output of
        encoder layer i, negative indices count from the end (-1 = last layer), as in transformers'
        ``hidden_states``. Only the layers up to the deepest one asked for are run."""
        self._check(pixel_values)
        n_layers = len(self.encoder.layers)
        want = [i % (n_layers + 1) for i in layers]
        x = self.embeddings(pixel_values)  # (N, P, E)
        N, P, E = x.shape
        cu = torch.arange(0, (N + 1) * P, P, dtype=torch.int32, device=x.device)  # one sequence per tile
        h = x.reshape(N * P, E)  # (N*P, E)
        out = {0: h}
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(self.encoder.layers[: max(want)], start=1):
            h = checkpoint(layer, h, cu, P, use_reentrant=False) if recompute else layer(h, cu, P)
            out[i] = h
        return [out[i].view(N, P, E) for i in want]  # (N, P, E) each

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values (N, C, S, S) -> last hidden state (N, P, E), after post_layernorm when built with it."""
        (h,) = self.hidden_states(pixel_values, [-1])
        return self.post_layernorm(h) if self.post_layernorm is not None else h
