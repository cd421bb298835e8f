"""Benchmark the paged KV cache's inference ops: paged_decode_attention (one query token per sequence over its
context in the cache) and store_kv (a step's keys and values written into it), in GB/s and as a percentage of the
device copy bandwidth measured in the same run (read + write of a 4 GiB copy), launched and replayed in a CUDA graph
(decode runs in CUDA graphs in an engine).

Decode rows, bf16 on a GPU (fp32 at tiny shapes with --quick / on the CPU), 32 q / 8 kv heads of 128, blocks of 16
tokens, each sequence's blocks scattered over the cache in a random order (as a block manager leaves them):
  the anchor (docs/ANCHORS.md): B=32, every context 4096 (SDPA with enable_gqa on contiguous K/V reads 3.84 TB/s
  of KV on an H200); ragged: B=32, contexts random in [1, 4096]; latency: B=1, context 4096 (split-K decides it);
  B=128, context 1024.
Their GB/s count the bytes of K and V the contexts hold (what decode must read) + q + the output, for every provider
alike: a provider that reads padding or gathers the pages first moves more and shows it as fewer GB/s. Providers:
"SDPA contiguous KV" (the anchor's peer: K/V already contiguous per sequence), "r4b triton" (split-K), "r4b cuda"
(r4b._C's kernel; skipped with the reason where the extension has none), "flash-attn kvcache" (flash-attn's
``flash_attn_with_kvcache`` with a block table, when flash_attn imports: its pages must be a multiple of 256 tokens,
so it reads its own copy of the same K/V in 256-token blocks, scattered the same way) and "torch gather + SDPA" (the
naive paged path: a vectorised gather of the pages into contiguous K/V, then SDPA, every call).

store_kv rows: a prefill-sized write (T=16384 tokens) and a decode-sized one (T=32), Hkv=8, D=128, k and v strided
views of a fused (T, Hq + 2 Hkv, D) projection; GB/s of reading k and v and writing them (+ the slots); providers
"torch index_put" (store_kv_ref), "r4b triton", "r4b cuda".

Every provider's output is compared with the fp32 torch reference (paged_decode_attention_ref over the same bf16
cache; store_kv_ref's caches) before timing: ``err`` and ``check`` ("ok", or "MISMATCH" past CHECK_TOL) in the row.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bench.harness import (
    Case,
    Skip,
    backend_provider,
    copy_bandwidth_gbps,
    copy_columns,
    default_device,
    run_bench,
)

NAME = "paged_attention"  # the results' name (bench/results/<date>-<gpu>/paged_attention.json)
# against the fp32 reference: bf16 on the GPU (every provider reads the same bf16 cache), fp32 on the CPU
CHECK_TOL = {"cuda": 5e-2, "cpu": 1e-4}
SDPA = "SDPA contiguous KV"  # the anchor's peer (bench/summary.py judges r4b's rows against it)
FLASH_BLOCK = 256  # flash_attn_with_kvcache's paged KV needs blocks of a multiple of 256 tokens
R4B = ("r4b triton", "r4b cuda")  # r4b's rows (the same-size copy column is theirs)


def decode_cases(quick: bool, device: str = "cuda") -> list[Case]:
    if quick:  # tiny, for the CPU interpreter: GQA 4 like the real heads, D 32, blocks of 4
        hq, hkv, d, bs, shapes = 8, 2, 32, 4, [(3, 40, False), (3, 40, True), (1, 40, False), (4, 12, False)]
    else:
        hq, hkv, d, bs = 32, 8, 128, 16
        shapes = [(32, 4096, False), (32, 4096, True), (1, 4096, False), (128, 1024, False)]
    el = _dtype(device).itemsize  # bf16 on the GPU; the CPU's fp32 GB/s mean nothing
    out = []
    for B, ctx, ragged in shapes:
        if ragged:  # random contexts in [1, ctx], the same every run
            lens = torch.randint(1, ctx + 1, (B,), generator=torch.Generator().manual_seed(1)).tolist()
            label = f"decode B={B},ctx=rand[1,{ctx}]"
        else:
            lens = [ctx] * B
            label = f"decode B={B},ctx={ctx}"
        # bytes: K and V of every context (read once), q read, the output written
        nbytes = 2 * sum(lens) * hkv * d * el + 2 * B * hq * d * el
        out.append(Case(label, {"kind": "decode", "B": B, "lens": lens, "hq": hq, "hkv": hkv, "d": d, "bs": bs},
                        bytes=nbytes))
    return out


def store_cases(quick: bool, device: str = "cuda") -> list[Case]:
    hq, hkv, d, bs = (8, 2, 32, 4) if quick else (32, 8, 128, 16)
    el = _dtype(device).itemsize
    out = []
    for kind, T in (("prefill", 48 if quick else 16384), ("decode", 4 if quick else 32)):
        # read k and v, write them into the caches, read the int64 slots
        nbytes = 2 * 2 * T * hkv * d * el + 8 * T
        out.append(Case(f"store_kv {kind} T={T}", {"kind": f"store_{kind}", "T": T, "hq": hq, "hkv": hkv, "d": d,
                                                   "bs": bs}, bytes=nbytes))
    return out


def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter computes bf16 wrongly


# the current case's inputs and reference, shared by its providers (one case at a time: the anchor's cache is 0.5 GB)
_CURRENT: dict = {}


def _shared(case: Case, device: str, make) -> dict:
    key = (case.label, device)
    if _CURRENT.get("key") != key:
        _CURRENT.clear()
        _CURRENT.update(key=key, value=make(case, device))
    return _CURRENT["value"]


def _make_decode(case: Case, device: str) -> dict:
    """q (B, Hq, D); the caches (num_blocks, bs, Hkv, D) holding exactly the contexts' blocks, each sequence's blocks
    at random places (a random permutation of the cache's blocks); block_tables (B, max blocks) int32 (entries past
    a context 0, never read); context_lens (B,) int32; the fp32 reference output."""
    from r4b.kernels.paged_decode_attention import paged_decode_attention_ref

    p = case.params
    lens, bs = p["lens"], p["bs"]
    nblk = [-(-n // bs) for n in lens]
    perm = torch.randperm(sum(nblk), generator=torch.Generator().manual_seed(0))
    bt = torch.zeros(len(lens), max(nblk), dtype=torch.int32)
    at = 0
    for b, n in enumerate(nblk):
        bt[b, :n] = perm[at:at + n]
        at += n
    dtype = _dtype(device)
    g = torch.Generator(device=device).manual_seed(0)
    kc = torch.randn(sum(nblk), bs, p["hkv"], p["d"], device=device, dtype=dtype, generator=g)
    vc = torch.randn(sum(nblk), bs, p["hkv"], p["d"], device=device, dtype=dtype, generator=g)
    q = torch.randn(len(lens), p["hq"], p["d"], device=device, dtype=dtype, generator=g)
    bt = bt.to(device)
    cl = torch.tensor(lens, dtype=torch.int32, device=device)
    # fp32 q: the reference then computes in fp32 and returns fp32 (the bf16 cache upcast per sequence)
    ref = paged_decode_attention_ref(q.float(), kc, vc, bt, cl)
    return {"q": q, "kc": kc, "vc": vc, "bt": bt, "cl": cl, "ref": ref}


def _slots(bt: torch.Tensor, bs: int, length: int) -> torch.Tensor:
    """(B, length) int64: the cache slot of each sequence's token j < length (past a context: its table's entry,
    block 0 for an unused one: read, then masked)."""
    j = torch.arange(length, device=bt.device)
    return bt[:, j // bs].long() * bs + j % bs


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cl: torch.Tensor | None) -> torch.Tensor:
    """Decode attention with SDPA on (B, Hkv, L, D) K/V (any strides with a unit last one); q (B, Hq, D).

    Every context L long (cl None): the anchor's call, q (B, Hq, 1, D) with enable_gqa=True (no mask: SDPA's flash
    kernel). Ragged contexts (cl given): padded to the longest with a boolean key mask (chosen over running them as
    the anchor does, every context the longest, which would attend to the padding and fail the check). SDPA's flash
    kernel takes no mask, and enable_gqa with a mask may leave SDPA only its math kernel, which repeats K/V for every
    query head (transformers passes enable_gqa only without a mask); since a decode step has one query token, the
    Hq / Hkv query heads of each KV head are folded into the query length instead, q (B, Hkv, G, D) against K
    (B, Hkv, L, D): the same attention, no GQA, and a mask SDPA's memory-efficient kernel takes."""
    B, hq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    if cl is None:
        return F.scaled_dot_product_attention(q.view(B, hq, 1, d), k, v, enable_gqa=True).squeeze(2)
    mask = (torch.arange(length, device=q.device) < cl[:, None]).view(B, 1, 1, length)
    out = F.scaled_dot_product_attention(q.view(B, hkv, hq // hkv, d), k, v, attn_mask=mask)  # (B, Hkv, G, D)
    return out.reshape(B, hq, d)


def _no_graph(fn, why: str):
    """``fn``, refusing to be captured in a CUDA graph (it synchronises with the host): the row's graph_error says
    why, and nothing reaches the stream while it captures."""

    def call():
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"not capturable: {why}")
        return fn()

    return call


def decode_providers(device: str) -> dict:
    def sdpa_contiguous(case: Case):
        x = _shared(case, device, _make_decode)
        lens, bs = case.params["lens"], case.params["bs"]
        length = max(lens)
        hkv, d = case.params["hkv"], case.params["d"]
        slots = _slots(x["bt"], bs, length)
        k = x["kc"].view(-1, hkv, d)[slots].transpose(1, 2).contiguous()  # (B, Hkv, L, D)
        v = x["vc"].view(-1, hkv, d)[slots].transpose(1, 2).contiguous()
        cl = None if len(set(lens)) == 1 else x["cl"]
        q = x["q"]
        return lambda: _sdpa(q, k, v, cl)

    def gather_sdpa(case: Case):
        x = _shared(case, device, _make_decode)
        lens, bs = case.params["lens"], case.params["bs"]
        length = max(lens)  # the longest context: the engine knows it on the host
        hkv, d = case.params["hkv"], case.params["d"]
        kf, vf = x["kc"].view(-1, hkv, d), x["vc"].view(-1, hkv, d)  # (slots, Hkv, D)
        q, bt = x["q"], x["bt"]
        cl = None if len(set(lens)) == 1 else x["cl"]

        def fn():
            slots = _slots(bt, bs, length)  # (B, L)
            return _sdpa(q, kf[slots].transpose(1, 2), vf[slots].transpose(1, 2), cl)  # K/V (B, Hkv, L, D) views

        return fn

    def r4b(backend: str):
        def make(case: Case):
            from r4b.kernels.paged_decode_attention import paged_decode_attention as decode

            x = _shared(case, device, _make_decode)
            q, kc, vc, bt, cl = x["q"], x["kc"], x["vc"], x["bt"], x["cl"]
            return lambda: decode(q, kc, vc, bt, cl, backend=backend)

        return backend_provider("paged_decode_attention", backend, device, make)

    def flash(case: Case):
        if device != "cuda":
            raise Skip("flash-attn runs on a GPU only")
        try:
            from flash_attn import flash_attn_with_kvcache
        except Exception as ex:  # noqa: BLE001 - a missing or broken install is a skip with its reason
            raise Skip(f"flash_attn does not import ({type(ex).__name__}: {ex})") from None
        x = _shared(case, device, _make_decode)
        lens, bs = case.params["lens"], case.params["bs"]
        hkv, d = case.params["hkv"], case.params["d"]
        # its own cache: the same tokens' K/V in blocks of 256, each sequence's blocks at random places
        nblk = [-(-n // FLASH_BLOCK) for n in lens]
        width = max(nblk) * FLASH_BLOCK
        perm = torch.randperm(sum(nblk), generator=torch.Generator().manual_seed(0)).to(device)
        starts = [sum(nblk[:b]) for b in range(len(lens))]
        bt = torch.zeros(len(lens), max(nblk), dtype=torch.int32, device=device)  # (B, max blocks of 256)
        for b, n in enumerate(nblk):
            bt[b, :n] = perm[starts[b]:starts[b] + n]
        caches = []
        for src in (x["kc"], x["vc"]):
            tokens = src.view(-1, hkv, d)[_slots(x["bt"], bs, max(lens))]  # (B, L, Hkv, D)
            padded = F.pad(tokens, (0, 0, 0, 0, 0, width - tokens.shape[1]))  # (B, width, Hkv, D)
            cache = torch.zeros(sum(nblk), FLASH_BLOCK, hkv, d, device=device, dtype=src.dtype)
            for b, n in enumerate(nblk):
                cache[bt[b, :n].long()] = padded[b, :n * FLASH_BLOCK].view(n, FLASH_BLOCK, hkv, d)
            caches.append(cache)
        q, cl = x["q"].unsqueeze(1), x["cl"]  # (B, 1, Hq, D)
        kc, vc = caches
        return lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cl, block_table=bt).squeeze(1)

    # the peer first, then r4b's rows (the targets'), then the other peers: a bench cut at its time limit loses those
    return {SDPA: sdpa_contiguous, "r4b triton": r4b("triton"), "r4b cuda": r4b("cuda"),
            "flash-attn kvcache": flash, "torch gather + SDPA": gather_sdpa}


def _make_store(case: Case, device: str) -> dict:
    """A fused (T, Hq + 2 Hkv, D) projection whose k, v parts are written; slots into a cache of twice the tokens'
    blocks: a prefill fills blocks taken in a random order, a decode step writes each token (one per sequence) at
    a random offset of its own random block; the caches store_kv_ref leaves from zeros (the expected result)."""
    from r4b.kernels.store_kv import store_kv_ref

    p = case.params
    T, hq, hkv, d, bs = p["T"], p["hq"], p["hkv"], p["d"], p["bs"]
    gen = torch.Generator().manual_seed(0)
    if p["kind"] == "store_prefill":
        nb = 2 * -(-T // bs)
        t = torch.arange(T)
        slots = torch.randperm(nb, generator=gen)[t // bs] * bs + t % bs
    else:
        nb = 2 * T
        slots = torch.randperm(nb, generator=gen)[:T] * bs + torch.randint(0, bs, (T,), generator=gen)
    dtype = _dtype(device)
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(T, hq + 2 * hkv, d, device=device, dtype=dtype, generator=g)
    slots = slots.to(device)
    k, v = qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]  # (T, Hkv, D) strided views
    kexp = torch.zeros(nb, bs, hkv, d, device=device, dtype=dtype)
    vexp = torch.zeros_like(kexp)
    store_kv_ref(k, v, kexp, vexp, slots)
    return {"k": k, "v": v, "slots": slots, "ref": (kexp, vexp)}


def store_providers(device: str) -> dict:
    def make(backend: str | None):
        def setup(case: Case):
            from r4b.kernels.store_kv import store_kv, store_kv_ref

            x = _shared(case, device, _make_store)
            k, v, slots = x["k"], x["v"], x["slots"]
            kc, vc = torch.zeros_like(x["ref"][0]), torch.zeros_like(x["ref"][1])
            if backend is None:  # the peer: torch's index_put (a boolean mask drops the -1 slots: a host sync)
                return _no_graph(lambda: (store_kv_ref(k, v, kc, vc, slots), (kc, vc))[1],
                                 "store_kv_ref's boolean mask synchronises with the host")
            return lambda: (store_kv(k, v, kc, vc, slots, backend=backend), (kc, vc))[1]  # the caches, to check

        return setup

    return {"torch index_put": make(None), **{f"r4b {b}": backend_provider("store_kv", b, device, make(b))
                                               for b in ("triton", "cuda")}}


# (case label, provider) -> max relative error against the reference, filled before each row is timed
def main(argv: list[str] | None = None) -> list[dict]:
    argv = argv or []
    device = default_device()
    quick = "--quick" in argv or device == "cpu"
    copy = copy_bandwidth_gbps(device)  # the ceiling, measured in this run
    if copy:
        print(f"copy bandwidth: {copy:.0f} GB/s (read + write)", flush=True)

    def extra(case: Case, row: dict) -> dict:
        return copy_columns(case, row, device, copy, own=row["provider"] in R4B)

    # every row against the fp32 reference built with the case's inputs (by its providers' setup, _shared)
    check = dict(check_tol=CHECK_TOL[device], reference=lambda case: _CURRENT["value"]["ref"])
    try:
        rows = run_bench(NAME, decode_cases(quick, device), decode_providers(device), device=device, quick=quick,
                         extra_columns=extra, graph=True, **check)
        return run_bench(NAME, store_cases(quick, device), store_providers(device), device=device, quick=quick,
                         extra_columns=extra, graph=True, prior_rows=rows, **check)
    finally:
        _CURRENT.clear()


if __name__ == "__main__":
    main(sys.argv[1:])
