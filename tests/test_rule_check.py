"""tests/rule_check.py (the attention rule's baseline, examined on a GPU) runs its own code on the CPU: fp32, the
Triton interpreter, a small case; every provider's errors are measured and the rule lines are printed."""

import pytest

from tests import rule_check


def test_rule_check_reports_every_provider_on_the_cpu(capsys):
    rows = rule_check.report(device="cpu", cases=[([1, 9, 0, 20], 2, 1, 16, True, 3)])
    by = {r["provider"]: r for r in rows}
    assert list(by) == ["float64 ref rounded (floor)", "plain sdpa 3-D (tests' baseline)", "plain sdpa 4-D",
                        "r4b default (triton)", "gluon dK/dV (first config)"]
    assert by["gluon dK/dV (first config)"]["skipped"] == "needs a Hopper GPU"
    # fp32 everywhere here: every measured error is fp32-sized, the float64 reference rounded to fp32 the least
    for name in ("plain sdpa 3-D (tests' baseline)", "plain sdpa 4-D", "r4b default (triton)"):
        assert all(0 < by[name][n] < 1e-4 for n in rule_check.NAMES), by[name]
    assert all(by["float64 ref rounded (floor)"][n] <= by["r4b default (triton)"][n] for n in rule_check.NAMES)
    out = capsys.readouterr().out
    assert "rule with the 3-D baseline" in out and "rule with the 4-D baseline" in out and "r4b default: " in out


def test_rule_check_refuses_without_a_gpu():
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal without a GPU")
    res = subprocess.run([sys.executable, "-m", "tests.rule_check"], capture_output=True, text=True)
    assert res.returncode != 0 and "needs a CUDA GPU" in res.stderr
