"""GPU diagnostics: the hot kernels run once each inside cudaProfilerStart / cudaProfilerStop, for Nsight Compute
(``ncu --profile-from-start off``) and compute-sanitizer; and a condensed table of ncu's CSV. Most sessions of
this project have no GPU: a lease's hardware counters (where each kernel's time goes, what its warps wait on)
are what the sessions after it tune against. bench/gpu_check.sh's ``diag`` phase runs it.

    python -m bench.gpu_diag attn [--small] [--gluon-only]
        varlen attention forward + backward, bf16, causal: the default Triton kernels and, on sm_90, the Gluon
        ones (R4B_VARLEN_FWD=gluon, R4B_VARLEN_BWD=gluon) and the warp-specialised Triton ones (=ws; not with
        --gluon-only or --small). At the issue's anchor (16384 tokens in 10 documents,
        32 q / 8 kv heads, d 128) each variant runs twice first (autotuning, compiles) outside the profiled
        range. --small: a few hundred tokens with empty, length-1 and tile-straddling sequences, the first
        config of each kernel launched directly (no autotuning: for compute-sanitizer, under which every launch
        is slow); the outputs are checked against the float64 reference of the op (exit 1 on a mismatch).
    python -m bench.gpu_diag ws [--causal] [--all-configs]
        the warp-specialised kernels (R4B_VARLEN_FWD/BWD=ws; on a GPU refused unless R4B_VARLEN_WS_UNVERIFIED=1) at
        the boundary test's size (documents of 100, 300 and 77 tokens, 4 q / 2 kv heads, d 128, bf16), not causal
        unless --causal, each kernel's first config launched directly, twice: for compute-sanitizer (racecheck,
        synccheck, memcheck) on the kernels whose non-causal boundary test failed on an H200 (2026-11-27: the
        forward's, it turned out). Prints whether the two runs gave the same bits and the error against the fp32
        reference (exit 1 if either is wrong). --all-configs: the forward alone, every config of _varlen_ws.CONFIGS
        and of DROPPED_CONFIGS (dropped after NaN on an H200, 2026-11-27) launched directly, twice each; one line
        per config: the same bits twice, NaN in O / LSE, the max relative error of O against the fp32 reference
        (exit 1 if a kept config fails; a dropped config's line is information).
    python -m bench.gpu_diag gluon-ws [--causal]
        the warp-specialised Gluon kernels (forward, dQ, dK/dV; R4B_VARLEN_WS_UNVERIFIED=1 on a GPU) at the same size,
        every config launched directly, twice, into NaN-filled outputs, the backward kernels from the fp32
        reference's LSE and delta: one line per kernel and config (same bits, NaN, error against fp32); for
        compute-sanitizer when their GPU tests fail (bench/gpu_check.sh's diag_gluon_ws).
    python -m bench.gpu_diag grpo
        the chunked GRPO loss, forward + backward, on one chunk's worth of rows of the anchor (3072 x 2560 x
        151936, bf16): its GEMMs (cuBLAS) and the row kernel.
    python -m bench.gpu_diag host [--n N]
        where a launched small op's forward + backward spends its time (bench norms: rms_norm's at 14% of copy
        launched and 81% in a CUDA graph, and torch.compile's launched too, H200 2026-11-27): per callable, the host
        time of the forward and of ``torch.autograd.grad`` (each from an idle GPU, synchronised before), and the
        CUDA-event time of the pair. Baselines: one built-in op each way, and a custom autograd.Function doing one
        copy each way (the autograd engine's own cost on the GPU's worker thread), then r4b's rms_norm (hidden),
        qk_norm_rope and the unfused q/k ops it replaces, at the bench shapes.
    python -m bench.gpu_diag paged [--tiny]
        the decode kernels at the decode anchor (32 sequences x 4096 tokens, 32 q / 8 kv heads, d 128, bf16, blocks
        of 16 scattered over the cache), in CUDA graphs: the Triton split-K launch over (BLOCK_N, num_stages) x
        num_splits (its GPU_TILE chosen from compiling for sm_90, not yet timed) and the CUDA kernel over num_splits,
        each line with its KV GB/s and error against the fp32 reference. --tiny: a few hundred tokens in fp32 on the
        CPU interpreter (the errors only).
    python -m bench.gpu_diag report CSV...
        one line per profiled kernel of ncu's ``--csv --page raw`` log(s): time, SM / memory / DRAM throughput,
        tensor-pipe activity, registers, occupancy and the four largest warp-stall reasons.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from pathlib import Path

SMALL = [1, 37, 0, 130, 300, 5, 64]


def _profiled(run, device: str = "cuda") -> None:
    """run() between cudaProfilerStart and cudaProfilerStop (on the CPU, for the tests: just run())."""
    import torch

    if device != "cuda":
        run()
        return
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    try:
        run()
        torch.cuda.synchronize()
    finally:
        torch.cuda.cudart().cudaProfilerStop()


def attn(small: bool, gluon_only: bool, device: str = "cuda", shape=None) -> int:
    """shape: (lens, hq, hkv, d) instead of the anchor (tests, on the CPU)."""
    import torch

    from bench import bench_varlen_attention as bva
    from bench.harness import Case, env_var
    from r4b.kernels import varlen_attention, varlen_attention_ref

    hopper = device == "cuda" and torch.cuda.get_device_capability()[0] == 9
    variants = [] if gluon_only else [("triton", "triton", "split")]
    if hopper:
        variants.append(("gluon", "gluon", "gluon"))
        from r4b.kernels import _varlen_ws

        # the warp-specialised Triton kernels (R4B_VARLEN_FWD/BWD=ws), once the GPU no longer refuses them (or
        # while it does, with R4B_VARLEN_WS_UNVERIFIED=1: gpu_check sets it when their GPU tests passed)
        ws_refused = _varlen_ws.parts_problem(torch.device(device), False, ("fwd", "bwd"))
        if not gluon_only and not small and ws_refused is None:
            variants.append(("ws", "ws", "ws"))
    if not variants:
        print("no variant to run (--gluon-only needs a Hopper GPU)")
        return 1
    lens, hq, hkv, d = shape or ((SMALL, 4, 2, 128) if small else (bva.ANCHOR, 32, 8, 128))
    # the varlen bench's inputs (bf16 on the GPU, fp32 on the CPU interpreter)
    q, k, v, do, cu = bva._inputs(Case("diag", {"mode": "fwd", "lens": lens, "hq": hq, "hkv": hkv, "d": d}), device)
    m = max(lens)

    def step(fwd_kernel, bwd):
        with env_var("R4B_VARLEN_FWD", fwd_kernel), env_var("R4B_VARLEN_BWD", bwd):
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            o = varlen_attention(qq, kk, vv, cu, m, backend="triton")
            return (o, *torch.autograd.grad(o, (qq, kk, vv), do))

    if small:
        return _attn_small(variants, q, k, v, do, cu, lens)
    for _, fwd_kernel, bwd in variants:  # autotuning and compiles, outside the profiled range
        for _ in range(2):
            step(fwd_kernel, bwd)
    print("profiled, in launch order:", ", ".join(f"{n} fwd+bwd" for n, _, _ in variants), flush=True)
    _profiled(lambda: [step(f, b) for _, f, b in variants], device)
    # the same outputs as the reference (a profile of kernels computing something else would mislead)
    want = _ref_grads(varlen_attention_ref, q, k, v, do, cu)
    worst = max(_rel_err(step(f, b), want) for _, f, b in variants)
    print(f"max relative error of the profiled variants against the fp32 reference: {worst:.2e}")
    return 0 if worst < 5e-2 else 1


def _attn_small(variants, q, k, v, do, cu, lens) -> int:
    """The Gluon kernels' first configs launched directly (no autotuner), their outputs checked."""
    import importlib

    import torch

    from r4b.kernels import varlen_attention_ref

    if not any(name == "gluon" for name, _, _ in variants):
        print("--small runs the Gluon kernels only: this GPU is not a Hopper")
        return 1
    va = importlib.import_module("r4b.kernels.varlen_attention")
    vg = importlib.import_module("r4b.kernels._varlen_gluon")
    va._ensure_allocator()
    want = _ref_grads(varlen_attention_ref, q, k, v, do, cu)
    T, Hq, D = q.shape
    scale = D**-0.5
    o = torch.empty_like(q)
    lse = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    grads = []

    def run():
        vg.forward(q, k, v, o, lse, cu, scale / math.log(2.0), True, config=vg.CONFIGS[0])
        delta = (o.float() * do.float()).sum(-1).transpose(0, 1).contiguous()  # (Hq, T)
        grads.append(vg.backward(do, q, k, v, lse, delta, cu, scale, True, dkdv_config=vg.DKDV_CONFIGS[0],
                                 dq_config=vg.DQ_CONFIGS[0]))

    _profiled(run)
    err = _rel_err((o, *grads[0]), want)
    print(f"gluon: first configs {vg.CONFIGS[0]} / {vg.DKDV_CONFIGS[0]} / {vg.DQ_CONFIGS[0]}, max relative error "
          f"against the fp32 reference {err:.2e}")
    return 0 if err < 5e-2 else 1


def ws(causal: bool, device: str = "cuda", d: int = 128, all_configs: bool = False) -> int:
    """The ws kernels' first configs, directly, twice, at the boundary test's size; same bits twice and the error
    against the fp32 reference (d: 16 for the CPU test). all_configs: the forward alone, per config
    (:func:`ws_forward_configs`)."""
    import importlib

    import torch

    from bench.harness import same_bits
    from r4b.kernels import varlen_attention_ref

    wsk = importlib.import_module("r4b.kernels._varlen_ws")
    interp = device != "cuda"
    why = wsk.parts_problem(torch.device(device), interp, ("fwd",) if all_configs else ("fwd", "bwd"))
    if why is not None:
        print(f"ws: {why} (R4B_VARLEN_WS_UNVERIFIED=1 runs them)")
        return 1
    q, k, v, do, cu = _boundary_inputs(device, d)
    T, hq, _ = q.shape
    scale = d**-0.5
    if all_configs:
        return ws_forward_configs(wsk, q, k, v, do, cu, scale, causal, interp)
    cfg = {} if interp else {"config": wsk.CONFIGS[0]}
    bcfg = {} if interp else {"dq_config": wsk.DQ_CONFIGS[0], "dkdv_config": wsk.DKDV_CONFIGS[0]}
    runs = []

    def run():
        o = torch.empty_like(q)
        lse = torch.empty((hq, T), dtype=torch.float32, device=device)
        wsk.forward(q, k, v, o, lse, cu, scale / math.log(2.0), causal, interp, **cfg)
        delta = (o.float() * do.float()).sum(-1).transpose(0, 1).contiguous()  # (Hq, T)
        runs.append((o, *wsk.backward(do, q, k, v, lse, delta, cu, scale, causal, interp, **bcfg)))

    _profiled(lambda: (run(), run()), device)
    same = all(same_bits(a, b) for a, b in zip(*runs, strict=True))
    err = _rel_err(runs[0], _ref_grads(varlen_attention_ref, q, k, v, do, cu, causal))
    print(f"ws ({'causal' if causal else 'not causal'}): first configs; two runs the same bits: {same}; max relative "
          f"error against the fp32 reference {err:.2e}")
    return 0 if same and err < 5e-2 else 1


def ws_forward_configs(wsk, q, k, v, do, cu, scale: float, causal: bool, interp: bool) -> int:
    """The ws forward per config of wsk.CONFIGS and wsk.DROPPED_CONFIGS, launched directly, twice each: one line per
    config (the same bits twice; NaN in O / LSE; O's max relative error against the fp32 reference). 1 if a kept
    config is not the same bits twice, has a NaN or an error of 5e-2 or more; dropped configs only print. (The
    interpreter ignores the config: every line runs its small tiles.)"""
    import torch

    from bench.harness import same_bits
    from r4b.kernels import varlen_attention_ref

    T, hq, _ = q.shape
    want = _ref_grads(varlen_attention_ref, q, k, v, do, cu, causal)[0]
    failed = 0
    for config in [*wsk.CONFIGS, *wsk.DROPPED_CONFIGS]:
        runs = []
        for _ in range(2):
            o = torch.full_like(q, float("nan"))  # a row the kernel never writes shows as NaN
            lse = torch.full((hq, T), float("nan"), dtype=torch.float32, device=q.device)
            cfg = None if interp else config
            _profiled(lambda o=o, lse=lse, cfg=cfg: wsk.forward(q, k, v, o, lse, cu, scale / math.log(2.0), causal,
                                                                interp, config=cfg), q.device.type)
            runs.append((o, lse))
        same = all(same_bits(a, b) for a, b in zip(*runs, strict=True))
        nan = [f"{name} run {i}: {int(t.isnan().sum())}" for i, r in enumerate(runs)
               for name, t in zip(("O", "LSE"), r, strict=True) if bool(t.isnan().any())]
        err = _rel_err((runs[0][0],), (want,))
        ok = same and not nan and err < 5e-2
        dropped = config in wsk.DROPPED_CONFIGS
        failed += not ok and not dropped
        print(f"ws forward {'dropped ' if dropped else ''}config {config} ({'causal' if causal else 'not causal'}): "
              f"two runs the same bits: {same}; NaN: {'; '.join(nan) or 'none'}; max relative error against the "
              f"fp32 reference {err:.2e}: {'ok' if ok else 'FAILED'}")
    return 1 if failed else 0


def gluon_ws(causal: bool, device: str = "cuda", d: int = 128) -> int:
    """The warp-specialised Gluon kernels (R4B_VARLEN_FWD / _BWD=gluon-ws*; refused on GPUs unless
    R4B_VARLEN_WS_UNVERIFIED=1) at the boundary test's size, every config of each launched directly, twice, into
    NaN-filled outputs (a row never written shows): one line per kernel and config with the same bits twice, the NaN
    counts and the max relative error against the fp32 reference (the forward's O and LSE). The backward kernels
    take the fp32 reference's LSE and delta, so each is judged alone. For compute-sanitizer (racecheck, synccheck)
    when their GPU tests fail; 1 if any config fails. (d, device: the CPU test's, with stand-ins for the kernels.)"""
    import importlib

    import torch

    from bench.harness import same_bits
    from r4b.kernels import varlen_attention_ref

    gws = importlib.import_module("r4b.kernels._varlen_gluon_ws")
    for kernel in ("fwd", "dq", "dkdv"):
        why = gws.device_problem(torch.device(device), kernel)
        if why is not None:
            print(f"gluon-ws: {why}")
            return 1
    q, k, v, do, cu = _boundary_inputs(device, d)
    T, hq, _ = q.shape
    scale = d**-0.5
    want = _ref_grads(varlen_attention_ref, q, k, v, do, cu, causal)
    # the fp32 reference's LSE (log2 units) and delta = rowsum(dO * O), (Hq, T)
    lse = torch.zeros(hq, T, device=device)
    bounds = cu.tolist()
    for s0, e0 in zip(bounds[:-1], bounds[1:], strict=True):
        sc = torch.einsum("ihd,jhd->hij", q[s0:e0].float(), k[s0:e0].float().repeat_interleave(hq // k.shape[1], 1))
        sc = sc * scale
        if causal:
            sc = sc.masked_fill(~torch.ones(e0 - s0, e0 - s0, dtype=torch.bool, device=device).tril(), -math.inf)
        lse[:, s0:e0] = sc.logsumexp(-1) / math.log(2.0)
    delta = (want[0] * do.float()).sum(-1).transpose(0, 1).contiguous()

    def nan_like(t):
        return torch.full_like(t, float("nan"))

    def fwd(cfg):
        o, l2 = nan_like(q), torch.full((hq, T), float("nan"), device=device)
        gws.forward(q, k, v, o, l2, cu, scale / math.log(2.0), causal, config=cfg)
        return (o, l2), (want[0], lse)

    def dq(cfg):
        out = nan_like(q)
        gws.backward_dq(do, q, k, v, lse, delta, out, cu, scale, causal, config=cfg)
        return (out,), (want[1],)

    def dkdv(cfg):
        out = (nan_like(k), nan_like(v))
        gws.backward_dkdv(do, q, k, v, lse, delta, cu, scale, causal, config=cfg, out=out)
        return out, want[2:]

    failed = 0
    # the PINGPONG configs last: a hang there (the timeout) must not hide the other kernels' lines
    for name, fn, configs in (("forward", fwd, gws.CONFIGS), ("dQ", dq, gws.DQ_CONFIGS),
                              ("dK/dV", dkdv, gws.DKDV_CONFIGS), ("forward", fwd, gws.PINGPONG_CONFIGS)):
        for cfg in configs:
            runs = []
            _profiled(lambda cfg=cfg, fn=fn, runs=runs: runs.extend([fn(cfg), fn(cfg)]), device)
            (got, ref), (again, _) = runs
            same = all(same_bits(a, b) for a, b in zip(got, again, strict=True))
            nan = sum(int(t.isnan().sum()) for t in (*got, *again))
            err = _rel_err(got, ref)
            ok = same and not nan and err < 5e-2
            failed += not ok
            print(f"gluon-ws {name} config {cfg} ({'causal' if causal else 'not causal'}): two runs the same bits: "
                  f"{same}; NaN: {nan}; max relative error against the fp32 reference {err:.2e}: "
                  f"{'ok' if ok else 'FAILED'}", flush=True)
    return 1 if failed else 0


def _boundary_inputs(device: str, d: int):
    """(q, k, v, do, cu) at the boundary test's size (documents of 100, 300 and 77 tokens, 4 q / 2 kv heads, head
    dim d): the varlen bench's inputs (bf16 on the GPU, fp32 on the CPU interpreter), as attn() uses; on a GPU
    triton's scratch allocator set (the ws and Gluon kernels build TMA descriptors on the device)."""
    import importlib

    from bench import bench_varlen_attention as bva
    from bench.harness import Case

    q, k, v, do, cu = bva._inputs(Case("diag", {"mode": "fwd", "lens": [100, 300, 77], "hq": 4, "hkv": 2, "d": d}),
                                  device)
    if device == "cuda":
        importlib.import_module("r4b.kernels.varlen_attention")._ensure_allocator()
    return q, k, v, do, cu


def _ref_grads(ref, q, k, v, do, cu, causal: bool = True):
    import torch

    qq, kk, vv = (t.detach().float().requires_grad_() for t in (q, k, v))
    o = ref(qq, kk, vv, cu, causal=causal)
    return (o.detach(), *torch.autograd.grad(o, (qq, kk, vv), do.float()))


def _rel_err(got, want) -> float:
    """The harness's max relative error, or inf where a result holds NaN / inf (which that max would skip)."""
    from bench.harness import max_rel_err

    return max_rel_err(got, want) if all(bool(g.isfinite().all()) for g in got) else math.inf


def grpo(device: str = "cuda", shape=(3072, 2560, 151936)) -> int:
    """shape (N, H, V): by default one chunk of the anchor's (its last: _fused_linear_chunked.chunk_rows gives
    16384 = 4 x 3328 + 3072), with the GRPO bench's inputs (N a multiple of its 1024-token sequences, or less)."""
    import torch

    from bench.bench_grpo_loss import inputs
    from bench.harness import Case
    from r4b.kernels import fused_linear_grpo_loss

    n, h, v = shape
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden, weight, targets, adv, old, mask = inputs(Case("diag", {"N": n, "H": h, "V": v}), device, dtype)

    def step():
        hidden.grad = weight.grad = None
        loss = fused_linear_grpo_loss(hidden, weight, targets, adv, old_logprobs=old, loss_mask=mask,
                                      aggregation="token_mean", backend="triton")[0]
        loss.backward()
        return loss

    for _ in range(2):
        step()
    print(f"profiled: chunked GRPO loss fwd+bwd, N={n} H={h} V={v} {dtype} (one chunk)", flush=True)
    _profiled(step, device)
    ok = bool(torch.isfinite(hidden.grad).all()) and bool(torch.isfinite(weight.grad).all())
    print("gradients finite:", ok)
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------ ncu report

_STALL = re.compile(r"^smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)(?:_per_issue_active)?\.(?:ratio|pct)$")
_TENSOR = re.compile(r"^sm__(?:pipe_tensor|inst_executed_pipe_tensor)\w*\.(?:avg\.)?pct_of_peak_sustained_active$")
_COLUMNS = {  # label: ncu metric (raw page) or column name
    "time": "gpu__time_duration.sum",
    "SM%": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "mem%": "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
    "dram%": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "occ%": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "regs": "launch__registers_per_thread",
    "grid": "launch__grid_size",
    "block": "launch__block_size",
}
_TO_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6,
          "s": 1e6}


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def parse_ncu_csv(text: str) -> list[dict]:
    """Kernels of an ``ncu --csv --page raw`` log: one dict per profiled launch with "name", "time_us" and the
    metrics of _COLUMNS found, "tensor%" (the largest tensor-pipe activity metric found, with its name) and
    "stalls" (the four largest warp-stall reasons, cycles per issued instruction). Lines that are not CSV rows
    (ncu's ==PROF== messages, the program's own output) are skipped; a metric ncu did not collect is absent."""
    rows = [r for r in csv.reader(line for line in text.splitlines() if line.startswith('"'))]
    header_at = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if header_at is None:
        return []
    header = rows[header_at]
    units: dict[str, str] = {}
    out = []
    for r in rows[header_at + 1:]:
        if len(r) != len(header) or r == header:
            continue
        rec = dict(zip(header, r, strict=True))
        if not rec.get("ID", "").strip().isdigit():  # the units row follows the header
            units = {k: v for k, v in rec.items() if v}
            continue
        k = {"name": rec["Kernel Name"], "id": int(rec["ID"])}
        for label, metric in _COLUMNS.items():
            val = _number(rec.get(metric, ""))
            if val is None:
                continue
            if label == "time":
                k["time_us"] = val * _TO_US.get(units.get(metric, "nsecond"), 1e-3)
            else:
                k[label] = val
        tensor = [(float(v), m) for m, v in rec.items() if _TENSOR.match(m) and _number(v) is not None]
        if tensor:
            k["tensor%"], k["tensor_metric"] = max(tensor)
        stalls = [(float(v), _STALL.match(m).group(1)) for m, v in rec.items()
                  if _STALL.match(m) and _number(v) is not None]
        k["stalls"] = [(name, val) for val, name in sorted(stalls, reverse=True)[:4] if val > 0]
        out.append(k)
    return out


def _cell(k: dict, key: str, width: int, digits: int = 0) -> str:
    v = k.get(key)
    return f"{v:>{width}.{digits}f}" if isinstance(v, float) else " " * width


def report(kernels: list[dict]) -> str:
    """A fixed-width table of :func:`parse_ncu_csv`'s kernels, in launch order, with each one's share of the
    total time."""
    if not kernels:
        return "no kernels in the ncu log (did ncu run, and see cudaProfilerStart?)"
    total = sum(k.get("time_us", 0.0) for k in kernels) or 1.0
    lines = [f"{'#':>3} {'kernel':<34} {'us':>9} {'%time':>6} {'SM%':>5} {'mem%':>5} {'dram%':>5} {'tens%':>5} "
             f"{'occ%':>5} {'regs':>4} {'grid':>7} {'blk':>4}  top stalls (cycles per issue)"]
    for i, k in enumerate(kernels):
        name = re.sub(r"\(.*", "", k["name"])[:34]
        stalls = ", ".join(f"{n} {v:.1f}" for n, v in k.get("stalls", []))
        lines.append(f"{i:>3} {name:<34} {_cell(k, 'time_us', 9, 1)} {100 * k.get('time_us', 0.0) / total:>6.1f} "
                     + " ".join(_cell(k, key, w) for key, w in (("SM%", 5), ("mem%", 5), ("dram%", 5),
                                                                ("tensor%", 5), ("occ%", 5), ("regs", 4),
                                                                ("grid", 7), ("block", 4)))
                     + f"  {stalls}")
    metric = next((k["tensor_metric"] for k in kernels if "tensor_metric" in k), None)
    lines.append(f"total {total:.1f} us; tensor column: {metric or 'no tensor-pipe metric in the log'}")
    return "\n".join(lines)


def host_split(fns: dict, device: str = "cuda", n: int = 50, on_row=None) -> list[dict]:
    """For each name -> (forward callable, inputs to differentiate, output gradients): the median over n calls of
    the forward's host time, the backward's (torch.autograd.grad) host time, and the device time of the pair
    (CUDA events; on the CPU the wall time), each call started with the device idle. ``on_row(row)`` gets each
    row as soon as it is measured (so a time limit keeps the rows measured before it)."""
    import statistics
    import time

    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for name, (fwd, wrt, dys) in fns.items():
        f_us, b_us, dev_ms = [], [], []
        for i in range(n + 3):  # 3 warm-up calls (autotuning, compiles)
            sync()
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            out = fwd()
            t1 = time.perf_counter()
            torch.autograd.grad(out, wrt, dys)
            t2 = time.perf_counter()
            if device == "cuda":
                end.record()
            sync()
            if i >= 3:
                f_us.append((t1 - t0) * 1e6)
                b_us.append((t2 - t1) * 1e6)
                dev_ms.append(start.elapsed_time(end) if device == "cuda" else (time.perf_counter() - t0) * 1e3)
            del out
        rows.append({"name": name, "fwd_host_us": statistics.median(f_us), "bwd_host_us": statistics.median(b_us),
                     "pair_ms": statistics.median(dev_ms)})
        if on_row is not None:
            on_row(rows[-1])
    return rows


def host(device: str = "cuda", n: int = 50, shapes=None) -> int:
    """shapes: (T, hidden, q heads, kv heads, head dim) instead of the bench's (tests, on the CPU)."""
    import torch

    from r4b.kernels import qk_norm_rope, rms_norm, rope

    T, hidden, hq, hkv, d = shapes or (16384, 2560, 32, 8, 128)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *shape: torch.randn(shape, device=device, dtype=dt, generator=g).requires_grad_(True)  # noqa: E731
    x, w = rnd(T, hidden), rnd(hidden)
    q, k, wq, wk = rnd(T, hq, d), rnd(T, hkv, d), rnd(d), rnd(d)
    pos = torch.arange(T, device=device) % 4096
    dy, dq, dk = (torch.randn_like(t) for t in (x, q, k))

    class Copy(torch.autograd.Function):  # one copy kernel each way: the engine's cost for a custom Function
        @staticmethod
        def forward(ctx, a):
            return a.clone()

        @staticmethod
        def backward(ctx, da):
            return da.clone()

    unfused = lambda: (rope(rms_norm(q, wq), pos), rope(rms_norm(k, wk), pos))  # noqa: E731
    fns = {
        "built-in op (x * 2), hidden": (lambda: x * 2, (x,), dy),
        "custom Function (a copy each way), hidden": (lambda: Copy.apply(x), (x,), dy),
        "r4b rms_norm, hidden": (lambda: rms_norm(x, w), (x, w), dy),
        "r4b qk_norm_rope": (lambda: qk_norm_rope(q, k, wq, wk, pos), (q, k, wq, wk), (dq, dk)),
        "r4b rms_norm + rope, q and k (unfused)": (unfused, (q, k, wq, wk), (dq, dk)),
    }
    print(f"{'callable':44s} {'fwd host us':>12s} {'grad host us':>13s} {'fwd+grad ms':>12s}", flush=True)
    row = lambda r: print(  # noqa: E731
        f"{r['name'][:44]:44s} {r['fwd_host_us']:12.1f} {r['bwd_host_us']:13.1f} {r['pair_ms']:12.3f}", flush=True)
    host_split(fns, device, n, on_row=row)
    # where the host time of the eager call goes: the Python functions of rms_norm's forward + grad (the backward
    # runs in the autograd engine's device thread on a GPU, which cProfile does not see: the grad's line is its wait)
    print(profile_lines(lambda: torch.autograd.grad(rms_norm(x, w), (x, w), dy), n), flush=True)
    if device == "cuda":  # last (inductor compiles): as a compiled step calls it, a custom op in CUDA graphs
        for t in (x, w):  # no copy into the graph's buffers (the backward's dy is copied in: pair_ms has it)
            torch._dynamo.mark_static_address(t)
        compiled = torch.compile(lambda: rms_norm(x, w), mode="reduce-overhead")
        host_split({"r4b rms_norm, hidden, compiled reduce-overhead": (compiled, (x, w), dy)}, device, n,
                   on_row=row)
    return 0


def profile_lines(fn, n: int, top: int = 18) -> str:
    """cProfile of n calls of fn (after 3 warm-up calls): the ``top`` functions by own time, microseconds a call."""
    import cProfile
    import pstats

    for _ in range(3):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(((tt, ct, nc, f"{Path(f).name}:{line}({name})") for (f, line, name), (_, nc, tt, ct, _) in
                   stats.items()), reverse=True)[:top]
    lines = [f"host profile of {n} calls of r4b rms_norm (hidden) forward + grad: us a call, own / with callees"]
    lines += [f"  {tt / n * 1e6:8.1f} {ct / n * 1e6:8.1f}  x{nc / n:<4.3g} {where}" for tt, ct, nc, where in rows]
    return "\n".join(lines)


def paged(tiny: bool) -> int:
    """Time the decode kernels' launch options at the decode anchor (see the module docstring)."""
    import torch

    from r4b.kernels.paged_decode_attention import (
        _paged_decode_triton,
        paged_decode_attention,
        paged_decode_attention_ref,
    )

    dev, dt = ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)
    B, L, Hq, Hkv, D, bs = (3, 208, 8, 2, 32, 16) if tiny else (32, 4096, 32, 8, 128, 16)
    nb = B * L // bs
    g = torch.Generator().manual_seed(0)
    bt = torch.randperm(nb, generator=g).view(B, L // bs).to(torch.int32).to(dev)
    kc = torch.randn(nb, bs, Hkv, D, generator=g).to(dt).to(dev)
    vc = torch.randn_like(kc)
    q = torch.randn(B, Hq, D, generator=g).to(dt).to(dev)
    cl = torch.full((B,), L, dtype=torch.int32, device=dev)
    ref = paged_decode_attention_ref(q.float(), kc, vc, bt, cl)
    kv_bytes = 2 * B * L * Hkv * D * kc.element_size()
    scale = D**-0.5
    runs = [(f"triton BLOCK_N={bn} stages={st} splits={ns}",
             lambda bn=bn, st=st, ns=ns: _paged_decode_triton(q, kc, vc, bt, cl, scale, ns, (bn, st, 4)))
            for bn in (32, 64) for st in (3, 5) for ns in (1, 2, 4)]
    if not tiny:
        runs += [(f"cuda splits={ns}", lambda ns=ns: paged_decode_attention(q, kc, vc, bt, cl, num_splits=ns,
                                                                            backend="cuda")) for ns in (1, 2, 4, 8)]
    bad = 0
    for name, fn in runs:
        try:
            err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
        except Exception as ex:  # e.g. r4b._C without CUDA kernels: the line says so, the others still run
            print(f"{name:40s} {type(ex).__name__}: {str(ex)[:160]}", flush=True)
            continue
        bad += not err < 2e-2
        if tiny:
            print(f"{name:40s} rel err {err:.1e}", flush=True)
            continue
        from bench.harness import graph_time_ms

        ms = graph_time_ms(fn)
        print(f"{name:40s} {ms * 1e3:8.1f} us {kv_bytes / ms / 1e6:7.0f} GB/s  rel err {err:.1e}", flush=True)
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("attn", "ws", "gluon-ws", "grpo", "host", "paged", "report"):
        print(__doc__)
        return 2
    if argv[0] == "report":
        kernels = []
        for path in argv[1:]:
            kernels += parse_ncu_csv(Path(path).read_text(errors="replace"))
        print(report(kernels))
        return 0 if kernels else 1
    import torch

    if argv[0] == "paged" and "--tiny" in argv:
        return paged(tiny=True)
    if not torch.cuda.is_available():
        print("gpu_diag needs a CUDA GPU")
        return 2
    if argv[0] == "attn":
        return attn("--small" in argv, "--gluon-only" in argv)
    if argv[0] == "ws":
        return ws("--causal" in argv, all_configs="--all-configs" in argv)
    if argv[0] == "gluon-ws":
        return gluon_ws("--causal" in argv)
    if argv[0] == "paged":
        return paged(tiny=False)
    if argv[0] == "host":
        return host(n=int(argv[argv.index("--n") + 1]) if "--n" in argv else 50)
    return grpo()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
