"""The warp-specialised Gluon kernels' protocol without a GPU: tests/ws_model.py transcribes the three partitions of
_fwd_kernel, _bwd_dq_kernel and _bwd_dkdv_kernel (r4b/kernels/_varlen_gluon_ws.py) into event generators and runs
every (tile, head) program of varlen batches under seeded random interleavings of its partitions and of its TMA
loads' landings, checking the ring's mbarrier phases, expect-tx bytes, wgmma retirement before releases and refills,
descriptor rebuilds, the per-half barriers and the stores, and for the forward's PINGPONG configs the consumers'
turns (strictly alternating per ring block, products issued only in their turn); planted protocol bugs must be
caught."""

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


PARAMS = [(kernel, config) for kernel in wm.KERNELS for config in wm.configs(kernel)]  # fwd: CONFIGS + PINGPONG_CONFIGS


def test_the_forward_is_modelled_with_and_without_pingpong():
    assert wm.configs("fwd") == wm.gws.CONFIGS + wm.gws.PINGPONG_CONFIGS
    assert all(len(c) == 2 for c in wm.gws.CONFIGS)
    assert wm.gws.PINGPONG_CONFIGS and all(len(c) == 3 and c[2] is True for c in wm.gws.PINGPONG_CONFIGS)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kernel,config", PARAMS, ids=[f"{k}-{wm.config_id(c)}" for k, c in PARAMS])
def test_every_config_keeps_the_protocol_under_random_interleavings(kernel, config, causal):
    """wm.CASES: length-1 and empty sequences, a sequence of many blocks, a tile of many short sequences, T not a
    multiple of 128 (a last tile's second half wholly or partly past T), GQA 1, 2 and 4. The forward's PINGPONG
    configs (3-tuples) with the consumers' turns."""
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
    pingpong = kernel == "fwd" and len(config) == 3 and config[2]
    # PINGPONG: each consumer waited for its turn, turns taken and passed on by release-only blocks, P V of the
    # last block issued after the turns
    turn_keys = ("blocked consumer 0 turn", "blocked consumer 1 turn", "turn passed without products",
                 "product outside the turns")
    for key in turn_keys:
        assert (cov[key] > 0) == bool(pingpong), (key, dict(cov))


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


def test_pingpong_turns_alternate_over_every_ring_block():
    # the model's turn bookkeeping on one program: both consumers took and passed on one turn per ring block
    # (the end check), whatever the interleaving; a batch whose tiles hold many short sequences (release-only
    # blocks in both consumers)
    for config in wm.gws.PINGPONG_CONFIGS:
        for causal in (True, False):
            for lens in ([5, 1, 0, 130, 2, 40, 260], [64] * 9, [1] * 150):
                assert wm.run("fwd", lens, 2, 1, config, causal, seed=3, n_orders=6) > 0


def test_a_violation_names_kernel_config_tile_head_partition_and_event():
    with pytest.raises(wm.ModelError, match=r"\[release\] dq config \(64, 2\) causal=False lens=\[3, 200\] .*tile "
                                            r"t0=0 head 0 order 0: partition consumer [01], event \('arrive', "
                                            r"\('empty', [01]\)\): releases slot [01] while its wgmma group 'dq'"):
        wm.run("dq", [3, 200], 2, 1, (64, 2), False, bugs={"early_release"}, n_orders=1)


def test_planted_protocol_bugs_are_caught():
    found = wm.selftest()
    assert set(found) == {(bug, kernel) for bug, (kernels, _) in wm.BUGS.items() for kernel in kernels}
    # the PINGPONG bugs are caught on the forward's PINGPONG configs (and are no-ops without PINGPONG)
    assert wm.PINGPONG_BUGS == {"turn_skip_release", "turn_parity_c1", "turn_own_arrive", "turn_count2"}
    for bug in wm.PINGPONG_BUGS:
        assert "True) causal=" in found[(bug, "fwd")], found[(bug, "fwd")]
        wm.run("fwd", [65, 1, 200], 2, 1, wm.gws.CONFIGS[0], True, n_orders=2, bugs={bug})
