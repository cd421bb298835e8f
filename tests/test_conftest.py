"""tests/conftest.py's R4B_FAILURES_NOW=1 (set by bench/gpu_check.sh): a failure's report is printed when the test
fails, so a pytest run killed at its time limit (no final summary) still shows why its tests failed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path


def _run(tmp_path: Path, now: bool) -> str:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_two.py").write_text(
        "import os\n"
        "def test_fails():\n    assert 1 == 2, 'the-reason-' + str(6 * 7)\n"
        "def test_killed():\n    os._exit(3)  # as a kill at the step's time limit: no final summary\n")
    env = {k: v for k, v in os.environ.items() if k != "R4B_FAILURES_NOW"}
    if now:
        env["R4B_FAILURES_NOW"] = "1"
    out = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "test_two.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    return out.stdout


def test_failure_reported_before_a_killed_run_ends(tmp_path):
    text = _run(tmp_path, now=True)
    assert "FAILED NOW: test_two.py::test_fails (call)" in text
    assert "AssertionError: the-reason-42" in text


def test_without_the_variable_a_killed_run_loses_the_reason(tmp_path):
    assert "the-reason-42" not in _run(tmp_path, now=False)
