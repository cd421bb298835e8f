"""The benchmark harness: timing rows, skips and failing providers reported (not raised), result files."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from bench import harness
from bench.__main__ import main as bench_main
from bench.__main__ import names


def test_run_bench_rows(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "results_dir", lambda device: tmp_path)
    x = torch.randn(1000)

    def broken(case):
        raise RuntimeError("kernel exploded")

    def skipped(case):
        raise harness.Skip("not on this machine")

    cases = [harness.Case("n=1000", {"n": 1000}, flops=2000.0, bytes=8000.0)]
    rows = harness.run_bench("toy", cases, {"mul": lambda case: (lambda: x * 2), "skip": skipped, "broken": broken},
                             device="cpu", quick=True)
    by = {r["provider"]: r for r in rows}
    assert by["mul"]["ms"] > 0 and by["mul"]["ms_p20"] <= by["mul"]["ms_p80"]
    assert by["mul"]["gbps"] == 8000.0 / by["mul"]["ms"] / 1e6 and by["mul"]["p_n"] == 1000
    assert by["skip"]["skipped"] == "not on this machine"
    assert by["broken"]["skipped"].startswith("error: RuntimeError: kernel exploded")
    data = json.loads((tmp_path / "toy.json").read_text())
    assert data["env"]["device"] == "cpu" and len(data["rows"]) == 3
    assert "| n=1000 | mul |" in (tmp_path / "toy.md").read_text()


def test_backend_provider_skips_unavailable_backend():
    make = harness.backend_provider("pack", "cuda", "cpu", lambda case: (lambda: None))
    try:
        make(harness.Case("c", {}))
    except harness.Skip as why:
        assert "cuda backend unavailable for pack on cpu" in str(why)
    else:
        raise AssertionError("expected Skip")


def test_bench_registry():
    assert {"group_advantages", "pack", "grpo_loss", "fused_linear", "varlen_attention", "norms",
            "model_step", "paged_attention", "generate", "paged_prefill"} <= set(names())
    assert bench_main(["--list"]) == 0
    assert bench_main(["nope"]) == 2


def test_max_rel_err():
    a = torch.tensor([1.0, -2.0, 4.0])
    assert harness.max_rel_err(a, a) == 0.0
    assert harness.max_rel_err((a, a + 0.04), (a, a)) == pytest.approx(0.01, rel=1e-5)  # 0.04 / max|ref|
    assert harness.max_rel_err(a, a[:2]) == float("inf")
    assert harness.max_rel_err((a,), (a, a)) == float("inf")


def test_run_bench_check_flags_a_provider_that_computes_something_else(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "results_dir", lambda device: tmp_path)
    x = torch.randn(100)
    cases = [harness.Case("n=100", {"n": 100})]
    provs = {"ref": lambda case: (lambda: x * 2), "same": lambda case: (lambda: x + x),
             "other": lambda case: (lambda: x * 2.1)}
    rows = harness.run_bench("toy", cases, provs, device="cpu", quick=True, check_tol=1e-6)
    by = {r["provider"]: r for r in rows}
    assert by["ref"]["check"] == "ref" and by["same"]["check"] == "ok"
    assert by["other"]["check"] == "MISMATCH" and abs(by["other"]["err"] - 0.05) < 1e-6
    assert "MISMATCH" in harness.format_row(by["other"])
    # with a reference output, every provider (the first too) is compared with it, and no row is "ref"
    rows = harness.run_bench("toy", cases, provs, device="cpu", quick=True, check_tol=1e-6,
                             reference=lambda case: x * 2.1)
    by = {r["provider"]: r for r in rows}
    assert by["ref"]["check"] == by["same"]["check"] == "MISMATCH" and by["other"]["check"] == "ok"
    assert abs(by["ref"]["err"] - 0.1 / 2.1) < 1e-6


@pytest.mark.parametrize("name", ["grpo_loss", "fused_linear"])
def test_loss_bench_providers_compute_the_same_loss(name, monkeypatch, tmp_path):
    """Every provider of the loss benches (r4b's backends, and Liger's when it is installed) runs on the CPU at
    the --quick shapes and its gradients / log-probs match eager torch's (the bench's own check)."""
    monkeypatch.setattr(harness, "results_dir", lambda device: tmp_path)
    monkeypatch.setattr(harness, "time_fn", lambda fn, device, quick=False: (1.0, 1.0, 1.0))  # no timing here
    monkeypatch.setattr(harness, "peak_memory_gib", lambda fn, device: None)
    mod = importlib.import_module(f"bench.bench_{name}")
    rows = mod.main(["--quick"])
    ran = [r for r in rows if "skipped" not in r]
    assert not [r for r in rows if r.get("skipped", "").startswith("error")], rows
    assert {r["provider"] for r in ran} >= {"torch eager", "r4b torch (chunked)", "r4b triton chunked"}
    partial = [r for r in ran if r["check"] == "n/a"]  # a part of the work (the GRPO loss's GEMMs alone)
    assert [r["provider"] for r in partial] == (["cublas gemms only"] if name == "grpo_loss" else [])
    assert all(r["check"] in ("ref", "ok") for r in ran if r not in partial), \
        [(r["provider"], r.get("err")) for r in ran]


def test_model_step_bench_providers_compute_the_same_loss(monkeypatch, tmp_path):
    """The end-to-end bench at its --quick size (2 layers, 4 documents) under the interpreter: r4b's step, r4b's with
    the unfused small ops (the fused ops really swapped out for the call, and back after it) and transformers'
    padded-batch step give the same loss (fp32: the bench's own check at 1e-4)."""
    pytest.importorskip("transformers")
    import r4b.kernels as K
    from bench import bench_model_step as mod

    monkeypatch.setattr(harness, "results_dir", lambda device: tmp_path)
    monkeypatch.setattr(harness, "time_fn", lambda fn, device, quick=False: (1.0, 1.0, 1.0))  # no timing here
    monkeypatch.setattr(harness, "peak_memory_gib", lambda fn, device: None)
    calls = []
    real = K.add_rms_norm
    monkeypatch.setattr(K, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = K.add_rms_norm
    rows = mod.main(["--quick"])
    # (the compiled model's row is the GPU's: tests/test_compile.py compiles the model on the CPU)
    assert [r["provider"] for r in rows if "skipped" in r] == ["r4b torch.compile (model)"], rows
    rows = [r for r in rows if "skipped" not in r]
    assert [(r["provider"], r["check"]) for r in rows] == [
        ("r4b (default)", "ref"), ("r4b unfused small ops", "ok"), ("r4b gradient checkpointing", "ok"),
        ("transformers (sdpa, padded)", "ok")], rows
    # the default step called the fused op for every norm but the first (2 layers: 3 of 4 norms + the final one);
    # the unfused one did not, and restored it; the checkpointing one called it 4 times and 3 more in the layers'
    # recomputed forwards
    assert len(calls) == 4 + 7 and K.add_rms_norm is fused
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 for r in rows)


def test_summary_targets_compare_the_best_r4b_row_with_the_peer_and_skip_mismatches(tmp_path):
    from bench.summary import targets

    case = "fwd T=16384,docs=10"
    rows = [{"case": case, "provider": "sdpa per doc", "tflops": 400.0},
            {"case": case, "provider": "r4b triton", "tflops": 420.0},
            {"case": case, "provider": "r4b gluon", "tflops": 500.0},
            {"case": case, "provider": "r4b fast but wrong", "tflops": 900.0, "check": "MISMATCH"}]
    (tmp_path / "varlen_attention.json").write_text(json.dumps({"rows": rows}))
    grpo = [{"case": "N=16384,H=2560", "provider": "liger chunked", "x_floor": 16.0, "peak_mem_gib": 3.0},
            {"case": "N=16384,H=2560", "provider": "r4b triton chunked", "x_floor": 1.12, "peak_mem_gib": 1.8},
            {"case": "N=4096,H=2560", "provider": "r4b triton chunked", "x_floor": 1.3}]  # not an anchor
    (tmp_path / "grpo_loss.json").write_text(json.dumps({"rows": grpo}))
    assert "GEMMs alone" not in targets(tmp_path)
    grpo[1].update(ms=56.0, floor_tflops=800.0, matmul_tflops=700.0)
    grpo.append({"case": "N=16384,H=2560", "provider": "cublas gemms only", "ms": 50.0, "x_floor": 1.0})
    (tmp_path / "grpo_loss.json").write_text(json.dumps({"rows": grpo}))
    out = targets(tmp_path)
    assert ("MET; 0.980x the matmul rate read right after it (700 vs 800 TFLOP/s); 1.120x its GEMMs alone "
            "(which are 1.000x floor)") in out, out
    assert "r4b gluon 1.25x sdpa per doc (target >= 1.2x) MET" in out, out
    assert "N=4096" not in out, out
    assert "r4b triton chunked 1.120x floor (target <= 1.1x) not met; peak 1.80 GiB vs liger chunked 3.00" in out
    assert "liger chunked 3.00 (target <=) MET" in out, out  # the memory target
    # the small ops: % of the copy bandwidth, launched and in a CUDA graph, and of a same-size copy
    norms = [{"case": "rms fwd", "provider": "r4b triton", "pct_of_copy": 90.0, "pct_of_copy_graph": 95.0},
             {"case": "rope fwd", "provider": "r4b triton", "pct_of_copy": 40.0, "pct_of_copy_graph": 86.0,
              "pct_of_same_copy": 60.0, "pct_of_same_copy_graph": 97.0},
             {"case": "rope bwd", "provider": "r4b triton", "pct_of_copy": 40.0, "pct_of_copy_graph": 70.0},
             {"case": "rope bwd", "provider": "torch eager", "pct_of_copy": 99.0}]
    (tmp_path / "norms.json").write_text(json.dumps({"rows": norms}))
    out = targets(tmp_path).splitlines()
    assert out[-3:] == [
        "  norms rms fwd: 90% of copy launched / 95% in a graph (target >= 85%) MET",
        "  norms rope fwd: 40% of copy launched / 86% in a graph; of a same-size copy 60% / 97% (target >= 85%) "
        "MET in a graph",
        "  norms rope bwd: 40% of copy launched / 70% in a graph (target >= 85%) not met"], out
    # a fused op against the unfused kernels it replaces, timed in the same run
    norms += [{"case": "qk fwd", "provider": "r4b triton", "ms": 0.1, "graph_ms": 0.08},
              {"case": "qk fwd", "provider": "r4b triton unfused", "ms": 0.3, "graph_ms": 0.12},
              {"case": "qk fwd", "provider": "torch eager", "ms": 1.0}]
    (tmp_path / "norms.json").write_text(json.dumps({"rows": norms}))
    assert targets(tmp_path).splitlines()[-1] == (
        "  norms qk fwd: fused 0.100 ms vs unfused 0.300 ms launched (3.00x), 0.080 vs 0.120 in a graph (1.50x)")
    norms[-3]["check"] = "MISMATCH"  # a fused op computing something else is no speed-up
    (tmp_path / "norms.json").write_text(json.dumps({"rows": norms}))
    assert "qk fwd: fused" not in targets(tmp_path)
    # launched under torch.compile with CUDA graphs (the op as a custom op): shown, not a verdict (its fwd+bwd rows
    # also time the graph's copy of the output gradient)
    norms += [{"case": "rope bwd", "provider": "r4b compiled reduce-overhead", "pct_of_copy": 88.0},
              {"case": "rms fwd", "provider": "r4b compiled reduce-overhead", "pct_of_copy": 70.0}]
    (tmp_path / "norms.json").write_text(json.dumps({"rows": norms}))
    out = targets(tmp_path)
    assert ("norms rope bwd: 40% of copy launched / 70% in a graph / 88% compiled (reduce-overhead) (target >= 85%) "
            "not met") in out, out
    assert ("norms rms fwd: 90% of copy launched / 95% in a graph / 70% compiled (reduce-overhead) (target >= 85%) "
            "MET\n") in out + "\n", out


def test_summary_table_prints_checked_reference_and_unchecked_rows(tmp_path):
    """The table prints each row's check with its error where there is one: a reference row and an unchecked
    ("n/a", a part of the work) row have none (2026-11-27, H200: an "n/a" row without "err" stopped the table)."""
    from bench.summary import table

    rows = [{"op": "grpo_loss", "case": "N=16384", "provider": "torch eager", "ms": 80.0, "check": "ref", "err": 0.0},
            {"op": "grpo_loss", "case": "N=16384", "provider": "r4b triton chunked", "ms": 56.0, "check": "ok",
             "err": 6.7e-3},
            {"op": "grpo_loss", "case": "N=16384", "provider": "cublas gemms only", "ms": 52.0, "check": "n/a"}]
    (tmp_path / "grpo_loss.json").write_text(json.dumps({"rows": rows, "env": {"device_name": "H200"}}))
    lines = table(tmp_path).splitlines()
    assert lines[2].endswith(" ref") and lines[3].endswith(" ok 6.7e-03") and lines[4].endswith(" n/a"), lines
    assert "cublas gemms only" in lines[4] and "0.929" in lines[4], lines  # 52 / 56 of r4b's best
    # an unfused baseline row (what a fused op replaces) is not one of r4b's rows: it never sets "x r4b"'s base
    rows.append({"op": "grpo_loss", "case": "N=16384", "provider": "r4b triton unfused", "ms": 28.0, "check": "ok",
                 "err": 1e-3})
    (tmp_path / "grpo_loss.json").write_text(json.dumps({"rows": rows, "env": {"device_name": "H200"}}))
    lines = table(tmp_path).splitlines()
    assert "0.929" in lines[4] and " 0.5 " in lines[5], lines  # 28 / 56


def test_varlen_bench_rows_come_in_the_order_the_targets_need():
    from bench.bench_varlen_attention import R4B_ROWS, providers

    names = list(providers("cpu", {}))
    assert names[:9] == ["sdpa per doc", "r4b triton", "flex doc mask", "r4b ws", "r4b ws fwd+bwd", "r4b gluon",
                         "r4b gluon fwd+bwd", "r4b triton gluon-dkdv", "r4b ws gluon-dkdv"], names
    assert set(names) == {"sdpa per doc", "flex doc mask", "flash-attn varlen", "xformers blockdiag", *R4B_ROWS}


def test_grpo_gemms_only_row_runs_the_chunked_loss_gemms(monkeypatch):
    """bench grpo_loss's "cublas gemms only" row times the same matrix products (ops and operand shapes, over
    several chunks, masked rows skipped) as the chunked r4b loss it splits, on the CPU with small chunks."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from bench import bench_grpo_loss as bgl
    from r4b.kernels import _fused_linear_chunked as fc

    monkeypatch.setattr(fc, "_CHUNK_BYTES", 96 * 1000 * 4)  # 96 rows of V=1000 fp32: three chunks of N=256
    mm = {torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default,
          torch.ops.aten.addmm.out, torch.ops.aten.addmm_.default}

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in mm:
                self.seen.append(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    case = bgl.cases(True)[0]
    provs = bgl.providers("cpu")
    gemms, loss = provs["cublas gemms only"](case), provs["r4b triton chunked"](case)
    with Products() as g:
        gemms()
    with Products() as r:
        loss()
    assert len(g.seen) >= 9  # three chunks, three products each
    assert sorted(g.seen) == sorted(r.seen)


def test_paged_attention_bench_providers_match_the_reference(monkeypatch, tmp_path):
    """bench paged_attention at its --quick shapes under the interpreter (fp32): every decode provider that runs here
    (SDPA on contiguous K/V, ragged contexts through a key mask included; the torch gather of the pages; r4b's Triton
    split-K) and every store_kv provider matches the fp32 torch reference before timing; the GPU-only rows skip
    with their reason, none with an error."""
    from bench import bench_paged_attention as mod

    if torch.cuda.is_available():  # there the bench runs bf16 on the GPU, its rows bench/gpu_check.sh's
        pytest.skip("the CPU smoke run of the bench (TRITON_INTERPRET=1, fp32)")
    monkeypatch.setattr(harness, "results_dir", lambda device: tmp_path)
    monkeypatch.setattr(harness, "time_fn", lambda fn, device, quick=False: (1.0, 1.0, 1.0))  # no timing here
    monkeypatch.setattr(harness, "peak_memory_gib", lambda fn, device: None)
    rows = mod.main(["--quick"])
    assert not [r for r in rows if r.get("skipped", "").startswith("error")], rows
    ran = {(r["case"], r["provider"]): r for r in rows if "skipped" not in r}
    decode = [c.label for c in mod.decode_cases(True, "cpu")]
    store = [c.label for c in mod.store_cases(True, "cpu")]
    assert any("rand" in c for c in decode)  # the ragged batch
    want = {(c, p) for c in decode for p in ("SDPA contiguous KV", "torch gather + SDPA", "r4b triton")}
    want |= {(c, p) for c in store for p in ("torch index_put", "r4b triton")}
    assert set(ran) == want, sorted(set(ran) ^ want)
    assert all(r["check"] == "ok" and r["err"] <= 1e-4 and r["gbps"] > 0 for r in ran.values()), ran
    skipped = {r["provider"]: r["skipped"] for r in rows if "skipped" in r}
    assert "cuda backend unavailable" in skipped["r4b cuda"] and "GPU" in skipped["flash-attn kvcache"], skipped
    assert json.loads((tmp_path / "paged_attention.json").read_text())["rows"] == json.loads(json.dumps(rows))


def test_paged_attention_bench_bytes_are_the_contexts_kv():
    """Decode GB/s count K and V of every context once (+ q and the output); store_kv's read k, v and write them."""
    from bench.bench_paged_attention import decode_cases, store_cases

    anchor, ragged, latency, big = decode_cases(False)
    assert anchor.label == "decode B=32,ctx=4096" and latency.params["lens"] == [4096]
    assert anchor.bytes == 2 * 32 * 4096 * 8 * 128 * 2 + 2 * 32 * 32 * 128 * 2  # 0.54 GB of KV: the anchor's
    assert ragged.bytes == 2 * sum(ragged.params["lens"]) * 8 * 128 * 2 + 2 * 32 * 32 * 128 * 2
    assert len(ragged.params["lens"]) == 32 and min(ragged.params["lens"]) >= 1 and max(ragged.params["lens"]) <= 4096
    assert big.params["B"] == 128 and big.params["lens"] == [1024] * 128
    prefill, step = store_cases(False)
    assert prefill.bytes == 4 * 16384 * 8 * 128 * 2 + 8 * 16384 and step.params["T"] == 32


def test_summary_judges_paged_decode_against_copy_bandwidth_and_sdpa(tmp_path):
    """The paged decode lines: r4b's best checked row against 85% of the copy bandwidth (launched, else in a CUDA
    graph) and the SDPA contiguous-KV peer's GB/s, marked informational; store_kv shown against its peer."""
    from bench.summary import targets

    case = "decode B=32,ctx=4096"
    rows = [{"case": case, "provider": "SDPA contiguous KV", "gbps": 3800.0, "pct_of_copy": 90.0,
             "graph_gbps": 3900.0},
            {"case": case, "provider": "r4b triton", "gbps": 3000.0, "pct_of_copy": 71.0, "pct_of_copy_graph": 88.0,
             "graph_gbps": 3950.0, "check": "ok"},
            {"case": case, "provider": "r4b cuda", "gbps": 9000.0, "check": "MISMATCH"},  # wrong: never the best
            {"case": case, "provider": "flash-attn kvcache", "skipped": "flash_attn does not import"},
            {"case": "store_kv decode T=32", "provider": "torch index_put", "gbps": 10.0},
            {"case": "store_kv decode T=32", "provider": "r4b triton", "gbps": 25.0, "pct_of_copy": 0.6}]
    (tmp_path / "paged_attention.json").write_text(json.dumps({"rows": rows}))
    out = targets(tmp_path).splitlines()
    assert out[-2:] == [
        "  paged_attention decode B=32,ctx=4096: r4b triton 3000 GB/s, 71% of copy launched / 88% in a graph "
        "(target >= 85%) MET in a graph; 0.79x SDPA contiguous KV's GB/s / 1.01x in a graph (target >= 1x) "
        "MET in a graph [informational: no issue yet]",
        "  paged_attention store_kv decode T=32: r4b triton 25 GB/s, 1% of copy launched; 2.50x torch index_put's "
        "GB/s [informational: no issue yet]"], out
    rows[0]["check"] = "MISMATCH"  # no peer to compare with
    (tmp_path / "paged_attention.json").write_text(json.dumps({"rows": rows}))
    assert "SDPA contiguous KV missing (skipped, cut or MISMATCH): no ratio" in targets(tmp_path)


def test_copy_columns_give_percent_of_the_copy_bandwidth():
    from bench.harness import Case, copy_columns

    case = Case("x", {}, bytes=100)
    assert copy_columns(case, {"gbps": 50.0, "graph_gbps": 80.0}, "cpu", 200.0, own=False) == {
        "copy_gbps": 200.0, "pct_of_copy": 25.0, "pct_of_copy_graph": 40.0}
    assert copy_columns(case, {"gbps": 50.0}, "cpu", None, own=True) == {}  # no copy reading (the CPU)
    assert copy_columns(case, {"gbps": None}, "cpu", 200.0, own=True) == {}  # a row without GB/s


def test_generate_bench_runs_quick_and_matches_transformers(monkeypatch, tmp_path):
    """The generate bench on its tiny CPU shapes: both providers time, and r4b's greedy tokens equal transformers'
    (fp32) in every sequence."""
    pytest.importorskip("transformers")
    from bench import bench_generate

    monkeypatch.setattr(harness, "results_dir", lambda device: tmp_path)
    monkeypatch.setenv("R4B_BACKEND", "torch")
    rows = bench_generate.main(["--quick"])
    assert [(r["case"].split()[0], r["provider"]) for r in rows] == [
        ("bs1", "r4b LLM.generate"), ("bs1", "transformers generate"),
        ("bs4", "r4b LLM.generate"), ("bs4", "transformers generate"),
        ("bs4", "r4b, no prefix cache"), ("bs4", "r4b, prefix cache")]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert [r.get("same") for r in rows] == ["1/1", None, "4/4", None, None, "4/4"]
    # a shared system prompt of 48 tokens (3 blocks of 16) before 8 own: the cache spares the 3 blocks a request
    assert rows[4]["prompt_tokens_a_call"] == 4 * 56 and rows[5]["prompt_tokens_a_call"] == 4 * 8
    assert rows[5]["x_cold"] == pytest.approx(rows[4]["ms"] / rows[5]["ms"])
    assert (tmp_path / "generate.json").exists() and (tmp_path / "generate.md").exists()


def test_summary_reports_generate_against_transformers(tmp_path):
    from bench.summary import targets

    rows = [{"case": "bs1 x", "provider": "r4b LLM.generate", "tokens_per_s": 300.0, "x_floor": 1.8, "same": "1/1"},
            {"case": "bs1 x", "provider": "transformers generate", "tokens_per_s": 20.0},
            {"case": "bs32 x", "provider": "r4b LLM.generate", "tokens_per_s": 900.0},
            {"case": "bs32 x", "provider": "transformers generate", "skipped": "out of memory"},
            {"case": "bs32 shared", "provider": "r4b, no prefix cache", "tokens_per_s": 100.0},
            {"case": "bs32 shared", "provider": "r4b, prefix cache", "tokens_per_s": 400.0, "x_cold": 4.0,
             "prompt_tokens_a_call": 2048.0, "same": "32/32"}]
    (tmp_path / "generate.json").write_text(json.dumps({"rows": rows}))
    out = targets(tmp_path).splitlines()
    assert out[-3:] == [
        "  generate bs1 x: r4b 300 tok/s, 15.00x transformers' 20; 1.80x the weight-read floor a step; greedy tokens "
        "equal to transformers' in 1/1 sequences (informational: no issue yet)",
        "  generate bs32 x: r4b 900 tok/s; transformers missing: no ratio (informational: no issue yet)",
        "  generate bs32 shared: prefix cache 400 tok/s, 4.00x without it; 2048 prompt tokens computed a call; same "
        "greedy tokens in 32/32 sequences (informational: no issue yet)"], out


def test_paged_prefill_bench_checks_every_provider(monkeypatch, tmp_path):
    """The extend-step bench at its --quick shapes: every provider (r4b's flash kernel, the decode-rows way, SDPA on
    contiguous K/V) computes the fp32 reference's output."""
    from bench import bench_paged_prefill

    monkeypatch.setattr(harness, "results_dir", lambda device: tmp_path)
    monkeypatch.setattr(harness, "time_fn", lambda fn, device, quick=False: (1.0, 1.0, 1.0))  # no timing here
    rows = bench_paged_prefill.main(["--quick"])
    assert [r["provider"] for r in rows] == ["SDPA contiguous KV", "r4b triton", "r4b decode rows"] * 2
    assert all(r["check"] == "ok" and r["err"] < 1e-5 for r in rows), rows


def test_summary_reports_paged_prefill_against_sdpa_and_decode_rows(tmp_path):
    from bench.summary import targets

    case = "chunk B=8 L=512 ctx=4096"
    rows = [{"case": case, "provider": "SDPA contiguous KV", "ms": 2.0, "check": "ok"},
            {"case": case, "provider": "r4b triton", "ms": 1.6, "check": "ok"},
            {"case": case, "provider": "r4b decode rows", "ms": 8.0, "check": "ok"},
            {"case": "suffix", "provider": "r4b triton", "ms": 1.0, "check": "MISMATCH"}]  # wrong: no line
    (tmp_path / "paged_prefill.json").write_text(json.dumps({"rows": rows}))
    out = targets(tmp_path).splitlines()
    assert out[-1] == ("  paged_prefill chunk B=8 L=512 ctx=4096: r4b triton 1.6 ms; 1.25x as fast as SDPA contiguous "
                       "KV; 5.00x as fast as r4b decode rows (informational: no issue yet)"), out
    assert not any("paged_prefill suffix" in line for line in out)
