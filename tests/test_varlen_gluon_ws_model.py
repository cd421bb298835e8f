"""The warp-specialised Gluon kernels' protocol without a GPU: tests/ws_model.py transcribes the three partitions of
_fwd_kernel, _bwd_dq_kernel and _bwd_dkdv_kernel (r4b/kernels/_varlen_gluon_ws.py) into event generators and runs
every (tile, head) program of varlen batches under seeded random interleavings of its partitions and of its TMA
loads' landings, checking the ring's mbarrier phases, expect-tx bytes, wgmma retirement before releases and refills,
descriptor rebuilds, the per-half barriers and the stores; planted protocol bugs must be caught."""

import random
from collections import Counter

import pytest

from tests import ws_model as wm

ORDERS = 12  # random interleavings of each program


def test_the_model_transcribes_the_current_kernels():
    # a kernel edit must be mirrored in tests/ws_model.py (then KERNEL_SHA updated), or the model checks something
    # else than what runs on the GPU
    assert wm.kernel_sha() == wm.KERNEL_SHA, (
        "r4b/kernels/_varlen_gluon_ws.py's transcribed functions changed: transcribe the change into "
        f"tests/ws_model.py and set KERNEL_SHA = {wm.kernel_sha()!r}")


def _programs(kernel, lens, Hq, Hkv):
    T = sum(lens)
    tile = wm.BLOCK_M_KV if kernel == "dkdv" else wm.BLOCK_M
    return -(-T // tile) * (Hkv if kernel == "dkdv" else Hq)


PARAMS = [(kernel, config) for kernel in wm.KERNELS for config in wm.configs(kernel)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kernel,config", PARAMS, ids=[f"{k}-{n}x{s}" for k, (n, s) in PARAMS])
def test_every_config_keeps_the_protocol_under_random_interleavings(kernel, config, causal):
    """wm.CASES: length-1 and empty sequences, a sequence of many blocks, a tile of many short sequences, T not a
    multiple of 128 (a last tile's second half wholly or partly past T), GQA 1, 2 and 4."""
    cov = Counter()
    n = 0
    for i, (lens, Hq, Hkv) in enumerate(wm.CASES):
        n += wm.run(kernel, lens, Hq, Hkv, config, causal, seed=i, n_orders=ORDERS, cov=cov)
    assert n == ORDERS * sum(_programs(kernel, *case) for case in wm.CASES)
    assert cov["programs"] == n
    # the interleavings reached the protocol's corners: the ring full (the producer waiting on empty), slots
    # refilled, descriptors rebuilt after a wait for loads still in flight, consumers waiting on full, tiles with
    # a consumer without rows
    for key in ("blocked producer empty", "ring refill", "descriptor rebuilt", "blocked producer full",
                "blocked consumer 0 full", "blocked consumer 1 full", "consumer without rows"):
        assert cov[key] > 0, (key, dict(cov))


def test_random_batches_keep_the_protocol():
    rnd = random.Random(11)
    n = 0
    for trial in range(24):
        lens = [rnd.choice([0, 1, 2, 5, 17, 63, 64, 65, 127, 128, 129, 255, 400]) for _ in range(rnd.randint(1, 9))]
        Hkv = rnd.choice([1, 2])
        Hq = Hkv * rnd.choice([1, 2, 4])
        kernel = wm.KERNELS[trial % 3]
        config = rnd.choice(wm.configs(kernel))
        n += wm.run(kernel, lens, Hq, Hkv, config, trial % 2 == 0, seed=trial, n_orders=3)
    assert n > 0
    assert wm.run("fwd", [0, 0], 2, 1, wm.configs("fwd")[0], True) == 0  # no rows, no programs


def test_a_violation_names_kernel_config_tile_head_partition_and_event():
    with pytest.raises(wm.ModelError, match=r"\[release\] dq config \(64, 2\) causal=False lens=\[3, 200\] .*tile "
                                            r"t0=0 head 0 order 0: partition consumer [01], event \('arrive', "
                                            r"\('empty', [01]\)\): releases slot [01] while its wgmma group 'dq'"):
        wm.run("dq", [3, 200], 2, 1, (64, 2), False, bugs={"early_release"}, n_orders=1)


def test_planted_protocol_bugs_are_caught():
    found = wm.selftest()
    assert set(found) == {(bug, kernel) for bug, (kernels, _) in wm.BUGS.items() for kernel in kernels}
