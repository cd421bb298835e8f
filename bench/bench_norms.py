"""Benchmark the small memory-bound ops (rms_norm, rope, swiglu) at Qwen3-4B shapes: r4b Triton vs torch eager
(the references) and torch.compile of them, in GB/s and as a percentage of the device copy bandwidth measured
in the same run. Forward and forward+backward rows.
"""

from __future__ import annotations

import sys

import torch

from bench.harness import Case, Skip, copy_bandwidth_gbps, default_device, run_bench

# outputs / gradients against eager torch's before timing (harness check_tol), bf16 on the GPU, fp32 on the CPU
CHECK_TOL = {"cuda": 5e-2, "cpu": 1e-4}


def cases(quick: bool) -> list[Case]:
    # Qwen3-4B on a 16k-token packed row: hidden 2560, 32 q / 8 kv heads of 128, intermediate 9728
    T = 64 if quick else 16384
    hidden, inter, hq, hkv, d = (256, 384, 4, 2, 64) if quick else (2560, 9728, 32, 8, 128)
    el = 2  # bf16 bytes (the CPU smoke run uses fp32; its GB/s mean nothing)
    shapes = [
        ("rms_norm", f"hidden T={T},D={hidden}", (T, hidden), 2, 5),  # fwd: read x, write y; bwd: dy, x -> dx
        ("rms_norm", f"qk-head T={T},H={hq},D={d}", (T, hq, d), 2, 5),
        ("rope", f"q T={T},H={hq},D={d}", (T, hq, d), 2, 4),
        ("rope", f"k T={T},H={hkv},D={d}", (T, hkv, d), 2, 4),
        ("swiglu", f"T={T},I={inter}", (T, inter), 3, 8),  # fwd: gate, up -> y; bwd: dy, gate, up -> dg, du
    ]
    out = []
    for op, label, shape, fwd_io, all_io in shapes:
        n = 1
        for s in shape:
            n *= s
        for mode, io in (("fwd", fwd_io), ("fwd+bwd", all_io)):
            out.append(Case(f"{op} {mode} {label}", {"op": op, "mode": mode, "shape": shape}, bytes=io * n * el))
    return out


def _fns(op: str):
    from r4b.kernels import rms_norm, rms_norm_ref, rope, rope_ref, swiglu, swiglu_ref

    if op == "rms_norm":
        return (lambda x, w, backend: rms_norm(x, w, backend=backend)), rms_norm_ref
    if op == "rope":
        return (lambda x, p, backend: rope(x, p, backend=backend)), rope_ref
    return (lambda g, u, backend: swiglu(g, u, backend=backend)), swiglu_ref


def _inputs(case: Case, device: str):
    p = case.params
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    grad = p["mode"] != "fwd"
    x = torch.randn(p["shape"], device=device, dtype=dtype, generator=gen).requires_grad_(grad)
    if p["op"] == "rms_norm":
        other = torch.rand(p["shape"][-1], device=device, dtype=dtype, generator=gen).requires_grad_(grad)
        wrt = (x, other)
    elif p["op"] == "rope":
        T = p["shape"][0]
        other = (torch.arange(T, device=device) % 4096).long()  # positions restart per packed document
        wrt = (x,)
    else:
        other = torch.randn(p["shape"], device=device, dtype=dtype, generator=gen).requires_grad_(grad)
        wrt = (x, other)
    dy = torch.randn(p["shape"], device=device, dtype=dtype, generator=gen)
    return x, other, wrt, dy


def _timed(case: Case, fn, x, other, wrt, dy):
    if case.params["mode"] == "fwd":
        return lambda: fn(x, other)
    return lambda: torch.autograd.grad(fn(x, other), wrt, dy)


def providers(device: str) -> dict:
    def r4b(case: Case):
        from r4b.kernels import available_backends

        if "triton" not in available_backends(case.params["op"], device):
            raise Skip(f"triton unavailable on {device} (set TRITON_INTERPRET=1 on the CPU)")
        public, _ = _fns(case.params["op"])
        x, other, wrt, dy = _inputs(case, device)
        return _timed(case, lambda a, b: public(a, b, "triton"), x, other, wrt, dy)

    def eager(case: Case):
        _, ref = _fns(case.params["op"])
        x, other, wrt, dy = _inputs(case, device)
        return _timed(case, ref, x, other, wrt, dy)

    def compiled(case: Case):
        if device != "cuda":
            raise Skip("torch.compile provider is measured on the GPU only")
        _, ref = _fns(case.params["op"])
        x, other, wrt, dy = _inputs(case, device)
        return _timed(case, torch.compile(ref, dynamic=False), x, other, wrt, dy)

    # eager first: the reference of the result check; torch.compile in a second pass (see main)
    return {"torch eager": eager, "r4b triton": r4b, "torch.compile": compiled}


def main(argv: list[str] | None = None) -> list[dict]:
    argv = argv or []
    device = default_device()
    quick = "--quick" in argv or device == "cpu"
    copy = copy_bandwidth_gbps(device)  # the ceiling, measured in this run
    extra = lambda case, row: {"copy_gbps": copy, "pct_of_copy": 100 * row["gbps"] / copy} if copy else {}
    # two passes: every case's r4b row first (the target: % of copy bandwidth), then torch.compile's rows, whose
    # compile time would otherwise hold up the r4b rows of the later cases when a time limit cuts the run
    # (torch.compile of the eager reference is not result-checked)
    provs = providers(device)
    first = {k: provs[k] for k in ("torch eager", "r4b triton")}
    rows = run_bench("norms", cases(quick), first, device=device, quick=quick, extra_columns=extra,
                     check_tol=CHECK_TOL[device])
    return run_bench("norms", cases(quick), {"torch.compile": provs["torch.compile"]}, device=device, quick=quick,
                     extra_columns=extra, prior_rows=rows)


if __name__ == "__main__":
    main(sys.argv[1:])
