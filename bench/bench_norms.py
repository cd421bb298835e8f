"""Benchmark the small memory-bound ops (rms_norm, rope, swiglu) at Qwen3-4B shapes: r4b Triton vs torch eager
(the references) and torch.compile of them, in GB/s and as a percentage of the device copy bandwidth measured
in the same run. Forward and forward+backward rows.
"""

from __future__ import annotations

import re
import sys

import torch

from bench.harness import Case, Skip, copy_bandwidth_gbps, copy_columns, default_device, run_bench

# the fused ops, timed against the unfused kernels they replace ("r4b triton unfused")
FUSED = ("add_rms_norm", "qk_norm_rope")
# outputs / gradients against eager torch's before timing (harness check_tol), bf16 on the GPU, fp32 on the CPU
CHECK_TOL = {"cuda": 5e-2, "cpu": 1e-4}


COMPILED = "r4b compiled reduce-overhead"  # the provider of r4b's ops under torch.compile with CUDA graphs


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
        # the residual add + norm: fwd: x, residual -> sum, normed; bwd: d normed, d sum, sum -> dx
        ("add_rms_norm", f"hidden T={T},D={hidden}", (T, hidden), 4, 8),
        # q and k together: (T, Hq + Hkv, D) elements; fwd: read q, k, write them; bwd: dy, x -> dx
        ("qk_norm_rope", f"q+k T={T},Hq={hq},Hkv={hkv},D={d}", (T, hq + hkv, d), 2, 5),
    ]
    out = []
    for op, label, shape, fwd_io, all_io in shapes:
        n = 1
        for s in shape:
            n *= s
        for mode, io in (("fwd", fwd_io), ("fwd+bwd", all_io)):
            params = {"op": op, "mode": mode, "shape": shape}
            if op == "qk_norm_rope":
                params["q_heads"] = hq
            out.append(Case(f"{op} {mode} {label}", params, bytes=io * n * el))
    return out


def _fns(op: str):
    from r4b.kernels import (
        add_rms_norm,
        add_rms_norm_ref,
        qk_norm_rope,
        qk_norm_rope_ref,
        rms_norm,
        rms_norm_ref,
        rope,
        rope_ref,
        swiglu,
        swiglu_ref,
    )

    if op == "add_rms_norm":  # other: (residual, weight)
        return (lambda x, o, backend: add_rms_norm(x, o[0], o[1], backend=backend)), \
            (lambda x, o: add_rms_norm_ref(x, *o))

    if op == "qk_norm_rope":  # other: (k, q_weight, k_weight, position_ids)
        return (lambda q, o, backend: qk_norm_rope(q, o[0], o[1], o[2], o[3], backend=backend)), \
            (lambda q, o: qk_norm_rope_ref(q, *o))
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
    if p["op"] == "qk_norm_rope":
        T, heads, D = p["shape"]
        hq = p["q_heads"]
        q = torch.randn((T, hq, D), device=device, dtype=dtype, generator=gen).requires_grad_(grad)
        k = torch.randn((T, heads - hq, D), device=device, dtype=dtype, generator=gen).requires_grad_(grad)
        wq, wk = (torch.rand(D, device=device, dtype=dtype, generator=gen).requires_grad_(grad) for _ in range(2))
        pos = (torch.arange(T, device=device) % 4096).long()
        dys = tuple(torch.randn(t.shape, device=device, dtype=dtype, generator=gen) for t in (q, k))
        return q, (k, wq, wk, pos), (q, k, wq, wk), dys
    if p["op"] == "add_rms_norm":
        x, r = (torch.randn(p["shape"], device=device, dtype=dtype, generator=gen).requires_grad_(grad)
                for _ in range(2))
        w = torch.rand(p["shape"][-1], device=device, dtype=dtype, generator=gen).requires_grad_(grad)
        dys = tuple(torch.randn(p["shape"], device=device, dtype=dtype, generator=gen) for _ in range(2))
        return x, (r, w), (x, r, w), dys  # both outputs differentiated, as in the model
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

    def unfused(case: Case):
        """What a fused op replaces: qk_norm_rope's rope(rms_norm(x)) for q and for k (4 Triton kernels each way);
        add_rms_norm's eager add then the Triton rms_norm."""
        from r4b.kernels import available_backends, rms_norm, rope

        if case.params["op"] not in FUSED:
            raise Skip("the unfused provider is the fused ops' baseline")
        if "triton" not in available_backends("rope", device):
            raise Skip(f"triton unavailable on {device} (set TRITON_INTERPRET=1 on the CPU)")

        def fn(q, o):
            if case.params["op"] == "add_rms_norm":
                s = q + o[0]
                return rms_norm(s, o[1], backend="triton"), s
            k, wq, wk, pos = o
            return (rope(rms_norm(q, wq, backend="triton"), pos, backend="triton"),
                    rope(rms_norm(k, wk, backend="triton"), pos, backend="triton"))

        x, other, wrt, dy = _inputs(case, device)
        return _timed(case, fn, x, other, wrt, dy)

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

    def r4b_compiled(case: Case):
        """r4b's op under torch.compile with inductor's CUDA graphs (mode="reduce-overhead"; the op is a custom op
        there, r4b/kernels/_compile.py): the forward and the backward each one graph replay launched from Python.
        The forward's inputs are marked static (no copy into the graph's buffers); the backward's output gradient
        is not (the graph copies it in: a compiled step's own gradients need no such copy), so the fwd+bwd rows
        time one copy more than the op's own work."""
        if device != "cuda":
            raise Skip("measured on the GPU only (inductor's CUDA graphs)")
        public, _ = _fns(case.params["op"])
        x, other, wrt, dy = _inputs(case, device)
        for t in (x, *(other if isinstance(other, tuple) else (other,))):
            torch._dynamo.mark_static_address(t)
        fn = torch.compile(lambda a, b: public(a, b, "triton"), mode="reduce-overhead", dynamic=False)
        return _timed(case, fn, x, other, wrt, dy)

    # eager first: the reference of the result check; torch.compile in a second pass (see main)
    return {"torch eager": eager, "r4b triton": r4b, "r4b triton unfused": unfused, "torch.compile": compiled,
            COMPILED: r4b_compiled}


def _cp_async_ops(ptx: str) -> dict[str, int]:
    """How many cp.async copies (global -> shared: the loads of a ``tl.range(..., num_stages=...)`` loop) the PTX
    holds, by bytes a copy (``cp.async.cg.shared.global.16``: 16-byte vectors)."""
    counts: dict[str, int] = {}
    for op, size in re.findall(r"\b(cp\.async\.c[ag]\.shared\.global)\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(\w+)", ptx):
        counts[f"{op}.{int(size, 0)}"] = counts.get(f"{op}.{int(size, 0)}", 0) + 1
    return counts


def aot_report() -> list[str]:
    """Compile the small ops' Triton kernels for sm_90 at the bench shapes with the launchers' own block sizes
    and warps (no GPU: triton's bundled ptxas) and print registers / spills and the global loads and stores by
    width: a bf16 tile read element by element (``ld.global.b16``) instead of in 16-byte vectors
    (``ld.global.v4.b32``) costs about a third of the bandwidth (swiglu, 2026-11-26)."""
    import importlib

    from bench.harness import global_memory_ops, ptxas_report, sm90_compile

    rms = importlib.import_module("r4b.kernels.rms_norm")
    rope = importlib.import_module("r4b.kernels.rope")
    swi = importlib.import_module("r4b.kernels.swiglu")

    def sig(bf16: tuple[str, ...], fp32: tuple[str, ...] = (), i64: tuple[str, ...] = (), f32_scalars=("eps",)):
        def of(n: str) -> str:
            if n in bf16:
                return "*bf16"
            if n in fp32:
                return "*fp32"
            if n in i64:
                return "*i64"
            return "fp32" if n in f32_scalars else "i32"

        return of

    jobs = []
    for D in (2560, 128):
        bd, bm, w = rms._blocks(D)
        meta = {"D": D, "BLOCK_D": bd, "BLOCK_M": bm}
        rsig = sig(("X", "W", "Y", "DY", "DX", "R", "S", "DS"), ("RSTD", "DW_PART"))
        # rms_norm's kernels at both widths; with the residual add switched on (add_rms_norm) at the hidden size
        for name, add in (("rms_norm", False), ("add_rms_norm", True)):
            if add and D != 2560:
                continue
            jobs.append((f"{name} fwd D={D}", rms._rms_fwd_kernel, {**meta, "ADD": add}, rsig, w, ()))
            # the GPU backward (always autotuned): every config that its pruning keeps at this D, as rows a step,
            # pipeline stages and programs an SM
            tuned, prune = (rms._bwd_add_tuned, rms._bwd_add_prune) if add else (rms._bwd_tuned, rms._bwd_prune)
            for c in prune(tuned.configs, {}, D=D, BLOCK_D=bd):
                m, st, p = (c.kwargs[k] for k in ("BLOCK_M", "STAGES", "PROGS_PER_SM"))
                jobs.append((f"{name} bwd D={D} M{m} S{st} P{p}", rms._rms_bwd_kernel,
                             {**meta, **c.kwargs, "ADD_DS": add}, rsig, c.num_warps, ()))
    # every GPU autotune config of rope and swiglu that survives its pruning at the bench shapes (the first one is
    # the interpreter's fixed tile)
    for t, w in rope.CONFIGS:
        if t * 64 > 4096:
            continue
        meta = {"HALF": 64, "BLOCK_HALF": 64, "BLOCK_T": t, "INVERSE": False}
        jobs.append((f"rope D=128 T{t}", rope._rope_kernel, meta, sig(("X", "Y"), ("INV_FREQ",), ("POS",)), w, ()))
    # the fused q/k norm + RoPE, both directions, every config its pruning keeps at D=128
    qkr = importlib.import_module("r4b.kernels.qk_norm_rope")
    qsig = sig(("Q", "K", "WQ", "WK", "YQ", "YK", "DYQ", "DYK", "DXQ", "DXK"), ("INV_FREQ", "DW_PART"), ("POS",))
    for t, w, st in qkr.CONFIGS:
        if t * 64 > 4096:
            continue
        meta = {"HALF": 64, "BLOCK_HALF": 64, "BLOCK_T": t, "STAGES": st}
        jobs.append((f"qk_norm_rope fwd D=128 T{t} S{st}", qkr._fwd_kernel, meta, qsig, w, ()))
        jobs.append((f"qk_norm_rope bwd D=128 T{t} S{st}", qkr._bwd_kernel, meta, qsig, w, ()))
    ssig = sig(("G", "U", "Y", "DY", "DG", "DU"))
    # integer arguments the launchers leave specialised get the runtime's divisibility-by-16 hint at these shapes
    for bm, bn, w in swi.CONFIGS:
        tile = {"BLOCK_M": bm, "BLOCK_N": bn}
        jobs.append((f"swiglu fwd I=9728 {bm}x{bn}", swi._swiglu_fwd_kernel, tile, ssig, w, ("n_cols",)))
        jobs.append((f"swiglu bwd I=9728 {bm}x{bn}", swi._swiglu_bwd_kernel, tile, ssig, w, ("n_cols",)))
    lines = []
    for label, kern, meta, sig_of, warps, divisible in jobs:
        # an argument in a kernel's do_not_specialize never gets the hint at run time: none here either
        divisible = tuple(n for n in divisible if n not in (kern.do_not_specialize or ()))
        compiled = sm90_compile(kern, meta, sig_of, warps, 1, divisible)
        ptx = compiled.asm["ptx"]
        info, ops = ptxas_report(compiled), {**global_memory_ops(ptx), **_cp_async_ops(ptx)}
        line = f"{label} warps={warps}: {info}; {compiled.metadata.shared} bytes smem | global memory ops {ops}"
        print(line, flush=True)
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    argv = argv or []
    if "--aot" in argv:
        aot_report()
        return []
    device = default_device()
    quick = "--quick" in argv or device == "cpu"
    copy = copy_bandwidth_gbps(device)  # the ceiling, measured in this run
    def extra(case, row):  # % of the copy bandwidth, also for the CUDA-graph replay time (no launch cost)
        return copy_columns(case, row, device, copy, own=row["provider"] == "r4b triton")

    # two passes: every case's r4b row first (the target: % of copy bandwidth), then the compiled rows (r4b's ops
    # under torch.compile with CUDA graphs, and torch.compile of the eager reference), whose compile time would
    # otherwise hold up the r4b rows of the later cases when a time limit cuts the run (not result-checked: the
    # compiled ops' results are tests/test_compile.py's)
    provs = providers(device)
    first = {k: provs[k] for k in ("torch eager", "r4b triton")}
    # the fused ops' cases first (the newest kernels: a time limit cuts the last rows), with the unfused kernels
    # that each replaces as a third provider
    qk = [c for c in cases(quick) if c.params["op"] in FUSED]
    rows = run_bench("norms", qk, {**first, "r4b triton unfused": provs["r4b triton unfused"]}, device=device,
                     quick=quick, extra_columns=extra, check_tol=CHECK_TOL[device], graph=True)
    rows = run_bench("norms", [c for c in cases(quick) if c not in qk], first, device=device, quick=quick,
                     extra_columns=extra, check_tol=CHECK_TOL[device], graph=True, prior_rows=rows)
    return run_bench("norms", cases(quick), {COMPILED: provs[COMPILED], "torch.compile": provs["torch.compile"]},
                     device=device, quick=quick, extra_columns=extra, prior_rows=rows)


if __name__ == "__main__":
    main(sys.argv[1:])
