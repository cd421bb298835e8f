"""r4b.kernels: one file per op (reference -> Triton/CUDA kernels -> public function with backend=None).

Dispatch order and the R4B_BACKEND override are described in r4b/kernels/_dispatch.py.
"""

from ._dispatch import available_backends, registered_ops
from .add_rms_norm import add_rms_norm, add_rms_norm_ref
from .fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_ref
from .fused_linear_grpo_loss import fused_linear_grpo_loss, fused_linear_grpo_loss_ref
from .fused_linear_logprobs import fused_linear_logprobs, fused_linear_logprobs_ref
from .group_advantages import group_advantages, group_advantages_ref
from .pack import Packed, pack_sequences, unpack, unpack_padded
from .paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from .paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from .qk_norm_rope import qk_norm_rope, qk_norm_rope_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rope import rope, rope_ref
from .store_kv import store_kv, store_kv_ref
from .swiglu import swiglu, swiglu_ref
from .varlen_attention import varlen_attention, varlen_attention_ref

__all__ = [
    "Packed",
    "add_rms_norm",
    "add_rms_norm_ref",
    "available_backends",
    "group_advantages",
    "group_advantages_ref",
    "pack_sequences",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
    "unpack",
    "unpack_padded",
    "registered_ops",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "fused_linear_grpo_loss",
    "fused_linear_grpo_loss_ref",
    "fused_linear_logprobs",
    "fused_linear_logprobs_ref",
    "qk_norm_rope",
    "qk_norm_rope_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope",
    "rope_ref",
    "store_kv",
    "store_kv_ref",
    "swiglu",
    "swiglu_ref",
    "varlen_attention",
    "varlen_attention_ref",
]
