"""float64 emulation of the three Gluon kernels of r4b/kernels/_varlen_gluon.py (_fwd_kernel, _bwd_dkdv_kernel,
_bwd_dq_kernel) with a model of their asynchrony, checked against an independent float64 reference on random
varlen batches (tests/test_varlen_gluon_model.py; ``python -m tests.gluon_model [N | selftest]`` for a long run).
The Triton interpreter cannot run Gluon, so this is what checks the kernels' protocol (ring slots, mbarrier
phases, wgmma waits, refills, segments, masks) without a GPU. It is a hand transcription: KERNEL_SHA pins the
kernels' source it was transcribed from, and the test fails when they change until it is transcribed again.

Each program is run statement by statement as the source is written (loop bounds, prologue coordinates, refill
slot / block / step, pred conditions, masks and which path a block takes, stores). The asynchrony model per
program (class Prog):
  * ring slots: per slot the number of TMA loads issued into it (= mbarrier phases that will complete) and
    consumed (waited for), and the tag + data of the newest load. A wait on parity p passes (hardware rule:
    phase of parity p complete <=> completed-phase count c has (c & 1) != p) only once the newest load landed:
    needs exactly one unconsumed load and ((issued - 1) & 1) == p; otherwise "hang" (no load will complete the
    phase) or "stale pass" (parity already satisfied by an older phase: stale data). The tag must be the
    block / step the code expects.
  * a load may be issued into a slot only if (a) its previous load was consumed (else two loads share a phase /
    data overwritten unread), (b) no wgmma group reading that slot is still in the FIFO, (c) a thread_barrier
    lies between the last wait on the slot and the load and between the retirement of its last reader and the
    load (other warps / the other warpgroup may lag behind the issuing thread).
  * wgmma: every warpgroup_mma is one group appended to a per-program FIFO (is_async=False = issue + wait(0));
    warpgroup_mma_wait(n) retires all but the newest n. A group's result may be read only once retired; a
    register operand (P, dS) may not be reassigned while a group reading it is in flight. Smem / register
    operands are read at issue (sound because the checks above forbid any overwrite before retirement).
  * single-shot barriers (q_bar, kv_bar): one load, read only after a wait.
  * at every segment end and at kernel end: no unconsumed load in any slot (an unconsumed completed phase would
    shift the parity of the next segment), FIFO empty at kernel end; every output element written exactly once.
TMA loads zero-fill outside the descriptor's shape (rows past the sequence end / T, columns past GROUP * D).
"""
import ast
import hashlib
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path

import numpy as np

np.seterr(all="ignore")
SRC = str(Path(__file__).resolve().parents[1] / "r4b" / "kernels" / "_varlen_gluon.py")
SRC_TRITON = str(Path(SRC).with_name("varlen_attention.py"))  # _seq_of and _tile_of, which the kernels call
# sha256 of the transcribed @gluon.jit functions' source (kernel_sha()); the configs are read from SRC itself
KERNEL_SHA = "e39d18b300813d6dcf648c012e129b5e04a3d2e83dba7ca042c4e6fc7a804c05"
KERNELS = {SRC: ("_segment_keys", "_seq_kv_descs", "_softmax_block", "_load_kv", "_fwd_kernel", "_load_qdo",
                 "_bwd_dkdv_kernel", "_bwd_dq_kernel"),
           SRC_TRITON: ("_seq_of", "_tile_of")}
NEG = -1.0e30
LN2 = np.log(2.0)
MUT = set()  # mutations (self-test of the checker), empty for the real runs
COV = {}  # coverage counters (which paths the batches took)


def cov(key):
    COV[key] = COV.get(key, 0) + 1


class EmuError(Exception):
    pass


def fail(msg):
    raise EmuError(msg)


def read_configs():
    src = open(SRC).read()
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and \
                node.targets[0].id in ("CONFIGS", "DKDV_CONFIGS", "DQ_CONFIGS"):
            out[node.targets[0].id] = ast.literal_eval(node.value)
    return out, kernel_sha()


def kernel_sha() -> str:
    """sha256 of the source of the functions this file transcribes (KERNELS: the Gluon kernels and helpers, and the
    Triton helpers they call), decorators included."""
    h = hashlib.sha256()
    for path, names in KERNELS.items():
        src = open(path).read()
        lines = src.splitlines(keepends=True)
        parts = {}
        for node in ast.walk(ast.parse(src)):  # (the Triton helpers are defined inside an `if`)
            if isinstance(node, ast.FunctionDef) and node.name in names:
                start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
                parts[node.name] = "".join(lines[start:node.end_lineno])
        missing = set(names) - set(parts)
        if missing:
            raise EmuError(f"functions not found in {path}: {sorted(missing)}")
        for n in names:
            h.update(parts[n].encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ machine model
class Slot:
    def __init__(self):
        self.issued = 0
        self.waited = 0
        self.tag = None
        self.data = None
        self.last_wait_t = -10


class Group:
    def __init__(self, reads, value):
        self.reads = frozenset(reads)
        self.value = value
        self.retired = False


class Prog:
    def __init__(self, S, name):
        self.S = S
        self.name = name
        self.slots = [Slot() for _ in range(S)]
        self.fifo = []
        self.t = 0
        self.bar_t = -1
        self.retire_t = {}  # smem buffer -> time its last reader retired
        self.single = {}  # name -> [issued, waited, data]

    def tick(self):
        self.t += 1
        return self.t

    def thread_barrier(self):
        self.bar_t = self.tick()

    # single-shot TMA (Q / K,V tile of the program)
    def load_single(self, name, data, expect_bytes, copy_bytes):
        if name in self.single:
            fail(f"{self.name}: second load on single barrier {name}")
        if expect_bytes != copy_bytes:
            fail(f"{self.name}: {name} expect {expect_bytes} B, copies {copy_bytes} B")
        self.single[name] = [1, 0, data]
        self.tick()

    def wait_single(self, name, parity):
        st = self.single.get(name)
        if st is None:
            fail(f"{self.name}: wait on {name} without a load: hang" if parity == 0 else "passes with no data")
        # phase 0 completes once; wait(0) passes from then on (no-op); wait(1) would pass at once before it
        if parity != 0:
            fail(f"{self.name}: wait({name}, {parity})")
        st[1] += 1
        self.tick()

    def get_single(self, name):
        st = self.single.get(name)
        if st is None or st[1] == 0:
            fail(f"{self.name}: {name} read before its barrier was waited for")
        return st[2]

    # ring
    def load(self, slot, tag, data, pred, expect_bytes, copy_bytes):
        if not pred:
            return
        if not (0 <= slot < self.S):
            fail(f"{self.name}: slot {slot} out of range")
        s = self.slots[slot]
        if s.issued != s.waited:
            fail(f"{self.name}: load {tag} into slot {slot} whose previous load {s.tag} was never consumed")
        buf = ("ring", slot)
        for g in self.fifo:
            if buf in g.reads:
                fail(f"{self.name}: load {tag} into slot {slot} while a wgmma reading it ({s.tag}) is in flight")
        if s.last_wait_t > self.bar_t:
            fail(f"{self.name}: load {tag} into slot {slot}: no thread_barrier since the last wait on it")
        if self.retire_t.get(buf, -10) > self.bar_t:
            fail(f"{self.name}: load {tag} into slot {slot}: no thread_barrier since its readers retired")
        if expect_bytes != copy_bytes:
            fail(f"{self.name}: expect {expect_bytes} B, copies {copy_bytes} B")
        s.issued += 1
        s.tag = tag
        s.data = data
        self.tick()

    def wait(self, slot, parity, want):
        s = self.slots[slot]
        if s.issued != s.waited + 1:
            if s.issued == s.waited:
                # no load outstanding: the completed count is s.issued
                if (s.issued & 1) == parity:
                    fail(f"{self.name}: wait slot {slot} parity {parity} for {want}: HANG (no load issued)")
                fail(f"{self.name}: wait slot {slot} parity {parity} for {want}: passes at once on stale {s.tag}")
            fail(f"{self.name}: wait slot {slot}: {s.issued - s.waited} loads outstanding")
        if ((s.issued - 1) & 1) != parity:
            fail(f"{self.name}: wait slot {slot} parity {parity} for {want}: the pending load completes phase "
                 f"{s.issued - 1}: passes early (stale data) or hangs")
        if s.tag != want:
            fail(f"{self.name}: slot {slot} holds {s.tag}, code expects {want}")
        s.waited += 1
        s.last_wait_t = self.tick()

    def ring(self, slot, want):
        s = self.slots[slot]
        if s.issued == 0 or s.issued != s.waited:
            fail(f"{self.name}: wgmma reads slot {slot} (wants {want}) whose newest load {s.tag} was not waited for")
        if s.tag != want:
            fail(f"{self.name}: wgmma reads slot {slot}: holds {s.tag}, code expects {want}")
        return s.data

    # wgmma
    def mma(self, reads, value, sync=False):
        g = Group(reads, value)
        self.fifo.append(g)
        self.tick()
        if sync:
            self.mma_wait(0)
        return g

    def mma_wait(self, n):
        t = self.tick()
        while len(self.fifo) > n:
            g = self.fifo.pop(0)
            g.retired = True
            for b in g.reads:
                self.retire_t[b] = t

    def val(self, g, what):
        if not g.retired:
            fail(f"{self.name}: {what} used before its wgmma group retired")
        return g.value

    def reg_write(self, name):
        for g in self.fifo:
            if ("reg", name) in g.reads:
                fail(f"{self.name}: register operand {name} overwritten while a wgmma reading it is in flight")

    def seg_end(self, where):
        for i, s in enumerate(self.slots):
            if s.issued != s.waited:
                fail(f"{self.name}: {where}: slot {i} holds an unconsumed load {s.tag}")

    def kernel_end(self):
        self.seg_end("kernel end")
        if self.fifo:
            fail(f"{self.name}: kernel end with {len(self.fifo)} wgmma groups in flight")
        for n, st in self.single.items():
            if st[1] == 0:
                fail(f"{self.name}: barrier {n} never waited for (invalidated under a load)")


def tile_of(pid, n_heads, T, BLOCK, heavy_last):
    """varlen_attention._tile_of: (first packed row, head) of program pid."""
    h = pid % n_heads
    tile = pid // n_heads
    if heavy_last:
        tile = (T + BLOCK - 1) // BLOCK - 1 - tile
    return tile * BLOCK, h


def segment_keys(t, cs, seg_hi, L, causal):
    """_varlen_gluon._segment_keys: (kv_hi, free_hi) of a segment."""
    if causal:
        return seg_hi - cs, t - cs
    return L, L


def tma_box(X, r0, c0, nr, nc):
    """TMA box [r0, r0+nr) x [c0, c0+nc) of the 2-D descriptor view X, zero-filled outside X's shape."""
    out = np.zeros((nr, nc))
    R, C = X.shape
    rlo, rhi, clo, chi = max(r0, 0), min(r0 + nr, R), max(c0, 0), min(c0 + nc, C)
    if rlo < rhi and clo < chi:
        out[rlo - r0:rhi - r0, clo - c0:chi - c0] = X[rlo:rhi, clo:chi]
    return out


def seq_of(cu, n_seqs, t):
    lo = 0
    hi = n_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cu[mid] <= t:
            lo = mid
        else:
            hi = mid
    return lo


def cdiv(a, b):
    return -(-a // b)


class Out:
    """An output array that counts writes per element (each must be written exactly once)."""

    def __init__(self, shape):
        self.a = np.full(shape, np.nan)
        self.n = np.zeros(shape, dtype=np.int64)

    def put(self, idx, val):
        self.a[idx] = val
        self.n[idx] += 1


ESZ = 2  # bytes of bf16 / fp16


# ------------------------------------------------------------------------------------------------ _fwd_kernel
def softmax_block(s, m_i, kn, lim, qk, MASK):
    if MASK:
        s = np.where(kn[None, :] < lim[:, None], s * qk, NEG)
        m_new = np.maximum(m_i, s.max(1))
        p = np.exp2(s - m_new[:, None])
    else:
        m_new = np.maximum(m_i, s.max(1) * qk)
        p = np.exp2(s * qk - m_new[:, None])
    return p, m_new


def fwd_program(pid, q, k, v, cu, qk, causal, G, BM, BN, S, O, LSE):
    T, Hq, D = q.shape
    n_seqs = len(cu) - 1
    t0, h = tile_of(pid, Hq, T, BM, causal)
    hk = h // G
    P = Prog(S, f"fwd pid {pid}")
    P.load_single("q", tma_box(q[:, h], t0, 0, BM, D), BM * D * ESZ, BM * D * ESZ)
    rows = t0 + np.arange(BM)
    offs_n = np.arange(BN)
    t_end = min(t0 + BM, T)
    seq = seq_of(cu, n_seqs, t0)
    t = t0
    it = 0
    while t < t_end:
        cs = int(cu[seq])
        ce = int(cu[seq + 1])
        seg_hi = min(ce, t_end)
        L = ce - cs
        kv_hi, free_hi = segment_keys(t, cs, seg_hi, L, causal)
        nb = (kv_hi + BN - 1) // BN
        if nb > 0:
            cov(("fwd", "segment with it>0 (not the program's first)" if it else "first segment"))
            cov(("fwd", f"nb {'<' if nb < S else '>='} STAGES"))
            if "fwd_no_seg_barrier" not in MUT:
                P.thread_barrier()
            Kd = k[cs:ce, hk]
            Vd = v[cs:ce, hk]

            def load_kv(block, slot, pred):
                data = (tma_box(Kd, block * BN, 0, BN, D), tma_box(Vd, block * BN, 0, BN, D)) if pred else None
                P.load(slot, (seq, block), data, pred, 2 * BN * D * ESZ, 2 * BN * D * ESZ)

            for i in range(S):
                load_kv(i, (it + i) % S, i < nb)
            q_loc = rows - cs
            lim = q_loc + 1 if causal else q_loc * 0 + L
            if "fwd_skip_qwait" not in MUT:
                P.wait_single("q", 0)
            slot = it % S
            P.wait(slot, (it // S) & 1, (seq, 0))
            Kb, _ = P.ring(slot, (seq, 0))
            Qt = P.get_single("q")
            sc = P.mma({"q", ("ring", slot)}, Qt @ Kb.T, sync=True)
            m_i = np.full(BM, -np.inf)
            cov(("fwd", "masked block" if BN > free_hi else "unmasked block"))
            if BN > free_hi:
                p, m_i = softmax_block(P.val(sc, "S_0"), m_i, offs_n, lim, qk, True)
            else:
                p, m_i = softmax_block(P.val(sc, "S_0"), m_i, offs_n, lim, qk, False)
            l_i = p.sum(1)
            P.reg_write("p16")
            p16 = p
            acc = Group(set(), np.zeros((BM, D)))  # gl.zeros: a plain register tensor, no wgmma group
            acc.retired = True
            for j in range(1, nb):
                cur = it + j
                slot = cur % S
                prev = (cur - 1) % S
                P.wait(slot, (cur // S) & 1, (seq, j))
                Kb, _ = P.ring(slot, (seq, j))
                sc = P.mma({"q", ("ring", slot)}, Qt @ Kb.T)
                _, Vp = P.ring(prev, (seq, j - 1))
                acc = P.mma({("reg", "p16"), ("ring", prev)}, acc.value + p16 @ Vp)
                if "fwd_early_refill" in MUT:
                    P.thread_barrier()
                    load_kv(j - 1 + S, prev, j - 1 + S < nb)
                P.mma_wait(1)
                scv = P.val(sc, "S_j")
                cov(("fwd", "masked block" if j * BN + BN > free_hi else "unmasked block"))
                if (j * BN > free_hi) if "fwd_mask_edge" in MUT else (j * BN + BN > free_hi):
                    p, m_new = softmax_block(scv, m_i, j * BN + offs_n, lim, qk, True)
                else:
                    p, m_new = softmax_block(scv, m_i, j * BN + offs_n, lim, qk, False)
                alpha = np.exp2(m_i - m_new)
                l_i = l_i * alpha + p.sum(1)
                p_next = p
                if "fwd_wait1" in MUT:
                    P.mma_wait(1)
                else:
                    P.mma_wait(0)
                accv = P.val(acc, "O accumulator") * alpha[:, None]
                acc = Group(set(), accv)
                acc.retired = True
                m_i = m_new
                P.reg_write("p16")
                p16 = p_next
                if "fwd_no_refill_barrier" not in MUT:
                    P.thread_barrier()
                if "fwd_early_refill" not in MUT:
                    if "fwd_refill_cur" in MUT:
                        load_kv(j + S, slot, j + S < nb)
                    else:
                        load_kv(j - 1 + S, prev, j - 1 + S < nb)
            last = (it + nb - 1) % S
            _, Vl = P.ring(last, (seq, nb - 1))
            acc = P.mma({("reg", "p16"), ("ring", last)}, acc.value + p16 @ Vl)
            P.mma_wait(0)
            it += nb
            accv = P.val(acc, "O")
            out = accv / l_i[:, None]
            seg = (rows >= t) & (rows < seg_hi)
            O.put((rows[seg], h), out[seg])
            LSE.put((h, rows[seg]), (m_i + np.log2(l_i))[seg])
            P.seg_end(f"segment seq {seq}")
        t = seg_hi
        seq += 1
    P.wait_single("q", 0)
    P.kernel_end()


def fwd_kernel(q, k, v, cu, scale, causal, G, cfg):
    BM, BN, _w, S = cfg
    T, Hq, D = q.shape
    O = Out(q.shape)
    LSE = Out((Hq, T))
    qk = scale / LN2  # scale * log2(e)
    for pid in range(cdiv(T, BM) * Hq):
        fwd_program(pid, q, k, v, cu, qk, causal, G, BM, BN, S, O, LSE)
    return O, LSE


# ------------------------------------------------------------------------------------------------ _bwd_dkdv_kernel
def dkdv_program(pid, q, k, v, do, lse_g, delta_g, cu, qk, sm_scale, causal, G, BN, BM, S, DK, DV):
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    n_seqs = len(cu) - 1
    t0, hk = tile_of(pid, Hkv, T, BN, False)
    P = Prog(S, f"dkdv pid {pid}")
    P.load_single("kv", (tma_box(k[:, hk], t0, 0, BN, D), tma_box(v[:, hk], t0, 0, BN, D)),
                  2 * BN * D * ESZ, 2 * BN * D * ESZ)
    rows = t0 + np.arange(BN)
    offs_m = np.arange(BM)
    t_end = min(t0 + BN, T)
    seq = seq_of(cu, n_seqs, t0)
    t = t0
    it = 0
    P.wait_single("kv", 0)
    Kt, Vt = P.get_single("kv")
    lse_flat = lse_g.reshape(-1)
    delta_flat = delta_g.reshape(-1)
    while t < t_end:
        cs = int(cu[seq])
        ce = int(cu[seq + 1])
        seg_hi = min(ce, t_end)
        L = ce - cs
        k_lo = t - cs
        k_hi = seg_hi - cs
        if causal:
            q_start = (k_lo // BM) * BM
        else:
            q_start = k_lo * 0
        nq = (L - q_start + BM - 1) // BM
        total = nq * G
        if total > 0:
            cov(("dkdv", "segment with it>0" if it else "first segment"))
            cov(("dkdv", f"total {'<' if total < S else '>='} STAGES"))
            P.thread_barrier()
            # descriptor: (L, GROUP * D) view of the sequence's GROUP query heads of KV head hk
            Qv = q[cs:ce, hk * G:(hk + 1) * G].reshape(L, G * D)
            Ov = do[cs:ce, hk * G:(hk + 1) * G].reshape(L, G * D)

            def load_qdo(row, col, slot, pred):
                if pred and not (0 <= col and col + D <= G * D):
                    fail(f"dkdv pid {pid}: column {col} outside the (L, GROUP*D) view")
                data = (tma_box(Qv, row, col, BM, D), tma_box(Ov, row, col, BM, D)) if pred else None
                P.load(slot, (seq, row, col), data, pred, 2 * BM * D * ESZ, 2 * BM * D * ESZ)

            for i in range(S):
                if "dkdv_extra_load" in MUT:  # one load too many, on a valid column
                    load_qdo(q_start + (i % nq) * BM, min(i // nq, G - 1) * D, (it + i) % S, i <= total)
                    continue
                load_qdo(q_start + (i % nq) * BM, (i // nq) * D, (it + i) % S, i < total)
            k_loc = rows - cs
            dk = Group(set(), np.zeros((BN, D)))
            dk.retired = True
            dv = Group(set(), np.zeros((BN, D)))
            dv.retired = True
            pT16 = np.zeros((BN, BM))
            dsT16 = np.zeros((BN, BM))
            for step in range(total):
                g = step // nq
                m0 = q_start + (step - g * nq) * BM
                cur = it + step
                slot = cur % S
                h = hk * G + g
                qn = m0 + offs_m
                qmask = qn < L
                idx = h * T + cs + qn  # LSE + h * T + cs + qn, masked by qmask
                lse = np.where(qmask, lse_flat[np.clip(idx, 0, lse_flat.size - 1)], 0.0)
                delta = np.where(qmask, delta_flat[np.clip(idx, 0, delta_flat.size - 1)], 0.0)
                want = (seq, m0, g * D)
                P.wait(slot, (cur // S) & 1, want)
                Qb, Ob = P.ring(slot, want)
                sT = P.mma({"kv", ("ring", slot)}, Kt @ Qb.T)
                dpT = P.mma({"kv", ("ring", slot)}, Vt @ Ob.T)
                P.mma_wait(2 if "dkdv_wait2" in MUT else 1)
                if step > 0:
                    P.thread_barrier()
                    nxt = step - 1 + S
                    g2 = nxt // nq
                    rslot = cur % S if "dkdv_refill_cur" in MUT else (cur - 1) % S
                    load_qdo(q_start + (nxt - g2 * nq) * BM, g2 * D, rslot, nxt < total)
                pT = np.exp2(P.val(sT, "S^T") * qk - lse[None, :])
                cov(("dkdv", "masked step" if ((m0 < k_hi or m0 + BM > L) if causal else m0 + BM > L)
                     else "unmasked step"))
                if causal:
                    if m0 < k_hi or m0 + BM > L:
                        ok = qmask[None, :] & (qn[None, :] >= k_loc[:, None])
                        pT = np.where(ok, pT, 0.0)
                else:
                    if m0 + BM > L:
                        pT = np.where(qmask[None, :], pT, 0.0)
                P.reg_write("pT16")
                pT16 = pT
                _, Ob = P.ring(slot, want)
                dv = P.mma({("reg", "pT16"), ("ring", slot)}, dv.value + pT16 @ Ob)
                P.mma_wait(1)
                dsT = pT * (P.val(dpT, "dP^T") - delta[None, :])
                P.reg_write("dsT16")
                dsT16 = dsT
                Qb, _ = P.ring(slot, want)
                dk = P.mma({("reg", "dsT16"), ("ring", slot)}, dk.value + dsT16 @ Qb)
            if "dkdv_skip_final_wait" not in MUT:
                P.mma_wait(0)
            it += total
            seg = (rows >= t) & (rows < seg_hi)
            DK.put((rows[seg], hk), (P.val(dk, "dK") * sm_scale)[seg])
            DV.put((rows[seg], hk), P.val(dv, "dV")[seg])
            P.seg_end(f"segment seq {seq}")
        t = seg_hi
        seq += 1
    P.kernel_end()


def dkdv_kernel(q, k, v, do, lse, delta, cu, scale, causal, G, cfg):
    BN, BM, _w, S = cfg
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    DK = Out(k.shape)
    DV = Out(v.shape)
    for pid in range(cdiv(T, BN) * Hkv):
        dkdv_program(pid, q, k, v, do, lse, delta, cu, scale / LN2, scale, causal, G, BN, BM, S, DK, DV)
    return DK, DV


# ------------------------------------------------------------------------------------------------ _bwd_dq_kernel
def dq_program(pid, q, k, v, do, lse_g, delta_g, cu, qk, sm_scale, causal, G, BM, BN, S, DQ):
    T, Hq, D = q.shape
    n_seqs = len(cu) - 1
    t0, h = tile_of(pid, Hq, T, BM, causal)
    hk = h // G
    P = Prog(S, f"dq pid {pid}")
    P.load_single("qdo", (tma_box(q[:, h], t0, 0, BM, D), tma_box(do[:, h], t0, 0, BM, D)),
                  2 * BM * D * ESZ, 2 * BM * D * ESZ)
    rows = t0 + np.arange(BM)
    offs_n = np.arange(BN)
    rv = rows < T
    lse = np.where(rv, lse_g[h, np.clip(rows, 0, T - 1)], 0.0)
    delta = np.where(rv, delta_g[h, np.clip(rows, 0, T - 1)], 0.0)
    t_end = min(t0 + BM, T)
    seq = seq_of(cu, n_seqs, t0)
    t = t0
    it = 0
    P.wait_single("qdo", 0)
    Qt, Ot = P.get_single("qdo")
    while t < t_end:
        cs = int(cu[seq])
        ce = int(cu[seq + 1])
        seg_hi = min(ce, t_end)
        L = ce - cs
        kv_hi, free_hi = segment_keys(t, cs, seg_hi, L, causal)
        nb = (kv_hi + BN - 1) // BN
        if nb > 0:
            cov(("dq", "segment with it>0" if it else "first segment"))
            cov(("dq", f"nb {'<' if nb < S else '>='} STAGES"))
            P.thread_barrier()
            Kd = k[cs:ce, hk]
            Vd = v[cs:ce, hk]

            def load_kv(block, slot, pred):
                data = (tma_box(Kd, block * BN, 0, BN, D), tma_box(Vd, block * BN, 0, BN, D)) if pred else None
                P.load(slot, (seq, block), data, pred, 2 * BN * D * ESZ, 2 * BN * D * ESZ)

            nb_pred = nb - 1 if "dq_pred_short" in MUT else nb
            for i in range(S):
                load_kv(i, (it + i) % S, i < nb_pred)
            q_loc = rows - cs
            lim = q_loc + 1 if causal else q_loc * 0 + L
            dq = Group(set(), np.zeros((BM, D)))
            dq.retired = True
            ds16 = np.zeros((BM, BN))
            for j in range(nb):
                cur = it + j
                slot = cur % S
                P.wait(slot, (cur // S) & 1, (seq, j))
                Kb, Vb = P.ring(slot, (seq, j))
                s = P.mma({"qdo", ("ring", slot)}, Qt @ Kb.T)
                dp = P.mma({"qdo", ("ring", slot)}, Ot @ Vb.T)
                P.mma_wait(1)
                if j > 0:
                    if "dq_no_refill_barrier" not in MUT:
                        P.thread_barrier()
                    rslot = slot if "dq_refill_cur" in MUT else (cur - 1) % S
                    load_kv(j - 1 + S, rslot, j - 1 + S < nb_pred)
                p = np.exp2(P.val(s, "S") * qk - lse[:, None])
                edge = (j * BN > free_hi) if "dq_mask_edge" in MUT else (j * BN + BN > free_hi)
                cov(("dq", "masked block" if edge else "unmasked block"))
                if edge:
                    kn = j * BN + offs_n
                    p = np.where(kn[None, :] < lim[:, None], p, 0.0)
                P.mma_wait(0)
                ds = p * (P.val(dp, "dP") - delta[:, None])
                P.reg_write("ds16")
                ds16 = ds
                Kb, _ = P.ring(slot, (seq, j))
                dq = P.mma({("reg", "ds16"), ("ring", slot)}, dq.value + ds16 @ Kb)
            P.mma_wait(0)
            it += nb
            seg = (rows >= t) & (rows < seg_hi)
            DQ.put((rows[seg], h), (P.val(dq, "dQ") * sm_scale)[seg])
            P.seg_end(f"segment seq {seq}")
        t = seg_hi
        seq += 1
    P.kernel_end()


def dq_kernel(q, k, v, do, lse, delta, cu, scale, causal, G, cfg):
    BM, BN, _w, S = cfg
    T, Hq, D = q.shape
    DQ = Out(q.shape)
    for pid in range(cdiv(T, BM) * Hq):
        dq_program(pid, q, k, v, do, lse, delta, cu, scale / LN2, scale, causal, G, BM, BN, S, DQ)
    return DQ


# ------------------------------------------------------------------------------------------------ reference
def reference(q, k, v, do, cu, scale, causal, G):
    """Plain float64 attention per (sequence, head): O, LSE (log2), delta, dQ, dK, dV."""
    T, Hq, D = q.shape
    O = np.zeros_like(q)
    lse2 = np.zeros((Hq, T))
    delta = np.zeros((Hq, T))
    dq = np.zeros_like(q)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    for s in range(len(cu) - 1):
        a, b = int(cu[s]), int(cu[s + 1])
        if b == a:
            continue
        n = b - a
        for h in range(Hq):
            hk = h // G
            Q, K, V, dO = q[a:b, h], k[a:b, hk], v[a:b, hk], do[a:b, h]
            Sc = Q @ K.T * scale
            if causal:
                Sc = np.where(np.arange(n)[None, :] <= np.arange(n)[:, None], Sc, -np.inf)
            mx = Sc.max(1, keepdims=True)
            E = np.exp(Sc - mx)
            Z = E.sum(1, keepdims=True)
            Pm = E / Z
            O[a:b, h] = Pm @ V
            lse2[h, a:b] = (mx + np.log(Z))[:, 0] / LN2
            dl = (dO * O[a:b, h]).sum(1)
            delta[h, a:b] = dl
            dS = Pm * (dO @ V.T - dl[:, None])
            dq[a:b, h] = scale * dS @ K
            dk[a:b, hk] += scale * dS.T @ Q
            dv[a:b, hk] += Pm.T @ dO
    return O, lse2, delta, dq, dk, dv


# ------------------------------------------------------------------------------------------------ batches
KINDS = ("mixed", "many_short", "long", "edges")


def gen_lens(r, kind, unit):
    """unit: a typical block size, so lengths fall around block boundaries."""
    u = unit
    around = [0, 1, 2, 3, u // 2, u - 1, u, u + 1, 2 * u - 1, 2 * u, 2 * u + 1, 3 * u + 5, 4 * u - 1, 4 * u + 1]
    if kind == "mixed":
        lens = [r.choice(around) for _ in range(r.randint(1, 8))]
    elif kind == "many_short":  # tiles that span many sequences (empties and length 1 among them)
        lens = [r.choice([0, 0, 1, 1, 1, 2, 3, 4, 5, 7]) for _ in range(r.randint(10, 70))]
    elif kind == "long":  # one long sequence spanning many blocks, possibly with neighbours
        lens = [r.randint(5 * u, 12 * u) + r.choice([-1, 0, 1])]
        for _ in range(r.randint(0, 3)):
            lens.insert(r.randint(0, len(lens)), r.choice([0, 1, 3, u - 1, u + 1]))
    else:  # empties / length 1 at the ends and in between, lengths off by one from the block
        lens = []
        for _ in range(r.randint(2, 9)):
            lens.append(r.choice([0, 0, 1, 1, u - 1, u + 1, 2 * u + 1, r.randint(1, 3 * u)]))
        if r.random() < 0.5:
            lens = [0] + lens
        if r.random() < 0.5:
            lens = lens + [0, 0]
    if sum(lens) == 0:
        lens.append(r.choice([1, u + 1]))
    return lens


def make_case(i, unit, D):
    r = random.Random(1000 + i * 7919 + unit)
    G = (1, 2, 4, 8)[i % 4]
    causal = bool((i // 4) % 2)
    kind = KINDS[(i // 8) % 4]
    Hkv = r.choice([1, 2]) if G < 8 else 1 + (i // 32) % 2
    lens = gen_lens(r, kind, unit)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    T = int(cu[-1])
    rng = np.random.default_rng(i + 17 * unit)
    Hq = Hkv * G
    q = rng.standard_normal((T, Hq, D))
    k = rng.standard_normal((T, Hkv, D))
    v = rng.standard_normal((T, Hkv, D))
    do = rng.standard_normal((T, Hq, D))
    scale = r.uniform(0.1, 0.5)
    return dict(lens=lens, cu=cu, q=q, k=k, v=v, do=do, scale=scale, causal=causal, G=G, Hkv=Hkv, kind=kind)


def close(a, ref):
    if np.isnan(a).any():
        return False, float("nan")
    err = float(np.max(np.abs(a - ref) / (1.0 + np.abs(ref)))) if a.size else 0.0
    return err < 1e-9, err


def check_out(name, o, ref):
    if (o.n != 1).any():
        bad = np.argwhere(o.n != 1)[0]
        return f"{name}: element {tuple(bad)} written {o.n[tuple(bad)]} times"
    ok, err = close(o.a, ref)
    return None if ok else f"{name}: max rel err {err:.3g}"


def run_case(args):
    i, unit, D, fwd_cfgs, dkdv_cfgs, dq_cfgs, mut = args
    MUT.clear()
    MUT.update(mut)
    COV.clear()
    c = make_case(i, unit, D)
    q, k, v, do, cu, scale, causal, G = c["q"], c["k"], c["v"], c["do"], c["cu"], c["scale"], c["causal"], c["G"]
    O_r, lse_r, delta_r, dq_r, dk_r, dv_r = reference(q, k, v, do, cu, scale, causal, G)
    res = []
    desc = f"case {i} kind={c['kind']} G={G} Hkv={c['Hkv']} causal={causal} lens={c['lens']}"
    for kern, cfgs in (("fwd", fwd_cfgs), ("dkdv", dkdv_cfgs), ("dq", dq_cfgs)):
        for cfg in cfgs:
            try:
                if kern == "fwd":
                    O, LSE = fwd_kernel(q, k, v, cu, scale, causal, G, cfg)
                    err = check_out("O", O, O_r) or check_out("LSE", LSE, lse_r)
                elif kern == "dkdv":
                    DK, DV = dkdv_kernel(q, k, v, do, lse_r, delta_r, cu, scale, causal, G, cfg)
                    err = check_out("dK", DK, dk_r) or check_out("dV", DV, dv_r)
                else:
                    DQ = dq_kernel(q, k, v, do, lse_r, delta_r, cu, scale, causal, G, cfg)
                    err = check_out("dQ", DQ, dq_r)
            except EmuError as e:
                err = "ASSERT " + str(e)
            res.append((kern, cfg, err))
    return desc, res, dict(COV)


def scaled(cfgs, f):
    return [tuple([a // f, b // f, w, st]) for a, b, w, st in cfgs]


def main():
    cf, sha = read_configs()
    if sha != KERNEL_SHA:
        print(f"WARNING: the kernels in {SRC} changed since this emulation was written (sha {sha[:12]} != "
              f"{KERNEL_SHA[:12]})")
    n_cases = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    D = 16  # head dim only sets the column offsets (g * D) and the byte counts; the kernels' 64 / 128 change no
    # control flow. Real tile sizes (unit 64) and every tile size / 8 (unit 8: same ratios, same STAGES)
    plans = [("real tiles", 1, 64), ("tiles / 8", 8, 8)]
    print("CONFIGS", cf["CONFIGS"], "\nDKDV_CONFIGS", cf["DKDV_CONFIGS"], "\nDQ_CONFIGS", cf["DQ_CONFIGS"])
    total_bad = 0
    runs = 0
    t_start = time.time()
    with mp.Pool(max(1, mp.cpu_count())) as pool:
        for label, f, unit in plans:
            fc, kc, qc = scaled(cf["CONFIGS"], f), scaled(cf["DKDV_CONFIGS"], f), scaled(cf["DQ_CONFIGS"], f)
            args = [(i, unit, D, fc, kc, qc, ()) for i in range(n_cases)]
            counts = {}
            allcov = {}
            for desc, res, cv in pool.imap_unordered(run_case, args):
                for key, n in cv.items():
                    allcov[key] = allcov.get(key, 0) + n
                for kern, cfg, err in res:
                    runs += 1
                    counts[(kern, cfg)] = counts.get((kern, cfg), 0) + 1
                    if err:
                        total_bad += 1
                        print(f"[{label}] {kern} {cfg}: {err}\n    {desc}")
            print(f"[{label}] coverage (all configs):", {f"{a}: {b}": n for (a, b), n in sorted(allcov.items())})
            print(f"[{label}] runs per config:", {f"{a}{b}": n for (a, b), n in sorted(counts.items())})
    print(f"{runs} emulated kernel runs, {total_bad} failing, {time.time() - t_start:.0f} s")
    return total_bad


def selftest():
    """Each mutation of the kernels' ordering / masks must be caught."""
    cf, _ = read_configs()
    fc, kc, qc = scaled(cf["CONFIGS"], 8), scaled(cf["DKDV_CONFIGS"], 8), scaled(cf["DQ_CONFIGS"], 8)
    muts = {"fwd_no_seg_barrier": "fwd", "fwd_skip_qwait": "fwd", "fwd_early_refill": "fwd", "fwd_wait1": "fwd",
            "fwd_no_refill_barrier": "fwd", "fwd_refill_cur": "fwd", "dkdv_wait2": "dkdv",
            "dkdv_refill_cur": "dkdv", "dkdv_skip_final_wait": "dkdv", "dq_pred_short": "dq",
            "dq_no_refill_barrier": "dq", "dq_refill_cur": "dq", "dq_mask_edge": "dq",
            "dkdv_extra_load": "dkdv", "fwd_mask_edge": "fwd"}
    ok_all = True
    for m, kern in muts.items():
        caught = None
        for i in range(16):
            args = (i, 8, 8, fc if kern == "fwd" else [], kc if kern == "dkdv" else [], qc if kern == "dq" else [],
                    (m,))
            _, res, _ = run_case(args)
            errs = [e for _, _, e in res if e]
            if errs:
                caught = errs[0]
                break
        ok_all &= caught is not None
        print(f"mutation {m:24s}: {'caught: ' + caught[:110] if caught else 'NOT CAUGHT'}")
    MUT.clear()
    return ok_all


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "selftest":
        sys.exit(0 if selftest() else 1)
    sys.exit(1 if main() else 0)
