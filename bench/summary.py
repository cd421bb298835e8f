"""Print a short table of a results folder: per op and case, each provider's time, its ratio to r4b's best,
its ratio to the matmul floor and the bench's result check against the reference provider.

python -m bench.summary [--latest | DIR] [--copy-to DIR]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def latest_dir() -> Path | None:
    dirs = [d for d in RESULTS.iterdir() if d.is_dir() and "-cpu-" not in d.name]
    dirs.sort(key=lambda d: d.stat().st_mtime)
    return dirs[-1] if dirs else None


def table(folder: Path) -> str:
    lines = [f"results: {folder}", f"{'op':<22} {'case':<34} {'provider':<22} {'ms':>9} {'TF/s':>7} {'GB/s':>7} "
             f"{'GiB':>6} {'x r4b':>6} {'xfloor':>6} {'%copy':>7} check"]
    for f in sorted(folder.glob("*.json")):
        data = json.loads(f.read_text())
        rows = data["rows"]
        env = data.get("env", {})
        for case in dict.fromkeys(r["case"] for r in rows):
            rs = [r for r in rows if r["case"] == case]
            # r4b's own rows (not a baseline of the unfused kernels a fused op replaces)
            mine = [r for r in rs if r["provider"].startswith("r4b") and "unfused" not in r["provider"]
                    and "skipped" not in r]
            best = min((r["ms"] for r in mine), default=None)
            for r in rs:
                if "skipped" in r:
                    lines.append(f"{r['op']:<22} {case:<34} {r['provider']:<22} skipped: {r['skipped'][:60]}")
                    continue
                fmt = lambda v, p: f"{v:>{p}.3g}" if isinstance(v, (int, float)) else " " * p
                ratio = r["ms"] / best if best else None
                check = r.get("check", "")
                if check != "ref" and r.get("err") is not None:  # none on an unchecked ("n/a") row
                    check += f" {r['err']:.1e}"
                # % of the copy bandwidth (small ops), "launched/graph-replayed" when the bench timed a CUDA graph
                pct = r.get("pct_of_copy", r.get("pct_copy"))
                pct_s = "" if pct is None else f"{pct:.0f}"
                if r.get("pct_of_copy_graph") is not None:
                    pct_s += f"/{r['pct_of_copy_graph']:.0f}"
                if r.get("pct_of_same_copy") is not None:  # and of a copy of the same bytes, after "s"
                    pct_s += f" s{r['pct_of_same_copy']:.0f}"
                    if r.get("pct_of_same_copy_graph") is not None:
                        pct_s += f"/{r['pct_of_same_copy_graph']:.0f}"
                lines.append(f"{r['op']:<22} {case:<34} {r['provider']:<22} {r['ms']:>9.3f} {fmt(r.get('tflops'), 7)} "
                             f"{fmt(r.get('gbps'), 7)} {fmt(r.get('peak_mem_gib'), 6)} {fmt(ratio, 6)} "
                             f"{fmt(r.get('x_floor'), 6)} {pct_s:>7} {check}".rstrip())
        lines.append(f"  ({f.stem}: {env.get('device_name')}, torch {env.get('torch')}, commit {env.get('commit')})")
    return "\n".join(lines)


# the issues' targets: (op, case prefix, r4b rows, peer row, metric, target); metric "tflops" is r4b / peer
# (higher is better), "x_floor" r4b's own ratio to the matmul floor (lower is better)
TARGETS = [  # at the issues' anchor shapes (docs/ANCHORS.md): 16384 packed tokens, N=16384
    ("varlen_attention", "fwd T=16384,", "r4b", "sdpa per doc", "tflops", 1.2),
    ("varlen_attention", "fwd+bwd T=16384,", "r4b", "flex doc mask", "tflops", 1.3),
    # the same from a subset run (bench_varlen_attention --anchor --providers ...: e.g. the ws rows), its own peers
    ("varlen_attention_subset", "fwd T=16384,", "r4b", "sdpa per doc", "tflops", 1.2),
    ("varlen_attention_subset", "fwd+bwd T=16384,", "r4b", "flex doc mask", "tflops", 1.3),
    ("grpo_loss", "N=16384,", "r4b", None, "x_floor", 1.10),
]


def targets(folder: Path) -> str:
    """One line per (target, case): r4b's best row against the peer (or the floor) and the target, so the result
    of a GPU run reads at a glance."""
    lines = ["targets (best r4b row per case):"]
    for op, prefix, mine, peer, metric, want in TARGETS:
        f = folder / f"{op}.json"
        if not f.exists():
            continue
        rows = [r for r in json.loads(f.read_text())["rows"] if "skipped" not in r and r["case"].startswith(prefix)
                and "MISMATCH" not in str(r.get("check", ""))]
        for case in dict.fromkeys(r["case"] for r in rows):
            rs = [r for r in rows if r["case"] == case]
            ours = [r for r in rs if r["provider"].startswith(mine) and r.get(metric) is not None]
            if not ours:
                continue
            if metric == "tflops":
                best = max(ours, key=lambda r: r["tflops"])
                ref = next((r for r in rs if r["provider"] == peer and r.get("tflops")), None)
                if ref is None:
                    lines.append(f"  {op} {case}: {peer} missing (skipped, cut or MISMATCH): no ratio")
                    continue
                got = best["tflops"] / ref["tflops"]
                ok = got >= want
                lines.append(f"  {op} {case}: {best['provider']} {got:.2f}x {peer} (target >= {want}x) "
                             f"{'MET' if ok else 'not met'}")
            else:
                best = min(ours, key=lambda r: r[metric])
                got = best[metric]
                ok = got <= want
                mem = ""
                lean = next((r for r in rs if r["provider"] == "liger chunked" and r.get("peak_mem_gib")), None)
                if lean is not None and best.get("peak_mem_gib") is not None:
                    mem_ok = best["peak_mem_gib"] <= lean["peak_mem_gib"]
                    mem = (f"; peak {best['peak_mem_gib']:.2f} GiB vs liger chunked {lean['peak_mem_gib']:.2f} "
                           f"(target <=) {'MET' if mem_ok else 'not met'}")
                gemms = next((r for r in rs if r["provider"] == "cublas gemms only" and r.get("ms")), None)
                split = ""
                if best.get("matmul_tflops") and best.get("floor_tflops"):  # the card's rate right after the row
                    split = (f"; {got * best['matmul_tflops'] / best['floor_tflops']:.3f}x the matmul rate read "
                             f"right after it ({best['matmul_tflops']:.0f} vs {best['floor_tflops']:.0f} TFLOP/s)")
                if gemms is not None:  # r4b's time over its GEMMs alone, and those GEMMs' own x floor
                    split += (f"; {best['ms'] / gemms['ms']:.3f}x its GEMMs alone (which are "
                             f"{gemms[metric]:.3f}x floor)")
                lines.append(f"  {op} {case}: {best['provider']} {got:.3f}x floor (target <= {want}x) "
                             f"{'MET' if ok else 'not met'}{mem}{split}")
    lines += _small_op_targets(folder)
    lines += _paged_targets(folder)
    lines += _generate_lines(folder)
    lines += _prefill_lines(folder)
    return "\n".join(lines)


SMALL_OP_TARGET = 85.0  # % of the copy bandwidth (issue 5's small ops)


def _prefill_lines(folder: Path) -> list[str]:
    """Per case of bench_paged_prefill: r4b's flash kernel against SDPA on contiguous K/V and against the decode-rows
    way, by time (checked rows only). Informational (no issue asks for the engine yet)."""
    f = folder / "paged_prefill.json"
    if not f.exists():
        return []
    rows = [r for r in json.loads(f.read_text())["rows"] if "skipped" not in r and r.get("ms")
            and r.get("check") == "ok"]
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {r["provider"]: r for r in rows if r["case"] == case}
        mine = by.get("r4b triton")
        if mine is None:
            continue
        line = f"  paged_prefill {case}: r4b triton {mine['ms']:.4g} ms"
        for peer in ("SDPA contiguous KV", "r4b decode rows"):
            if peer in by:
                line += f"; {by[peer]['ms'] / mine['ms']:.2f}x as fast as {peer}"
        out.append(line + " (informational: no issue yet)")
    return out


def _generate_lines(folder: Path) -> list[str]:
    """Per case of bench_generate: r4b's new tokens/s against transformers' generate in the same run, and at batch
    1 its time a step over the weight-read floor. Informational (no issue asks for the engine yet)."""
    f = folder / "generate.json"
    if not f.exists():
        return []
    rows = [r for r in json.loads(f.read_text())["rows"] if "skipped" not in r and r.get("tokens_per_s")]
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        cached = next((r for r in rows if r["case"] == case and r["provider"] == "r4b, prefix cache"), None)
        if cached is not None:  # the shared-system-prompt case: r4b with its prefix cache against without
            line = f"  generate {case}: prefix cache {cached['tokens_per_s']:.4g} tok/s"
            line += (f", {cached['x_cold']:.2f}x without it" if cached.get("x_cold") else "; uncached missing")
            line += f"; {cached.get('prompt_tokens_a_call', 0):.0f} prompt tokens computed a call"
            if cached.get("same"):
                line += f"; same greedy tokens in {cached['same']} sequences"
            out.append(line + " (informational: no issue yet)")
            continue
        mine = next((r for r in rows if r["case"] == case and r["provider"].startswith("r4b")), None)
        peer = next((r for r in rows if r["case"] == case and r["provider"].startswith("transformers")), None)
        if mine is None:
            continue
        line = f"  generate {case}: r4b {mine['tokens_per_s']:.4g} tok/s"
        line += (f", {mine['tokens_per_s'] / peer['tokens_per_s']:.2f}x transformers' {peer['tokens_per_s']:.4g}"
                 if peer is not None else "; transformers missing: no ratio")
        if mine.get("x_floor"):
            line += f"; {mine['x_floor']:.2f}x the weight-read floor a step"
        if mine.get("same"):
            line += f"; greedy tokens equal to transformers' in {mine['same']} sequences"
        out.append(line + " (informational: no issue yet)")
    return out


def _small_op_targets(folder: Path) -> list[str]:
    """Per small-op case, r4b's % of the device copy bandwidth as launched from Python, as replayed in a CUDA
    graph (no launch cost), as launched under torch.compile with CUDA graphs (reduce-overhead, shown only) where
    measured, and of a copy of the same bytes where measured: MET when launched, "MET in a graph" when only the
    graph replay reaches the target."""
    f = folder / "norms.json"
    if not f.exists():
        return []
    out = []
    rows = json.loads(f.read_text())["rows"]
    # r4b's ops under torch.compile with CUDA graphs (bench_norms.COMPILED), launched: per case
    compiled = {r.get("case"): r["pct_of_copy"] for r in rows
                if r.get("provider") == "r4b compiled reduce-overhead" and r.get("pct_of_copy") is not None}
    for r in rows:
        if r.get("provider") != "r4b triton" or r.get("pct_of_copy") is None \
                or "MISMATCH" in str(r.get("check", "")):
            continue
        launched, graph, comp = r["pct_of_copy"], r.get("pct_of_copy_graph"), compiled.get(r["case"])
        status = ("MET" if launched >= SMALL_OP_TARGET else
                  "MET in a graph" if graph is not None and graph >= SMALL_OP_TARGET else "not met")
        same = ""
        if r.get("pct_of_same_copy") is not None:
            same = f"; of a same-size copy {r['pct_of_same_copy']:.0f}%"
            if r.get("pct_of_same_copy_graph") is not None:
                same += f" / {r['pct_of_same_copy_graph']:.0f}%"
        g = f" / {graph:.0f}% in a graph" if graph is not None else ""
        # (informational: a fwd+bwd compiled row also times the CUDA graph's copy of the output gradient)
        g += f" / {comp:.0f}% compiled (reduce-overhead)" if comp is not None else ""
        out.append(f"  norms {r['case']}: {launched:.0f}% of copy launched{g}{same} (target >= "
                   f"{SMALL_OP_TARGET:.0f}%) {status}")
    # a fused op against the unfused kernels it replaces (qk_norm_rope), in the same run
    by = {(r.get("case"), r.get("provider")): r for r in json.loads(f.read_text())["rows"]
          if r.get("ms") and "MISMATCH" not in str(r.get("check", ""))}
    for (case, prov), r in by.items():
        u = by.get((case, "r4b triton unfused"))
        if prov != "r4b triton" or u is None:
            continue
        line = f"  norms {case}: fused {r['ms']:.3f} ms vs unfused {u['ms']:.3f} ms launched ({u['ms'] / r['ms']:.2f}x)"
        if r.get("graph_ms") and u.get("graph_ms"):
            line += f", {r['graph_ms']:.3f} vs {u['graph_ms']:.3f} in a graph ({u['graph_ms'] / r['graph_ms']:.2f}x)"
        out.append(line)
    return out


# paged decode attention (bench_paged_attention): % of the copy bandwidth and the SDPA contiguous-KV peer's GB/s.
# Informational: the op has no issue yet, so its lines say so and judge nothing else.
DECODE_TARGET = 85.0
DECODE_PEER = "SDPA contiguous KV"


def _paged_targets(folder: Path) -> list[str]:
    """Per case of bench_paged_attention, r4b's best row by GB/s (checked, launched from Python): decode cases against
    >= DECODE_TARGET % of the copy bandwidth (MET launched, or "MET in a graph" when only its CUDA-graph replay
    reaches it) and >= the SDPA contiguous-KV peer's GB/s (launched, and graph replay against graph replay where
    both were captured); store_kv cases shown against the copy bandwidth and the torch index_put peer."""
    f = folder / "paged_attention.json"
    if not f.exists():
        return []
    rows = [r for r in json.loads(f.read_text())["rows"] if "skipped" not in r and r.get("gbps")
            and "MISMATCH" not in str(r.get("check", ""))]
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case]
        mine = [r for r in rs if r["provider"].startswith("r4b")]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["gbps"])
        decode = case.startswith("decode")
        peer_name = DECODE_PEER if decode else "torch index_put"
        peer = next((r for r in rs if r["provider"] == peer_name), None)
        line = f"  paged_attention {case}: {best['provider']} {best['gbps']:.4g} GB/s"
        pct, graph = best.get("pct_of_copy"), best.get("pct_of_copy_graph")
        if pct is not None:
            line += f", {pct:.0f}% of copy launched" + (f" / {graph:.0f}% in a graph" if graph is not None else "")
            if best.get("pct_of_same_copy") is not None:
                line += f"; of a same-size copy {best['pct_of_same_copy']:.0f}%"
                if best.get("pct_of_same_copy_graph") is not None:
                    line += f" / {best['pct_of_same_copy_graph']:.0f}%"
            if decode:
                status = ("MET" if pct >= DECODE_TARGET else
                          "MET in a graph" if graph is not None and graph >= DECODE_TARGET else "not met")
                line += f" (target >= {DECODE_TARGET:.0f}%) {status}"
        if peer is None:
            line += f"; {peer_name} missing (skipped, cut or MISMATCH): no ratio"
        else:
            ratio = best["gbps"] / peer["gbps"]
            g_ratio = (best["graph_gbps"] / peer["graph_gbps"]
                       if best.get("graph_gbps") and peer.get("graph_gbps") else None)
            line += f"; {ratio:.2f}x {peer_name}'s GB/s" + (f" / {g_ratio:.2f}x in a graph" if g_ratio else "")
            if decode:
                status = ("MET" if ratio >= 1 else "MET in a graph" if g_ratio is not None and g_ratio >= 1
                          else "not met")
                line += f" (target >= 1x) {status}"
        out.append(line + " [informational: no issue yet]")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    copy_to = None
    if "--copy-to" in argv:
        i = argv.index("--copy-to")
        copy_to = Path(argv[i + 1])
        del argv[i : i + 2]
    folder = latest_dir() if (not argv or argv[0] == "--latest") else Path(argv[0])
    if folder is None or not folder.exists():
        print("no GPU results found under bench/results/")
        return 1
    text = table(folder) + "\n" + targets(folder)
    print(text)
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        (copy_to / "summary.txt").write_text(text + "\n")
        # one archive: the device tool brings back at most 8 files from $OUT
        shutil.make_archive(str(copy_to / "results"), "gztar", root_dir=folder.parent, base_dir=folder.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
