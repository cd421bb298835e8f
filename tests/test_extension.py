"""The compiled extension r4b._C, the nvcc compile check of every CUDA source, and kernel dispatch."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from r4b.kernels import _dispatch, available_backends, group_advantages, pack_sequences

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc").rglob("*.cu"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").exists():
            return str(Path(home, "bin", "nvcc"))
    return None


def test_extension_is_built_with_cpu_kernels():
    from r4b import _C

    assert {"group_advantages", "pack", "unpack_padded"} <= set(_C.cpu_ops())
    assert _C.built_with_cuda == bool(_C.cuda_ops())
    assert hasattr(torch.ops.r4b, "group_advantages")


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/ should hold the CUDA kernels"


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cuda_source_compiles_with_nvcc(cu, tmp_path):
    cmd = [_nvcc(), "-std=c++17", "-c", str(cu), "-o", str(tmp_path / "k.o"), f"-I{ROOT / 'csrc' / 'include'}",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-Werror", "all-warnings"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nvcc failed on {cu}:\n{res.stderr[-4000:]}"


def _cuda_include() -> Path | None:
    nvcc = _nvcc()
    homes = [Path(nvcc).resolve().parents[1]] if nvcc else []
    homes += [Path(h) for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if h]
    for home in homes:
        if (home / "include" / "cuda_runtime_api.h").exists():
            return home / "include"
    return None


@pytest.mark.skipif(_cuda_include() is None, reason="CUDA headers not found")
def test_cuda_glue_parses_against_torch_headers(tmp_path):
    """The torch glue of the CUDA kernels (csrc/ops/ops_cuda.cpp) type-checks against the installed torch headers.

    A CPU torch wheel lacks one generated header of c10/cuda (cuda_cmake_macros.h); a stand-in with the shared
    library define lets g++ parse the rest, so glue errors show up without a CUDA torch.
    """
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = ["g++", "-std=c++17", "-fsyntax-only", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DR4B_WITH_CUDA=1",
           f"-I{tmp_path}", *[f"-I{p}" for p in include_paths()], f"-I{_cuda_include()}",
           f"-I{ROOT / 'csrc' / 'include'}", str(ROOT / "csrc" / "ops" / "ops_cuda.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


def test_auto_dispatch_order_on_cpu(monkeypatch):
    monkeypatch.delenv("R4B_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert available_backends("group_advantages") == ["cpp", "torch"]
    assert _dispatch.pick("group_advantages", None, torch.ones(1)) == "cpp"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.pick("group_advantages", None, torch.ones(1)) == "triton"
    assert available_backends("group_advantages") == ["triton", "cpp", "torch"]


def test_env_forces_a_backend(monkeypatch):
    rewards, ids = torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3, dtype=torch.int64)
    monkeypatch.setenv("R4B_BACKEND", "torch")
    assert _dispatch.pick("group_advantages", None, rewards) == "torch"
    monkeypatch.setenv("R4B_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"R4B_BACKEND='cuda' cannot run: .*GPU"):
        group_advantages(rewards, ids)
    monkeypatch.setenv("R4B_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"R4B_BACKEND='fast' is not a backend"):
        group_advantages(rewards, ids)
    monkeypatch.delenv("R4B_BACKEND")
    # the argument wins over the environment
    monkeypatch.setenv("R4B_BACKEND", "cuda")
    assert torch.equal(group_advantages(rewards, ids, backend="torch"), group_advantages(rewards, ids, backend="cpp"))


def test_forced_backend_the_op_lacks(monkeypatch):
    monkeypatch.delenv("R4B_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match=r"op 'pack' has no triton implementation"):
        pack_sequences([torch.arange(2)], backend="triton")


def test_triton_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        group_advantages(torch.ones(2), torch.zeros(2, dtype=torch.int64), backend="triton")


def test_unknown_op():
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        available_backends("nope")
