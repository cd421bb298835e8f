"""Qwen3 decoder on packed variable-length batches (the R-4B language model).

Owns the modules; every op with its own maths (RMSNorm, RoPE, SwiGLU, attention) is called from r4b.kernels.
Parameter names follow the Hugging Face checkpoint (``model.layers.N.self_attn.q_proj.weight``, ...), so a
state dict maps one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from r4b import kernels

from .config import Qwen3Config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """rms_norm(x); with a residual, (rms_norm(x + residual), x + residual) from one fused op."""
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        if x.dtype != residual.dtype:  # as x + residual would promote (e.g. bf16 outputs onto fp32 embeddings)
            dt = torch.promote_types(x.dtype, residual.dtype)
            x, residual = x.to(dt), residual.to(dt)
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


@dataclass
class PagedKV:
    """One inference step's view of the paged KV cache (r4b.engine.llm builds it; see docs/DESIGN.md).

    Every attention layer first writes the step's keys and values into its caches (``store_kv`` at
    ``slot_mapping``), then attends:
    - ``block_tables`` None (a prefill of sequences with nothing cached yet): each packed sequence attends to
      itself (``varlen_attention`` over cu_seqlens);
    - ``block_tables`` per row (a decode step: one row per sequence): row t attends through the cache
      (``paged_decode_attention``) to its sequence's blocks ``block_tables[t]`` up to ``context_lens[t]`` (its
      position + 1), the token this step wrote included;
    - ``seq_block_tables`` per sequence (an extend step: chunks that follow a cached context, e.g. a long
      prompt's later chunks or the mode suffix after a shared prompt): each packed sequence's rows attend causally
      to its whole cached context, ``seq_context_lens`` tokens with the chunk at the end
      (``paged_prefill_attention``).
    """

    k_caches: list[Tensor]  # per layer (num_blocks, block_size, Hkv, D)
    v_caches: list[Tensor]
    slot_mapping: Tensor  # (T,) int64: cache slot of each row's key/value (-1: not stored)
    block_tables: Tensor | None = None  # (T, max_blocks) int32
    context_lens: Tensor | None = None  # (T,) int32
    seq_block_tables: Tensor | None = None  # (n, max_blocks) int32
    seq_context_lens: Tensor | None = None  # (n,) int32


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def qkv(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projected, q/k-normed and rotated q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, D); the inference runtime
        uses this to write its KV cache."""
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        # q_norm, k_norm and RoPE in one fused op (one kernel each way on the Triton backend)
        q, k = kernels.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, position_ids, self.q_norm.eps,
                                    self.rope_theta)
        return q, k, v

    def forward(self, x: Tensor, position_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                kv: PagedKV | None = None) -> Tensor:
        q, k, v = self.qkv(x, position_ids)
        if kv is None:
            o = kernels.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True)  # (T, Hq, D)
        else:
            k_cache, v_cache = kv.k_caches[self.layer_idx], kv.v_caches[self.layer_idx]
            kernels.store_kv(k, v, k_cache, v_cache, kv.slot_mapping)
            if kv.block_tables is not None:
                o = kernels.paged_decode_attention(q, k_cache, v_cache, kv.block_tables, kv.context_lens,
                                                   softmax_scale=self.head_dim**-0.5)
            elif kv.seq_block_tables is not None:
                o = kernels.paged_prefill_attention(q, k_cache, v_cache, kv.seq_block_tables, cu_seqlens,
                                                    kv.seq_context_lens, max_seqlen,
                                                    softmax_scale=self.head_dim**-0.5)
            else:
                o = kernels.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True)
        return self.o_proj(o.reshape(x.shape[0], self.num_heads * self.head_dim))  # (T, Hq*D) -> (T, H)


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_idx: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(self, x: Tensor, position_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                residual: Tensor | None = None, kv: PagedKV | None = None) -> tuple[Tensor, Tensor]:
        """The layer's output as the pair (mlp_out, residual), whose sum is the hidden state after the layer (the
        next norm adds them in its fused op, add_rms_norm). residual None: x is the hidden state itself (the first
        layer's embeddings); else the hidden state is x + residual (the previous layer's pair)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, position_ids, cu_seqlens, max_seqlen, kv),
                                                    residual)
        return self.mlp(h), residual


def check_packed(input_len: int, position_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> None:
    """Validate the packed-batch fields that travel with input_ids / inputs_embeds of ``input_len`` rows."""
    if not isinstance(position_ids, Tensor) or position_ids.shape != (input_len,):
        got = tuple(position_ids.shape) if isinstance(position_ids, Tensor) else type(position_ids).__name__
        raise ValueError(f"position_ids must be a ({input_len},) tensor like input_ids, got {got}")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        got = (cu_seqlens.dtype, tuple(cu_seqlens.shape)) if isinstance(cu_seqlens, Tensor) else type(cu_seqlens)
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {got}")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be an int >= 0, got {max_seqlen!r}")


class Qwen3Model(nn.Module):
    """Embeddings, decoder layers and the final norm: tokens (or embeddings) in, hidden states out.

    ``gradient_checkpointing`` (False; set by ``gradient_checkpointing_enable()`` of the top-level models): while
    gradients are recorded, each decoder layer keeps only its inputs and runs its forward again in the backward
    (torch.utils.checkpoint, non-reentrant), so a long packed row's activations are one layer's, not all layers'."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                kv: PagedKV | None = None) -> Tensor:
        """inputs_embeds: (T, H); returns hidden states (T, H) after the final norm. ``kv``: the inference
        engine's paged KV cache for this step (see :class:`PagedKV`); None for training and plain forwards."""
        h, residual = inputs_embeds, None
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and kv is None
        for layer in self.layers:
            if recompute:
                h, residual = checkpoint(layer, h, position_ids, cu_seqlens, max_seqlen, residual, use_reentrant=False)
            else:
                h, residual = layer(h, position_ids, cu_seqlens, max_seqlen, residual, kv)
        return self.norm(h) if residual is None else self.norm(h, residual)[0]


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 with an LM head (tied to the embeddings when the config says so)."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        """Recompute each decoder layer's forward in the backward instead of keeping its activations (see
        Qwen3Model); ``False`` turns it off."""
        self.model.gradient_checkpointing = bool(enabled)

    @property
    def language_model(self) -> Qwen3Model:
        """The decoder stack (same attribute on R4BForConditionalGeneration, for the runtime)."""
        return self.model

    def embed(self, input_ids: Tensor) -> Tensor:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 1 or input_ids.dtype != torch.int64:
            got = (input_ids.dtype, tuple(input_ids.shape)) if isinstance(input_ids, Tensor) else type(input_ids)
            raise ValueError(f"input_ids must be a 1-D int64 tensor (T,), got {got}")
        return self.model.embed_tokens(input_ids)  # (T, H)

    def forward(self, input_ids: Tensor, position_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """Packed batch in (see DESIGN.md): input_ids (T,) int64, position_ids (T,), cu_seqlens (n+1,) int32,
        max_seqlen int. Returns hidden states (T, H); logits come from :meth:`compute_logits`."""
        x = self.embed(input_ids)
        check_packed(x.shape[0], position_ids, cu_seqlens, max_seqlen)
        return self.model(x, position_ids, cu_seqlens, max_seqlen)

    def compute_logits(self, hidden: Tensor, rows: Tensor | list[int] | None = None) -> Tensor:
        """Logits (R, V) for the chosen rows of hidden (T, H) (all rows when ``rows`` is None)."""
        if rows is not None:
            hidden = hidden[rows]
        return self.lm_head(hidden)


def last_rows(cu_seqlens: Tensor) -> Tensor:
    """Index of each sequence's last token in a packed batch: cu_seqlens[1:] - 1 (int64). Every sequence must
    hold a token (an empty one has no last row; checked when cu_seqlens is on the CPU)."""
    if cu_seqlens.device.type == "cpu" and cu_seqlens.numel() > 1 and bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
        raise ValueError(f"last_rows needs every sequence non-empty, got cu_seqlens={cu_seqlens.tolist()}")
    return cu_seqlens[1:].long() - 1
