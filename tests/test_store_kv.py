"""store_kv on every backend: bit-exact writes into the paged cache, skipped slots, strided inputs, its errors."""

from __future__ import annotations

import pytest
import torch

from r4b.kernels.store_kv import store_kv
from tests._backends import backend_params

BACKENDS = backend_params("store_kv")


def reference(k, v, k_cache, v_cache, slots):
    """A plain loop over tokens (independent of store_kv_ref): the caches after the writes."""
    kc, vc = k_cache.clone(), v_cache.clone()
    bs = kc.shape[1]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            kc[s // bs, s % bs] = k[t]
            vc[s // bs, s % bs] = v[t]
    return kc, vc


def make(T, Hkv, D, num_blocks, bs, dtype, seed, strided=False, skip=()):
    gen = torch.Generator().manual_seed(seed)
    if strided:  # k as a view of a fused (T, Hq + 2 Hkv, D) projection; v of another width: strides of its own
        qkv = torch.randn(T, 3 * Hkv + 2, D, generator=gen).to(dtype)
        k = qkv[:, 2 : 2 + Hkv]
        v = torch.randn(T, 2 * Hkv + 1, D, generator=gen).to(dtype)[:, 1 : 1 + Hkv]
        assert not k.is_contiguous() and k.stride(0) != v.stride(0)
    else:
        k = torch.randn(T, Hkv, D, generator=gen).to(dtype)
        v = torch.randn(T, Hkv, D, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * bs, generator=gen)[:T]
    for i in skip:
        slots[i] = -1
    # the caches hold earlier values everywhere, so a write to a wrong slot or a skipped one not skipped shows
    k_cache = torch.randn(num_blocks, bs, Hkv, D, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, bs, Hkv, D, generator=gen).to(dtype)
    return k, v, k_cache, v_cache, slots


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,Hkv,D,num_blocks,bs,strided,skip", [
    (1, 1, 16, 1, 1, False, ()),
    (37, 2, 80, 5, 16, True, (0, 5, 36)),
    (97, 8, 128, 7, 16, False, (3,)),
    (64, 4, 64, 3, 32, True, tuple(range(0, 64, 2))),
    (5, 3, 48, 10, 1, False, (0, 1, 2, 3, 4)),  # every token skipped: nothing written
])
def test_writes_match_a_plain_loop_bit_for_bit(backend, dtype, T, Hkv, D, num_blocks, bs, strided, skip):
    k, v, kc, vc, slots = make(T, Hkv, D, num_blocks, bs, dtype, seed=T + D, strided=strided, skip=skip)
    want_k, want_v = reference(k, v, kc, vc, slots)
    assert store_kv(k, v, kc, vc, slots, backend=backend) is None
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_slot_mapping_and_zero_tokens(backend):
    k, v, kc, vc, slots = make(9, 2, 32, 4, 4, torch.float32, seed=1, skip=(2,))
    want = reference(k, v, kc, vc, slots)
    store_kv(k, v, kc, vc, slots.to(torch.int32), backend=backend)
    assert torch.equal(kc, want[0]) and torch.equal(vc, want[1])
    before = kc.clone(), vc.clone()
    store_kv(k[:0], v[:0], kc, vc, slots[:0], backend=backend)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_slot_mapping_values_are_checked(backend):
    k, v, kc, vc, slots = make(4, 1, 16, 2, 4, torch.float32, seed=2)
    for bad in (8, -2):  # 2 blocks of 4 slots: 8 is one past the end; -1 is the only negative allowed
        s = slots.clone()
        s[3] = bad
        with pytest.raises(ValueError, match=rf"slot_mapping\[3\]={bad}"):
            store_kv(k, v, kc, vc, s, backend=backend)


def test_argument_errors_name_the_argument():
    k, v, kc, vc, slots = make(4, 2, 16, 2, 4, torch.float32, seed=3)
    with pytest.raises(TypeError, match="k must have dtype"):
        store_kv(k.half(), v, kc, vc, slots)
    with pytest.raises(ValueError, match="v_cache must match k_cache"):
        store_kv(k, v, kc, vc[:1], slots)
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        store_kv(k, v, kc.transpose(0, 1), vc, slots)
    with pytest.raises(ValueError, match=r"caches' \(Hkv, D\)"):
        store_kv(k[:, :1], v[:, :1], kc, vc, slots)
    with pytest.raises(ValueError, match="slot_mapping has 3 rows but k has 4"):
        store_kv(k, v, kc, vc, slots[:3])
    with pytest.raises(TypeError, match="slot_mapping must have dtype"):
        store_kv(k, v, kc, vc, slots.float())
    with pytest.raises(ValueError, match="k_cache must be 4-D"):
        store_kv(k, v, kc[0], vc[0], slots)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params("store_kv", "cuda"))
def test_gpu_prefill_sized_write_bit_for_bit(backend):
    # 16k tokens of a fused bf16 projection (32 q + 8 k + 8 v heads of 128) into 1100 blocks of 16, 10 skipped
    gen = torch.Generator(device="cuda").manual_seed(0)
    T, Hkv, D, bs = 16384, 8, 128, 16
    qkv = torch.randn(T, 48, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = qkv[:, 32:40], qkv[:, 40:48]
    kc = torch.randn(1100, bs, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    vc = torch.randn_like(kc)
    slots = torch.randperm(1100 * bs, device="cuda", generator=gen)[:T]
    slots[torch.arange(0, T, T // 10, device="cuda")] = -1
    want = reference(k.cpu(), v.cpu(), kc.cpu(), vc.cpu(), slots.cpu())
    store_kv(k, v, kc, vc, slots, backend=backend)
    assert torch.equal(kc.cpu(), want[0]) and torch.equal(vc.cpu(), want[1])
