"""A CPU model of the asynchrony of the three warp-specialised Gluon kernels of r4b/kernels/_varlen_gluon_ws.py
(``_fwd_kernel``, ``_bwd_dq_kernel``, ``_bwd_dkdv_kernel``): "random interleaving" of their partitions
(tests/test_varlen_gluon_ws_model.py; ``python -m tests.ws_model [N | selftest]``: N orders of every case).

No float math: each partition of a program (two consumer warpgroups and the producer warp) is transcribed, statement
by statement as the Gluon source is written, into a Python generator that yields the program's protocol events in
program order:

  ("desc", site, tensor, base, rows, head)        tma.make_tensor_descriptor (rebuilt in place per call site)
  ("expect", bar, bytes, pred)                    mbarrier.expect = arrive.expect_tx (one arrival + tx bytes)
  ("load", site, row, col, bar, buf, box, pred)   tma.async_copy_global_to_shared of a [box, D] box
  ("wait", bar, parity, pred, want)               mbarrier.wait; want: the (buffer, data tag) pairs the
                                                  consumer's code expects in the buffers that barrier guards
  ("arrive", bar)                                 mbarrier.arrive (one arrival per partition: the lowering
                                                  predicates it on the partition's thread 0)
  ("mma", label, reads, sync[, block])            warpgroup_mma: one wgmma group reading (buffer, tag) pairs;
                                                  a forward product names the ring block whose turn (PINGPONG)
                                                  it is issued in, or "last": P V of the last block, after turns
  ("mma_wait", n)                                 warpgroup_mma_wait(num_outstanding=n)
  ("use", label)                                  the newest group's result read (after its wait)
  ("store", out, seq, lo, hi, head)               gl.store of rows [lo, hi) of one head (the store mask)

A scheduler (class Sim) runs the three generators of one program under a seeded random interleaving: at each step
it takes a random runnable partition (one whose next event is not a wait on an unmet barrier condition) or lands a
random in-flight TMA load (loads land in random order, at random later times). The model:

  * mbarrier: count, pending arrivals, pending tx bytes, completed phases. A phase completes when both its
    arrivals and its tx bytes are down to zero; it then resets and the parity flips. wait(parity p) passes iff
    (completed & 1) != p (the hardware rule: a fresh barrier counts its previous phase, parity 1, as complete).
  * a TMA load: issued into a buffer on a barrier's current phase, reads its descriptor until it lands (the TMA
    unit may read the tensormap late), lands later: the buffer then holds its tag (tensor, descriptor base row,
    row, head) and the barrier's tx drops by the box's full bytes (box rows x D x 2: out-of-bounds rows are
    zero-filled and counted, as the hardware does).
  * the barriers each kernel initialises (_fwd_kernel, _ring_barriers): full (count 1) and empty (count 2) per
    ring slot, one per consumer half (count 1), and with the forward's PINGPONG the turn barriers turn[0..1]
    (count 1: _turn); the kernels invalidate them after the partitions, so every one must end in a whole phase.
  * PINGPONG turns (the forward's, FlashAttention-3's inter-warpgroup schedule): a consumer takes a turn when its
    wait on turn[C] passes and passes it on with its arrival on turn[1 - C]; the model keeps the one holder and the
    next turn due: (block 0, consumer 0), (0, 1), (1, 0), (1, 1), ... over every ring block of the program.
  * wgmma: per consumer a FIFO of groups; warpgroup_mma_wait(n) retires all but the newest n; a synchronous
    warpgroup_mma (is_async=False) is issue + wait(0). Shared memory operands are taken to be read until the
    group retires.

Checks (each a ModelError naming kernel, config, batch, tile, head, partition, event and the check):
  deadlock    no partition can run and no load is in flight while a partition is unfinished;
  stale       a consumer passes a full / per-half wait but the buffer's newest landed tag is not the one its code
              expects, or a load into it is still in flight; a wgmma reads a buffer whose content is not the
              expected tag or that the consumer does not hold (waited for and not yet released);
  overwrite   a TMA load into a buffer while a load into it is in flight, while an unretired wgmma of either
              consumer reads it, or before each consumer waited for and released its previous content (a
              single-shot buffer loaded twice);
  turn        (PINGPONG) a turn taken out of the order (block 0 consumer 0, block 0 consumer 1, block 1 consumer 0,
              ...) or while the other consumer holds its turn, a turn passed on by a consumer not holding one, a
              product of ring block b issued by a consumer not holding its turn for b (P V of the last block, after
              the loop, is outside the turns);
  release     mbarrier.arrive on empty[slot] while this consumer has an unretired wgmma reading the slot, or for a
              slot it does not hold;
  barrier     an arrival on a phase with no pending arrival, or a consumer arriving twice on one phase of
              empty[slot]; expect-tx bytes not equal to the bytes loaded in the phase (a load its phase's
              expect-tx does not cover, a phase completing with a load of it in flight, a load landing in a later
              phase, tx below zero); an arrival on turn[c] by any partition but consumer 1 - c;
  half        a consumer with no rows (its half at or past T) reaches a pred=True wait on its per-half barrier
              (q_bar / kv_bar; its pass is checked by "stale");
  retire      a wgmma result used before its group retired (the wait depths), a partition ending with a wgmma in
              flight;
  descriptor  a descriptor rebuilt while a load reading it is in flight; a load box starting past its rows;
  store       a store of rows outside this consumer's half, the segment's sequence or T, of another head, or before
              the consumer read every key (query) block those rows need;
  end         at the end: a partition unfinished, a load in flight, a partial barrier phase, per slot the
              producer's loads != each consumer's waits != its releases != the full / empty phases completed, a
              consumer still holding a slot, a (row, head) of the tile below T not stored exactly once; with
              PINGPONG a turn still held, or not both consumers' turns taken and passed for every ring block.

The planted bugs of selftest() are flags of the transcription functions (``bugs``), not copies of them.
KERNEL_SHA pins the transcribed kernel source (sha256 over inspect.getsource(fn.fn) of every transcribed function):
a kernel edit fails tests/test_varlen_gluon_ws_model.py until it is transcribed here again.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import sys
import time
from collections import Counter

gws = importlib.import_module("r4b.kernels._varlen_gluon_ws")
_gl_plain = importlib.import_module("r4b.kernels._varlen_gluon")
_va = importlib.import_module("r4b.kernels.varlen_attention")

BLOCK_M = gws.BLOCK_M.value  # query rows of a forward / dQ program
HALF = gws.HALF.value  # rows of one consumer
BLOCK_M_KV = gws.BLOCK_M_KV.value  # key rows of a dK/dV program
BITS = 16  # dtype.primitive_bitwidth (bf16 / fp16)
D = 64  # head dim: only byte counts depend on it
KERNELS = ("fwd", "dq", "dkdv")

# every function the transcription mirrors: (module, name)
FNS = ((gws, "_segment"), (gws, "_producer"), (gws, "_produce_kv"), (gws, "_consumer"), (gws, "_my_blocks"),
       (gws, "_release_rest"), (gws, "_turn"), (gws, "_fwd_kernel"), (gws, "_ring_barriers"), (gws, "_load_halves"),
       (gws, "_invalidate_barriers"), (gws, "_dq_producer"), (gws, "_dq_consumer"), (gws, "_bwd_dq_kernel"),
       (gws, "_dkdv_segment"), (gws, "_dkdv_producer"), (gws, "_dkdv_consumer"), (gws, "_bwd_dkdv_kernel"),
       (_gl_plain, "_segment_keys"), (_gl_plain, "_seq_kv_descs"), (_va, "_seq_of"))
KERNEL_SHA = "1db4556208a6f6c92f37400cc737384ec6be13afb1a32f824d977ad1b53b2208"

# planted protocol bugs (selftest): name -> (kernels it applies to, checks that may catch it)
BUGS = {
    "empty_parity": (KERNELS, {"deadlock"}),  # producer: empty wait on parity (i // STAGES) & 1, no ^ 1
    "early_release": (KERNELS, {"release"}),  # consumer: arrive(empty) before the wait(0) retiring its readers
    "skip_release": (KERNELS, {"deadlock", "end"}),  # consumer: a block it does not compute waited, not released
    # producer: ring / per-half expect of half the bytes (the phase completes on the first load: a consumer may
    # pass before the second lands or is even issued)
    "half_expect": (KERNELS, {"barrier", "stale"}),
    "half_expect_rows": (KERNELS, {"barrier", "stale"}),
    "short_rebuild": (KERNELS, {"descriptor"}),  # producer: STAGES - 1 full waits before a descriptor rebuild
    "no_rebuild_wait": (KERNELS, {"descriptor"}),  # producer: no full waits before a descriptor rebuild
    # consumer: full wait on the flipped parity (passes at once on the previous phase, or waits for a next one)
    "full_parity": (KERNELS, {"stale", "deadlock"}),
    "no_half_pred": (KERNELS, {"half"}),  # consumer: per-half wait without pred=r0 < T
    "shallow_wait": (KERNELS, {"retire"}),  # consumer: the first wait(1) of a block as wait(2)
    "release_prev_late": (("fwd",), {"deadlock"}),  # fwd consumer: slot prev released only after the segment
    "it_mine": (("fwd", "dq"), {"stale", "deadlock", "end"}),  # consumer: it += mine (not nb) after a segment
    "store_from_t": (KERNELS, {"store", "end"}),  # consumer: stores rows [t, hi), not [lo, hi)
    "mine_short": (("fwd", "dq"), {"store"}),  # consumer: computes one block fewer than it needs (releases it)
    # PINGPONG (the forward's PINGPONG_CONFIGS only): _release_rest neither waits for nor passes on its turns
    "turn_skip_release": (("fwd",), {"deadlock", "turn", "end"}),
    "turn_parity_c1": (("fwd",), {"turn", "deadlock"}),  # _turn: consumer 1 waits on the flipped parity
    "turn_own_arrive": (("fwd",), {"barrier", "turn", "deadlock"}),  # consumer: arrive(turn[C]), not turn[1 - C]
    "turn_count2": (("fwd",), {"deadlock", "end"}),  # _fwd_kernel: mbarrier.init(turn[c], count=2)
}
PINGPONG_BUGS = {bug for bug in BUGS if bug.startswith("turn_")}


class ModelError(AssertionError):
    def __init__(self, check, msg):
        super().__init__(f"[{check}] {msg}")
        self.check = check


def kernel_sha() -> str:
    h = hashlib.sha256()
    for mod, name in FNS:
        h.update(inspect.getsource(getattr(mod, name).fn).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- shared helpers
def _seq_of(cu, n_seqs, t):
    """varlen_attention._seq_of: the largest s in [0, n_seqs) with cu[s] <= t (its binary search as written)."""
    lo = 0
    hi = lo + n_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        take = cu[mid] <= t
        lo = mid if take else lo
        hi = hi if take else mid
    return lo


def _segment_keys(t, cs, seg_hi, L, causal):
    if causal:
        kv_hi = seg_hi - cs
        free_hi = t - cs
    else:
        kv_hi = L
        free_hi = L
    return kv_hi, free_hi


def _segment(cu, seq, t, t_end, BLOCK_N, causal):
    cs = cu[seq]
    ce = cu[seq + 1]
    seg_hi = min(ce, t_end)
    L = ce - cs
    kv_hi, free_hi = _segment_keys(t, cs, seg_hi, L, causal)
    return cs, L, seg_hi, free_hi, (kv_hi + BLOCK_N - 1) // BLOCK_N


def _my_blocks(t, cs, seg_hi, free_hi, nb, r0, my_end, BLOCK_N, causal):
    lo = max(t, r0)
    hi = min(seg_hi, my_end)
    if causal:
        mine = min((hi - cs + BLOCK_N - 1) // BLOCK_N, nb)
        free = lo - cs
    else:
        mine = nb
        free = free_hi
    mine = mine if hi > lo else 0
    return lo, hi, mine, free


def _dkdv_segment(cu, seq, t, t_end, BLOCK_M, GROUP, causal):
    cs = cu[seq]
    ce = cu[seq + 1]
    seg_hi = min(ce, t_end)
    L = ce - cs
    if causal:
        q_start = ((t - cs) // BLOCK_M) * BLOCK_M
    else:
        q_start = 0
    nq = (L - q_start + BLOCK_M - 1) // BLOCK_M
    return cs, L, seg_hi, q_start, nq, nq * GROUP


class Prog:
    """One program: kernel, batch (cu), tile t0, head (query head for fwd / dQ, KV head for dK/dV), GQA group,
    block (BLOCK_N, or the dK/dV kernel's BLOCK_M), STAGES, causal, planted bugs, PINGPONG (the forward's)."""

    def __init__(self, kernel, cu, t0, head, group, block, stages, causal, bugs=frozenset(), pingpong=False):
        assert not pingpong or kernel == "fwd"
        self.kernel, self.cu, self.t0, self.head, self.group = kernel, cu, t0, head, group
        self.block, self.S, self.causal, self.bugs = block, stages, causal, frozenset(bugs)
        self.pingpong = pingpong
        self.T = cu[-1]
        self.n_seqs = len(cu) - 1


def _kv_want(slot, cs, j, BLOCK_N, hk):
    return ((("k_smem", slot), ("K", cs, j * BLOCK_N, hk)), (("v_smem", slot), ("V", cs, j * BLOCK_N, hk)))


# ---------------------------------------------------------------------------------------------- the forward
def _producer(p):
    """_producer: the two Q halves on q_bar, then _produce_kv."""
    T, t0, h, bugs = p.T, p.t0, p.head, p.bugs
    hk = h // p.group
    yield ("desc", "q_desc", "Q", 0, T, h)
    for c in range(2):
        has_rows = t0 + c * HALF < T
        nbytes = HALF * D * BITS // 8
        if "half_expect_rows" in bugs:
            nbytes //= 2
        yield ("expect", ("q_bar", c), nbytes, has_rows)
        yield ("load", "q_desc", t0 + c * HALF, 0, ("q_bar", c), ("q_smem", c), HALF, has_rows)
    yield from _produce_kv(p, hk)


def _produce_kv(p, hk):
    S, BLOCK_N, bugs = p.S, p.block, p.bugs
    t_end = min(p.t0 + BLOCK_M, p.T)
    seq = _seq_of(p.cu, p.n_seqs, p.t0)
    t = p.t0
    it = 0
    while t < t_end:
        cs, L, seg_hi, free_hi, nb = _segment(p.cu, seq, t, t_end, BLOCK_N, p.causal)
        if nb > 0:
            yield from _rebuild_waits(it, S, bugs)
            # _seq_kv_descs
            yield ("desc", "k_desc", "K", cs, L, hk)
            yield ("desc", "v_desc", "V", cs, L, hk)
            for j in range(nb):
                slot = it % S
                yield ("wait", ("empty", slot), _empty_parity(it, S, bugs), True, None)
                bar = ("full", slot)
                nbytes = 2 * BLOCK_N * D * BITS // 8
                if "half_expect" in bugs:
                    nbytes //= 2
                yield ("expect", bar, nbytes, True)
                yield ("load", "k_desc", j * BLOCK_N, 0, bar, ("k_smem", slot), BLOCK_N, True)
                yield ("load", "v_desc", j * BLOCK_N, 0, bar, ("v_smem", slot), BLOCK_N, True)
                it += 1
        t = seg_hi
        seq += 1


def _rebuild_waits(it, S, bugs):
    """The producer's waits for the newest loads before it rebuilds the ring's descriptors in place."""
    if "no_rebuild_wait" in bugs:
        return
    back = S - 1 if "short_rebuild" in bugs else S
    for i in range(max(it - back, 0), it):
        yield ("wait", ("full", i % S), (i // S) & 1, True, None)


def _empty_parity(it, S, bugs):
    return (it // S) & 1 if "empty_parity" in bugs else ((it // S) & 1) ^ 1


def _full_parity(cur, S, bugs):
    return ((cur // S) & 1) ^ 1 if "full_parity" in bugs else (cur // S) & 1


def _consumer(C, p):
    """_consumer: rows [t0 + 64 C, +64) of the tile; S_j and P_{j-1} V_{j-1} in flight together."""
    T, t0, h, S, BLOCK_N, causal, bugs = p.T, p.t0, p.head, p.S, p.block, p.causal, p.bugs
    hk = h // p.group
    r0 = t0 + C * HALF
    q = (("q_smem", C), ("Q", 0, r0, h))
    t_end = min(t0 + BLOCK_M, T)
    my_end = min(r0 + HALF, T)
    seq = _seq_of(p.cu, p.n_seqs, t0)
    t = t0
    it = 0
    yield ("wait", ("q_bar", C), 0, True if "no_half_pred" in bugs else r0 < T, (q, ))
    while t < t_end:
        cs, L, seg_hi, free_hi, nb = _segment(p.cu, seq, t, t_end, BLOCK_N, causal)
        lo, hi, mine, free = _my_blocks(t, cs, seg_hi, free_hi, nb, r0, my_end, BLOCK_N, causal)
        if "mine_short" in bugs and mine > 1:
            mine -= 1
        if "store_from_t" in bugs:
            lo = t
        late = []  # release_prev_late: slots whose release is held back to the segment's end
        if mine > 0:
            slot = it % S
            kv = _kv_want(slot, cs, 0, BLOCK_N, hk)
            yield ("wait", ("full", slot), _full_parity(it, S, bugs), True, kv)
            if p.pingpong:  # this consumer's turn to issue products (_turn), passed on once they are issued
                yield from _turn(p, C, it)
                yield ("mma", "s", (q, kv[0]), False, it)
                yield ("arrive", ("turn", _other(C, bugs)))
                yield ("mma_wait", 0)
            else:
                yield ("mma", "s", (q, kv[0]), True, it)
            yield ("use", "s")
            for j in range(1, mine):
                cur = it + j
                slot = cur % S
                prev = (cur - 1) % S
                kv = _kv_want(slot, cs, j, BLOCK_N, hk)
                kv_prev = _kv_want(prev, cs, j - 1, BLOCK_N, hk)
                yield ("wait", ("full", slot), _full_parity(cur, S, bugs), True, kv)
                if p.pingpong:
                    yield from _turn(p, C, cur)
                yield ("mma", "s", (q, kv[0]), False, cur)
                yield ("mma", "acc", (kv_prev[1], ), False, cur)
                if p.pingpong:
                    yield ("arrive", ("turn", _other(C, bugs)))
                yield ("mma_wait", 2 if "shallow_wait" in bugs else 1)
                yield ("use", "s")
                if "early_release" in bugs:
                    yield ("arrive", ("empty", prev))
                yield ("mma_wait", 0)
                if "release_prev_late" in bugs:
                    late.append(prev)
                elif "early_release" not in bugs:
                    yield ("arrive", ("empty", prev))
                yield ("use", "acc")  # acc * alpha
            last = (it + mine - 1) % S
            yield ("mma", "acc", (_kv_want(last, cs, mine - 1, BLOCK_N, hk)[1], ), False, "last")
            if "early_release" in bugs:
                yield ("arrive", ("empty", last))
            yield ("mma_wait", 0)
            for s in late:
                yield ("arrive", ("empty", s))
            if "early_release" not in bugs:
                yield ("arrive", ("empty", last))
            yield ("use", "acc")  # acc / l
            yield ("store", "O", seq, lo, hi, h)
            yield ("store", "LSE", seq, lo, hi, h)
        yield from _release_rest(p, it, mine, nb, lambda j, slot, cs=cs: _kv_want(slot, cs, j, BLOCK_N, hk), C,
                                 p.pingpong)
        it += mine if "it_mine" in bugs else nb
        t = seg_hi
        seq += 1


def _turn(p, C, block):
    """_turn: wait for consumer C's turn to issue the products of ring block ``block``."""
    parity = (block & 1) ^ (1 - C)
    if "turn_parity_c1" in p.bugs and C == 1:
        parity ^= 1
    yield ("wait", ("turn", C), parity, True, None)


def _other(C, bugs):
    """turn.index(1 - C): the other consumer's turn barrier, on which this one passes on its turn."""
    return C if "turn_own_arrive" in bugs else 1 - C


def _release_rest(p, it, mine, nb, want, C, pingpong):
    """_release_rest: blocks [mine, nb) of the segment waited for and released (want(j, slot): their tags); with
    PINGPONG each block's turn taken and passed on."""
    S, bugs = p.S, p.bugs
    for j in range(mine, nb):
        cur = it + j
        slot = cur % S
        yield ("wait", ("full", slot), _full_parity(cur, S, bugs), True, want(j, slot))
        if pingpong and "turn_skip_release" not in bugs:
            yield from _turn(p, C, cur)
            yield ("arrive", ("turn", _other(C, bugs)))
        if "skip_release" not in bugs:
            yield ("arrive", ("empty", slot))


# ---------------------------------------------------------------------------------------------- dQ
def _load_halves(p, a, b, a_head, b_head, bar, a_smem, b_smem):
    """_load_halves: both halves c of tensors a and b (heads a_head / b_head) into a_smem / b_smem slot c on
    bar c; none for a half wholly past T."""
    T, t0 = p.T, p.t0
    yield ("desc", "a_desc", a, 0, T, a_head)
    yield ("desc", "b_desc", b, 0, T, b_head)
    for c in range(2):
        has_rows = t0 + c * HALF < T
        nbytes = 2 * HALF * D * BITS // 8
        if "half_expect_rows" in p.bugs:
            nbytes //= 2
        yield ("expect", (bar, c), nbytes, has_rows)
        yield ("load", "a_desc", t0 + c * HALF, 0, (bar, c), (a_smem, c), HALF, has_rows)
        yield ("load", "b_desc", t0 + c * HALF, 0, (bar, c), (b_smem, c), HALF, has_rows)


def _dq_producer(p):
    h = p.head
    hk = h // p.group
    yield from _load_halves(p, "Q", "DO", h, h, "q_bar", "q_smem", "do_smem")
    yield from _produce_kv(p, hk)


def _dq_consumer(C, p):
    """_dq_consumer: per block S and dP in flight together, then dQ += dS K, released once that retired."""
    T, t0, h, S, BLOCK_N, causal, bugs = p.T, p.t0, p.head, p.S, p.block, p.causal, p.bugs
    hk = h // p.group
    r0 = t0 + C * HALF
    q = (("q_smem", C), ("Q", 0, r0, h))
    do = (("do_smem", C), ("DO", 0, r0, h))
    t_end = min(t0 + BLOCK_M, T)
    my_end = min(r0 + HALF, T)
    seq = _seq_of(p.cu, p.n_seqs, t0)
    t = t0
    it = 0
    yield ("wait", ("q_bar", C), 0, True if "no_half_pred" in bugs else r0 < T, (q, do))
    while t < t_end:
        cs, L, seg_hi, free_hi, nb = _segment(p.cu, seq, t, t_end, BLOCK_N, causal)
        lo, hi, mine, free = _my_blocks(t, cs, seg_hi, free_hi, nb, r0, my_end, BLOCK_N, causal)
        if "mine_short" in bugs and mine > 1:
            mine -= 1
        if "store_from_t" in bugs:
            lo = t
        if mine > 0:
            for j in range(mine):
                cur = it + j
                slot = cur % S
                kv = _kv_want(slot, cs, j, BLOCK_N, hk)
                yield ("wait", ("full", slot), _full_parity(cur, S, bugs), True, kv)
                yield ("mma", "s", (q, kv[0]), False)
                yield ("mma", "dp", (do, kv[1]), False)
                yield ("mma_wait", 2 if "shallow_wait" in bugs else 1)
                yield ("use", "s")
                yield ("mma_wait", 0)
                yield ("use", "dp")
                yield ("mma", "dq", (kv[0], ), False)
                if "early_release" in bugs:
                    yield ("arrive", ("empty", slot))
                yield ("mma_wait", 0)
                yield ("use", "dq")
                if "early_release" not in bugs:
                    yield ("arrive", ("empty", slot))
            yield ("store", "DQ", seq, lo, hi, h)
        yield from _release_rest(p, it, mine, nb, lambda j, slot, cs=cs: _kv_want(slot, cs, j, BLOCK_N, hk), 0,
                                 False)
        it += mine if "it_mine" in bugs else nb
        t = seg_hi
        seq += 1


# ---------------------------------------------------------------------------------------------- dK / dV
def _qdo_want(slot, cs, m0, h):
    return ((("q_smem", slot), ("Q", cs, m0, h)), (("do_smem", slot), ("DO", cs, m0, h)))


def _dkdv_producer(p):
    """_dkdv_producer: the tile's K / V halves on kv_bar, then per segment the GROUP heads' Q / dO blocks."""
    S, BM, GROUP, hk, bugs = p.S, p.block, p.group, p.head, p.bugs
    yield from _load_halves(p, "K", "V", hk, hk, "kv_bar", "k_smem", "v_smem")
    t_end = min(p.t0 + BLOCK_M_KV, p.T)
    seq = _seq_of(p.cu, p.n_seqs, p.t0)
    t = p.t0
    it = 0
    while t < t_end:
        cs, L, seg_hi, q_start, nq, total = _dkdv_segment(p.cu, seq, t, t_end, BM, GROUP, p.causal)
        if total > 0:
            yield from _rebuild_waits(it, S, bugs)
            # the (L, GROUP * D) view of the group's query heads: column g * D is head hk * GROUP + g
            yield ("desc", "q_desc", "Q", cs, L, hk * GROUP)
            yield ("desc", "do_desc", "DO", cs, L, hk * GROUP)
            for step in range(total):
                g = step // nq
                slot = it % S
                yield ("wait", ("empty", slot), _empty_parity(it, S, bugs), True, None)
                bar = ("full", slot)
                nbytes = 2 * BM * D * BITS // 8
                if "half_expect" in bugs:
                    nbytes //= 2
                yield ("expect", bar, nbytes, True)
                row = q_start + (step - g * nq) * BM
                yield ("load", "q_desc", row, g * D, bar, ("q_smem", slot), BM, True)
                yield ("load", "do_desc", row, g * D, bar, ("do_smem", slot), BM, True)
                it += 1
        t = seg_hi
        seq += 1


def _dkdv_consumer(C, p):
    """_dkdv_consumer: keys [t0 + 64 C, +64); per step S^T and dP^T in flight, dV during dS, then dK."""
    T, t0, hk, S, BM, GROUP, causal, bugs = p.T, p.t0, p.head, p.S, p.block, p.group, p.causal, p.bugs
    r0 = t0 + C * HALF
    k_c = (("k_smem", C), ("K", 0, r0, hk))
    v_c = (("v_smem", C), ("V", 0, r0, hk))
    t_end = min(t0 + BLOCK_M_KV, T)
    my_end = min(r0 + HALF, T)
    seq = _seq_of(p.cu, p.n_seqs, t0)
    t = t0
    it = 0
    yield ("wait", ("kv_bar", C), 0, True if "no_half_pred" in bugs else r0 < T, (k_c, v_c))
    while t < t_end:
        cs, L, seg_hi, q_start, nq, total = _dkdv_segment(p.cu, seq, t, t_end, BM, GROUP, causal)
        lo = max(t, r0)
        hi = min(seg_hi, my_end)
        if hi > lo:
            if "store_from_t" in bugs:
                lo = t
            for step in range(total):
                g = step // nq
                m0 = q_start + (step - g * nq) * BM
                cur = it + step
                slot = cur % S
                h = hk * GROUP + g
                qd = _qdo_want(slot, cs, m0, h)
                yield ("wait", ("full", slot), _full_parity(cur, S, bugs), True, qd)
                yield ("mma", "sT", (k_c, qd[0]), False)
                yield ("mma", "dpT", (v_c, qd[1]), False)
                yield ("mma_wait", 2 if "shallow_wait" in bugs else 1)
                yield ("use", "sT")
                yield ("mma", "dv", (qd[1], ), False)
                yield ("mma_wait", 1)
                yield ("use", "dpT")
                yield ("mma", "dk", (qd[0], ), False)
                if "early_release" in bugs:
                    yield ("arrive", ("empty", slot))
                yield ("mma_wait", 0)
                yield ("use", "dv")
                yield ("use", "dk")
                if "early_release" not in bugs:
                    yield ("arrive", ("empty", slot))
            yield ("store", "DK", seq, lo, hi, hk)
            yield ("store", "DV", seq, lo, hi, hk)
        else:
            for step in range(total):
                cur = it + step
                g = step // nq  # (the model's expected tags; the kernel computes no index here)
                qd = _qdo_want(cur % S, cs, q_start + (step - g * nq) * BM, hk * GROUP + g)
                yield ("wait", ("full", cur % S), _full_parity(cur, S, bugs), True, qd)
                if "skip_release" not in bugs:
                    yield ("arrive", ("empty", cur % S))
        it += total
        t = seg_hi
        seq += 1


def _fwd_kernel(p):
    """_fwd_kernel's mbarriers as it initialises them, {key: count} (it invalidates them all after the partitions:
    the end check's whole phases): full / empty per ring slot, q_bar per half, and with PINGPONG the turns."""
    bars = {}
    for i in range(p.S):
        bars[("full", i)] = 1
        bars[("empty", i)] = 2
    for c in range(2):
        bars[("q_bar", c)] = 1
    if p.pingpong:  # the consumers' turns (_turn): one arrival each (the other consumer's)
        for c in range(2):
            bars[("turn", c)] = 2 if "turn_count2" in p.bugs else 1
    return bars


def _ring_barriers(p, half_bar):
    """_ring_barriers (the backward kernels'): full / empty per ring slot, one per consumer half."""
    bars = {}
    for i in range(p.S):
        bars[("full", i)] = 1
        bars[("empty", i)] = 2
    for c in range(2):
        bars[(half_bar, c)] = 1
    return bars


BARRIERS = {
    "fwd": _fwd_kernel,
    "dq": lambda p: _ring_barriers(p, "q_bar"),
    "dkdv": lambda p: _ring_barriers(p, "kv_bar"),
}
PARTITIONS = {  # gl.warp_specialize's list: the default partition (consumer 0), then the workers
    "fwd": (lambda p: _consumer(0, p), lambda p: _consumer(1, p), _producer),
    "dq": (lambda p: _dq_consumer(0, p), lambda p: _dq_consumer(1, p), _dq_producer),
    "dkdv": (lambda p: _dkdv_consumer(0, p), lambda p: _dkdv_consumer(1, p), _dkdv_producer),
}
HALF_BAR = {"fwd": "q_bar", "dq": "q_bar", "dkdv": "kv_bar"}
RING = {"fwd": ("k_smem", "v_smem"), "dq": ("k_smem", "v_smem"), "dkdv": ("q_smem", "do_smem")}
OUTPUTS = {"fwd": ("O", "LSE"), "dq": ("DQ", ), "dkdv": ("DK", "DV")}
NAMES = ("consumer 0", "consumer 1", "producer")


# ---------------------------------------------------------------------------------------------- the machine
class Bar:
    __slots__ = ("count", "pending", "tx", "completed", "expected", "issued", "landed", "arrivals")

    def __init__(self, count):
        self.count = count
        self.pending = count
        self.tx = 0
        self.completed = 0
        self.expected = 0  # expect-tx bytes of the current phase, and bytes of its loads issued / landed
        self.issued = 0
        self.landed = 0
        self.arrivals = [0, 0]  # per consumer (empty barriers)


class Load:
    __slots__ = ("site", "bar", "buf", "tag", "nbytes", "phase")

    def __init__(self, site, bar, buf, tag, nbytes, phase):
        self.site, self.bar, self.buf, self.tag, self.nbytes, self.phase = site, bar, buf, tag, nbytes, phase


class Part:
    __slots__ = ("idx", "name", "gen", "ev", "done", "fifo", "waits", "arrives", "held", "reads", "weight", "turns")

    def __init__(self, idx, gen, S, weight):
        self.idx, self.name, self.gen, self.weight = idx, NAMES[idx], gen, weight
        self.ev = None
        self.done = False
        self.fifo = []  # [label, bufs, retired]
        self.waits = [0] * S  # full waits per slot (consumers)
        self.arrives = [0] * S
        self.held = set()  # buffers waited for and not yet released
        self.reads = set()  # data tags read by wgmma since the last store
        self.turns = 0  # PINGPONG turns taken


class Sim:
    """One program under one random interleaving."""

    def __init__(self, p, rng, where):
        self.p, self.rng, self.where = p, rng, where
        S = p.S
        self.bars = {key: Bar(count) for key, count in BARRIERS[p.kernel](p).items()}
        self.turn_next = (0, 0)  # PINGPONG: the next turn due, (ring block, consumer)
        self.turn_holder = None  # (ring block, consumer) holding its turn, products issued in it
        self.bufs = {}  # buffer -> [newest landed tag, load in flight or None, loads issued]
        self.descs = {}  # call site -> (tensor, base, rows, head)
        self.inflight = []
        self.stores = Counter()
        self.ring = RING[p.kernel]
        self.parts = [Part(i, fn(p), S, 1.0) for i, fn in enumerate(PARTITIONS[p.kernel])]
        self._redraw()
        self.cur = None
        self.cov = Counter()

    # ---- errors
    def fail(self, check, msg, part=None):
        part = part or self.cur
        who = f"partition {part.name}, event {part.ev}" if part is not None else "scheduler / TMA unit"
        raise ModelError(check, f"{self.where}: {who}: {msg}")

    # ---- scheduling
    def _redraw(self):
        """New relative speeds of the three partitions and of the TMA unit, kept for a random stretch of steps:
        one consumer far behind the other, the producer ahead of both or starved, loads landing at once or late."""
        for part in self.parts:
            part.weight = self.rng.choice((0.05, 0.3, 1.0, 3.0, 20.0))
        self.w_land = self.rng.choice((0.05, 0.3, 1.0, 3.0, 20.0))
        self.stretch = self.rng.randint(5, 200)

    def _advance(self, part):
        try:
            part.ev = next(part.gen)
        except StopIteration:
            part.ev = None
            part.done = True
            self.cur = part
            if any(not g[2] for g in part.fifo):
                self.fail("retire", "partition ends with a wgmma group in flight")
            ring_held = sorted(buf for buf in part.held if buf[0] in self.ring)
            if ring_held:
                self.fail("end", f"partition ends holding ring slots {ring_held} (waited for, never released)")
            return
        ev = part.ev
        if ev[0] == "wait" and ev[1][0] == HALF_BAR[self.p.kernel] and ev[3]:
            if self.p.t0 + part.idx * HALF >= self.p.T:
                self.cur = part
                self.fail("half", "a consumer with no rows (its half at or past T) waits on its per-half barrier")

    def _runnable(self, part):
        ev = part.ev
        if ev[0] != "wait" or not ev[3]:
            return True
        bar = self.bars[ev[1]]
        return (bar.completed & 1) != ev[2]

    def run(self):
        rng = self.rng
        for part in self.parts:
            self._advance(part)
        while True:
            cands = [part for part in self.parts if not part.done and self._runnable(part)]
            for part in self.parts:
                if not part.done and part not in cands:
                    self.cov[f"blocked {part.name} {part.ev[1][0]}"] += 1
            self.stretch -= 1
            if self.stretch == 0:
                self._redraw()
            total = sum(part.weight for part in cands) + (self.w_land if self.inflight else 0.0)
            if total == 0.0:
                if all(part.done for part in self.parts):
                    break
                self.cur = None
                stuck = "; ".join(f"{part.name} at {part.ev}" for part in self.parts if not part.done)
                bars = {k: (b.completed, b.pending, b.tx) for k, b in self.bars.items()}
                self.fail("deadlock", f"no partition can run and no load is in flight: {stuck}; "
                                      f"barriers (completed, pending, tx): {bars}")
            x = rng.random() * total
            pick = None
            for part in cands:
                x -= part.weight
                if x < 0:
                    pick = part
                    break
            if pick is None:
                self._land(self.inflight.pop(rng.randrange(len(self.inflight))))
                continue
            self.cur = pick
            self._exec(pick, pick.ev)
            self._advance(pick)
        self.cur = None
        self._end()
        return self.stores

    # ---- barriers
    def _arrive(self, bar, key):
        if bar.pending == 0:
            self.fail("barrier", f"arrival on {key} whose phase {bar.completed} has no pending arrival (count "
                                 f"{bar.count}, tx {bar.tx} B pending)")
        bar.pending -= 1
        self._maybe_complete(bar, key)

    def _maybe_complete(self, bar, key):
        if bar.pending == 0 and bar.tx == 0:
            if bar.expected != bar.landed:
                self.fail("barrier", f"{key} phase {bar.completed}: expect-tx {bar.expected} B, loaded {bar.landed} B")
            for ld in self.inflight:
                if ld.bar == key and ld.phase == bar.completed:
                    self.fail("barrier", f"{key} phase {bar.completed} completes with its load {ld.tag} in flight "
                                         f"(expect-tx {bar.expected} B below the bytes loaded)")
            bar.completed += 1
            bar.pending = bar.count
            bar.expected = bar.issued = bar.landed = 0

    def _land(self, ld):
        self.cur = None
        bar = self.bars[ld.bar]
        st = self.bufs[ld.buf]
        st[0], st[1] = ld.tag, None
        if bar.completed != ld.phase:
            self.fail("barrier", f"load {ld.tag} into {ld.buf} issued in phase {ld.phase} of {ld.bar} lands in "
                                 f"phase {bar.completed}")
        bar.tx -= ld.nbytes
        bar.landed += ld.nbytes
        if bar.tx < 0:
            self.fail("barrier", f"load {ld.tag} lands {ld.nbytes} B on {ld.bar}: tx below zero (expect-tx "
                                 f"{bar.expected} B, loaded {bar.landed} B)")
        self._maybe_complete(bar, ld.bar)

    # ---- events
    def _exec(self, part, ev):
        kind = ev[0]
        if kind == "wait":
            _, key, parity, pred, want = ev
            if not pred:
                return
            bar = self.bars[key]
            if part.idx == 2:
                return  # the producer's waits guard no data it reads
            if key[0] == "turn":
                self._take_turn(part, key)
                return
            for buf, tag in want:
                st = self.bufs.get(buf)
                if st is None or st[1] is not None or st[0] != tag:
                    have = None if st is None else st[0]
                    fly = None if st is None or st[1] is None else st[1].tag
                    self.fail("stale", f"passes wait({key}, parity {parity}) (phases completed {bar.completed}) "
                                       f"but {buf} holds {have} (in flight: {fly}), the code expects {tag}")
                part.held.add(buf)
            if key[0] == "full":
                part.waits[key[1]] += 1
            return
        if kind == "arrive":
            key = ev[1]
            bar = self.bars[key]
            slot = key[1]
            if key[0] == "turn" and part.idx < 2:
                self._pass_turn(part, key, bar)
                return
            if part.idx == 2 or key[0] != "empty":
                self.fail("barrier", "arrival by a partition that does not release ring slots")
            bufs = {(name, slot) for name in self.ring}
            for label, gbufs, retired in part.fifo:
                if not retired and gbufs & bufs:
                    self.fail("release", f"releases slot {slot} while its wgmma group {label!r} reading "
                                         f"{sorted(gbufs & bufs)} is in flight")
            if part.arrives[slot] >= part.waits[slot]:
                self.fail("release", f"releases slot {slot} which it has not waited for (waits {part.waits[slot]}, "
                                     f"releases {part.arrives[slot]})")
            if bar.arrivals[part.idx] != bar.completed:
                self.fail("barrier", f"arrives on {key} for the {bar.arrivals[part.idx]}-th time in its phase "
                                     f"{bar.completed}: a second arrival of this consumer on one phase")
            part.arrives[slot] += 1
            bar.arrivals[part.idx] += 1
            part.held -= bufs
            self._arrive(bar, key)
            return
        if kind == "expect":
            _, key, nbytes, pred = ev
            if not pred:
                return
            bar = self.bars[key]
            if bar.pending == 0:
                self.fail("barrier", f"expect on {key} whose phase {bar.completed} has no pending arrival "
                                     f"(tx {bar.tx} B pending)")
            bar.tx += nbytes
            bar.expected += nbytes
            self._arrive(bar, key)
            return
        if kind == "load":
            _, site, row, col, key, buf, box, pred = ev
            if not pred:
                return
            if site not in self.descs:
                self.fail("descriptor", f"load through {site} before it was built")
            tensor, base, rows, head = self.descs[site]
            if not 0 <= row < rows:
                self.fail("descriptor", f"load box at row {row} starts outside {site}'s {rows} rows")
            tag = (tensor, base, row, head + col // D)
            st = self.bufs.setdefault(buf, [None, None, 0])
            if st[1] is not None:
                self.fail("overwrite", f"load {tag} into {buf} while its load {st[1].tag} is in flight")
            for q in self.parts[:2]:
                for label, gbufs, retired in q.fifo:
                    if not retired and buf in gbufs:
                        self.fail("overwrite", f"load {tag} into {buf} while {q.name}'s wgmma {label!r} reads it")
            if buf[0] in self.ring:
                slot = buf[1]
                for q in self.parts[:2]:
                    if q.waits[slot] != st[2] or q.arrives[slot] != st[2]:
                        self.fail("overwrite", f"load {tag} into {buf}: {q.name} waited for {q.waits[slot]} and "
                                               f"released {q.arrives[slot]} of its {st[2]} previous loads")
                if st[2]:
                    self.cov["ring refill"] += 1
            elif st[2]:
                self.fail("overwrite", f"second load {tag} into the single-shot buffer {buf}")
            bar = self.bars[key]
            ld = Load(site, key, buf, tag, box * D * BITS // 8, bar.completed)
            if bar.issued + ld.nbytes > bar.expected:
                self.fail("barrier", f"load {tag} of {ld.nbytes} B on {key} phase {bar.completed}: its expect-tx "
                                     f"{bar.expected} B does not cover it ({bar.issued} B issued before)")
            bar.issued += ld.nbytes
            st[1] = ld
            st[2] += 1
            self.inflight.append(ld)
            return
        if kind == "desc":
            _, site, tensor, base, rows, head = ev
            for ld in self.inflight:
                if ld.site == site:
                    self.fail("descriptor", f"{site} rebuilt for rows {base}+{rows} while its load {ld.tag} is in "
                                            "flight")
            if rows < 1:
                self.fail("descriptor", f"{site} built with {rows} rows")
            if site in self.descs:
                self.cov["descriptor rebuilt"] += 1
            self.descs[site] = (tensor, base, rows, head)
            return
        if kind == "mma":
            label, reads, sync = ev[1:4]
            if self.p.pingpong:
                block = ev[4]
                if block == "last":
                    self.cov["product outside the turns"] += 1
                elif self.turn_holder is None or tuple(self.turn_holder[:2]) != (block, part.idx):
                    held = (f"no turn is held ({self.turn_next} due)" if self.turn_holder is None else
                            f"the turn held is {tuple(self.turn_holder[:2])}")
                    self.fail("turn", f"issues a product of ring block {block} while {held} (block, consumer)")
                else:
                    self.turn_holder[2] += 1
            for buf, tag in reads:
                st = self.bufs.get(buf)
                if st is None or st[1] is not None or st[0] != tag or buf not in part.held:
                    have = None if st is None else st[0]
                    self.fail("stale", f"wgmma {label!r} reads {buf} holding {have}, expects {tag} (held by this "
                                       f"consumer: {buf in part.held})")
                part.reads.add(tag)
            part.fifo.append([label, frozenset(buf for buf, _ in reads), False])
            if sync:
                self._mma_wait(part, 0)
            return
        if kind == "mma_wait":
            self._mma_wait(part, ev[1])
            return
        if kind == "use":
            for g in reversed(part.fifo):
                if g[0] == ev[1]:
                    if not g[2]:
                        self.fail("retire", f"result of wgmma {ev[1]!r} used before its group retired")
                    return
            self.fail("retire", f"result of wgmma {ev[1]!r} used, none issued")
        if kind == "store":
            self._store(part, ev)
            return
        raise AssertionError(ev)

    def _take_turn(self, part, key):
        """Consumer part passes its wait on turn[C]: its part.turns-th turn (ring block part.turns)."""
        if key[1] != part.idx:
            self.fail("turn", f"waits on {key}, the other consumer's turn barrier")
        mine = (part.turns, part.idx)
        if self.turn_holder is not None:
            self.fail("turn", f"takes its turn {mine} (block, consumer) while {tuple(self.turn_holder[:2])} is held")
        if mine != self.turn_next:
            self.fail("turn", f"takes its turn {mine} (block, consumer) out of order: {self.turn_next} is due")
        self.turn_holder = [part.turns, part.idx, 0]
        part.turns += 1

    def _pass_turn(self, part, key, bar):
        """Consumer part arrives on a turn barrier: it passes on the turn it holds."""
        if key[1] != 1 - part.idx:
            self.fail("barrier", f"arrives on {key}: only consumer {1 - key[1]} arrives there (count {bar.count})")
        if self.turn_holder is None or self.turn_holder[1] != part.idx:
            self.fail("turn", f"passes on a turn it does not hold (held: "
                              f"{None if self.turn_holder is None else tuple(self.turn_holder[:2])})")
        b, c, products = self.turn_holder
        if products == 0:
            self.cov["turn passed without products"] += 1
        self.turn_holder = None
        self.turn_next = (b, 1) if c == 0 else (b + 1, 0)
        bar.arrivals[part.idx] += 1
        self._arrive(bar, key)

    def _mma_wait(self, part, n):
        live = [g for g in part.fifo if not g[2]]
        for g in live[:max(len(live) - n, 0)]:
            g[2] = True
        # groups retire in issue order: drop old retired ones, keep the newest few for "use"
        if len(part.fifo) > 8:
            part.fifo = part.fifo[-max(8, min(len(live), n)):]

    def _store(self, part, ev):
        _, out, seq, lo, hi, head = ev
        p = self.p
        cu = p.cu
        cs, ce = cu[seq], cu[seq + 1]
        r0 = p.t0 + part.idx * HALF
        if head != p.head:
            self.fail("store", f"stores head {head}, the program's is {p.head}")
        if not (lo < hi and cs <= lo and hi <= ce and r0 <= lo and hi <= min(r0 + HALF, p.T)):
            self.fail("store", f"stores rows [{lo}, {hi}) outside its half [{r0}, {r0 + HALF}) / sequence "
                               f"[{cs}, {ce}) / T {p.T}")
        L = ce - cs
        B = p.block
        if p.kernel in ("fwd", "dq"):
            hk = head // p.group
            n_keys = hi - cs if p.causal else L  # the last stored row's keys
            need = [(t, cs, j * B, hk) for j in range((n_keys + B - 1) // B) for t in ("K", "V")]
        else:
            first = (lo - cs) // B * B if p.causal else 0  # the first query block that sees key lo
            need = [(t, cs, m0, head * p.group + g) for g in range(p.group) for m0 in range(first, L, B)
                    for t in ("Q", "DO")]
        missing = [tag for tag in need if tag not in part.reads]
        if missing:
            self.fail("store", f"stores rows [{lo}, {hi}) without having read {missing[:3]} (of {len(missing)})")
        for r in range(lo, hi):
            self.stores[(out, r, head)] += 1
        if out == OUTPUTS[p.kernel][-1]:
            part.reads = set()

    def _end(self):
        p = self.p
        if self.inflight:
            self.fail("end", f"loads in flight at the end: {[ld.tag for ld in self.inflight]}")
        c0, c1, _ = self.parts
        for s in range(p.S):
            loads = self.bufs.get((self.ring[0], s), [None, None, 0])[2]
            full, empty = self.bars[("full", s)], self.bars[("empty", s)]
            got = (full.completed, c0.waits[s], c1.waits[s], c0.arrives[s], c1.arrives[s], empty.completed)
            if got != (loads, ) * 6:
                self.fail("end", f"slot {s}: producer loads {loads}, (full phases, waits c0, c1, releases c0, c1, "
                                 f"empty phases) {got}")
        if p.pingpong:
            blocks = sum(self.bufs.get((self.ring[0], s), [None, None, 0])[2] for s in range(p.S))
            got = (self.turn_holder, self.turn_next, c0.turns, c1.turns, self.bars[("turn", 0)].completed,
                   self.bars[("turn", 1)].completed)
            if got != (None, (blocks, 0), blocks, blocks, blocks, blocks):
                self.fail("end", f"{blocks} ring blocks: (turn held, next turn due, turns taken c0, c1, turn[0] "
                                 f"phases, turn[1] phases) {got}")
        for key, bar in self.bars.items():
            if bar.pending != bar.count or bar.tx != 0:
                self.fail("end", f"{key} ends in a partial phase (pending {bar.pending} of {bar.count}, tx {bar.tx})")
        for c in range(2):
            want = 1 if p.t0 + c * HALF < p.T else 0
            got = self.bars[(HALF_BAR[p.kernel], c)].completed
            if got != want:
                self.fail("end", f"per-half barrier {c} completed {got} phases, expected {want}")
        tile = BLOCK_M_KV if p.kernel == "dkdv" else BLOCK_M
        for out in OUTPUTS[p.kernel]:
            for r in range(p.t0, min(p.t0 + tile, p.T)):
                n = self.stores[(out, r, p.head)]
                if n != 1:
                    self.fail("end", f"{out} row {r} head {p.head} stored {n} times")
        if len(self.stores) != len(OUTPUTS[p.kernel]) * (min(p.t0 + tile, p.T) - p.t0):
            self.fail("end", "stores outside the tile's rows")
        self.cov["programs"] += 1
        for c in range(2):
            if p.t0 + c * HALF >= p.T:
                self.cov["consumer without rows"] += 1


# ---------------------------------------------------------------------------------------------- driver
def configs(kernel):
    """The kernel's configs: the forward's CONFIGS (PINGPONG False) and PINGPONG_CONFIGS (3-tuples)."""
    return {"fwd": gws.CONFIGS + gws.PINGPONG_CONFIGS, "dq": gws.DQ_CONFIGS, "dkdv": gws.DKDV_CONFIGS}[kernel]


def config_id(config):
    return "x".join(map(str, config[:2])) + ("-pingpong" if config[2:] and config[2] else "")


def cu_of(lens):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return cu


def run(kernel, lens, Hq, Hkv, config, causal, seed=0, n_orders=3, bugs=frozenset(), cov=None):
    """Every (tile, head) program of the varlen batch ``lens`` under n_orders random interleavings each; raises
    ModelError on the first violation. Returns the number of (program, order) runs checked."""
    assert Hq % Hkv == 0 and kernel in KERNELS
    cu = cu_of(lens)
    T = cu[-1]
    group = Hq // Hkv
    block, stages, *pingpong = config  # forward()'s config
    pingpong = bool(pingpong and pingpong[0])
    heads = Hkv if kernel == "dkdv" else Hq
    tile = BLOCK_M_KV if kernel == "dkdv" else BLOCK_M
    rng = random.Random(f"{kernel} {lens} {Hq} {Hkv} {config} {causal} {seed}")
    stores = Counter()
    n = 0
    for t0 in range(0, T, tile):
        for head in range(heads):
            p = Prog(kernel, cu, t0, head, group, block, stages, causal, bugs, pingpong)
            for order in range(n_orders):
                where = (f"{kernel} config {config} causal={causal} lens={lens} Hq={Hq} Hkv={Hkv} seed={seed}: "
                         f"tile t0={t0} head {head} order {order}")
                sim = Sim(p, random.Random(rng.random()), where)
                got = sim.run()
                if order == 0:
                    stores.update(got)
                if cov is not None:
                    cov.update(sim.cov)
                n += 1
    for out in OUTPUTS[kernel]:
        for r in range(T):
            for head in range(heads):
                if stores[(out, r, head)] != 1:
                    raise ModelError("end", f"{kernel} config {config} causal={causal} lens={lens}: {out} row {r} "
                                            f"head {head} stored {stores[(out, r, head)]} times over the grid")
    return n


# varlen batches: length-1 and empty sequences, a sequence of many blocks, tiles of many short sequences, T not a
# multiple of 128 (a last tile whose second half is past T, or partly past it), GQA 1, 2 and 4
CASES = [
    ([1, 63, 0, 64, 65, 200, 1, 300], 4, 1),  # T 694: the last tile's second half partly past T
    ([700, 3, 0, 129], 2, 2),  # T 832; a sequence of 11 blocks of 64, a long segment then a short one
    ([130, 0, 126, 5], 2, 1),  # T 261: the last tile's second half wholly past T
    ([64] * 3 + [1] * 7 + [2, 3, 0, 5] + [190], 4, 2),  # many short sequences in one tile
    ([0, 1, 37, 1, 16, 5, 0, 170, 0], 2, 1),  # T 230: the second tile's second half partly past T; empty ends
    ([1], 2, 1),  # one row
]


def selftest(verbose=False, n_orders=4):
    """Each planted bug (BUGS) must be caught by one of its checks on some case of some config of each kernel it
    applies to (PINGPONG_BUGS: of the forward's PINGPONG_CONFIGS); the unplanted transcription passes the same
    cases. Returns {(bug, kernel): message}."""
    found = {}
    for bug, (kernels, checks) in BUGS.items():
        for kernel in kernels:
            msg = None
            cfgs = gws.PINGPONG_CONFIGS if bug in PINGPONG_BUGS else configs(kernel)
            for lens, Hq, Hkv in CASES:
                for config in cfgs:
                    for causal in (True, False):
                        try:
                            run(kernel, lens, Hq, Hkv, config, causal, seed=1, n_orders=n_orders, bugs={bug})
                        except ModelError as e:
                            if e.check not in checks:
                                raise AssertionError(f"planted {bug} in {kernel} caught by the wrong check: {e}") \
                                    from e
                            msg = str(e)
                        if msg:
                            break
                    if msg:
                        break
                if msg:
                    break
            if msg is None:
                raise AssertionError(f"planted bug {bug} in {kernel} not caught")
            found[(bug, kernel)] = msg
            if verbose:
                print(f"{bug:18s} {kernel:5s} {msg[:200]}")
    return found


if __name__ == "__main__":
    t = time.time()
    if sys.argv[1:] == ["selftest"]:
        selftest(verbose=True)
    else:
        orders = int(sys.argv[1]) if sys.argv[1:] else 10
        cov = Counter()
        total = 0
        for kernel in KERNELS:
            for config in configs(kernel):
                for causal in (True, False):
                    for lens, Hq, Hkv in CASES:
                        total += run(kernel, lens, Hq, Hkv, config, causal, seed=7, n_orders=orders, cov=cov)
        print(total, "program orders;", dict(cov))
    print(f"{time.time() - t:.1f} s")
