"""The benchmark harness: timing rows, skips and failing providers reported (not raised), result files."""

from __future__ import annotations

import json

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
    assert {"group_advantages", "pack", "grpo_loss", "fused_linear", "varlen_attention", "norms"} <= set(names())
    assert bench_main(["--list"]) == 0
    assert bench_main(["nope"]) == 2
