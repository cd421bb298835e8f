"""Compile Triton kernels for sm_90 without a GPU: run a bench's ``--aot`` report (triton's bundled ptxas) in a
process without TRITON_INTERPRET, which catches what only the GPU compiler rejects (non-constexpr globals,
loop-carried type changes, dot shapes) and reports registers and spills."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_aot_report(module: str, flag: str = "--aot") -> str:
    """stdout of ``python -m <module> <flag>``; skips when this triton wheel has no bundled ptxas."""
    return _run_without_interpreter(["-m", module, flag])


def run_aot_code(code: str) -> str:
    """stdout of ``python -c <code>`` (sm_90 compiles); skips when this triton wheel has no bundled ptxas."""
    return _run_without_interpreter(["-c", code])


def _run_without_interpreter(args: list[str]) -> str:
    import triton

    if not (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton wheel has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout
