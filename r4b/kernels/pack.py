"""pack / unpack: variable-length sequences <-> one packed buffer with cu_seqlens (the packed-batch contract).

Owns the torch reference and the public functions; the C++ CPU and CUDA kernels (gather into the packed buffer,
scatter into padded rows) live in csrc/cpu/pack.cpp and csrc/cuda/pack.cu (torch.ops.r4b.pack / unpack_padded).
``unpack`` returns views of the packed buffer (a split costs nothing, so it has no kernel).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _checks, _dispatch

_dispatch.register("pack", ("cuda", "cpp", "torch"))
_dispatch.register("unpack_padded", ("cuda", "cpp", "torch"))


@dataclass
class Packed:
    """A packed batch: ``flat`` (T, ...) holds the n sequences back to back.

    cu_seqlens: (n+1,) int32 = 0, len0, len0+len1, ..., T; position_ids: (T,) int64, restarting at 0 in every
    sequence; seq_ids: (T,) int32, the sequence of each row; max_seqlen: the longest length (a host int).
    """

    flat: Tensor
    cu_seqlens: Tensor
    position_ids: Tensor
    seq_ids: Tensor
    max_seqlen: int

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    def lengths(self) -> Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]


def pack_ref(seqs: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Torch reference: (flat, cu_seqlens int32, position_ids int64, seq_ids int32)."""
    dev = seqs[0].device
    lengths = torch.tensor([s.shape[0] for s in seqs], dtype=torch.int64, device=dev)
    flat = torch.cat(list(seqs), 0)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(lengths, 0)
    seq_ids = torch.repeat_interleave(torch.arange(len(seqs), dtype=torch.int32, device=dev), lengths)
    starts = torch.repeat_interleave(cu[:-1].to(torch.int64), lengths)
    position_ids = torch.arange(flat.shape[0], dtype=torch.int64, device=dev) - starts
    return flat, cu, position_ids, seq_ids


def _check_seqs(seqs) -> None:
    if isinstance(seqs, Tensor) or not isinstance(seqs, Sequence):
        raise TypeError(f"seqs must be a list or tuple of tensors, got {type(seqs).__name__}")
    if len(seqs) == 0:
        raise ValueError("seqs must hold at least one sequence, got an empty list")
    first = seqs[0]
    for i, s in enumerate(seqs):
        if not isinstance(s, Tensor):
            raise TypeError(f"seqs[{i}] must be a torch.Tensor, got {type(s).__name__}")
        if s.dim() == 0:
            raise ValueError(f"seqs[{i}] must have at least one dimension, got a scalar")
        if s.shape[0] == 0:
            raise ValueError(f"seqs[{i}] is empty (length 0); every sequence needs at least one token")
        if s.dtype != first.dtype:
            raise TypeError(f"seqs[{i}] has dtype={s.dtype} but seqs[0] has dtype={first.dtype}")
        if s.device != first.device:
            raise ValueError(f"seqs[{i}] is on {s.device} but seqs[0] is on {first.device}")
        if s.shape[1:] != first.shape[1:]:
            raise ValueError(f"seqs[{i}] has shape={tuple(s.shape)}; its trailing dimensions must match seqs[0]'s "
                             f"{tuple(first.shape)}")


def pack_sequences(seqs: Sequence[Tensor], *, backend: str | None = None) -> Packed:
    """Pack sequences along dim 0.

    seqs: a non-empty list of tensors (L_i, ...) with L_i >= 1, one dtype, one device, equal trailing dims.
    Returns a :class:`Packed` whose ``flat`` is (sum L_i, ...). Runs without a host synchronisation (the lengths
    are shapes).
    """
    _check_seqs(seqs)
    total = sum(s.shape[0] for s in seqs)
    if total >= 2**31:
        raise ValueError(f"the packed length {total} does not fit cu_seqlens' int32")
    max_seqlen = max(s.shape[0] for s in seqs)
    b = _dispatch.pick("pack", backend, seqs[0])
    if b in ("cuda", "cpp"):
        flat, cu, pos, sid = torch.ops.r4b.pack(list(seqs))
    else:
        flat, cu, pos, sid = pack_ref(seqs)
    return Packed(flat, cu, pos, sid, max_seqlen)


def unpack(flat: Tensor, cu_seqlens: Tensor) -> list[Tensor]:
    """Split a packed buffer back into its sequences (views of ``flat``, no copy).

    flat: (T, ...); cu_seqlens: (n+1,) int32 on any device (read on the host).
    """
    _checks.tensor("flat", flat)
    if flat.dim() == 0:
        raise ValueError("flat must have at least one dimension, got a scalar")
    _checks.cu_seqlens("cu_seqlens", cu_seqlens, total=flat.shape[0], values=True)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return list(torch.split(flat, lengths, 0))


def unpack_padded_ref(flat: Tensor, cu_seqlens: Tensor, max_seqlen: int, pad_value: float | int = 0) -> Tensor:
    n = cu_seqlens.numel() - 1
    out = flat.new_full((n, max_seqlen, *flat.shape[1:]), pad_value)
    for i, (s, e) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)):
        length = min(e - s, max_seqlen)
        out[i, :length] = flat[s : s + length]
    return out


def unpack_padded(
    flat: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int | None = None,
    pad_value: float | int = 0,
    *,
    backend: str | None = None,
) -> Tensor:
    """Scatter a packed buffer into padded rows.

    flat: (T, ...); cu_seqlens: (n+1,) int32 on flat's device; max_seqlen: the row width (default: the longest
    sequence; longer sequences are cut to it). Returns (n, max_seqlen, ...) filled with ``pad_value`` past each
    sequence's end.
    """
    _checks.tensor("flat", flat)
    if flat.dim() == 0:
        raise ValueError("flat must have at least one dimension, got a scalar")
    _checks.same_device(flat=flat, cu_seqlens=cu_seqlens)
    _checks.cu_seqlens("cu_seqlens", cu_seqlens, total=flat.shape[0], values=True)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    b = _dispatch.pick("unpack_padded", backend, flat)
    if b in ("cuda", "cpp"):
        return torch.ops.r4b.unpack_padded(flat, cu_seqlens, int(max_seqlen), pad_value)
    return unpack_padded_ref(flat, cu_seqlens, int(max_seqlen), pad_value)
