"""The shared benchmark harness: providers per op, timing, peak memory, FLOP/s and GB/s, result files.

A bench module (bench/bench_<op>.py) builds a list of :class:`Case` and a dict of providers
(name -> setup(case) -> zero-arg callable) and calls :func:`run_bench`. Timing uses
``triton.testing.do_bench`` on a GPU (median and 20/80 percentiles) and a wall-clock loop on the CPU.
Results go to ``bench/results/<date>-<device>/<op>.{json,md,png}`` with the device name, torch/triton
versions and the git commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


class Skip(Exception):
    """Raised by a provider's setup when it cannot run here (missing package, no GPU...)."""


@dataclasses.dataclass
class Case:
    label: str
    params: dict
    flops: float | None = None  # analytic FLOPs of one timed call
    bytes: float | None = None  # bytes moved by one timed call


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


@functools.cache
def _git_commit() -> str | None:
    """The checkout's short commit, looked up once per process (results are rewritten after every row)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:
        commit = ""
    return commit or None


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "date": datetime.date.today().isoformat(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": _git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, *, quick: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of one call of ``fn``."""
    if device == "cuda":
        import triton.testing

        # do_bench repeats for `rep` milliseconds: at 100 ms a 60 ms loss would be timed once, so a long call
        # gets about 10 repetitions (at most 3 s of them) from an estimate of one warm call
        rep = 20 if quick else 100
        if not quick:
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            rep = min(max(rep, 10 * (time.perf_counter() - t0) * 1e3), 3000)
        q = triton.testing.do_bench(fn, warmup=25 if not quick else 5, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    fn()  # warm-up (compilation, caches)
    times: list[float] = []
    budget = 0.5 if quick else 2.0
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    pick = lambda p: times[min(len(times) - 1, int(p * (len(times) - 1) + 0.5))]
    return statistics.median(times), pick(0.2), pick(0.8)


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """Sets the environment variable ``name`` to ``value`` inside the block and restores what it was (None:
    leaves it alone); for providers that time one of r4b's environment-selected implementations."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def graph_time_ms(fn: Callable[[], object], *, quick: bool = False) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph (warmed up on a side stream first,
    as torch.cuda.graph requires; autograd's backward is captured too)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    try:
        return time_fn(g.replay, "cuda", quick=quick)[0]
    finally:
        del g
        torch.cuda.empty_cache()


def peak_memory_gib(fn: Callable[[], object], device: str) -> float | None:
    """Peak GPU memory allocated during one call, above what was allocated before it (None on the CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def matmul_floor_tflops(device: str, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Achieved TFLOP/s of an n^3 matmul on this device (the compute ceiling measured in this run)."""
    if device != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms, _, _ = time_fn(lambda: a @ b, device)
    return 2 * n**3 / ms / 1e9


def copy_bandwidth_gbps(device: str, nbytes: int = 2 * 2**30) -> float | None:
    """Achieved GB/s (read + write) of a large device copy (the bandwidth ceiling measured in this run)."""
    if device != "cuda":
        return None
    return _copy_gbps(2 * nbytes, device, graph=False)


def _copy_gbps(moved: int, device: str, graph: bool) -> float:
    """GB/s of one device copy reading moved / 2 bytes and writing as many, launched or replayed in a CUDA graph."""
    x = torch.empty(moved // 8, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    ms = graph_time_ms(lambda: y.copy_(x)) if graph else time_fn(lambda: y.copy_(x), device)[0]
    return 2 * x.numel() * 4 / ms / 1e6


_SAME_SIZE_COPY: dict[tuple[int, bool], float] = {}


def same_size_copy_gbps(nbytes: int, device: str, graph: bool) -> float | None:
    """GB/s (read + write) of a device copy moving ``nbytes`` in all (nbytes / 2 read, nbytes / 2 written), timed
    as launched from Python or (``graph``) replayed in a CUDA graph: the ceiling for a small op moving the same
    bytes, whose fixed costs (launch, a partial last wave) a 2 GiB copy hides. Cached per size and mode."""
    if device != "cuda" or nbytes < 8:
        return None
    key = (nbytes, graph)
    if key not in _SAME_SIZE_COPY:
        _SAME_SIZE_COPY[key] = _copy_gbps(nbytes, device, graph)
    return _SAME_SIZE_COPY[key]


def copy_columns(case, row: dict, device: str, copy: float | None, own: bool) -> dict:
    """A memory-bound row's GB/s as a % of the device copy bandwidth ``copy`` measured in the run, launched and (when
    timed) replayed in a CUDA graph; for r4b's own rows (``own``) also of a copy of the same bytes (half read, half
    written): the op's own ceiling, launch and last-wave costs included. Empty without a copy reading or GB/s."""
    if not copy or not row.get("gbps"):
        return {}
    out = {"copy_gbps": copy, "pct_of_copy": 100 * row["gbps"] / copy}
    if row.get("graph_gbps"):
        out["pct_of_copy_graph"] = 100 * row["graph_gbps"] / copy
    if case.bytes and own:
        same = same_size_copy_gbps(case.bytes, device, graph=False)
        out.update(same_copy_gbps=same, pct_of_same_copy=100 * row["gbps"] / same)
        if row.get("graph_gbps"):
            same_g = same_size_copy_gbps(case.bytes, device, graph=True)
            out.update(same_copy_graph_gbps=same_g, pct_of_same_copy_graph=100 * row["graph_gbps"] / same_g)
    return out


def results_dir(device: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower() or device
    if device != "cuda":
        slug = f"cpu-{slug}"  # CPU smoke runs are not results (git ignores bench/results/*-cpu-*)
    out = ROOT / "results" / f"{datetime.date.today().isoformat()}-{slug}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical tensors (a NaN equal to the same NaN, unlike torch.equal): same dtype and the same bits."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def max_rel_err(out: object, ref: object) -> float:
    """Largest ``max|out - ref| / max|ref|`` over the paired tensors of two (nested tuple/list of) tensors,
    in float64; ``inf`` when their structure or shapes differ."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(outs) != len(refs):
        return float("inf")
    worst = 0.0
    for o, r in zip(outs, refs, strict=True):
        if isinstance(o, (tuple, list)) or isinstance(r, (tuple, list)):
            worst = max(worst, max_rel_err(o, r))
            continue
        if not (isinstance(o, torch.Tensor) and isinstance(r, torch.Tensor)) or o.shape != r.shape:
            return float("inf")
        o64, r64 = o.detach().double(), r.detach().double()
        scale = r64.abs().max().item() if r64.numel() else 0.0
        diff = (o64 - r64).abs().max().item() if r64.numel() else 0.0
        worst = max(worst, diff / max(scale, 1e-30))
    return worst


def run_bench(
    op: str,
    cases: list[Case],
    providers: dict[str, Callable[[Case], Callable[[], object]]],
    *,
    device: str,
    quick: bool = False,
    extra_columns: Callable[[Case, dict], dict] | None = None,
    check_tol: float | None = None,
    reference: Callable[[Case], object] | None = None,
    write: bool = True,
    prior_rows: list[dict] | None = None,
    graph: bool = False,
) -> list[dict]:
    """Time every provider on every case; return the rows and write JSON + markdown + PNG.

    With ``check_tol``, each provider's callable is run once before timing and its result (tensors) compared
    with that of the first provider that ran for the case (the reference, e.g. eager torch): the row gets
    ``err`` (:func:`max_rel_err`) and ``check`` ("ref", "ok" or "MISMATCH" when ``err > check_tol``). This
    flags a provider that computes something else (other inputs, another loss), so that no row compares
    unlike work; it is a guard of the bench, not the kernels' correctness test (tests/ do that). A callable with
    the attribute ``unchecked = True`` (a part of the work, timed to split another row's time) gets ``check``
    "n/a" and is not run before timing. With ``reference`` as well, every provider is compared with
    ``reference(case)`` instead (e.g. an fp32 reference output built with the case's inputs; called after the first
    provider's setup, so it may read inputs that setup built), and no row is "ref".

    ``prior_rows`` (rows of an earlier pass of the same op) come first in the returned rows and the files.

    With ``graph`` (GPU only), each call is also captured in a CUDA graph and its replays timed: ``graph_ms`` and
    ``graph_gbps`` are the GPU's time without the host's launch cost, which for a sub-millisecond op can be most
    of ``ms`` (``graph_error`` says why a provider could not be captured).
    """
    rows: list[dict] = list(prior_rows or [])
    for case in cases:
        ref_out = None
        for name, setup in providers.items():
            row: dict = {"op": op, "case": case.label, "provider": name}
            row.update({f"p_{k}": v for k, v in case.params.items()})
            try:
                fn = setup(case)
                if check_tol is not None and getattr(fn, "unchecked", False):
                    row["check"] = "n/a"  # a partial-work row (e.g. a loss's GEMMs alone): nothing to compare
                elif check_tol is not None:
                    out = fn()
                    if ref_out is None and reference is not None:
                        ref_out = reference(case)
                    if ref_out is None:
                        ref_out, row["err"], row["check"] = out, 0.0, "ref"
                    else:
                        row["err"] = max_rel_err(out, ref_out)
                        row["check"] = "ok" if row["err"] <= check_tol else "MISMATCH"
                    del out
                ms, p20, p80 = time_fn(fn, device, quick=quick)
                row.update(ms=ms, ms_p20=p20, ms_p80=p80, peak_mem_gib=peak_memory_gib(fn, device))
                row["tflops"] = case.flops / ms / 1e9 if case.flops else None
                row["gbps"] = case.bytes / ms / 1e6 if case.bytes else None
                if graph and device == "cuda":
                    try:
                        gms = graph_time_ms(fn, quick=quick)
                        row.update(graph_ms=gms, graph_gbps=case.bytes / gms / 1e6 if case.bytes else None)
                    except Exception as ex:  # noqa: BLE001 - a provider that cannot be captured keeps its row
                        row["graph_error"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:160] if str(ex) else ''}"
                del fn
            except Skip as why:
                row["skipped"] = str(why)
            except torch.OutOfMemoryError as ex:  # a provider running out of memory is a result, not a crash
                row["skipped"] = f"out of memory: {str(ex).splitlines()[0][:160]}"
            except Exception as ex:  # report and go on: one broken provider must not hide the others
                row["skipped"] = f"error: {type(ex).__name__}: {str(ex).splitlines()[0][:200] if str(ex) else ''}"
            if extra_columns is not None and "skipped" not in row:
                row.update(extra_columns(case, row))
            rows.append(row)
            if device == "cuda":
                torch.cuda.empty_cache()
            print(format_row(row), flush=True)
            if write:  # after every row, so that a bench stopped at its time limit keeps what it measured
                write_results(op, rows, device, plot=False)
        del ref_out
    if write:
        write_results(op, rows, device)
    return rows


def format_row(row: dict) -> str:
    if "skipped" in row:
        return f"{row['op']:>24} | {row['case']:<36} | {row['provider']:<18} | skipped: {row['skipped']}"
    extras = []
    for key in ("tflops", "gbps", "peak_mem_gib", "x_floor", "err"):
        if row.get(key) is not None:
            extras.append(f"{key}={row[key]:.3g}")
    if row.get("check") == "MISMATCH":
        extras.append("MISMATCH")
    return f"{row['op']:>24} | {row['case']:<36} | {row['provider']:<18} | {row['ms']:9.3f} ms  " + " ".join(extras)


def _markdown(op: str, rows: list[dict], env: dict) -> str:
    cols = ["case", "provider", "ms", "ms_p20", "ms_p80", "tflops", "gbps", "peak_mem_gib"]
    skip = ("op", "skipped")
    extra = sorted({k for r in rows for k in r if k not in cols and not k.startswith("p_") and k not in skip})
    cols += extra + ["skipped"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    lines = [
        f"# {op}",
        "",
        f"{env['date']} on {env['device_name']} ({env['device']}); torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['commit']}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(op: str, rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    done = [r for r in rows if "skipped" not in r]
    if not done:
        return
    cases = list(dict.fromkeys(r["case"] for r in done))
    provs = list(dict.fromkeys(r["provider"] for r in done))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) * max(1, len(provs)) / 2), 4))
    width = 0.8 / max(1, len(provs))
    for j, p in enumerate(provs):
        xs, ys = [], []
        for i, c in enumerate(cases):
            m = [r for r in done if r["case"] == c and r["provider"] == p]
            if m:
                xs.append(i + j * width)
                ys.append(m[0]["ms"])
        ax.bar(xs, ys, width=width, label=p)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, rotation=15, fontsize=7)
    ax.set_ylabel("ms (median, lower is better)")
    ax.set_title(op)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(op: str, rows: list[dict], device: str, *, plot: bool = True) -> Path:
    env = environment(device)
    out = results_dir(device)
    _write_atomic(out / f"{op}.json", json.dumps({"env": env, "rows": rows}, indent=1, default=str))
    _write_atomic(out / f"{op}.md", _markdown(op, rows, env))
    if plot:
        _plot(op, rows, out / f"{op}.png")
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def backend_provider(op: str, backend: str, device: str, make: Callable[[Case], Callable[[], object]]):
    """A provider running r4b's ``backend`` of ``op``: skips with the reason when that backend cannot run here,
    otherwise ``make(case)`` builds the inputs and returns the call to time."""
    from r4b.kernels._dispatch import why_unavailable

    def setup(case: Case) -> Callable[[], object]:
        why = why_unavailable(op, backend, device)
        if why is not None:
            raise Skip(f"{backend} backend unavailable for {op} on {device}: {why}")
        return make(case)

    return setup


def sm90_compile(kern, constexprs: dict, sig_of: Callable[[str], str], warps: int, stages: int,
                 divisible: tuple[str, ...] = (), maxnreg: int | None = None):
    """Compile the Triton JIT function ``kern`` for sm_90 without a GPU and return triton's compiled kernel (its
    ``asm["ptx"]``, ``metadata``). ``constexprs`` fixes the constexpr arguments, ``sig_of(name)`` gives each other
    argument's type ("*bf16", "i32", ...); pointers and strides get the divisibility-by-16 hint the runtime gives
    them, and so do the integers named in ``divisible`` (specialised arguments whose value at the shape of
    interest is a multiple of 16); other integers none. ``maxnreg``: ptxas's register cap per thread (triton's
    option; None: ptxas's own choice). Needs TRITON_INTERPRET unset."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("--aot needs TRITON_INTERPRET unset (the kernels must be JIT functions)")
    names = kern.arg_names
    sig = {n: "constexpr" if n in constexprs else sig_of(n) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or n.startswith("stride") or n in divisible}
    if getattr(kern, "is_gluon", lambda: False)():  # a Gluon kernel compiles from its own source kind
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    src = ASTSource(fn=kern, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def global_memory_ops(ptx: str) -> dict[str, int]:
    """How many of each global load / store instruction the PTX holds (``ld.global.v4.b32`` is a 16-byte vector
    access, ``ld.global.b16`` a single bf16 element)."""
    counts: dict[str, int] = {}
    for op in re.findall(r"\b((?:ld|st)\.global[\w.]*)", ptx):
        counts[op] = counts.get(op, 0) + 1
    return counts


def ptxas_report(compiled) -> str:
    """ptxas's register / spill report (triton's bundled ptxas, sm_90a) of a kernel from :func:`sm90_compile`, with
    its "Potential Performance Loss" warnings when it gives any (C7510-C7515: wgmma.mma_async serialised, e.g. for
    insufficient register resources: every tensor-core product then waits for the one before, whatever the PTX's
    wgmma.wait_group depths say; a withdrawn warp-specialised Gluon dK/dV kernel had it, 2026-11-27)."""
    import subprocess
    import tempfile

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True,
                           check=True)
    finally:
        os.unlink(f.name)
    return "; ".join(line.split(":", 1)[-1].strip() for line in r.stderr.splitlines()
                     if "registers" in line or "spill" in line or "Potential Performance Loss" in line)


def sass(compiled) -> str:
    """The SASS of a kernel from :func:`sm90_compile` (its cubin through triton's bundled nvdisasm)."""
    import subprocess
    import tempfile

    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def mma_loop_local_ops(sass_text: str) -> tuple[int, int]:
    """(loops, local memory ops) of the innermost loops that run tensor-core products: a loop is the address range
    from the target of a conditional backward branch to the branch (the retry loops of mbarrier waits hold no
    HGMMA, the unconditional jumps back from out-of-line code are not loops); of those holding an HGMMA, the ones
    holding no other such loop; and the LDL / STL instructions inside them (spill traffic in the hot loop; ptxas's
    spill bytes also count stores before and after it, once per tile or segment)."""
    at: dict[str, int] = {}
    pending: list[str] = []
    ins: list[tuple[int, str]] = []
    for line in sass_text.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line.strip())
        if label:
            pending.append(label.group(1))
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if m:
            addr = int(m.group(1), 16)
            at.update((name, addr) for name in pending)
            pending = []
            ins.append((addr, m.group(2)))
    back = []
    for addr, text in ins:
        m = re.match(r"@!?U?P\w+\s+BRA\s+`\((\.L_x_\d+)\)", text)
        if m and at[m.group(1)] <= addr:
            back.append((at[m.group(1)], addr))
    mma = {(s, e) for s, e in back if any(s <= a <= e and re.match(r"(@!?U?P\w+\s+)?HGMMA", text) for a, text in ins)}
    inner = [(s, e) for s, e in mma if not any(o != (s, e) and s <= o[0] and o[1] <= e for o in mma)]
    local = sum(1 for s, e in inner for a, text in ins if s <= a <= e and re.match(r"(@!?U?P\w+\s+)?(LDL|STL)\b", text))
    return len(inner), local


def sm90_ptxas(kern, constexprs: dict, sig_of: Callable[[str], str], warps: int, stages: int) -> tuple[str, int]:
    """Compile ``kern`` for sm_90 (:func:`sm90_compile`) and return (ptxas's register / spill report, shared
    memory bytes)."""
    compiled = sm90_compile(kern, constexprs, sig_of, warps, stages)
    return ptxas_report(compiled), compiled.metadata.shared


def matmul_floor_columns(device: str) -> Callable[[Case, dict], dict] | None:
    """Measure the bf16 matmul rate and return ``extra_columns`` giving each row's time over the matmul floor of
    its case's FLOPs (``floor_ms``, ``x_floor``); None without a GPU.

    The rate moves with the card's clocks: on one H100 (2026-11-26) it read 767 TFLOP/s in one bench and 703 in
    the next, which moved the same 57 ms loss from 1.15x to 1.06x "the floor". So each row's floor is the
    faster of two readings: the best of three taken when the bench starts, and one taken right after the row
    (``matmul_tflops``); ``floor_tflops`` is the one its x_floor uses. Every row gets the same rule, whatever
    the rows before it read."""
    first = [matmul_floor_tflops(device) for _ in range(3)]
    if first[0] is None:
        return None
    start = max(first)
    print(f"matmul floor: {start:.1f} TFLOP/s (8192^3 bf16, best of {', '.join(f'{f:.0f}' for f in first)})",
          flush=True)

    def extra(case: Case, row: dict) -> dict:
        if not case.flops:
            return {}
        now = matmul_floor_tflops(device)
        floor = max(start, now)
        floor_ms = case.flops / floor / 1e9
        return {"floor_ms": floor_ms, "x_floor": row["ms"] / floor_ms, "matmul_tflops": now,
                "floor_tflops": floor}

    return extra
