"""The warp-specialised Gluon kernels (R4B_VARLEN_FWD=gluon-ws, R4B_VARLEN_BWD=gluon-ws / gluon-ws-dq / gluon-ws-dkdv,
r4b/kernels/_varlen_gluon_ws.py; the forward is described here, the dQ and dK/dV kernels are checked the same ways):
never run on a GPU yet, so here it is (1) compiled for sm_90 (partitions, register split, pipelined products, no
spills), (2) its index and ring logic transcribed into a float64 emulation (the producer's block order, each
consumer's segments, the blocks it computes or only releases, its masks and stores) and checked against float64
attention on varlen batches, (3) refused on GPUs by name until its GPU tests (below, -m gpu) pass. The transcription
pins the kernel source's sha256: a change to the kernel fails the pin until the emulation is transcribed again."""

import hashlib
import inspect
import random

import numpy as np
import pytest
import torch

gws = pytest.importorskip("r4b.kernels._varlen_gluon_ws")

from bench.harness import same_bits  # noqa: E402
from r4b.kernels import varlen_attention, varlen_attention_ref  # noqa: E402
from tests._aot import run_aot_code, run_aot_report  # noqa: E402
from tests._lowprec import assert_within_twice_plain  # noqa: E402
from tests.test_varlen_attention import (  # noqa: E402
    _attention64,
    _cu,
    _grads,
    _inputs,
    _routing_case,
    _sdpa_bf16_per_doc,
)

# sha256 of the source of the eight @gluon.jit functions of the forward, transcribed into emulate() below
KERNEL_SHA = "4eda2f23e9ba791bf53ad249ba69680868bf1175325030a0fa3f62ca339ff91d"
NEG = -1.0e30
LOG2E = 1.4426950408889634


FWD_FNS = ("_segment", "_producer", "_produce_kv", "_my_blocks", "_release_rest", "_consumer", "_fwd_kernel", "_turn")
# and of the nine of the dQ kernel, transcribed into emulate_dq()
DQ_SHA = "9daecf6f47e6d2f88057731b77e7c7df45ed4ff8954fc589aa352f0a8535166d"
DQ_FNS = ("_segment", "_dq_producer", "_produce_kv", "_my_blocks", "_release_rest", "_dq_consumer", "_bwd_dq_kernel",
          "_ring_barriers", "_load_halves")
# and of the six of the dK/dV kernel, transcribed into emulate_dkdv()
DKDV_SHA = "c2554fa1bf434bdbfa9a96b35417cfa69de5cb240f9d9b88c96deec22f551ee4"
DKDV_FNS = ("_dkdv_segment", "_dkdv_producer", "_dkdv_consumer", "_bwd_dkdv_kernel", "_ring_barriers",
            "_load_halves")


def kernel_sha(names=FWD_FNS) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(inspect.getsource(getattr(gws, name).fn).encode())
    return h.hexdigest()


def test_the_emulation_is_transcribed_from_the_current_kernel():
    assert kernel_sha() == KERNEL_SHA, ("r4b/kernels/_varlen_gluon_ws.py's kernels changed: transcribe the change into "
                                        f"emulate() below, then set KERNEL_SHA = {kernel_sha()!r}")
    assert kernel_sha(DQ_FNS) == DQ_SHA, ("r4b/kernels/_varlen_gluon_ws.py's dQ kernel changed: transcribe the change "
                                          f"into emulate_dq() below, then set DQ_SHA = {kernel_sha(DQ_FNS)!r}")
    assert kernel_sha(DKDV_FNS) == DKDV_SHA, ("r4b/kernels/_varlen_gluon_ws.py's dK/dV kernel changed: transcribe the "
                                              "change into emulate_dkdv() below, then set "
                                              f"DKDV_SHA = {kernel_sha(DKDV_FNS)!r}")


def _segments(cu, n_seqs, t0, T):
    """The segments of the tile from t0 (the kernels' walk: _seq_of, then one sequence at a time)."""
    t_end = min(t0 + gws.BLOCK_M.value, T)
    seq = max(s for s in range(n_seqs) if cu[s] <= t0)
    t = t0
    while t < t_end:
        cs, ce = cu[seq], cu[seq + 1]
        seg_hi = min(ce, t_end)
        yield t, cs, ce, seg_hi
        t = seg_hi
        seq += 1


def _kv_blocks(cu, n_seqs, t0, T, causal, block_n):
    """_produce_kv's loads, in order: (sequence start, block index) of every segment of the tile (its waits for the
    loads in flight before it rebuilds the descriptors of a new segment change no order)."""
    blocks = []
    for _t, cs, ce, seg_hi in _segments(cu, n_seqs, t0, T):
        kv_hi = seg_hi - cs if causal else ce - cs
        blocks += [(cs, j) for j in range((kv_hi + block_n - 1) // block_n)]
    return blocks


def _consumer_segments(cu, n_seqs, t0, T, r0, causal, block_n):
    """Per segment of the tile, as a consumer with rows from r0 walks it (_segment, then _my_blocks): (t, cs, L,
    nb, lo, hi, mine, free)."""
    my_end = min(r0 + gws.HALF.value, T)
    for t, cs, ce, seg_hi in _segments(cu, n_seqs, t0, T):
        L = ce - cs
        kv_hi, free_hi = (seg_hi - cs, t - cs) if causal else (L, L)
        nb = (kv_hi + block_n - 1) // block_n
        lo, hi = max(t, r0), min(seg_hi, my_end)
        if causal:
            mine = min((hi - cs + block_n - 1) // block_n, nb)
            free = lo - cs
        else:
            mine, free = nb, free_hi
        yield t, cs, L, nb, lo, hi, (mine if hi > lo else 0), free


def emulate(q, k, v, lens, causal, scale, block_n):
    """float64 transcription of _fwd_kernel's three partitions for every (tile, head): the producer's block list,
    each consumer's waits / releases of it (checked in order, each block released once by each consumer), the
    blocks a consumer computes (masked or not, exactly as written), its stores; every (row, head) must be stored
    exactly once. Returns (out (T, Hq, D), lse (Hq, T) in log2 units)."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    half = gws.HALF.value
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    n_seqs = len(lens)
    qk_scale = scale * LOG2E
    out = np.full((T, Hq, D), np.nan)
    lse = np.full((Hq, T), np.nan)
    stores = np.zeros((T, Hq), dtype=int)
    for t0 in range(0, T, gws.BLOCK_M.value):
        for h in range(Hq):
            hk = h // group
            blocks = _kv_blocks(cu, n_seqs, t0, T, causal, block_n)
            for c in range(2):
                r0 = t0 + c * half
                rows = r0 + np.arange(half)
                qc = np.zeros((half, D))
                ok_rows = rows < T
                qc[ok_rows] = q[rows[ok_rows], h]  # TMA zero-fill past T
                it = 0
                released = []
                for _t, cs, L, nb, lo, hi, mine, free in _consumer_segments(cu, n_seqs, t0, T, r0, causal, block_n):
                    # a consumer whose rows all lie past T gets no Q load and does not wait for one: it computes
                    # nothing
                    assert r0 < T or mine == 0, (t0, c)
                    if mine > 0:
                        q_loc = rows - cs
                        lim = q_loc + 1 if causal else q_loc * 0 + L
                        m_i = np.full(half, -np.inf)
                        acc = np.zeros((half, D))
                        l_i = np.zeros(half)
                        for j in range(mine):
                            assert blocks[it + j] == (cs, j), (blocks[it + j], (cs, j))
                            keys = np.zeros((block_n, D))
                            vals = np.zeros((block_n, D))
                            kr = j * block_n + np.arange(block_n)
                            inside = kr < L  # the sequence's descriptor zero-fills past L
                            keys[inside] = k[cs + kr[inside], hk]
                            vals[inside] = v[cs + kr[inside], hk]
                            s = qc @ keys.T
                            kn = kr
                            if j * block_n + block_n > free:
                                s = np.where(kn[None, :] < lim[:, None], s * qk_scale, NEG)
                                m_new = np.maximum(m_i, s.max(1))
                                p = np.exp2(s - m_new[:, None])
                            else:
                                m_new = np.maximum(m_i, s.max(1) * qk_scale)
                                p = np.exp2(s * qk_scale - m_new[:, None])
                            alpha = np.exp2(m_i - m_new) if j > 0 else np.zeros(half)
                            l_i = l_i * alpha + p.sum(1) if j > 0 else p.sum(1)
                            acc = acc * alpha[:, None] + p @ vals if j > 0 else p @ vals
                            m_i = m_new
                            released.append(it + j)
                        seg = (rows >= lo) & (rows < hi)
                        out[rows[seg], h] = acc[seg] / l_i[seg, None]
                        lse[h, rows[seg]] = m_i[seg] + np.log2(l_i[seg])
                        stores[rows[seg], h] += 1
                    released += [it + j for j in range(mine, nb)]  # waited for and released, not computed
                    it += nb
                assert released == list(range(len(blocks))), (t0, h, c, released, len(blocks))
    assert (stores == 1).all(), np.argwhere(stores != 1)[:5]
    return out, lse


def emulate_dq(q, k, v, do, lse, delta, lens, causal, scale, block_n):
    """float64 transcription of _bwd_dq_kernel's three partitions for every (tile, head): the producer's block
    list (the forward's ring), each consumer's blocks (computed or only released, each released once, in order),
    per computed block S, P = exp2(S scale log2e - lse) with the mask exactly as written, dP, dS = P (dP - delta),
    dQ += dS K, and its stores; every (row, head) stored exactly once. lse (Hq, T) in log2 units and delta (Hq, T)
    are inputs, as in the kernel. Returns dq (T, Hq, D)."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    half = gws.HALF.value
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    n_seqs = len(lens)
    qk_scale = scale * LOG2E
    dq_out = np.full((T, Hq, D), np.nan)
    stores = np.zeros((T, Hq), dtype=int)
    for t0 in range(0, T, gws.BLOCK_M.value):
        for h in range(Hq):
            hk = h // group
            blocks = _kv_blocks(cu, n_seqs, t0, T, causal, block_n)
            for c in range(2):
                r0 = t0 + c * half
                rows = r0 + np.arange(half)
                ok_rows = rows < T
                qc, doc = np.zeros((half, D)), np.zeros((half, D))
                qc[ok_rows] = q[rows[ok_rows], h]  # TMA zero-fill past T
                doc[ok_rows] = do[rows[ok_rows], h]
                lse_c, delta_c = np.zeros(half), np.zeros(half)  # masked loads: 0 past T
                lse_c[ok_rows] = lse[h, rows[ok_rows]]
                delta_c[ok_rows] = delta[h, rows[ok_rows]]
                it = 0
                released = []
                for _t, cs, L, nb, lo, hi, mine, free in _consumer_segments(cu, n_seqs, t0, T, r0, causal, block_n):
                    assert r0 < T or mine == 0, (t0, c)
                    if mine > 0:
                        q_loc = rows - cs
                        lim = q_loc + 1 if causal else q_loc * 0 + L
                        dq = np.zeros((half, D))
                        for j in range(mine):
                            assert blocks[it + j] == (cs, j), (blocks[it + j], (cs, j))
                            keys, vals = np.zeros((block_n, D)), np.zeros((block_n, D))
                            kr = j * block_n + np.arange(block_n)
                            inside = kr < L  # the sequence's descriptor zero-fills past L
                            keys[inside] = k[cs + kr[inside], hk]
                            vals[inside] = v[cs + kr[inside], hk]
                            s = qc @ keys.T
                            dp = doc @ vals.T
                            p = np.exp2(s * qk_scale - lse_c[:, None])
                            if j * block_n + block_n > free:
                                p = np.where(kr[None, :] < lim[:, None], p, 0.0)
                            ds = p * (dp - delta_c[:, None])
                            dq = dq + ds @ keys
                            released.append(it + j)
                        seg = (rows >= lo) & (rows < hi)
                        dq_out[rows[seg], h] = dq[seg] * scale
                        stores[rows[seg], h] += 1
                    released += [it + j for j in range(mine, nb)]  # _release_rest
                    it += nb
                assert released == list(range(len(blocks))), (t0, h, c, released, len(blocks))
    assert (stores == 1).all(), np.argwhere(stores != 1)[:5]
    return dq_out


def _reference_dq(q, k, v, do, lens, causal, scale):
    """(dq, lse in log2 units, delta = rowsum(dO * O)) of float64 attention (torch autograd)."""
    qt, kt, vt = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    o = _attention64(qt, kt, vt, lens, causal, scale)
    o.backward(torch.from_numpy(do))
    _, lse = _reference(q, k, v, lens, causal, scale)
    delta = (torch.from_numpy(do) * o.detach()).sum(-1).T.numpy()  # (Hq, T)
    return qt.grad.numpy(), lse, delta


def _reference(q, k, v, lens, causal, scale):
    o = _attention64(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), lens, causal, scale).numpy()
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    lse = np.full((Hq, T), np.nan)
    s0 = 0
    for n in lens:
        for h in range(Hq if n else 0):
            s = q[s0:s0 + n, h] @ k[s0:s0 + n, h // group].T * scale
            if causal:
                s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
            m = s.max(1, keepdims=True)
            lse[h, s0:s0 + n] = (np.log(np.exp(s - m).sum(1)) + m[:, 0]) * LOG2E
        s0 += n
    return o, lse


CASES = [([1, 63, 64, 65, 128, 200, 1, 300], 4, 1, 64), ([700, 3, 129], 2, 2, 32), ([130, 0, 126, 5], 2, 1, 16),
         ([64] * 5 + [1] * 7 + [190], 4, 2, 16)]


@pytest.mark.parametrize("block_n", sorted({n for n, _ in gws.CONFIGS}))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens,Hq,Hkv,D", CASES)
def test_emulated_kernel_matches_float64(lens, Hq, Hkv, D, causal, block_n):
    """Tiles spanning several sequences (and an empty one), sequences of 1, tiles whose second consumer has no
    rows or no rows in a segment, causal blocks above a consumer's last row, partial tiles at T."""
    rng = np.random.default_rng(len(lens) * 7 + Hq)
    T = sum(lens)
    q, k, v = (rng.standard_normal((T, H, D)) for H in (Hq, Hkv, Hkv))
    scale = D**-0.5
    out, lse = emulate(q, k, v, lens, causal, scale, block_n)
    ref_o, ref_lse = _reference(q, k, v, lens, causal, scale)
    np.testing.assert_allclose(out, ref_o, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block_n", sorted({n for n, _ in gws.DQ_CONFIGS}))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens,Hq,Hkv,D", CASES)
def test_emulated_dq_kernel_matches_float64(lens, Hq, Hkv, D, causal, block_n):
    """The dQ kernel's transcription against float64 autograd on the forward's cases."""
    rng = np.random.default_rng(len(lens) * 11 + Hq)
    T = sum(lens)
    q, k, v, do = (rng.standard_normal((T, H, D)) for H in (Hq, Hkv, Hkv, Hq))
    scale = D**-0.5
    ref_dq, lse, delta = _reference_dq(q, k, v, do, lens, causal, scale)
    lse = np.where(np.isnan(lse), 0.0, lse)  # rows of empty sequences: none
    got = emulate_dq(q, k, v, do, lse, delta, lens, causal, scale, block_n)
    np.testing.assert_allclose(got, ref_dq, rtol=1e-9, atol=1e-11)


def test_random_batches_match_float64():
    rnd = random.Random(5)
    for trial in range(6):
        lens = [rnd.choice([0, 1, 2, 17, 63, 64, 65, 127, 128, 129, 255]) for _ in range(rnd.randint(1, 9))]
        if sum(lens) == 0:
            lens.append(3)
        causal = trial % 2 == 0
        rng = np.random.default_rng(trial)
        T = sum(lens)
        q, k, v = (rng.standard_normal((T, H, 16)) for H in (2, 1, 1))
        out, lse = emulate(q, k, v, lens, causal, 0.25, 64)
        ref_o, ref_lse = _reference(q, k, v, lens, causal, 0.25)
        np.testing.assert_allclose(out, ref_o, rtol=1e-10, atol=1e-12, err_msg=str(lens))
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-10, atol=1e-10, err_msg=str(lens))


def emulate_dkdv(q, k, v, do, lse, delta, lens, causal, scale, block_m):
    """float64 transcription of _bwd_dkdv_kernel's three partitions for every (key tile, KV head): the producer's
    (Q, dO) block list (head-major steps per segment), each consumer's waits / releases (in order, each once), the
    steps it computes (the masks as written), its stores; every (key row, KV head) stored exactly once. lse (Hq, T)
    in log2 units, delta (Hq, T). Returns (dk, dv)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    half = gws.HALF.value
    tile = gws.BLOCK_M_KV.value
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    qk_scale = scale * LOG2E
    dk = np.full((T, Hkv, D), np.nan)
    dv = np.full((T, Hkv, D), np.nan)
    stores = np.zeros((T, Hkv), dtype=int)

    def segments(t0):
        t_end = min(t0 + tile, T)
        seq = max(s for s in range(len(lens)) if cu[s] <= t0)
        t = t0
        while t < t_end:
            cs, ce = cu[seq], cu[seq + 1]
            seg_hi = min(ce, t_end)
            L = ce - cs
            q_start = (t - cs) // block_m * block_m if causal else 0
            nq = (L - q_start + block_m - 1) // block_m
            yield t, cs, L, seg_hi, q_start, nq, nq * group
            t = seg_hi
            seq += 1

    for t0 in range(0, T, tile):
        for hk in range(Hkv):
            blocks = []  # the producer's loads: (sequence start, row, query head); waits before rebuilding: no order
            for _t, cs, _L, _seg_hi, q_start, nq, total in segments(t0):
                for step in range(total):
                    g = step // nq
                    blocks.append((cs, q_start + (step - g * nq) * block_m, hk * group + g))
            for c in range(2):
                r0 = t0 + c * half
                my_end = min(r0 + half, T)
                rows = r0 + np.arange(half)
                keys = np.zeros((half, D))
                vals = np.zeros((half, D))
                ok_rows = rows < T
                keys[ok_rows] = k[rows[ok_rows], hk]  # TMA zero-fill past T
                vals[ok_rows] = v[rows[ok_rows], hk]
                it = 0
                released = []
                for t, cs, L, seg_hi, q_start, nq, total in segments(t0):
                    lo, hi = max(t, r0), min(seg_hi, my_end)
                    assert r0 < T or not hi > lo, (t0, c)  # no keys: no K / V load waited for
                    if hi > lo:
                        k_loc = rows - cs
                        k_hi = hi - cs
                        acc_k = np.zeros((half, D))
                        acc_v = np.zeros((half, D))
                        for step in range(total):
                            g = step // nq
                            m0 = q_start + (step - g * nq) * block_m
                            h = hk * group + g
                            assert blocks[it + step] == (cs, m0, h), (blocks[it + step], (cs, m0, h))
                            qn = m0 + np.arange(block_m)
                            qmask = qn < L
                            qb = np.zeros((block_m, D))  # the (L, GROUP * D) descriptor zero-fills past L
                            dob = np.zeros((block_m, D))
                            qb[qmask] = q[cs + qn[qmask], h]
                            dob[qmask] = do[cs + qn[qmask], h]
                            lse_b = np.where(qmask, lse[h, np.minimum(cs + qn, T - 1)], 0.0)
                            delta_b = np.where(qmask, delta[h, np.minimum(cs + qn, T - 1)], 0.0)
                            sT = keys @ qb.T
                            dpT = vals @ dob.T
                            with np.errstate(over="ignore"):
                                pT = np.exp2(sT * qk_scale - lse_b[None, :])
                            if causal:
                                if m0 < k_hi or m0 + block_m > L:
                                    ok = qmask[None, :] & (qn[None, :] >= k_loc[:, None])
                                    pT = np.where(ok, pT, 0.0)
                            elif m0 + block_m > L:
                                pT = np.where(qmask[None, :], pT, 0.0)
                            acc_v = acc_v + pT @ dob
                            dsT = pT * (dpT - delta_b[None, :])
                            acc_k = acc_k + dsT @ qb
                            released.append(it + step)
                        seg = (rows >= lo) & (rows < hi)
                        dk[rows[seg], hk] = acc_k[seg] * scale
                        dv[rows[seg], hk] = acc_v[seg]
                        stores[rows[seg], hk] += 1
                    else:
                        released += [it + step for step in range(total)]
                    it += total
                assert released == list(range(len(blocks))), (t0, hk, c)
    assert (stores == 1).all(), np.argwhere(stores != 1)[:5]
    return dk, dv


@pytest.mark.parametrize("block_m", sorted({m for m, _ in gws.DKDV_CONFIGS}))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens,Hq,Hkv,D", CASES)
def test_emulated_dkdv_kernel_matches_float64(lens, Hq, Hkv, D, causal, block_m):
    """dK, dV of the transcribed kernel against float64 autograd of attention, from the float64 LSE (log2 units)
    and delta = rowsum(dO * O): key tiles spanning several sequences (and an empty one), consumers without keys in
    a segment or past T, causal query blocks below a consumer's first key, partial query blocks at a sequence end."""
    rng = np.random.default_rng(len(lens) * 11 + Hkv)
    T = sum(lens)
    q, k, v, do = (rng.standard_normal((T, H, D)) for H in (Hq, Hkv, Hkv, Hq))
    scale = D**-0.5
    qt, kt, vt = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    o = _attention64(qt, kt, vt, lens, causal, scale)
    o.backward(torch.from_numpy(do))
    _, lse = _reference(q, k, v, lens, causal, scale)
    delta = (o.detach().numpy() * do).sum(-1).T  # (Hq, T)
    dk, dv = emulate_dkdv(q, k, v, do, lse, delta, lens, causal, scale, block_m)
    np.testing.assert_allclose(dk, kt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dv, vt.grad.numpy(), rtol=1e-9, atol=1e-11)


def test_kernel_compiles_for_sm90_as_three_partitions_without_spills_in_its_key_loops():
    """Every config of the forward, the dQ and the dK/dV kernels, both masks, head dims 64 and 128: two consumer
    warpgroups and a producer warp (384 threads with the padding), the register split (consumers 232, producer 40),
    products in flight together (a wgmma.wait_group 1: the forward's S and P V, the dQ kernel's S and dP, the dK/dV
    kernel's S^T and dP^T, then dP^T and dV), the ring's
    releases (mbarrier.arrive), each consumer on its own named barrier of 128 threads, shared memory under the
    227 kB an SM gives a block, and in the SASS one key loop per consumer with no local memory access in it. No
    spills at all, except the forward's 128-key blocks at D 128: at most 128 B, stored and loaded around the key
    loops (once per segment; the module's CONFIGS comment)."""
    out = run_aot_report("bench.bench_varlen_attention", "--aot-gluon-ws")
    lines = [line for line in out.splitlines() if line.startswith("gluon-ws")]
    assert sum(line.startswith("gluon-ws ") for line in lines) == 2 * 2 * len(gws.CONFIGS), out
    assert sum(line.startswith("gluon-ws-pingpong ") for line in lines) == 2 * 2 * len(gws.PINGPONG_CONFIGS), out
    assert sum(line.startswith("gluon-ws-dq ") for line in lines) == 2 * 2 * len(gws.DQ_CONFIGS), out
    assert sum(line.startswith("gluon-ws-dkdv ") for line in lines) == 2 * 2 * len(gws.DKDV_CONFIGS), out
    for line in lines:
        f = dict(kv.split("=") for kv in line.split(": ", 1)[1].split())
        assert f["threads"] == "384", line
        assert {"232", "40"} <= set(f["setmaxnreg"].split(",")), line
        assert f["wait_group"] == "0,1", line
        # releases per consumer: the forward's in its loop, after it and in _release_rest (with PINGPONG also the
        # turns passed on: before its loop, in it and in _release_rest); the dQ and dK/dV kernels' in their loop
        # and in their release-only loop
        arrives = 12 if line.startswith("gluon-ws-pingpong ") else 6 if line.startswith("gluon-ws ") else 4
        assert int(f["arrives"]) >= arrives, line
        assert f["bar128"] == "0,2", line
        assert f["mma_loops"] == "2" and f["loop_local"] == "0", line
        if line.startswith(("gluon-ws D=128 N=128 ", "gluon-ws-pingpong D=128 N=128 ")):
            assert int(f["spill"]) <= 128, line
        else:
            assert f["spill"] == "0", line
        assert f["serialised"] == "0", line  # ptxas keeps the products asynchronous (no C7512-style warning)
        assert int(f["smem"]) <= 232448, line


def test_the_key_loop_spill_check_sees_spills():
    """bench.harness.mma_loop_local_ops (the loop_local field above) on a kernel that does spill in its key loop:
    the plain Gluon forward capped at 128 registers a thread finds its one key loop and local memory accesses in
    it; uncapped, the same loop and none. (sm_90 compile, no GPU.)"""
    code = ("from bench.harness import sm90_compile, sass, mma_loop_local_ops\n"
            "from bench.bench_varlen_attention import _attn_sig\n"
            "from r4b.kernels import _varlen_gluon as g\n"
            "c = dict(GROUP=4, D=128, BLOCK_M=128, BLOCK_N=64, CAUSAL=True, STAGES=3, NUM_WARPS=8)\n"
            "for cap in (128, None):\n"
            "    k = sm90_compile(g._fwd_kernel, c, _attn_sig, 8, 1, maxnreg=cap)\n"
            "    print(*mma_loop_local_ops(sass(k)))\n")
    out = run_aot_code(code)
    capped, free = [tuple(map(int, line.split())) for line in out.splitlines() if line.strip()]
    assert capped[0] == 1 and capped[1] > 0, out
    assert free == (1, 0), out


def test_op_refuses_gluon_ws_where_it_cannot_run(monkeypatch):
    """On the CPU (interpreter) the variable names the need for a Hopper GPU; on a Hopper GPU the kernel is refused
    by name until its GPU tests pass, unless R4B_VARLEN_WS_UNVERIFIED=1; other GPUs are refused as not Hopper."""
    q, k, v, _ = _inputs([5, 3], 2, 1, 64)
    monkeypatch.setenv("R4B_VARLEN_FWD", "gluon-ws")
    with pytest.raises(RuntimeError, match="R4B_VARLEN_FWD=gluon-ws needs a Hopper GPU"):
        varlen_attention(q, k, v, _cu([5, 3]), 5, backend="triton")
    monkeypatch.setenv("R4B_VARLEN_FWD", "gluon_ws")
    with pytest.raises(ValueError, match="R4B_VARLEN_FWD must be one of .*'gluon-ws'.*got 'gluon_ws'"):
        varlen_attention(q, k, v, _cu([5, 3]), 5, backend="triton")
    # the dQ kernel (R4B_VARLEN_BWD=gluon-ws): the forward runs (Triton), the backward names the variable
    monkeypatch.setenv("R4B_VARLEN_FWD", "triton")
    monkeypatch.setenv("R4B_VARLEN_BWD", "gluon-ws")
    qg = q.clone().requires_grad_()
    out = varlen_attention(qg, k, v, _cu([5, 3]), 5, backend="triton")
    with pytest.raises(RuntimeError, match="R4B_VARLEN_BWD=gluon-ws needs a Hopper GPU"):
        out.sum().backward()
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv(gws.ENV_UNVERIFIED, raising=False)
    kernels = {"fwd": gws.GPU_BROKEN, "dq": gws.GPU_BROKEN_DQ, "dkdv": gws.GPU_BROKEN_DKDV}
    for kernel, broken in kernels.items():
        assert gws.device_problem(gpu, kernel) == broken
    monkeypatch.setenv(gws.ENV_UNVERIFIED, "1")
    assert all(gws.device_problem(gpu, kernel) is None for kernel in kernels)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert all("not 9.x (Hopper)" in gws.device_problem(gpu, kernel) for kernel in kernels)


def test_gluon_ws_forward_autotunes_pingpong_configs_only_when_asked(monkeypatch):
    """forward(config=None) launches the autotuner over CONFIGS, or with R4B_VARLEN_WS_PINGPONG=1 over
    PINGPONG_CONFIGS alone (each PINGPONG); a config given runs it directly with its PINGPONG flag."""
    launched = []

    class Launcher:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append((self.name, kw.get("PINGPONG")))

    assert [c.kwargs["PINGPONG"] for c in gws.TUNED.configs] == [False] * len(gws.CONFIGS)
    assert [c.kwargs["PINGPONG"] for c in gws.TUNED_PINGPONG.configs] == [True] * len(gws.PINGPONG_CONFIGS)
    monkeypatch.setattr(gws, "TUNED", Launcher("plain"))
    monkeypatch.setattr(gws, "TUNED_PINGPONG", Launcher("pingpong"))
    monkeypatch.setattr(gws, "_fwd_kernel", Launcher("direct"))
    q, k, v, _ = _inputs([5, 3], 4, 2, 64)
    args = (q, k, v, torch.empty_like(q), torch.empty(4, 8), _cu([5, 3]), 0.1, True)
    monkeypatch.delenv(gws.ENV_PINGPONG, raising=False)
    gws.forward(*args)
    monkeypatch.setenv(gws.ENV_PINGPONG, "1")
    gws.forward(*args)
    gws.forward(*args, config=gws.CONFIGS[0])
    gws.forward(*args, config=gws.PINGPONG_CONFIGS[0])
    assert launched == [("plain", None), ("pingpong", None), ("direct", False), ("direct", True)]


@pytest.mark.parametrize("mode", ["gluon-ws", "gluon-ws-dq", "gluon-ws-dkdv"])
def test_gluon_ws_backward_modes_route_each_gradient(mode, monkeypatch):
    """R4B_VARLEN_BWD=gluon-ws / gluon-ws-dq / gluon-ws-dkdv: dQ from the warp-specialised dQ kernel (or the Triton
    one for gluon-ws-dkdv), dK / dV from the warp-specialised dK/dV kernel (or the Gluon one for gluon-ws-dq), given
    the op's own inputs, after the refusal checks of exactly the kernels used; the Triton kernels a mode replaces
    are not launched. Under the interpreter, which cannot run Gluon, stand-ins give the Gluon checks' answers and
    the float64 reference's gradients; the op's four results must match float64. Then: each kernel the mode uses,
    refused, stops the backward with its reason; a head dim the Gluon backward refuses runs the Triton kernels."""
    import importlib

    va = importlib.import_module("r4b.kernels.varlen_attention")
    lens, scale, q, k, v, do, cu, want = _routing_case()
    asked = []

    class GluonStandIn:
        @staticmethod
        def bwd_problem(q):
            return None

        @staticmethod
        def input_problem(*tensors):
            return None

        @staticmethod
        def backward(do_, q_, k_, v_, lse, delta, cu_, scale_, causal, with_dq=True):
            same_inputs(do_, q_, k_, v_, lse, delta, cu_)
            asked.append(("gluon dkdv", with_dq))
            return None, want[2].to(k_.dtype), want[3].to(v_.dtype)

    def same_inputs(do_, q_, k_, v_, lse, delta, cu_):
        T, Hq = q.shape[:2]
        assert all(torch.equal(a, b) for a, b in ((do_, do), (q_, q), (k_, k), (v_, v), (cu_, cu)))
        assert lse.shape == delta.shape == (Hq, T) and lse.dtype == delta.dtype == torch.float32

    def ws_dq(do_, q_, k_, v_, lse, delta, dq, cu_, scale_, causal, config=None):
        same_inputs(do_, q_, k_, v_, lse, delta, cu_)
        asked.append(("ws dq", scale_, causal))
        dq.copy_(want[1])

    def ws_dkdv(do_, q_, k_, v_, lse, delta, cu_, scale_, causal, config=None):
        same_inputs(do_, q_, k_, v_, lse, delta, cu_)
        asked.append(("ws dkdv", scale_, causal))
        return want[2].to(k_.dtype), want[3].to(v_.dtype)

    monkeypatch.setattr(va, "_gluon_module", lambda env, interp, *t: GluonStandIn)
    monkeypatch.setattr(gws, "device_problem", lambda device, kernel="fwd": asked.append(kernel))
    monkeypatch.setattr(gws, "backward_dq", ws_dq)
    monkeypatch.setattr(gws, "backward_dkdv", ws_dkdv)
    monkeypatch.setattr(va, "_bwd_dkdv_kernel", None)  # no mode here launches the Triton dK/dV kernel
    if mode != "gluon-ws-dkdv":
        monkeypatch.setattr(va, "_bwd_dq_kernel", None)  # nor the Triton dQ kernel
    monkeypatch.setenv("R4B_VARLEN_FWD", "triton")
    monkeypatch.setenv("R4B_VARLEN_BWD", mode)
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, max(lens), backend="triton"), q, k, v, do)
    expect = {"gluon-ws": ["dq", "dkdv", ("ws dq", scale, True), ("ws dkdv", scale, True)],
              "gluon-ws-dq": ["dq", ("ws dq", scale, True), ("gluon dkdv", False)],
              "gluon-ws-dkdv": ["dkdv", ("ws dkdv", scale, True)]}[mode]
    assert asked == expect
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-5, msg=name)
    # each kernel the mode uses is refused by name (the variable, the mode, that kernel's reason)
    for kernel in {"gluon-ws": ("dq", "dkdv"), "gluon-ws-dq": ("dq",), "gluon-ws-dkdv": ("dkdv",)}[mode]:
        monkeypatch.setattr(gws, "device_problem", lambda device, k_="fwd", _bad=kernel: f"no {k_}" if k_ == _bad
                            else None)
        qq = q.clone().requires_grad_()
        out = varlen_attention(qq, k, v, cu, max(lens), backend="triton")
        with pytest.raises(RuntimeError, match=f"R4B_VARLEN_BWD={mode} cannot run here: no {kernel}$"):
            out.backward(do)
    # a head dim the Gluon backward is not verified at (bwd_problem): the Triton split backward, no Gluon kernel
    monkeypatch.undo()  # the Triton kernels back, then the stand-ins again
    monkeypatch.setattr(va, "_gluon_module", lambda env, interp, *t: GluonStandIn)
    monkeypatch.setattr(GluonStandIn, "bwd_problem", staticmethod(lambda q_: "not this head dim"))
    monkeypatch.setattr(gws, "backward_dq", ws_dq)
    monkeypatch.setattr(gws, "backward_dkdv", ws_dkdv)
    monkeypatch.setenv("R4B_VARLEN_FWD", "triton")
    monkeypatch.setenv("R4B_VARLEN_BWD", mode)
    asked.clear()
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, max(lens), backend="triton"), q, k, v, do)
    assert asked == []
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------ GPU tests
ANCHOR = [4096, 3072, 2560, 2048, 1536, 1280, 768, 512, 384, 128]


@pytest.fixture
def unverified(monkeypatch):
    """The kernel allowed on this GPU, R4B_VARLEN_FWD=gluon-ws; returns the count of its forward launches through
    the op (inputs it does not take would silently run the Triton forward)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels run on Hopper (sm_90) only")
    monkeypatch.setenv(gws.ENV_UNVERIFIED, "1")
    monkeypatch.setenv("R4B_VARLEN_FWD", "gluon-ws")
    monkeypatch.setenv("R4B_VARLEN_BWD", "split")
    monkeypatch.delenv(gws.ENV_PINGPONG, raising=False)  # the plain configs unless a test asks
    calls = {"forward": 0}
    real = gws.forward

    def spy(*a, **kw):
        calls["forward"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(gws, "forward", spy)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_ws_anchor_gpu(causal, unverified):
    """The anchor through the op (the gluon-ws forward, the Triton split backward), autotuned: output and gradients
    by STYLE.md's rule against the fp32 reference; two runs give the same bits."""
    _anchor_through_the_op(causal, unverified)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_ws_pingpong_anchor_gpu(causal, unverified, monkeypatch):
    """The same with R4B_VARLEN_WS_PINGPONG=1: the autotuner picks among the PINGPONG configs."""
    monkeypatch.setenv(gws.ENV_PINGPONG, "1")
    _anchor_through_the_op(causal, unverified)


def _anchor_through_the_op(causal, unverified):
    q, k, v, do = _inputs(ANCHOR, 32, 8, 128, device="cuda")
    cu = _cu(ANCHOR, "cuda")
    ref = _grads(lambda a, b, c: varlen_attention_ref(a, b, c, cu, causal), q, k, v, do)  # fp32, as the others
    bf = [t.bfloat16() for t in (q, k, v, do)]
    fn = lambda a, b, c: varlen_attention(a, b, c, cu, 4096, causal=causal, backend="triton")
    got = _grads(fn, *bf)
    assert unverified["forward"] == 1
    assert all(g.isfinite().all() for g in got)
    again = _grads(fn, *bf)
    assert all(same_bits(a, b) for a, b in zip(got, again, strict=True))
    base = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, ANCHOR, causal), *bf)
    assert_within_twice_plain(got, base, ref, ("out", "dq", "dk", "dv"), atol_rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("config", gws.CONFIGS)
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_ws_every_config_gpu(config, causal, unverified):
    """Each config launched directly, twice (NaN-filled outputs first): finite, the same bits, then output and LSE
    against float64, on tiles spanning sequences of 1 to 1100 rows (GQA 4, D 128)."""
    _every_config(config, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("config", gws.PINGPONG_CONFIGS)
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_ws_pingpong_every_config_gpu(config, causal, unverified):
    """The same for the PINGPONG configs."""
    _every_config(config, causal)


def _every_config(config, causal):
    from r4b.kernels.varlen_attention import _ensure_allocator

    lens = [700, 1, 129, 64, 3, 1100, 0, 65]
    q, k, v, _ = _inputs(lens, 8, 2, 128, device="cuda", dtype=torch.bfloat16)
    cu = _cu(lens, "cuda")
    T = sum(lens)
    _ensure_allocator()
    runs = []
    for _ in range(2):
        o = torch.full_like(q, float("nan"))
        lse = torch.full((8, T), float("nan"), dtype=torch.float32, device="cuda")
        gws.forward(q, k, v, o, lse, cu, 128**-0.5 * LOG2E, causal, config=config)
        runs.append((o, lse))
    (o, lse), (o2, lse2) = runs
    assert o.isfinite().all() and lse.isfinite().all(), "rows left unwritten or non-finite"
    assert same_bits(o, o2) and same_bits(lse, lse2), "two runs differ"
    ref = _attention64(q.double(), k.double(), v.double(), lens, causal, 128**-0.5)
    plain = _sdpa_bf16_per_doc(q, k, v, lens, causal).double()
    assert (o.double() - ref).abs().max() <= 2 * (plain - ref).abs().max() + 1e-3 * ref.abs().max()
    _, ref_lse = _reference(*(t.double().cpu().numpy() for t in (q, k, v)), lens, causal, 128**-0.5)
    torch.testing.assert_close(lse.double().cpu(), torch.from_numpy(ref_lse), rtol=0, atol=2e-2)  # log2 units


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_ws_pingpong_no_information_crosses_a_boundary_gpu(causal, unverified, monkeypatch):
    """The boundary test below with R4B_VARLEN_WS_PINGPONG=1 (the PINGPONG configs)."""
    monkeypatch.setenv(gws.ENV_PINGPONG, "1")
    test_gluon_ws_no_information_crosses_a_boundary_gpu(causal, unverified)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_ws_no_information_crosses_a_boundary_gpu(causal, unverified):
    """NaN / inf planted in sequence 1 (sharing 128-row tiles and both consumers' halves with its neighbours) leave
    the other sequences' outputs bit-identical."""
    lens = [70, 100, 90]
    cu = _cu(lens, "cuda")
    q, k, v, _ = (t.bfloat16() for t in _inputs(lens, 8, 2, 128, device="cuda"))
    fn = lambda a, b, c: varlen_attention(a, b, c, cu, 100, causal=causal, backend="triton")
    base = fn(q, k, v)
    assert unverified["forward"] == 1
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t, bad in ((q2, float("nan")), (k2, float("inf")), (v2, float("-inf"))):
        t[[70, 120, 169]] = bad
    pert = fn(q2, k2, v2)
    others = torch.ones(sum(lens), dtype=torch.bool, device="cuda")
    others[70:170] = False
    assert base.isfinite().all()
    assert same_bits(base[others], pert[others])
    assert not same_bits(base[~others], pert[~others])


# ------------------------------------------------------------------- GPU tests of the dQ and dK/dV kernels
@pytest.fixture
def ws_bwd_calls(monkeypatch):
    """The kernels allowed on this GPU (R4B_VARLEN_WS_UNVERIFIED=1); returns the count of the warp-specialised dQ and
    dK/dV kernels' launches through the op (inputs the Gluon kernels do not take would silently run the Triton
    backward)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels run on Hopper (sm_90) only")
    monkeypatch.setenv(gws.ENV_UNVERIFIED, "1")
    calls = {"dq": 0, "dkdv": 0}
    for name in calls:
        real = getattr(gws, f"backward_{name}")

        def spy(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(gws, f"backward_{name}", spy)
    return calls


# every config run directly: length-1 and empty sequences, lengths off every tile, tiles spanning many sequences,
# one sequence of many blocks, GQA 2 / 4, D 64 and 128, causal and not
# (D 128 only: the op sends only D 128 to the Gluon backwards, and at D 64 the rule's baseline itself is in question,
# see _varlen_gluon.BWD_HEAD_DIMS)
BWD_GPU_CASES = [([1, 37, 1, 16, 5, 0, 300], 2, 1, 128, True), ([70, 1, 3, 1, 0, 2, 9, 700], 4, 1, 128, False),
                 ([3000] + [1, 2, 3, 17, 40, 129] * 20, 8, 2, 128, True),
                 ([700, 1, 129, 64, 3, 1100, 0, 65], 8, 2, 128, False)]


def _bwd_inputs(lens, Hq, Hkv, D, causal):
    """bf16 q, k, v, dO on the GPU, the float64 gradients, SDPA's bf16 ones (the rule's baseline), and the float64
    LSE (log2 units) and delta = rowsum(dO * O) as (Hq, T) fp32."""
    q, k, v, do = _inputs(lens, Hq, Hkv, D, seed=7, device="cuda")
    bf = [t.bfloat16() for t in (q, k, v, do)]
    scale = D**-0.5
    want = _grads(lambda a, b, c: _attention64(a, b, c, lens, causal, scale), *(t.double() for t in bf))
    plain = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, [n for n in lens if n], causal), *bf)
    _, lse = _reference(*(t.double().cpu().numpy() for t in bf[:3]), lens, causal, scale)
    lse = torch.from_numpy(lse).float().cuda()  # every row of a non-empty sequence is set
    delta = (want[0] * bf[3].double()).sum(-1).transpose(0, 1).float().contiguous()
    return bf, want, plain, lse, delta


@pytest.mark.gpu
@pytest.mark.parametrize("lens,Hq,Hkv,D,causal", BWD_GPU_CASES)
def test_gluon_ws_dq_every_config_gpu(lens, Hq, Hkv, D, causal, ws_bwd_calls):
    """Each dQ config launched directly, twice (NaN-filled outputs first), from the float64 LSE and delta: finite,
    the same bits, and dQ by STYLE.md's rule against float64 (baseline: SDPA per document in bf16). Every config is
    judged before the test fails."""
    from r4b.kernels.varlen_attention import _ensure_allocator

    bf, want, plain, lse, delta = _bwd_inputs(lens, Hq, Hkv, D, causal)
    cu = _cu(lens, "cuda")
    _ensure_allocator()
    failures = []
    for cfg in gws.DQ_CONFIGS:
        runs = []
        for _ in range(2):
            dq = torch.full_like(bf[0], float("nan"))
            gws.backward_dq(bf[3], *bf[:3], lse, delta, dq, cu, D**-0.5, causal, config=cfg)
            runs.append(dq)
        if not runs[0].isfinite().all():
            failures.append(f"{cfg}: rows left unwritten or non-finite")
            continue
        if not same_bits(*runs):
            failures.append(f"{cfg}: two runs differ")
        try:
            assert_within_twice_plain([runs[0]], [plain[1]], [want[1]], [f"dq {cfg}"], atol_rel=1e-3)
        except AssertionError as ex:
            failures.append(str(ex))
    assert not failures, failures


@pytest.mark.gpu
@pytest.mark.parametrize("lens,Hq,Hkv,D,causal", BWD_GPU_CASES)
def test_gluon_ws_dkdv_every_config_gpu(lens, Hq, Hkv, D, causal, ws_bwd_calls):
    """Each dK/dV config launched directly, twice (NaN-filled outputs), from the float64 LSE and delta: finite, the
    same bits, and dK, dV by STYLE.md's rule against float64; q and dO also as head-major views in one config (the
    wrapper copies them for the kernel's (L, GROUP * D) reads). Every config is judged before the test fails."""
    from r4b.kernels.varlen_attention import _ensure_allocator

    bf, want, plain, lse, delta = _bwd_inputs(lens, Hq, Hkv, D, causal)
    cu = _cu(lens, "cuda")
    _ensure_allocator()
    head_major = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (bf[0], bf[3])]
    failures = []
    for i, cfg in enumerate(gws.DKDV_CONFIGS):
        qq, dd = head_major if i == 1 else (bf[0], bf[3])
        runs = [gws.backward_dkdv(dd, qq, bf[1], bf[2], lse, delta, cu, D**-0.5, causal, config=cfg,
                                  out=(torch.full_like(bf[1], float("nan")), torch.full_like(bf[2], float("nan"))))
                for _ in range(2)]  # NaN-filled: a row left unwritten fails the finiteness check
        (dk, dv), (dk2, dv2) = runs
        if not (dk.isfinite().all() and dv.isfinite().all()):
            failures.append(f"{cfg}: non-finite dK / dV")
            continue
        if not (same_bits(dk, dk2) and same_bits(dv, dv2)):
            failures.append(f"{cfg}: two runs differ")
        try:
            assert_within_twice_plain([dk, dv], plain[2:], want[2:], [f"dk {cfg}", f"dv {cfg}"], atol_rel=1e-3)
        except AssertionError as ex:
            failures.append(str(ex))
    assert not failures, failures


# (R4B_VARLEN_FWD, R4B_VARLEN_BWD) through the op, with ids for bench/gpu_check.sh's steps (pytest -k): "dq-only",
# "dkdv-only", then the two kernels together ("dq-and-dkdv"), also after the gluon-ws forward
WS_BWD_MODES = [pytest.param("triton", "gluon-ws-dq", id="dq-only"),
                pytest.param("triton", "gluon-ws-dkdv", id="dkdv-only"),
                pytest.param("triton", "gluon-ws", id="dq-and-dkdv"),
                pytest.param("gluon-ws", "gluon-ws", id="fwd-dq-and-dkdv")]
_WS_KERNELS = {"gluon-ws": {"dq": 1, "dkdv": 1}, "gluon-ws-dq": {"dq": 1, "dkdv": 0},
               "gluon-ws-dkdv": {"dq": 0, "dkdv": 1}}


@pytest.mark.gpu
@pytest.mark.parametrize("fwd,bwd", WS_BWD_MODES)
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_ws_bwd_anchor_gpu(fwd, bwd, causal, ws_bwd_calls, monkeypatch):
    """The anchor through the op with each warp-specialised backward (after the Triton or the gluon-ws forward),
    autotuned: output and gradients by STYLE.md's rule against the fp32 reference; two runs give the same bits."""
    monkeypatch.setenv("R4B_VARLEN_FWD", fwd)
    monkeypatch.setenv("R4B_VARLEN_BWD", bwd)
    q, k, v, do = _inputs(ANCHOR, 32, 8, 128, device="cuda")
    cu = _cu(ANCHOR, "cuda")
    ref = _grads(lambda a, b, c: varlen_attention_ref(a, b, c, cu, causal), q, k, v, do)
    bf = [t.bfloat16() for t in (q, k, v, do)]
    fn = lambda a, b, c: varlen_attention(a, b, c, cu, 4096, causal=causal, backend="triton")
    got = _grads(fn, *bf)
    assert ws_bwd_calls == _WS_KERNELS[bwd]
    assert all(g.isfinite().all() for g in got)
    again = _grads(fn, *bf)
    assert all(same_bits(a, b) for a, b in zip(got, again, strict=True))
    base = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, ANCHOR, causal), *bf)
    assert_within_twice_plain(got, base, ref, ("out", "dq", "dk", "dv"), atol_rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("fwd,bwd", WS_BWD_MODES[:3])
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_ws_bwd_no_information_crosses_a_boundary_gpu(fwd, bwd, causal, ws_bwd_calls, monkeypatch):
    """NaN / inf planted in sequence 1's q, k, v and dO (sharing 128-row tiles and both consumers' halves with its
    neighbours) leave the other sequences' gradients bit-identical."""
    monkeypatch.setenv("R4B_VARLEN_FWD", fwd)
    monkeypatch.setenv("R4B_VARLEN_BWD", bwd)
    lens = [70, 100, 90]
    cu = _cu(lens, "cuda")
    q, k, v, do = (t.bfloat16() for t in _inputs(lens, 8, 2, 128, device="cuda"))
    fn = lambda a, b, c: varlen_attention(a, b, c, cu, 100, causal=causal, backend="triton")
    base = _grads(fn, q, k, v, do)
    assert ws_bwd_calls == _WS_KERNELS[bwd]
    q2, k2, v2, do2 = (t.clone() for t in (q, k, v, do))
    for t, bad in ((q2, float("nan")), (k2, float("inf")), (v2, float("-inf")), (do2, float("nan"))):
        t[[70, 120, 169]] = bad
    pert = _grads(fn, q2, k2, v2, do2)
    others = torch.ones(sum(lens), dtype=torch.bool, device="cuda")
    others[70:170] = False
    for name, a, b in zip(("out", "dq", "dk", "dv"), base, pert, strict=True):
        assert a.isfinite().all(), name
        assert same_bits(a[others], b[others]), name
        assert not same_bits(a[~others], b[~others]), name  # the planted values did reach sequence 1's
