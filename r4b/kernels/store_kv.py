"""store_kv: write a step's keys and values into the paged KV cache (in place).

Owns the torch reference, the Triton kernel and the public function; the C++ CPU and CUDA kernels live in
csrc/cpu/paged_kv.cpp and csrc/cuda/paged_kv.cu (torch.ops.r4b.store_kv).

The cache layout (the inference engine's, docs/DESIGN.md): k_cache and v_cache are (num_blocks, block_size,
Hkv, D); token t of the step goes to slot ``slot_mapping[t]`` = block * block_size + offset in block, and a slot
of -1 skips the token (padding, or a prefix whose KV is already cached).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _dispatch

OP = "store_kv"
_dispatch.register(OP, ("cuda", "triton", "cpp", "torch"))


def store_kv_ref(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Torch reference: k_cache.view(-1, Hkv, D)[slot] = k[t] for every t with slot_mapping[t] >= 0."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    kc = k_cache.view(-1, *k_cache.shape[2:])
    vc = v_cache.view(-1, *v_cache.shape[2:])
    kc[slots] = k[keep].to(k_cache.dtype)
    vc[slots] = v[keep].to(v_cache.dtype)


_kernel = None


def _triton_kernel():
    """Build the Triton kernel on first use (triton is optional)."""
    global _kernel
    if _kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def store_kv_kernel(K, V, KC, VC, SLOT, num_slots, stride_kt, stride_kh, stride_vt, stride_vh,
                            HD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
            # one program: BLOCK elements of token t's Hkv * D keys and values (the cache's slot row, contiguous)
            t = tl.program_id(0)
            i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            slot = tl.load(SLOT + t)
            # a slot outside [0, num_slots) is skipped: -1 by contract; any other is never written out of bounds
            # (the public function rejects them when slot_mapping is on the CPU)
            m = (i < HD) & (slot >= 0) & (slot < num_slots)
            h = i // D
            d = i % D
            t64 = t.to(tl.int64)
            kk = tl.load(K + t64 * stride_kt + h * stride_kh + d, mask=m)
            vv = tl.load(V + t64 * stride_vt + h * stride_vh + d, mask=m)
            row = slot.to(tl.int64) * HD
            tl.store(KC + row + i, kk.to(KC.dtype.element_ty), mask=m)
            tl.store(VC + row + i, vv.to(VC.dtype.element_ty), mask=m)

        _kernel = store_kv_kernel
    return _kernel


def _block(hd: int) -> int:
    return min(1024, 1 << max(0, (hd - 1).bit_length()))


def _store_kv_triton(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    T, Hkv, D = k.shape
    hd = Hkv * D
    block = _block(hd)
    _triton_kernel()[(T, -(-hd // block))](
        k, v, k_cache, v_cache, slot_mapping, k_cache.shape[0] * k_cache.shape[1], k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), HD=hd, D=D, BLOCK=block)


def check_cache(name: str, cache: Tensor) -> Tensor:
    """A (num_blocks, block_size, Hkv, D) contiguous float cache (written in place, so never copied)."""
    _checks.tensor(name, cache, dtypes=_checks.FLOAT_DTYPES, ndim=4, contiguous=True)
    if min(cache.shape) < 1:
        raise ValueError(f"{name} must be (num_blocks, block_size, Hkv, D) with every size >= 1, "
                         f"got shape={tuple(cache.shape)}")
    return cache


def check_caches(k_cache: Tensor, v_cache: Tensor) -> None:
    check_cache("k_cache", k_cache)
    check_cache("v_cache", v_cache)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache must match k_cache, got k_cache {tuple(k_cache.shape)} {k_cache.dtype} and "
                         f"v_cache {tuple(v_cache.shape)} {v_cache.dtype}")


@_dispatch.on_tensor_device
def store_kv(
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Write keys and values into the paged KV cache, in place.

    k, v: (T, Hkv, D), any strides with a unit last stride (a view of a fused qkv projection works), the caches'
    dtype; k_cache, v_cache: (num_blocks, block_size, Hkv, D), contiguous; slot_mapping: (T,) int64 (int32
    accepted), token t goes to slot slot_mapping[t] = block * block_size + offset, and -1 skips it. Every slot
    must be -1 or in [0, num_blocks * block_size): checked when slot_mapping is on the CPU (a GPU call does not
    synchronise to read it; its kernels skip a slot out of range rather than write outside the cache).
    Two tokens writing one slot leave either one's values there. Returns None.
    backend: None (auto: cuda > triton > cpp > torch), or one of them (r4b/kernels/_dispatch.py).
    """
    check_caches(k_cache, v_cache)
    _checks.tensor("k", k, dtypes=(k_cache.dtype,), ndim=3)
    _checks.tensor("v", v, dtypes=(k_cache.dtype,), ndim=3)
    _checks.tensor("slot_mapping", slot_mapping, dtypes=(torch.int64, torch.int32), ndim=1)
    _checks.same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    if k.shape != v.shape or tuple(k.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(f"k and v must be (T, Hkv, D) with the caches' (Hkv, D) = {tuple(k_cache.shape[2:])}, "
                         f"got k={tuple(k.shape)} v={tuple(v.shape)}")
    _checks.same_len(k.shape[0], "k", slot_mapping=slot_mapping)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if slot_mapping.device.type == "cpu" and slot_mapping.numel() and not torch.compiler.is_compiling():
        bad = (slot_mapping < -1) | (slot_mapping >= num_slots)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"slot_mapping values must be -1 or in [0, {num_slots}) (num_blocks * block_size), "
                             f"got slot_mapping[{i}]={int(slot_mapping[i])}")
    chosen = _dispatch.pick(OP, backend, k)
    if k.shape[0] == 0:
        return None
    slots = slot_mapping.to(torch.int64).contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if chosen in ("cuda", "cpp"):
        torch.ops.r4b.store_kv(k, v, k_cache, v_cache, slots)
    elif chosen == "triton":
        _store_kv_triton(k, v, k_cache, v_cache, slots)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slots)
    return None
