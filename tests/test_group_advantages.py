"""group_advantages on every backend against an independent float64 reference, plus its errors."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from r4b.kernels import group_advantages
from tests._backends import backend_params


def reference(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str, eps: float) -> torch.Tensor:
    """Plain Python float64 loop: the formula of DESIGN.md, written independently of the kernels."""
    r = rewards.double().tolist()
    g = group_ids.tolist()
    members = defaultdict(list)
    for i, k in enumerate(g):
        members[k].append(r[i])
    mean = {k: sum(v) / len(v) for k, v in members.items()}
    std = {k: math.sqrt(sum((x - mean[k]) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
           for k, v in members.items()}
    bmean = sum(r) / len(r)
    bstd = math.sqrt(sum((x - bmean) ** 2 for x in r) / (len(r) - 1)) if len(r) > 1 else 0.0
    out = []
    for i, k in enumerate(g):
        v = members[k]
        if len(v) < 2 or min(v) == max(v):
            out.append(0.0)
            continue
        d = r[i] - mean[k]
        out.append(d / (std[k] + eps) if scale == "group" else d / (bstd + eps) if scale == "batch" else d)
    return torch.tensor(out, dtype=torch.float64)


def make(n: int, groups: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # shuffled, non-contiguous (and negative) group ids, binary-ish and continuous rewards mixed
    ids = torch.randint(0, groups, (n,), generator=gen) * 7 - 3
    ids = ids[torch.randperm(n, generator=gen)]
    rewards = torch.where(torch.rand(n, generator=gen) < 0.5, torch.randint(0, 2, (n,), generator=gen).float(),
                          torch.randn(n, generator=gen))
    return rewards, ids


GA = backend_params("group_advantages")


@pytest.mark.parametrize("backend", GA)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("n,groups", [(1, 1), (7, 3), (1000, 120), (70000, 9000)])
def test_matches_float64_reference(backend, scale, n, groups):
    rewards, ids = make(n, groups, seed=n + groups)
    out = group_advantages(rewards, ids, scale=scale, eps=1e-6, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (n,)
    torch.testing.assert_close(out.double(), reference(rewards, ids, scale, 1e-6), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", GA)
def test_singletons_and_equal_rewards_are_exactly_zero(backend):
    rewards = torch.tensor([0.3, 1.0, 1.0, 1.0, 0.1, 0.7, 0.7, 5.0, 0.1])
    ids = torch.tensor([9, 4, 4, 4, 2, 11, 11, 8, 2])  # 9 and 8: singletons; 4 and 11: equal; 2: equal
    for scale in ("group", "batch", "none"):
        out = group_advantages(rewards, ids, scale=scale, eps=0.0, backend=backend)
        assert torch.equal(out, torch.zeros(9)), (scale, out)
        assert not torch.isnan(out).any()


@pytest.mark.parametrize("backend", GA)
def test_binary_rewards_mixed_group(backend):
    # one BPO prompt: 2g = 8 rollouts, half thinking half not; 3 correct
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    ids = torch.zeros(8, dtype=torch.int64)
    out = group_advantages(rewards, ids, backend=backend)
    mean, std = 3 / 8, math.sqrt((3 * (5 / 8) ** 2 + 5 * (3 / 8) ** 2) / 7)
    expected = torch.tensor([(x - mean) / (std + 1e-6) for x in rewards.tolist()], dtype=torch.float64)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-7)
    assert abs(float(out.sum())) < 1e-5


@pytest.mark.parametrize("backend", GA)
def test_order_of_ids_does_not_matter(backend):
    rewards, ids = make(257, 40, seed=3)
    perm = torch.randperm(257, generator=torch.Generator().manual_seed(0))
    a = group_advantages(rewards, ids, backend=backend)
    b = group_advantages(rewards[perm], ids[perm], backend=backend)
    torch.testing.assert_close(a[perm], b, rtol=0, atol=1e-7)


def test_backends_agree_bitwise_close():
    rewards, ids = make(3000, 300, seed=1)
    outs = {b: group_advantages(rewards, ids, backend=b) for b in ("torch", "cpp")}
    torch.testing.assert_close(outs["torch"], outs["cpp"], rtol=0, atol=1e-6)


def test_int32_ids_and_float64_rewards_accepted():
    rewards, ids = make(50, 5, seed=2)
    a = group_advantages(rewards.double(), ids.int(), backend="torch")
    torch.testing.assert_close(a.double(), reference(rewards, ids, "group", 1e-6), rtol=1e-6, atol=1e-6)


def test_empty_input():
    out = group_advantages(torch.empty(0), torch.empty(0, dtype=torch.int64))
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize(
    "rewards,ids,kwargs,exc,match",
    [
        (torch.ones(3, 2), torch.zeros(3, dtype=torch.int64), {}, ValueError, "rewards must be 1-D"),
        (torch.ones(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), {}, TypeError, "rewards must have dtype"),
        (torch.ones(3), torch.zeros(3), {}, TypeError, "group_ids must have dtype"),
        (torch.ones(3), torch.zeros(4, dtype=torch.int64), {}, ValueError, "group_ids has 4 rows but rewards has 3"),
        (torch.tensor([0.0, 1.0, 2.0, float("nan")]), torch.zeros(4, dtype=torch.int64), {}, ValueError,
         r"rewards\[3\]=nan"),
        (torch.tensor([float("inf"), 1.0]), torch.zeros(2, dtype=torch.int64), {}, ValueError, r"rewards\[0\]=inf"),
        (torch.ones(3), torch.zeros(3, dtype=torch.int64), {"scale": "std"}, ValueError, "scale must be one of"),
        (torch.ones(3), torch.zeros(3, dtype=torch.int64), {"eps": -1.0}, ValueError, "eps must be"),
        ([1.0, 2.0], torch.zeros(2, dtype=torch.int64), {}, TypeError, "rewards must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise(rewards, ids, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        group_advantages(rewards, ids, **kwargs)


def test_compiled_op_checks_its_inputs():
    group_advantages(torch.ones(2), torch.zeros(2, dtype=torch.int64), backend="cpp")
    with pytest.raises(TypeError, match="rewards must be float32"):
        torch.ops.r4b.group_advantages(torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="scale must be one of"):
        torch.ops.r4b.group_advantages(torch.ones(2), torch.zeros(2, dtype=torch.int64), "bogus")


def test_opcheck_and_compile():
    group_advantages(torch.ones(2), torch.zeros(2, dtype=torch.int64), backend="cpp")  # loads r4b._C
    rewards, ids = make(64, 8, seed=5)
    torch.library.opcheck(torch.ops.r4b.group_advantages.default, (rewards, ids, "group", 1e-6))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(r, g):
        return torch.ops.r4b.group_advantages(r, g, "group", 1e-6) * 2

    torch.testing.assert_close(f(rewards, ids), 2 * group_advantages(rewards, ids, backend="torch"), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params("group_advantages", "cuda"))
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_gpu_matches_reference(backend, scale):
    rewards, ids = make(70000, 9000, seed=11)
    out = group_advantages(rewards.cuda(), ids.cuda(), scale=scale, backend=backend)
    torch.testing.assert_close(out.cpu().double(), reference(rewards, ids, scale, 1e-6), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params("group_advantages", "cuda"))
def test_gpu_big_group_singletons_stream_and_determinism(backend):
    """One group of 5000 (more threads than a block), singletons and an all-equal group (exact 0), n below one
    block; run on a side stream right after the rewards are made there; two runs bitwise equal."""
    g = torch.Generator().manual_seed(5)
    rewards = torch.cat([torch.randn(5000, generator=g), torch.randn(3, generator=g), torch.full((4,), 0.5)])
    ids = torch.cat([torch.zeros(5000), torch.tensor([7.0, 8.0, 9.0]), torch.full((4,), 3.0)]).long()
    for scale in ("group", "batch", "none"):
        want = reference(rewards, ids, scale, 1e-6)
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            r, i = rewards.cuda(non_blocking=True) * 1.0, ids.cuda(non_blocking=True)
            a = group_advantages(r, i, scale=scale, backend=backend)
            b = group_advantages(r, i, scale=scale, backend=backend)
        s.synchronize()
        torch.testing.assert_close(a.cpu().double(), want, rtol=1e-6, atol=1e-6)
        assert torch.equal(a, b)
        if scale == "group":
            assert torch.equal(a[5000:].cpu(), torch.zeros(7))  # singletons and the all-equal group
    small = group_advantages(rewards[5000:].cuda(), ids[5000:].cuda(), backend=backend)
    torch.testing.assert_close(small.cpu().double(), reference(rewards[5000:], ids[5000:], "group", 1e-6),
                               rtol=1e-6, atol=1e-6)
