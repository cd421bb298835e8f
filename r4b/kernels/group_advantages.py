"""group_advantages: GRPO/BPO group-relative advantages over (possibly unsorted) group ids.

Owns the torch reference, the Triton kernels and the public function; the C++ CPU and CUDA kernels live in
csrc/cpu/group_advantages.cpp and csrc/cuda/group_advantages.cu (torch.ops.r4b.group_advantages).
Every backend accumulates in float64 and is deterministic (no atomics).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _compile, _dispatch

OP = "group_advantages"
SCALES = ("group", "batch", "none")
_dispatch.register(OP, ("cuda", "triton", "cpp", "torch"))


def group_advantages_ref(rewards: Tensor, group_ids: Tensor, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """Torch reference in float64: (r - mean_g) / (std_g + eps); see :func:`group_advantages`."""
    r = rewards.double()
    _, inv = torch.unique(group_ids, return_inverse=True)
    G = int(inv.max()) + 1 if inv.numel() else 0
    zeros = r.new_zeros(G)
    cnt = zeros.index_add(0, inv, torch.ones_like(r))
    mean = zeros.index_add(0, inv, r) / cnt
    dev = r - mean[inv]
    ss = zeros.index_add(0, inv, dev * dev)
    lo = r.new_full((G,), float("inf")).scatter_reduce(0, inv, r, "amin")
    hi = r.new_full((G,), float("-inf")).scatter_reduce(0, inv, r, "amax")
    if scale == "group":
        denom = (ss / (cnt - 1).clamp_min(1)).sqrt()[inv] + eps
    elif scale == "batch":
        denom = (r.std() if r.numel() > 1 else r.new_zeros(())) + eps
    else:
        denom = torch.ones_like(r)
    degenerate = ((cnt < 2) | (lo == hi))[inv]
    adv = torch.where(degenerate, torch.zeros_like(r), dev / denom)
    return adv.float()


def _sorted_groups(group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """(inverse [n], perm [n] (elements sorted by group, stable), offsets [G+1], G, largest group size)."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    perm = torch.argsort(inverse, stable=True)
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=group_ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return inverse, perm, offsets, counts.numel(), int(counts.max())


_kernels = None


def _triton_kernels():
    """Build the Triton kernels on first use (triton is optional)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def group_stats_kernel(r_ptr, perm_ptr, off_ptr, mean_ptr, denom_ptr, degen_ptr, G, max_cnt, eps,
                           SCALE_GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr):
        # One program owns BLOCK_G groups; it walks their members BLOCK_E at a time in a [BLOCK_G, BLOCK_E] tile.
        gs = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
        gmask = gs < G
        start = tl.load(off_ptr + gs, mask=gmask, other=0)
        cnt = tl.load(off_ptr + gs + 1, mask=gmask, other=0) - start
        total = tl.zeros([BLOCK_G], dtype=tl.float64)
        lo = tl.full([BLOCK_G], float("inf"), dtype=tl.float64)
        hi = tl.full([BLOCK_G], float("-inf"), dtype=tl.float64)
        for j0 in range(0, max_cnt, BLOCK_E):
            j = j0 + tl.arange(0, BLOCK_E)
            m = gmask[:, None] & (j[None, :] < cnt[:, None])
            p = tl.load(perm_ptr + start[:, None] + j[None, :], mask=m, other=0)
            r = tl.load(r_ptr + p, mask=m, other=0.0).to(tl.float64)
            total += tl.sum(r, axis=1)
            lo = tl.minimum(lo, tl.min(tl.where(m, r, float("inf")), axis=1))
            hi = tl.maximum(hi, tl.max(tl.where(m, r, float("-inf")), axis=1))
        mean = total / tl.maximum(cnt, 1).to(tl.float64)
        ss = tl.zeros([BLOCK_G], dtype=tl.float64)
        for j0 in range(0, max_cnt, BLOCK_E):
            j = j0 + tl.arange(0, BLOCK_E)
            m = gmask[:, None] & (j[None, :] < cnt[:, None])
            p = tl.load(perm_ptr + start[:, None] + j[None, :], mask=m, other=0)
            r = tl.load(r_ptr + p, mask=m, other=0.0).to(tl.float64)
            d = tl.where(m, r - mean[:, None], 0.0)
            ss += tl.sum(d * d, axis=1)
        if SCALE_GROUP:
            denom = tl.sqrt(ss / tl.maximum(cnt - 1, 1).to(tl.float64)) + eps
        else:
            denom = tl.full([BLOCK_G], 1.0, dtype=tl.float64)
        degenerate = (cnt < 2) | (lo == hi)
        tl.store(mean_ptr + gs, mean, mask=gmask)
        tl.store(denom_ptr + gs, denom, mask=gmask)
        tl.store(degen_ptr + gs, degenerate.to(tl.int8), mask=gmask)

    @triton.jit
    def batch_std_kernel(r_ptr, out_ptr, n, eps, BLOCK: tl.constexpr):
        # A single program: two passes (mean, then squared deviations) in float64.
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for i0 in range(0, n, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            acc += tl.load(r_ptr + i, mask=i < n, other=0.0).to(tl.float64)
        mean = tl.sum(acc, axis=0) / n
        acc2 = tl.zeros([BLOCK], dtype=tl.float64)
        for i0 in range(0, n, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            d = tl.where(i < n, tl.load(r_ptr + i, mask=i < n, other=0.0).to(tl.float64) - mean, 0.0)
            acc2 += d * d
        std = tl.sqrt(tl.sum(acc2, axis=0) / tl.maximum(n - 1, 1))
        tl.store(out_ptr, tl.where(n > 1, std, 0.0) + eps)

    @triton.jit
    def advantages_kernel(r_ptr, inv_ptr, mean_ptr, denom_ptr, degen_ptr, batch_denom_ptr, out_ptr, n,
                          SCALE_BATCH: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        g = tl.load(inv_ptr + i, mask=m, other=0)
        r = tl.load(r_ptr + i, mask=m, other=0.0).to(tl.float64)
        mean = tl.load(mean_ptr + g, mask=m, other=0.0)
        if SCALE_BATCH:
            denom = tl.load(batch_denom_ptr)
        else:
            denom = tl.load(denom_ptr + g, mask=m, other=1.0)
        degenerate = tl.load(degen_ptr + g, mask=m, other=1) != 0
        adv = tl.where(degenerate, 0.0, (r - mean) / tl.where(degenerate, 1.0, denom))
        tl.store(out_ptr + i, adv.to(tl.float32), mask=m)

    _kernels = (group_stats_kernel, batch_std_kernel, advantages_kernel)
    return _kernels


# BLOCK_G x BLOCK_E = 64 x 16: rollout groups hold 2g <= 16 members in the usual BPO setting (not yet tuned
# on a GPU; the op costs microseconds there next to rollouts and the loss).
_BLOCK_G, _BLOCK_E, _BLOCK = 64, 16, 1024


def _group_advantages_triton(rewards: Tensor, group_ids: Tensor, scale: str, eps: float) -> Tensor:
    stats_k, batch_k, adv_k = _triton_kernels()
    n = rewards.numel()
    inverse, perm, offsets, G, max_cnt = _sorted_groups(group_ids)
    mean = torch.empty(G, dtype=torch.float64, device=rewards.device)
    denom = torch.empty_like(mean)
    degen = torch.empty(G, dtype=torch.int8, device=rewards.device)
    batch_denom = torch.empty(1, dtype=torch.float64, device=rewards.device)
    stats_k[(triton_cdiv(G, _BLOCK_G),)](rewards, perm, offsets, mean, denom, degen, G, max_cnt, eps,
                                         SCALE_GROUP=scale == "group", BLOCK_G=_BLOCK_G, BLOCK_E=_BLOCK_E)
    if scale == "batch":
        batch_k[(1,)](rewards, batch_denom, n, eps, BLOCK=_BLOCK)
    out = torch.empty(n, dtype=torch.float32, device=rewards.device)
    adv_k[(triton_cdiv(n, _BLOCK),)](rewards, inverse, mean, denom, degen, batch_denom, out, n,
                                     SCALE_BATCH=scale == "batch", BLOCK=_BLOCK)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@_compile.eager  # under torch.compile: runs eagerly (it reads values on the host; r4b/kernels/_compile.py)
@_dispatch.on_tensor_device
def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    scale: str = "group",
    eps: float = 1e-6,
    backend: str | None = None,
) -> Tensor:
    """Group-relative advantages.

    rewards: (n,) float (computed as float32 input, float64 inside); group_ids: (n,) int64 (int32 accepted), any
    values, in any order. scale="group": (r - mean_g) / (std_g + eps) with the unbiased std of the group;
    "batch": (r - mean_g) / (std of all n rewards + eps); "none": r - mean_g. A group of one, or a group whose
    rewards are all equal, gets exactly 0. Returns (n,) float32 on rewards' device.
    Raises ValueError naming the first non-finite reward.
    """
    _checks.tensor("rewards", rewards, dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16), ndim=1)
    _checks.tensor("group_ids", group_ids, dtypes=(torch.int64, torch.int32), ndim=1)
    _checks.same_device(rewards=rewards, group_ids=group_ids)
    _checks.same_len(rewards.shape[0], "rewards", group_ids=group_ids)
    _checks.choice("scale", scale, SCALES)
    if not (eps >= 0 and eps < float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"rewards must be finite, got rewards[{i}]={float(rewards[i])}")
    rewards = rewards.to(torch.float32).contiguous()
    group_ids = group_ids.to(torch.int64).contiguous()
    b = _dispatch.pick(OP, backend, rewards)
    if rewards.numel() == 0:
        return torch.empty(0, dtype=torch.float32, device=rewards.device)
    if b in ("cuda", "cpp"):
        return torch.ops.r4b.group_advantages(rewards, group_ids, scale, float(eps))
    if b == "triton":
        return _group_advantages_triton(rewards, group_ids, scale, float(eps))
    return group_advantages_ref(rewards, group_ids, scale, eps)
