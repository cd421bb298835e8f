"""The inference engine's extend step: chunks of new tokens attending causally to their sequences' cached contexts
through the paged cache (paged_prefill_attention), Qwen3-4B's heads (32q / 8kv, d 128), blocks of 16, bf16 on a GPU.

Cases: "chunk" (8 sequences, a 512-token chunk at the end of a 4096-token context: chunked prefill of long prompts)
and "suffix" (64 completions, 5 tokens each after a 2048-token shared prompt: BPO's mode suffixes).

Providers: "r4b triton" (paged_prefill_attention's flash kernel through the block tables); "r4b decode rows" (one
paged_decode_attention row per token, each reading its whole context: what the engine ran before the op existed);
"SDPA contiguous KV" (the peer: K/V already contiguous (B, Hkv, ctx, D), the chunk's queries with an offset causal
mask, enable_gqa). Columns: ms, TFLOP/s (4 * rows * attended keys * D per head, causal), each row's result checked
against the fp32 reference."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bench.harness import Case, backend_provider, default_device, run_bench

CHECK_TOL = {"cuda": 2e-2, "cpu": 1e-4}


def cases(quick: bool) -> list[Case]:
    shapes = [("chunk", 2, 24, 40), ("suffix", 4, 5, 33)] if quick else [("chunk", 8, 512, 4096),
                                                                      ("suffix", 64, 5, 2048)]
    hq, hkv, d = (4, 2, 16) if quick else (32, 8, 128)
    out = []
    for kind, B, L, ctx in shapes:
        keys = sum(ctx - L + i + 1 for i in range(L))  # keys each row attends to, summed over a sequence's rows
        out.append(Case(f"{kind} B={B} L={L} ctx={ctx}", {"B": B, "L": L, "ctx": ctx, "hq": hq, "hkv": hkv, "d": d,
                                                           "bs": 16}, flops=4.0 * B * keys * hq * d))
    return out


_CURRENT: dict = {}


def _inputs(case: Case, device: str) -> dict:
    key = (case.label, device)
    if _CURRENT.get("key") == key:
        return _CURRENT
    p = case.params
    B, L, ctx, bs = p["B"], p["L"], p["ctx"], p["bs"]
    nb = -(-ctx // bs)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(B, ctx, p["hkv"], p["d"], device=device, dtype=dtype, generator=g)
    v = torch.randn(B, ctx, p["hkv"], p["d"], device=device, dtype=dtype, generator=g)
    q = torch.randn(B * L, p["hq"], p["d"], device=device, dtype=dtype, generator=g)
    perm = torch.randperm(B * nb, generator=torch.Generator().manual_seed(0)).to(torch.int32).view(B, nb)
    kc = torch.zeros(B * nb, bs, p["hkv"], p["d"], device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    pad = nb * bs - ctx
    kc[perm.flatten().long().to(device)] = F.pad(k, (0, 0, 0, 0, 0, pad)).reshape(B * nb, bs, p["hkv"], p["d"])
    vc[perm.flatten().long().to(device)] = F.pad(v, (0, 0, 0, 0, 0, pad)).reshape(B * nb, bs, p["hkv"], p["d"])
    cu = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=device)
    cl = torch.full((B,), ctx, dtype=torch.int32, device=device)
    from r4b.kernels import paged_prefill_attention

    ref = paged_prefill_attention(q.float(), kc.float(), vc.float(), perm.to(device), cu, cl, L, backend="torch")
    _CURRENT.clear()
    _CURRENT.update(key=key, q=q, k=k, v=v, kc=kc, vc=vc, bt=perm.to(device), cu=cu, cl=cl, ref=ref)
    return _CURRENT


def providers(device: str) -> dict:
    from r4b.kernels import paged_decode_attention, paged_prefill_attention

    def r4b(case: Case):
        x = _inputs(case, device)
        L = case.params["L"]
        return lambda: paged_prefill_attention(x["q"], x["kc"], x["vc"], x["bt"], x["cu"], x["cl"], L,
                                               backend="triton")

    def decode_rows(case: Case):
        x = _inputs(case, device)
        p = case.params
        B, L, ctx = p["B"], p["L"], p["ctx"]
        rows_bt = x["bt"].repeat_interleave(L, dim=0)
        lens = torch.arange(ctx - L + 1, ctx + 1, dtype=torch.int32, device=device).repeat(B)
        return lambda: paged_decode_attention(x["q"], x["kc"], x["vc"], rows_bt, lens)

    def sdpa(case: Case):
        x = _inputs(case, device)
        p = case.params
        B, L, ctx, hq, d = p["B"], p["L"], p["ctx"], p["hq"], p["d"]
        q = x["q"].view(B, L, hq, d).transpose(1, 2)  # (B, Hq, L, D)
        k, v = x["k"].transpose(1, 2), x["v"].transpose(1, 2)  # (B, Hkv, ctx, D), strided views
        mask = torch.arange(ctx, device=device)[None, :] <= torch.arange(ctx - L, ctx, device=device)[:, None]

        def call():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, Hq, L, D)
            return out.transpose(1, 2).reshape(B * L, hq, d)

        return call

    triton = backend_provider("paged_prefill_attention", "triton", device, r4b)
    return {"SDPA contiguous KV": sdpa, "r4b triton": triton, "r4b decode rows": decode_rows}


def main(argv: list[str] | None = None) -> list[dict]:
    argv = argv or []
    device = default_device()
    quick = "--quick" in argv or device == "cpu"

    try:
        return run_bench("paged_prefill", cases(quick), providers(device), device=device, quick=quick,
                         check_tol=CHECK_TOL[device], reference=lambda case: _inputs(case, device)["ref"])
    finally:
        _CURRENT.clear()


if __name__ == "__main__":
    main(sys.argv[1:])
