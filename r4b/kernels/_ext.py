"""Loading of the compiled extension r4b._C and the fake (meta) kernels of its ops for torch.compile tracing."""

from __future__ import annotations

import functools

import torch


@functools.cache
def load():
    """r4b._C (importing it registers torch.ops.r4b.*), or None when the extension is not built."""
    try:
        from r4b import _C
    except ImportError:
        return None
    _register_fakes()
    return _C


def _register_fakes() -> None:
    @torch.library.register_fake("r4b::group_advantages")
    def _(rewards, group_ids, scale="group", eps=1e-6):
        return torch.empty_like(rewards, dtype=torch.float32)

    @torch.library.register_fake("r4b::pack")
    def _(seqs):
        total = sum(s.shape[0] for s in seqs)
        flat = seqs[0].new_empty((total, *seqs[0].shape[1:]))
        cu = seqs[0].new_empty((len(seqs) + 1,), dtype=torch.int32)
        pos = seqs[0].new_empty((total,), dtype=torch.int64)
        sid = seqs[0].new_empty((total,), dtype=torch.int32)
        return flat, cu, pos, sid

    @torch.library.register_fake("r4b::unpack_padded")
    def _(flat, cu_seqlens, max_seqlen, pad_value=0):
        return flat.new_empty((cu_seqlens.shape[0] - 1, max_seqlen, *flat.shape[1:]))

    @torch.library.register_fake("r4b::store_kv")
    def _(k, v, k_cache, v_cache, slot_mapping):
        return None  # writes k_cache and v_cache in place

    @torch.library.register_fake("r4b::paged_decode_attention")
    def _(q, k_cache, v_cache, block_tables, context_lens, softmax_scale, num_splits):
        return q.new_empty(q.shape)  # contiguous, q's dtype
