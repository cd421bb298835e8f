"""The demo that `make demo` runs: both training stages end to end through the real trainers (SFT, then BPO), the
auto-mode check between them, on the CPU backends."""

from __future__ import annotations

import re

import pytest

from r4b import demo


def test_demo_runs_both_stages(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU backends: the interpreter would take minutes here
    assert demo.main(sft_steps=60, bpo_steps=2, out_dir=str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "saved as an HF checkpoint" in out
    assert "<think>\\n\\n</think>\\n\\n" in out  # the non-thinking suffix, shown repr()'d
    sft = [float(x) for x in re.findall(r"step +\d+: loss ([\d.]+)  think", out)]
    assert len(sft) >= 3 and sft[-1] < 0.5 * sft[0]  # 2026-11-28: 6.20 -> 1.02
    # the bi-mode SFT taught the auto-mode decision: think on the sums, answer the repeats directly
    rate = re.search(r"think-rate hard ([\d.]+), easy ([\d.]+)", out)
    assert rate and float(rate.group(1)) >= 0.75 and float(rate.group(2)) <= 0.25, rate
    bpo = re.findall(r"step (\d+): reward think ([\d.]+) no-think ([\d.]+) .* grad norm ([\d.]+)", out)
    assert [s[0] for s in bpo] == ["1", "2"]
    assert all(float(s[3]) > 0 for s in bpo)  # the GRPO loss produced gradients
    assert (tmp_path / "bpo" / "final" / "model.safetensors").is_file()
    # the evaluation in the three modes: its table, and its auto row's think-rate is the hard / easy rates' mean
    ev = re.search(r"5\. the BPO model evaluated .* think-rate hard ([\d.]+), easy ([\d.]+)", out)
    auto = re.search(r"\| auto \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", out)
    assert ev and auto and "| thinking (long) |" in out and "| non-thinking (short) |" in out, out[-3000:]
    # (the rates print with 2 decimals, the table with 1: rounding moves the mean by at most 0.5 + 0.05 points)
    assert float(auto.group(1)) == pytest.approx(100 * (float(ev.group(1)) + float(ev.group(2))) / 2, abs=0.55)
    assert (tmp_path / "sft" / "metrics.jsonl").is_file() and (tmp_path / "bpo" / "metrics.png").is_file()
