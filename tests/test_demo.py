"""The demo that `make demo` runs: the milestone's pieces end to end (save/load, chat, BPO steps)."""

from __future__ import annotations

import re

from r4b import demo


def test_demo_runs_bpo_steps(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU backends: the interpreter would take minutes here
    assert demo.main(steps=2) == 0
    out = capsys.readouterr().out
    assert "saved as an HF checkpoint and loaded back" in out
    assert "<think>\\n\\n</think>\\n\\n" in out  # the non-thinking suffix, shown repr()'d
    steps = re.findall(r"step (\d+): reward think ([\d.]+) no-think ([\d.]+)  loss \S+  grad norm ([\d.]+)", out)
    assert [s[0] for s in steps] == ["0", "1"]
    assert all(float(s[3]) > 0 for s in steps)  # the GRPO loss produced gradients
