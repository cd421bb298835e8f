"""The attention GPU tests' low-precision rule, examined: ``python -m tests.rule_check`` on a GPU (about 20 s).

STYLE.md judges a bf16 kernel by flash-attn's rule: error against a high-precision reference <= 2x plain PyTorch's
own low-precision error + 1e-3 max|ref|. The attention tests' plain baseline (tests/test_varlen_attention.py
``_sdpa_bf16_per_doc``) calls SDPA on 3-D (H, L, D) tensors, which only PyTorch's math backend takes, and that
computes bf16 in fp32 (``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp`` is off by default), so its
"plain" error is only the output's rounding. On an H200 (2026-11-27) the Gluon dK/dV kernel broke that rule at D 64
by 16% in one case; a CPU emulation of its arithmetic (also the Triton kernels') reproduced the error to 16
digits and broke the rule on 1-2 of 150 random cases at D 64 and at D 128 (session 12).

Per case this prints, for dK (and O, dQ, dV), the float64 reference's own bf16 rounding (the floor), plain SDPA's
error on 3-D tensors (the current baseline) and on 4-D tensors (its fused bf16 kernels, when they take the case),
r4b's default Triton path, and on Hopper the Gluon dK/dV kernel's first config; then the allowance under each
baseline. What it decides: whether the baseline should be a real bf16 kernel (4-D), after which the Gluon backward
could take D 64 (``_varlen_gluon.BWD_HEAD_DIMS``). On the CPU (tests) it runs in fp32 with the Triton interpreter.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# (lens, Hq, Hkv, D, causal, seed): the H200's failing case (GLUON_CASES[0] with the test's seed 6), the same at
# D 128, and a GQA-4 case
CASES = [([1, 37, 1, 16, 5, 0, 300], 2, 2, 64, True, 6), ([1, 37, 1, 16, 5, 0, 300], 2, 2, 128, True, 6),
         ([70, 1, 3, 1, 0, 2, 9, 700], 4, 1, 128, True, 6)]
NAMES = ("O", "dQ", "dK", "dV")


def _sdpa(q, k, v, lens, causal, four_d: bool):
    """Plain SDPA per document: (H, L, D) tensors (the tests' baseline) or (1, H, L, D) (fused kernels eligible)."""
    outs, s = [], 0
    for L in lens:
        a, b, c = (t[s:s + L].transpose(0, 1) for t in (q, k, v))
        if four_d:
            a, b, c = a.unsqueeze(0), b.unsqueeze(0), c.unsqueeze(0)
        o = F.scaled_dot_product_attention(a, b, c, is_causal=causal, enable_gqa=True)
        outs.append(o.reshape(o.shape[-3:]).transpose(0, 1))
        s += L
    return torch.cat(outs)


def report(device: str = "cuda", cases=CASES) -> list[dict]:
    """One dict per (case, provider): the max abs error of O, dQ, dK, dV against float64 (or why it did not run),
    printed as it goes."""
    rows: list[dict] = []
    for case in cases:
        rows += _one_case(*case, device=device)
    return rows


def _one_case(lens, Hq, Hkv, D, causal, seed, device) -> list[dict]:
    from r4b.kernels import varlen_attention
    from tests.test_varlen_attention import _attention64, _cu, _grads, _inputs

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, do = _inputs(lens, Hq, Hkv, D, seed=seed, device=device)
    low = [t.to(dtype) for t in (q, k, v, do)]
    cu, scale, nz = _cu(lens, device), D**-0.5, [n for n in lens if n]
    want = _grads(lambda a, b, c: _attention64(a, b, c, lens, causal, scale), *(t.double() for t in low))
    label = f"lens {lens} Hq {Hq} Hkv {Hkv} D {D} {'causal' if causal else 'full'} seed {seed}"
    print(f"{label}: max|ref| " + " ".join(f"{n} {w.abs().max().item():.4f}" for n, w in zip(NAMES, want, strict=True)),
          flush=True)
    rows: list[dict] = []

    def record(provider, got=None, why=None):
        row = {"case": label, "provider": provider}
        if got is None:
            row["skipped"] = why
            print(f"  {provider:34s} n/a: {why}", flush=True)
        else:
            row.update({n: (g.double() - w).abs().max().item() for n, g, w in zip(NAMES, got, want, strict=True)})
            print(f"  {provider:34s} " + " ".join(f"{n} {row[n]:.6g}" for n in NAMES), flush=True)
        rows.append(row)
        return row

    record("float64 ref rounded (floor)", [w.to(dtype) for w in want])
    p3 = record("plain sdpa 3-D (tests' baseline)", _grads(lambda a, b, c: _sdpa(a, b, c, nz, causal, False), *low))
    try:
        p4 = record("plain sdpa 4-D", _grads(lambda a, b, c: _sdpa(a, b, c, nz, causal, True), *low))
    except RuntimeError as ex:
        p4 = record("plain sdpa 4-D", why=f"{type(ex).__name__}: {str(ex)[:80]}")
    record("r4b default (triton)", _grads(lambda a, b, c: varlen_attention(
        a, b, c, cu, max(lens), causal=causal, softmax_scale=scale, backend="triton"), *low))
    gl = _gluon_dkdv(low, want, lens, cu, scale, causal, device)
    if isinstance(gl, str):
        record("gluon dK/dV (first config)", why=gl)
    else:  # dK is its own; O, dQ, dV are the reference's (the verdict below reads dK only)
        record("gluon dK/dV (first config)", [want[0], want[1], gl, want[3]])
    for base_name, base in (("3-D", p3), ("4-D", p4)):
        if "skipped" in base:
            continue
        allow = {n: 2 * base[n] + 1e-3 * w.abs().max().item() for n, w in zip(NAMES, want, strict=True)}
        verdicts = []
        for r in rows:
            if "skipped" in r or r["provider"].startswith(("float64", "plain")):
                continue
            names = ("dK",) if r["provider"].startswith("gluon") else NAMES
            bad = [f"{n} {r[n] / allow[n]:.2f}x" for n in names if r[n] > allow[n]]
            verdicts.append(f"{r['provider'].split(' (')[0]}: {'breaks ' + ', '.join(bad) if bad else 'within'}")
        print(f"  rule with the {base_name} baseline (dK allowance {allow['dK']:.6g}): " + "; ".join(verdicts),
              flush=True)
    return rows


def _gluon_dkdv(low, want, lens, cu, scale, causal, device):
    """The Gluon dK/dV kernel's dK (first config), or why it cannot run here."""
    import importlib

    from tests.test_varlen_gluon import _lse64

    if device != "cuda":
        return "needs a Hopper GPU"
    vg = importlib.import_module("r4b.kernels._varlen_gluon")
    why = vg.device_problem(low[0].device) or vg.input_problem(*low)  # (not bwd_problem: D 64 is the question)
    if why:
        return why
    from r4b.kernels.varlen_attention import _ensure_allocator

    _ensure_allocator()
    lse = _lse64(low[0], low[1], lens, causal, scale).float()
    delta = (want[0] * low[3].double()).sum(-1).transpose(0, 1).float().contiguous()
    try:
        _, dk, _ = vg.backward(low[3], low[0], low[1], low[2], lse, delta, cu, scale, causal,
                               dkdv_config=vg.DKDV_CONFIGS[0], with_dq=False)
    except Exception as ex:  # noqa: BLE001 - a diagnostic reports and goes on
        return f"{type(ex).__name__}: {str(ex)[:80]}"
    return dk


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("tests.rule_check needs a CUDA GPU (the tests run it on the CPU in fp32)")
    os.environ.setdefault("R4B_VARLEN_BWD", "split")  # the Triton kernels (the Hopper default pairs Gluon's dK/dV)
    report()
