"""Benchmark varlen_attention (packed causal GQA attention): r4b Triton vs SDPA per document, FlexAttention with
a document block mask (mask build time in its own column), flash-attn / xformers when installed (through r4b's
opt-in backends, ``varlen_attention(..., backend="flash_attn" | "xformers")``).

TFLOP/s use flash-attn's accounting: forward = 4 * L^2 * Hq * D per document, halved when causal; backward =
2.5x forward (so forward+backward = 3.5x). ``--aot`` compiles the Triton kernels for sm_90 without a GPU and
prints registers / spills per autotune config (ptxas -v), the measurement behind the config lists
(``--aot-first``: the first config of each list only, what tests/test_varlen_attention.py runs; ``--aot-ws``: the
warp-specialised forward's configs, whether triton's Hopper pass specialised them, tests/test_varlen_ws.py;
``--aot-gluon-ws``: the warp-specialised Gluon forward's partitions, tests/test_varlen_gluon_ws.py; every report
carries ptxas's "Potential Performance Loss" warnings, e.g. serialised wgmma). ``--sched``
prints the list-scheduling model behind the kernels' grid order (no GPU needed).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from bench.harness import Case, Skip, default_device, env_var, run_bench, sm90_ptxas

ANCHOR = [4096, 3072, 2560, 2048, 1536, 1280, 768, 512, 384, 128]  # 16384 tokens, 10 docs 128..4096
# every provider's output (fwd) or q/k/v gradients (fwd+bwd) against SDPA's before timing (harness check_tol):
# bf16 on the GPU, fp32 on the CPU; beyond it a row is flagged MISMATCH (it computes other attention)
CHECK_TOL = {"cuda": 5e-2, "cpu": 1e-4}
ROW_64K = [16384, 12288, 8192, 8192, 6144, 4096, 4096, 2048, 2048, 1024, 512, 256, 256]  # 65536 tokens


def cases(quick: bool) -> list[Case]:
    if quick:
        shapes = [([40, 1, 30, 25], 4, 2, 64)]
    else:
        shapes = [(ANCHOR, 32, 8, 128), (ROW_64K, 32, 8, 128)]
    out = []
    for lens, hq, hkv, d in shapes:
        fwd = sum(4 * L * L * hq * d for L in lens) / 2  # causal
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            label = f"{mode} T={sum(lens)},docs={len(lens)},Hq={hq},Hkv={hkv},D={d}"
            out.append(Case(label, {"mode": mode, "lens": lens, "hq": hq, "hkv": hkv, "d": d}, flops=fwd * mult))
    return out


def _inputs(case: Case, device: str):
    p = case.params
    T = sum(p["lens"])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter computes bf16 wrongly
    g = torch.Generator(device=device).manual_seed(0)
    grad = p["mode"] != "fwd"
    q = torch.randn(T, p["hq"], p["d"], device=device, dtype=dtype, generator=g).requires_grad_(grad)
    k = torch.randn(T, p["hkv"], p["d"], device=device, dtype=dtype, generator=g).requires_grad_(grad)
    v = torch.randn(T, p["hkv"], p["d"], device=device, dtype=dtype, generator=g).requires_grad_(grad)
    do = torch.randn(T, p["hq"], p["d"], device=device, dtype=dtype, generator=g)
    cu = torch.tensor([0, *torch.tensor(p["lens"]).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, do, cu


def _timed(case: Case, fwd, q, k, v, do):
    """The zero-arg callable: forward only, or forward + backward into fresh gradients."""
    if case.params["mode"] == "fwd":
        return lambda: fwd(q, k, v)
    return lambda: torch.autograd.grad(fwd(q, k, v), (q, k, v), do)


# r4b's rows: provider -> (R4B_VARLEN_FWD, R4B_VARLEN_BWD, R4B_VARLEN_LOADS); "r4b gluon": the Gluon forward
# (sm_90, softmax overlapping P @ V), with the default Triton backward in its fwd+bwd row; "r4b gluon fwd+bwd":
# the Gluon forward and the Gluon backward; "... gluon-dkdv": the Triton dQ kernel with the Gluon dK/dV kernel
# (R4B_VARLEN_BWD=gluon-dkdv: each the faster of its pair in the 2026-11-27 H200 autotune logs); "r4b gluon-ws":
# the warp-specialised Gluon forward (a producer warp, two consumer warpgroups; refused on GPUs until its GPU tests
# pass, R4B_VARLEN_WS_UNVERIFIED=1 runs it); "r4b triton ws-bwd": the Triton forward with the warp-specialised Triton
# backward (it passed its boundary tests after the Triton forward on an H200, 2026-11-27, and was never timed);
# "... gluon-ws-dq" / "... gluon-ws-dkdv" / "... gluon-ws-bwd": R4B_VARLEN_BWD=gluon-ws-dq (the warp-specialised
# Gluon dQ kernel with the Gluon dK/dV kernel), gluon-ws-dkdv (the Triton dQ kernel with the warp-specialised Gluon
# dK/dV kernel), gluon-ws (both warp-specialised); each refused like the gluon-ws forward until its GPU tests pass
R4B_ROWS = {"r4b triton": ("triton", "split", "pointer"), "r4b triton atomic-dq": ("triton", "atomic", "pointer"),
            "r4b triton tma": ("triton", "split", "tma"), "r4b triton tma atomic-dq": ("triton", "atomic", "tma"),
            "r4b gluon": ("gluon", "split", "pointer"), "r4b gluon fwd+bwd": ("gluon", "gluon", "pointer"),
            "r4b ws": ("ws", "split", "pointer"), "r4b ws fwd+bwd": ("ws", "ws", "pointer"),
            "r4b triton gluon-dkdv": ("triton", "gluon-dkdv", "pointer"),
            "r4b ws gluon-dkdv": ("ws", "gluon-dkdv", "pointer"),
            "r4b gluon-ws": ("gluon-ws", "split", "pointer"),
            "r4b gluon-ws gluon-dkdv": ("gluon-ws", "gluon-dkdv", "pointer"),
            "r4b triton ws-bwd": ("triton", "ws", "pointer"),
            "r4b triton gluon-ws-dq": ("triton", "gluon-ws-dq", "pointer"),
            "r4b triton gluon-ws-dkdv": ("triton", "gluon-ws-dkdv", "pointer"),
            "r4b triton gluon-ws-bwd": ("triton", "gluon-ws", "pointer"),
            "r4b gluon-ws gluon-ws-bwd": ("gluon-ws", "gluon-ws", "pointer"),
            "r4b gluon-ws pingpong": ("gluon-ws+pingpong", "split", "pointer")}
# "+pingpong": R4B_VARLEN_WS_PINGPONG=1 (the gluon-ws forward's autotuner also takes its PINGPONG configs)
# the warp-specialised Gluon kernels each R4B_VARLEN_BWD mode runs (their refusals are checked by name)
WS_BWD_KERNELS = {"gluon-ws": ("dq", "dkdv"), "gluon-ws-dq": ("dq",), "gluon-ws-dkdv": ("dkdv",)}


def providers(device: str, mask_ms: dict) -> dict:
    def r4b_mode(fwd_kernel: str, bwd: str, loads: str):
        """r4b's kernels with the forward R4B_VARLEN_FWD=fwd_kernel ("triton", "gluon", "gluon-ws": warp-specialised
        Gluon, or "ws": warp-specialised Triton), the backward
        R4B_VARLEN_BWD=bwd ("split": Triton dQ kernel + dK/dV kernel; "atomic": the Triton dK/dV kernel adds dQ
        with fp32 atomics; "gluon": the split backward in Gluon; "gluon-dkdv": the Triton dQ kernel + the Gluon
        dK/dV kernel; "ws": warp-specialised Triton; "gluon-ws", "gluon-ws-dq", "gluon-ws-dkdv": warp-specialised
        Gluon kernels, WS_BWD_KERNELS) and the Triton kernels' block loads
        R4B_VARLEN_LOADS=loads ("pointer" or "tma": through TMA tensor descriptors)."""

        def setup(case: Case):
            from r4b.kernels import available_backends, varlen_attention

            if "triton" not in available_backends("varlen_attention", device):
                raise Skip(f"triton unavailable on {device} (set TRITON_INTERPRET=1 on the CPU)")
            if fwd_kernel.startswith("gluon") or bwd.startswith("gluon"):
                if device != "cuda" or torch.cuda.get_device_capability()[0] != 9:
                    raise Skip("the Gluon kernels need a Hopper GPU (sm_90)")
                try:
                    import r4b.kernels._varlen_gluon  # noqa: F401
                except ImportError as ex:
                    raise Skip(f"this triton has no Gluon with its Hopper API: {ex}") from None
            parts = (("fwd",) if fwd_kernel.startswith("gluon-ws") else ()) + WS_BWD_KERNELS.get(bwd, ())
            for part in parts:
                from r4b.kernels import _varlen_gluon_ws

                why = _varlen_gluon_ws.device_problem(torch.device("cuda"), part)
                if why is not None:
                    raise Skip(f"the warp-specialised Gluon kernels: {why}")
            if "ws" in (fwd_kernel, bwd) and device == "cuda":
                from r4b.kernels import _varlen_ws

                parts = [p for p, mode in (("fwd", fwd_kernel), ("bwd", bwd)) if mode == "ws"]
                why = _varlen_ws.parts_problem(torch.device("cuda"), False, parts)
                if why is not None:
                    raise Skip(f"the warp-specialised kernels: {why}")
            if bwd != "split" and case.params["mode"] == "fwd":
                same = next(n for n, m in R4B_ROWS.items() if m == (fwd_kernel, "split", loads))
                raise Skip(f"the same forward as the {same} row")
            q, k, v, do, cu = _inputs(case, device)
            m = max(case.params["lens"])

            def fwd(a, b, c):
                return varlen_attention(a, b, c, cu, m, backend="triton")

            timed = _timed(case, fwd, q, k, v, do)

            fwd_mode, _, pingpong = fwd_kernel.partition("+")

            def call():
                with env_var("R4B_VARLEN_FWD", fwd_mode), env_var("R4B_VARLEN_BWD", bwd), \
                        env_var("R4B_VARLEN_LOADS", loads), env_var("R4B_VARLEN_WS_PINGPONG", "1" if pingpong else "0"):
                    return timed()

            return call

        return setup

    def sdpa(case: Case):
        q, k, v, do, cu = _inputs(case, device)
        bounds = cu.tolist()
        spans = list(zip(bounds[:-1], bounds[1:], strict=True))

        def fwd(a, b, c):
            outs = []
            for s, e in spans:
                o = F.scaled_dot_product_attention(  # (1, H, L, D) views of the packed (L, H, D) slices
                    a[s:e].transpose(0, 1)[None], b[s:e].transpose(0, 1)[None], c[s:e].transpose(0, 1)[None],
                    is_causal=True, enable_gqa=True)
                outs.append(o[0].transpose(0, 1))  # (L, Hq, D)
            return torch.cat(outs)

        return _timed(case, fwd, q, k, v, do)

    def flex(case: Case):
        if device != "cuda":
            raise Skip("FlexAttention is measured on the GPU only (it needs torch.compile with triton)")
        import time

        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v, do, cu = _inputs(case, device)
        T = q.shape[0]
        doc = torch.repeat_interleave(torch.arange(len(case.params["lens"]), device=device),
                                      torch.tensor(case.params["lens"], device=device))  # (T,)

        def mask_mod(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        build = lambda: create_block_mask(mask_mod, None, None, T, T, device=device)
        build()  # compile once
        torch.cuda.synchronize()
        reps = 10
        t0 = time.perf_counter()
        for _ in range(reps):
            bm = build()
        torch.cuda.synchronize()
        mask_ms[case.label] = (time.perf_counter() - t0) * 1e3 / reps
        flex_c = torch.compile(flex_attention, dynamic=False)

        def fwd(a, b, c):  # (1, H, T, D) views
            o = flex_c(a.transpose(0, 1)[None], b.transpose(0, 1)[None], c.transpose(0, 1)[None], block_mask=bm,
                       enable_gqa=True)
            return o[0].transpose(0, 1)  # (T, Hq, D)

        return _timed(case, fwd, q, k, v, do)

    def peer(backend: str):
        """r4b's opt-in peer backend (flash-attn or xformers) through varlen_attention's dispatch, so the
        timing includes what r4b adds (validation; xformers: the block-diagonal mask, one host sync)."""

        def setup(case: Case):
            from r4b.kernels import varlen_attention
            from r4b.kernels._dispatch import why_unavailable

            why = why_unavailable("varlen_attention", backend, device)  # on a GPU the inputs are bf16: both take it
            if why is not None:
                raise Skip(f"{backend} backend unavailable: {why}")
            q, k, v, do, cu = _inputs(case, device)
            m = max(case.params["lens"])
            return _timed(case, lambda a, b, c: varlen_attention(a, b, c, cu, m, backend=backend), q, k, v, do)

        return setup

    # SDPA first: the reference of the result check (outputs, or the three gradients); then what the issue's
    # targets compare (r4b's default, Flex, the Gluon kernels), then the peers and r4b's other variants, so that a
    # bench cut at its time limit loses those last
    first = ("r4b triton", "flex doc mask", "r4b ws", "r4b ws fwd+bwd", "r4b gluon", "r4b gluon fwd+bwd",
             "r4b triton gluon-dkdv", "r4b ws gluon-dkdv")
    rows = {"sdpa per doc": sdpa, "flex doc mask": flex, **{name: r4b_mode(*m) for name, m in R4B_ROWS.items()},
            "flash-attn varlen": peer("flash_attn"), "xformers blockdiag": peer("xformers")}
    head = ("sdpa per doc", *first)
    return {**{n: rows[n] for n in head}, **{n: f for n, f in rows.items() if n not in head}}


def _attn_sig(n: str) -> str:
    """The sm_90 compile signature of an attention kernel's argument ``n`` (bf16 tensors; every kernel's names)."""
    if n in ("LSE", "DELTA", "LD", "DQ32"):
        return "*fp32"
    if n in ("CU", "TAB"):
        return "*i32"
    if n in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"):
        return "*bf16"
    return "fp32" if n in ("qk_scale", "sm_scale") else "i32"


def aot_report(first_only: bool = False) -> None:
    """Compile the three attention kernels for sm_90 (bf16, D=128, causal, GQA 4) per autotune config (or the
    first of each list); print registers and spills from ptxas. Needs no GPU (triton's bundled ptxas), and no
    TRITON_INTERPRET."""
    import importlib

    va = importlib.import_module("r4b.kernels.varlen_attention")

    # "+tma": the kernels of R4B_VARLEN_LOADS=tma (inner-loop blocks through TMA tensor descriptors);
    # "dkdv+dq": the dK/dV kernel of R4B_VARLEN_BWD=atomic, which also adds dQ with fp32 atomics
    kv_off = {"TMA": False}
    qdo_off = {"TMA": False, "TMA_DQ": False, "WIDE_HEADS": False}
    for kind, kern, cfgs, tile, extra in (
            ("fwd", va._fwd_kernel, va.FWD_CONFIGS, ("BLOCK_M", "BLOCK_N"), kv_off),
            ("fwd+tma", va._fwd_kernel, va.FWD_CONFIGS, ("BLOCK_M", "BLOCK_N"), {"TMA": True}),
            ("dq", va._bwd_dq_kernel, va.DQ_CONFIGS, ("BLOCK_M", "BLOCK_N"), kv_off),
            ("dq+tma", va._bwd_dq_kernel, va.DQ_CONFIGS, ("BLOCK_M", "BLOCK_N"), {"TMA": True}),
            ("dkdv", va._bwd_dkdv_kernel, va.DKDV_CONFIGS, ("BLOCK_N", "BLOCK_M"), {"ATOMIC_DQ": False, **qdo_off}),
            ("dkdv+tma", va._bwd_dkdv_kernel, va.DKDV_CONFIGS, ("BLOCK_N", "BLOCK_M"),
             {"ATOMIC_DQ": False, "TMA": True, "TMA_DQ": False, "WIDE_HEADS": False}),
            ("dkdv+dq", va._bwd_dkdv_kernel, va.DKDV_CONFIGS, ("BLOCK_N", "BLOCK_M"), {"ATOMIC_DQ": True, **qdo_off}),
            ("dkdv+dq+tma", va._bwd_dkdv_kernel, va.DKDV_CONFIGS, ("BLOCK_N", "BLOCK_M"),
             {"ATOMIC_DQ": True, "TMA": True, "TMA_DQ": True, "WIDE_HEADS": False})):
        for a, b, warps, stages in cfgs[:1] if first_only else cfgs:
            meta = {"GROUP": 4, "D": 128, "BLOCK_D": 128, "CAUSAL": True, "DOT_PREC": "tf32", tile[0]: a, tile[1]: b,
                    **extra}
            info, smem = sm90_ptxas(kern, meta, _attn_sig, warps, stages)
            print(f"{kind:11s} {a}x{b} w{warps} s{stages}: smem={smem} B | {info}", flush=True)
    # fp32 on a GPU (IEEE products as FMAs): one fixed config per kernel (va.F32_CONFIGS), never autotuned
    f32_sig = lambda n: "*fp32" if _attn_sig(n) == "*bf16" else _attn_sig(n)  # noqa: E731
    for name, kern, tile, extra in (
            ("fwd", va._fwd_kernel, ("BLOCK_M", "BLOCK_N"), kv_off),
            ("dq", va._bwd_dq_kernel, ("BLOCK_M", "BLOCK_N"), kv_off),
            ("dkdv", va._bwd_dkdv_kernel, ("BLOCK_N", "BLOCK_M"), {"ATOMIC_DQ": False, **qdo_off}),
            ("dkdv+dq", va._bwd_dkdv_kernel, ("BLOCK_N", "BLOCK_M"), {"ATOMIC_DQ": True, **qdo_off})):
        a, b, warps, stages = va.F32_CONFIGS[name]
        meta = {"GROUP": 4, "D": 128, "BLOCK_D": 128, "CAUSAL": True, "DOT_PREC": "ieee", tile[0]: a, tile[1]: b,
                **extra}
        t0 = time.perf_counter()
        info, smem = sm90_ptxas(kern, meta, f32_sig, warps, stages)
        print(f"{name + '-f32':11s} {a}x{b} w{warps} s{stages}: smem={smem} B | {info} | "
              f"compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    ws_report(first_only)
    gluon_report(first_only)


def ws_report(first_only: bool = False) -> None:
    """Compile the warp-specialised kernels (R4B_VARLEN_FWD=ws, R4B_VARLEN_BWD=ws) for sm_90 per config, both
    masks, D 128 and 64: whether triton's Hopper pass really specialised them (``setmaxnreg`` in the PTX: the
    producer gives registers to the consumers; 12 warps: a producer and two consumer warpgroups), registers,
    spills, shared memory."""
    import re

    from bench.harness import ptxas_report, sm90_compile
    from r4b.kernels import _varlen_ws as ws

    for kind, kern, cfgs, tile in (("fwd-ws", ws._ws_fwd_kernel, ws.CONFIGS, ("BLOCK_M", "BLOCK_N")),
                                   ("dq-ws", ws._ws_dq_kernel, ws.DQ_CONFIGS, ("BLOCK_M", "BLOCK_N")),
                                   ("dkdv-ws", ws._ws_dkdv_kernel, ws.DKDV_CONFIGS, ("BLOCK_N", "BLOCK_M"))):
        for inner, stages in cfgs[:1] if first_only else cfgs:
            for causal in (True, False):
                for d in (128, 64):
                    meta = {"GROUP": 4, "D": d, tile[0]: ws.BLOCK_M, tile[1]: inner, "CAUSAL": causal, "WS": True}
                    c = sm90_compile(kern, meta, _attn_sig, ws.NUM_WARPS, stages)
                    problems = ws_ir_problems(c.asm["ttgir"])
                    smem = ws_smem_problems(sm90_alloc_ir(c.asm["ttgir"]))
                    print(f"{kind:11s} {ws.BLOCK_M}x{inner} w{ws.NUM_WARPS} s{stages} D={d} causal={causal}: "
                          f"smem={c.metadata.shared} B | {ptxas_report(c)} | warps={c.metadata.num_warps} "
                          f"setmaxnreg={len(re.findall(r'setmaxnreg', c.asm['ptx']))} | "
                          f"ir problems={len(problems)}{': ' + '; '.join(problems) if problems else ''} | "
                          f"smem overlaps={len(smem)}{': ' + '; '.join(smem) if smem else ''}",
                          flush=True)


def ws_ir_problems(ttgir: str) -> list[str]:
    """The two miscompilations of triton 3.6's Hopper warp specialisation that the first H200 run of the ws kernels
    met (2026-11-27), looked for in the TTGIR after the pass:

    * a TMA copy whose shared-memory destination is not the size of its descriptor's block (the pass split a
      [1, BLOCK_M] block along its first dimension into slots half its size: a launch failure);
    * a consumer partition whose rows are offset twice: ``splat(x) + make_range(S, ...)`` with x defined in that
      partition as ``y + S`` (the pass remaps the value used as a TMA row coordinate, and every other use of it,
      to coordinate + S for the consumer that starts at row S; when the same value also builds the row indices,
      those move by 2 S: the forward's rows 64-127 were wrong)."""
    import math
    import re

    problems = []
    for m in re.finditer(r"async_tma_copy_global_to_local .*?tensordesc<tensor<([0-9x]+)x(\w+)[,>].*?"
                         r"-> !ttg\.memdesc<([0-9x]+)x(\w+),", ttgir):
        if math.prod(map(int, m.group(1).split("x"))) != math.prod(map(int, m.group(3).split("x"))) \
                or m.group(2) != m.group(4):
            problems.append(f"TMA copy of a {m.group(1)}x{m.group(2)} block into a {m.group(3)}x{m.group(4)} slot")
    for part in re.split(r"\n\s*partition\d+\(", ttgir)[1:]:
        defs = {}
        for line in part.splitlines():
            d = re.match(r"\s*(%[\w.]+)(?::\d+)? = (.*)", line)
            if d:
                defs[d.group(1)] = d.group(2)
        def constant(v: str, defs=defs) -> int | None:  # an i32 constant's value (%c64_i32 or a named one)
            c = re.match(r"%c(\d+)_i32", v) or re.match(r"arith\.constant .*?(\d+) : i32", defs.get(v, ""))
            return int(c.group(1)) if c else None

        ranges = {name: int(re.search(r"start = (\d+)", rhs).group(1)) for name, rhs in defs.items()
                  if rhs.startswith("tt.make_range") and int(re.search(r"start = (\d+)", rhs).group(1)) > 0}
        for name, rhs in defs.items():
            a = re.match(r"arith\.addi (%[\w.]+), (%[\w.]+)", rhs)
            if not a:
                continue
            for x, r in ((a.group(1), a.group(2)), (a.group(2), a.group(1))):
                if r not in ranges or not defs.get(x, "").startswith("tt.splat"):
                    continue
                base = re.match(r"tt\.splat (%[\w.]+)", defs[x]).group(1)
                b = re.match(r"arith\.addi (%[\w.]+), (%[\w.]+)", defs.get(base, ""))
                if b and ranges[r] in (constant(b.group(1)), constant(b.group(2))):
                    problems.append(f"rows offset twice: {name} = splat({base}) + range from {ranges[r]}, "
                                    f"{base} = {defs[base].split(' {')[0]}")
    return problems


def sm90_alloc_ir(ttgir: str) -> str:
    """The module after triton's shared-memory allocation for sm_90 (the first passes of the NVIDIA backend's
    make_llir, as triton 3.6 runs them, on a compile's TTGIR text): every ``ttg.local_alloc`` and every op with
    scratch (``ttg.convert_layout``, ``ttng.tensormap_create``, ``ttg.warp_specialize``, the function: the
    warp-specialised dispatch state) carries its ``allocation.offset``; the module its ``ttg.shared`` bytes. Needs
    TRITON_INTERPRET unset (sm90_compile's TTGIR)."""
    import os
    import tempfile

    from triton._C.libtriton import ir, nvidia, passes

    ctx = ir.context()
    ir.load_dialects(ctx)
    nvidia.load_dialects(ctx)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ttgir")
        with open(path, "w") as f:
            f.write(ttgir)
        mod = ir.parse_mlir_module(path, ctx)
    mod.context = ctx
    pm = ir.pass_manager(ctx)
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    passes.ttgpuir.add_allocate_warp_groups(pm)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, 90, 86)
    pm.run(mod, "sm90_alloc_ir")
    return mod.str()


_ELEM_BYTES = {"i1": 1, "i8": 1, "f8E4M3FN": 1, "f8E5M2": 1, "bf16": 2, "f16": 2, "i16": 2, "f32": 4, "i32": 4,
               "f64": 8, "i64": 8}


def ws_smem_problems(alloc_ir: str) -> list[str]:
    """Shared-memory overlaps in a warp-specialised kernel after allocation (:func:`sm90_alloc_ir`), the
    hypothesis for the ws forward's NaN / racecheck hazards on an H200 (2026-11-27, third run). The buffers that
    ``ttg.warp_specialize`` captures (TMA destinations: Q halves, K / V rings; mbarriers) are live in every
    partition for the whole region, so each must have bytes of its own:

    * two captured buffers overlap;
    * a scratch offset inside the region (a partition's ``convert_layout`` scratch: the epilogue's O / LSE
      stores; the producer's ``tensormap_create``; an allocation inside a partition) falls in a captured buffer;
    * two partitions' scratch starts at the same offset (one consumer's epilogue over the other's);
    * the dispatch state (the function's ``allocation.offset`` to ``ttg.shared``) overlaps a captured buffer;
    * an allocation made before the region shares bytes with a captured buffer and is used in the region.

    Allocations made before the region and used only there (the pass's unused partner mbarrier arrays, which
    get offset 0, inside the K ring's first stage, initialised and never invalidated) are not reported."""
    import math
    import re

    text = re.sub(r" loc\((?:[^()]|\([^()]*\))*\)", "", alloc_ir)
    ws_at = text.find("ttg.warp_specialize(")
    if ws_at < 0:
        return ["no ttg.warp_specialize in the module"]
    allocs = {}  # name -> (start, end, position of the definition)
    for m in re.finditer(r"(%[\w.]+) = ttg\.local_alloc(?: %[\w.]+)? \{allocation\.offset = (\d+) : i32\} : "
                         r"\([^)]*\) -> "
                         r"!ttg\.memdesc<([0-9x]+)x(\w+),", text):
        size = math.prod(map(int, m.group(3).split("x"))) * _ELEM_BYTES[m.group(4)]
        allocs[m.group(1)] = (int(m.group(2)), int(m.group(2)) + size, m.start())
    head = re.match(r"ttg\.warp_specialize\(([^)]*)\)", text[ws_at:])
    captured = {n.strip(): allocs[n.strip()] for n in head.group(1).split(",") if n.strip() in allocs}
    region = text[ws_at + head.end():]
    parts = re.split(r"\n\s*(?=partition\d+\()", region)  # the default region (the producer), partition0, ...

    def hit(a: int, b: int, c: int, d: int) -> bool:
        return a < d and c < b

    problems = []
    names = sorted(captured)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if hit(*captured[a][:2], *captured[b][:2]):
                problems.append(f"captured buffers {a} {captured[a][:2]} and {b} {captured[b][:2]} overlap")
    for name, (s, e, pos) in allocs.items():
        if name in captured or pos > ws_at:
            continue
        over = [c for c in names if hit(s, e, *captured[c][:2])]
        if over and re.search(re.escape(name) + r"\b", parts[0]):  # partitions see only captures
            problems.append(f"{name} [{s}, {e}) shares bytes with captured {', '.join(over)} and is used in the "
                            "warp-specialised region")
    starts = {}
    for k, part in enumerate(parts):
        offs = [int(o) for o in re.findall(r"allocation\.offset = (\d+) : i32", part)]
        for o in offs:
            for c in names:
                if captured[c][0] <= o < captured[c][1]:
                    problems.append(f"scratch at {o} in {'default' if k == 0 else f'partition{k - 1}'} lies in "
                                    f"captured {c} {captured[c][:2]}")
        if k > 0 and offs:
            starts.setdefault(min(offs), []).append(f"partition{k - 1}")
    for o, who in starts.items():
        if len(who) > 1:
            problems.append(f"{' and '.join(who)} both put scratch at {o}")
    fn = re.search(r"tt\.func public @\w+\(.*\) attributes \{allocation\.offset = (\d+) : i32", text)
    total = re.search(r"ttg\.shared = (\d+) : i32", text)
    if fn and total:
        for c in names:
            if hit(int(fn.group(1)), int(total.group(1)), *captured[c][:2]):
                problems.append(f"dispatch state [{fn.group(1)}, {total.group(1)}) overlaps captured {c}")
    return list(dict.fromkeys(problems))  # one line per overlap (two ops may share a scratch offset)


def wgmma_waits(ptx: str) -> list[int]:
    """The ``wgmma.wait_group N`` of a PTX listing, in order: N > 0 leaves N groups of tensor-core products in
    flight while the code after it runs (the overlap of the softmax with P @ V)."""
    import re

    return [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]


def gluon_report(first_only: bool) -> None:
    """Compile the Gluon kernels (R4B_VARLEN_FWD=gluon, R4B_VARLEN_BWD=gluon) for sm_90 per config, both masks:
    registers, spills, shared memory, and their wgmma waits (a 1 leaves one product in flight while the
    elementwise work of another runs: in the forward P @ V during the next softmax)."""
    try:
        from r4b.kernels import _varlen_gluon as vg
    except ImportError as ex:  # a triton without Gluon
        print(f"fwd-gluon   skipped: {ex}", flush=True)
        return
    from bench.harness import ptxas_report, sm90_compile

    for kind, kern, cfgs, tile in (("fwd-gluon", vg._fwd_kernel, vg.CONFIGS, ("BLOCK_M", "BLOCK_N")),
                                   ("dkdv-gluon", vg._bwd_dkdv_kernel, vg.DKDV_CONFIGS, ("BLOCK_N", "BLOCK_M")),
                                   ("dq-gluon", vg._bwd_dq_kernel, vg.DQ_CONFIGS, ("BLOCK_M", "BLOCK_N"))):
        for a, b, warps, stages in cfgs[:1] if first_only else cfgs:
            for causal in (True, False):
                meta = {"GROUP": 4, "D": 128, tile[0]: a, tile[1]: b, "CAUSAL": causal, "STAGES": stages,
                        "NUM_WARPS": warps}
                c = sm90_compile(kern, meta, _attn_sig, warps, 1)
                waits = ",".join(map(str, wgmma_waits(c.asm["ptx"])))
                print(f"{kind:11s} {a}x{b} w{warps} s{stages} causal={causal}: smem={c.metadata.shared} B | "
                      f"{ptxas_report(c)} | wgmma waits={waits}", flush=True)


def autotune_timings(mode: str, atomic: bool = False, tma: bool = False, gluon_fwd: bool = False,
                     gluon_bwd: bool = False, ws_fwd: bool = False, ws_bwd: bool = False) -> dict:
    """The varlen kernels' autotune results for the case just run: per kernel, the chosen config and every
    config's median ms at the last key it tuned (forward for "fwd" cases, dQ and dK/dV for "fwd+bwd", or the
    dK/dV+dQ kernel of the atomic backward); printed and stored in the row, the data to prune or extend the
    config lists with. (Triton keeps the timings of the last key tuned: the cases here tune one key each.)
    A config that could not run is timed as None."""
    import importlib
    import math

    va = importlib.import_module("r4b.kernels.varlen_attention")
    names = ("fwd",) if mode == "fwd" else ("dkdv+dq",) if atomic else ("dq", "dkdv")
    kernels = {name: va.TUNED[name, tma] for name in names}
    if gluon_fwd and mode == "fwd":
        from r4b.kernels import _varlen_gluon

        kernels = {"fwd-gluon": _varlen_gluon.TUNED}
    elif ws_fwd and mode == "fwd":
        from r4b.kernels import _varlen_ws

        kernels = {"fwd-ws": _varlen_ws.TUNED}
    elif gluon_bwd and mode != "fwd":
        from r4b.kernels import _varlen_gluon

        kernels = {"dq-gluon": _varlen_gluon.TUNED_DQ, "dkdv-gluon": _varlen_gluon.TUNED_DKDV}
    elif ws_bwd and mode != "fwd":
        from r4b.kernels import _varlen_ws

        kernels = {"dq-ws": _varlen_ws.TUNED_DQ, "dkdv-ws": _varlen_ws.TUNED_DKDV}
    out = {}
    for name, tuned in kernels.items():
        timings = getattr(tuned, "configs_timings", None) or {}
        cfg = lambda c: (f"M{c.kwargs.get('BLOCK_M')} N{c.kwargs.get('BLOCK_N')} w{c.num_warps} "
                         f"s{c.kwargs.get('STAGES', c.num_stages)}")
        t = {cfg(c): (ms[0] if isinstance(ms, (list, tuple)) else ms) for c, ms in timings.items()}
        t = {k: (float(v) if math.isfinite(v) else None) for k, v in t.items()}
        best = getattr(tuned, "best_config", None)
        out[name] = {"best": cfg(best) if best is not None else None, "ms": t}
        print(f"  autotune {name}: best {out[name]['best']}; "
              + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} failed" for k, v in t.items()), flush=True)
    return out


def _tile_work(lens: list[int], tile: int, step: int, keys: bool) -> list[float]:
    """Causal work of each packed tile, in inner-loop steps plus 1.5 steps of fixed cost: a query tile (keys=False)
    walks the key blocks up to its last query of each sequence it holds, a key tile (keys=True, one program per
    KV head, the GQA-4 query heads looped inside) the query blocks from its first key to the end of the sequence."""
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    work = []
    for t0 in range(0, cu[-1], tile):
        w = 1.5
        for cs, ce in zip(cu[:-1], cu[1:], strict=True):
            a, b = max(t0, cs), min(t0 + tile, ce)
            if a < b:
                w += 4 * -(-(ce - cs - (a - cs) // step * step) // step) if keys else -(-(b - cs) // step)
        work.append(w)
    return work


def _makespan(work: list[float], sms: int) -> float:
    """Finish time when programs start in grid order, each on the first SM to free up (one program per SM, as
    the autotuned attention kernels' 200+ registers x 256 threads allow)."""
    import heapq

    free = [0.0] * sms
    for w in work:
        heapq.heappush(free, heapq.heappop(free) + w)
    return max(free)


def schedule_report(sms: int = 132) -> dict[str, dict[str, float]]:
    """The list-scheduling model behind the kernels' grid order (r4b/kernels/varlen_attention.py ``_tile_of``):
    makespan over the ideal (total work / SMs) of the head-major 2-D grid the kernels had before, and of the
    tile-major 1-D grid they use now (query tiles backwards, key tiles forwards), at the bench's two shapes with
    the first autotune configs' tiles. A model, not a measurement: the GPU bench is the judge."""
    out = {}
    for name, lens in (("anchor 16k", ANCHOR), ("row 64k", ROW_64K)):
        for kind, tile, step, heads, keys in (("fwd/dq", 128, 64, 32, False), ("dkdv", 128, 32, 8, True)):
            w = _tile_work(lens, tile, step, keys)
            ideal = sum(w) * heads / sms
            head_major = [x for _ in range(heads) for x in w]
            tile_major = [x for x in (w if keys else w[::-1]) for _ in range(heads)]
            r = {"head-major": _makespan(head_major, sms) / ideal, "tile-major": _makespan(tile_major, sms) / ideal}
            out[f"{name} {kind}"] = r
            print(f"{name:10s} {kind:6s} makespan / ideal: head-major {r['head-major']:.3f}, "
                  f"tile-major {r['tile-major']:.3f}", flush=True)
    return out


def gluon_ws_report() -> None:
    """Compile the warp-specialised Gluon forward (R4B_VARLEN_FWD=gluon-ws), dQ and dK/dV kernels (R4B_VARLEN_BWD=
    gluon-ws) for sm_90 per config, both masks, head
    dims 64 and 128 (bf16, GQA 4): one line each with the launch's threads, the setmaxnreg values, the wgmma
    wait depths, the count of mbarrier arrives, the named barriers of 128 threads, ptxas's spills, its warnings of
    serialised wgmma (the products waited for one by one), the shared memory, and in the SASS the innermost loops
    of tensor-core products (one key loop per consumer) with the local memory (spill) instructions inside them.
    Needs no GPU; TRITON_INTERPRET unset."""
    import re

    from bench.harness import mma_loop_local_ops, ptxas_report, sass, sm90_compile
    from r4b.kernels import _varlen_gluon_ws as gws

    # (name, kernel, configs, its block's constexpr: keys a step of the query kernels, queries of the key one)
    kernels = (("gluon-ws", gws._fwd_kernel, [(*c, False) for c in gws.CONFIGS], "BLOCK_N"),
               ("gluon-ws-pingpong", gws._fwd_kernel, gws.PINGPONG_CONFIGS, "BLOCK_N"),
               ("gluon-ws-dq", gws._bwd_dq_kernel, gws.DQ_CONFIGS, "BLOCK_N"),
               ("gluon-ws-dkdv", gws._bwd_dkdv_kernel, gws.DKDV_CONFIGS, "BLOCK_M"))
    cases = [(name, fn, block, D, cfg, causal) for name, fn, configs, block in kernels for D in (64, 128)
             for cfg in configs for causal in (True, False)]
    for name, fn, block, D, (n, stages, *pingpong), causal in cases:
        extra = {"PINGPONG": pingpong[0]} if pingpong else {}
        kern = sm90_compile(fn, {"GROUP": 4, "D": D, block: n, "CAUSAL": causal, "STAGES": stages, **extra},
                            _attn_sig, 4, 1)
        ptx = kern.asm["ptx"]
        threads = re.search(r"\.reqntid (\d+)", ptx).group(1)
        regs = sorted({int(r) for r in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+);", ptx)})
        waits = sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d);", ptx)))
        arrives = len(re.findall(r"mbarrier\.arrive\.shared::cta\.b64", ptx))
        bars = sorted(set(re.findall(r"bar\.sync \t?(\d+), 128;", ptx)))
        report = ptxas_report(kern)
        spill = re.search(r"(\d+) bytes spill stores", report).group(1)
        serial = report.count("Potential Performance Loss")
        loops, local = mma_loop_local_ops(sass(kern))
        print(f"{name} D={D} {block[-1]}={n} s{stages} {'causal' if causal else 'full'}: threads={threads} "
              f"setmaxnreg={','.join(map(str, regs))} wait_group={','.join(waits)} arrives={arrives} "
              f"bar128={','.join(bars)} spill={spill} serialised={serial} smem={kern.metadata.shared} "
              f"mma_loops={loops} loop_local={local}", flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = argv or []
    if "--aot-gluon-ws" in argv:  # the warp-specialised Gluon forward, every config
        gluon_ws_report()
        return []
    if "--aot-ws" in argv:  # the warp-specialised forward only, every config
        ws_report()
        return []
    if "--aot" in argv or "--aot-first" in argv:
        aot_report(first_only="--aot-first" in argv)
        return []
    if "--sched" in argv:
        schedule_report()
        return []
    device = default_device()
    quick = "--quick" in argv or device == "cpu"
    mask_ms: dict[str, float] = {}

    def extra(case: Case, row: dict) -> dict:
        if row["provider"] == "flex doc mask":
            return {"mask_build_ms": mask_ms[case.label]}
        if row["provider"] in R4B_ROWS and device == "cuda":
            fwd_kernel, bwd, loads = R4B_ROWS[row["provider"]]
            try:  # tuning data only: it must never stop the bench
                return {"autotune": autotune_timings(case.params["mode"], bwd == "atomic", loads == "tma",
                                                     gluon_fwd=fwd_kernel == "gluon", gluon_bwd=bwd == "gluon",
                                                     ws_fwd=fwd_kernel == "ws", ws_bwd=bwd == "ws")}
            except Exception as ex:  # noqa: BLE001
                return {"autotune_error": f"{type(ex).__name__}: {ex}"[:200]}
        return {}

    # --providers a,b,...: those rows only (the first, the reference, should stay "sdpa per doc"); --anchor: the 16k
    # anchor only. A subset writes varlen_attention_subset.json, never over the full bench's results.
    provs = providers(device, mask_ms)
    name, todo = "varlen_attention", cases(quick)
    if "--providers" in argv:
        wanted = argv[argv.index("--providers") + 1].split(",")
        unknown = [w for w in wanted if w not in provs]
        if unknown:
            raise SystemExit(f"--providers: unknown {unknown}; known: {list(provs)}")
        provs, name = {n: provs[n] for n in wanted}, "varlen_attention_subset"
    if "--anchor" in argv:
        todo, name = todo[:2], "varlen_attention_subset"
    return run_bench(name, todo, provs, device=device, quick=quick, extra_columns=extra, check_tol=CHECK_TOL[device])


if __name__ == "__main__":
    main(sys.argv[1:])
