"""What users pip-install: a wheel built from the checkout's files (r4b._C compiled into it) and installed outside the
source tree imports, registers its compiled ops, finds its package data and runs its CLI and an op on each of its
CPU backends."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# run by the installed copy, from a directory without the checkout on sys.path
PROBE = r"""
import json, sys
import torch
import r4b, r4b._C
from r4b.engine.chat import ChatTokenizer
from r4b.kernels import available_backends, group_advantages, pack_sequences, registered_ops

tok = ChatTokenizer.demo()  # r4b/assets: the package data
x = torch.tensor([1.0, 2.0, 4.0, 4.0, 5.0])
g = torch.tensor([0, 0, 0, 1, 1])
outs = {b: group_advantages(x, g, backend=b).tolist() for b in ("cpp", "torch")}
packed = pack_sequences([torch.arange(3), torch.arange(2)])
print(json.dumps({
    "r4b": r4b.__file__, "ext": r4b._C.__file__, "cpu_ops": sorted(r4b._C.cpu_ops()),
    "vocab": tok.vocab_size, "adv": outs, "cu": packed.cu_seqlens.tolist(),
    "cpp_ops": sorted(op for op in registered_ops() if "cpp" in available_backends(op)),
}))
"""


def _checkout_files() -> list[str]:
    """The checkout's files as git sees them (tracked, and new ones not ignored): what a clone would hold."""
    res = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return [f for f in res.stdout.splitlines() if (ROOT / f).is_file()]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or shutil.which("cmake") is None or shutil.which("ninja") is None,
                    reason="needs git, cmake and ninja")
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    src = tmp_path / "src"
    for f in _checkout_files():  # a copy, so the build never touches the checkout's own build/ and r4b/_C*.so
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    env = {**os.environ, "R4B_BUILD_CUDA": "0", "MAX_JOBS": "2"}
    env.pop("PYTHONPATH", None)
    wheel_dir = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-build-isolation", "--no-deps",
                          "-q", "-w", str(wheel_dir)], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, f"pip wheel failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    (wheel,) = wheel_dir.glob("r4b-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("r4b/_C") and n.endswith(".so") for n in names), names
    assert any(n.startswith("r4b/assets/") for n in names), names
    assert not any(n.startswith(("tests/", "bench/", "csrc/")) for n in names), "the wheel ships only r4b"

    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                          str(wheel)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, f"pip install failed:\n{res.stderr[-3000:]}"
    run_env = {**env, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=run_env,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, f"the installed wheel failed:\n{res.stderr[-3000:]}"
    import json

    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(got["r4b"]).is_relative_to(site) and Path(got["ext"]).is_relative_to(site), got
    assert got["cpp_ops"] == sorted(got["cpu_ops"]) and "group_advantages" in got["cpu_ops"], got
    assert got["adv"]["cpp"] == pytest.approx(got["adv"]["torch"], abs=1e-6), got
    assert got["cu"] == [0, 3, 5] and got["vocab"] > 0, got
    res = subprocess.run([sys.executable, "-m", "r4b.cli", "info"], capture_output=True, text=True, env=run_env,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0 and "group_advantages" in res.stdout, res.stdout + res.stderr
