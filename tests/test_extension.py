"""The compiled extension r4b._C, the nvcc compile check of every CUDA source, and kernel dispatch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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

    ops = {"group_advantages", "pack", "unpack_padded", "store_kv", "paged_decode_attention"}
    assert ops <= set(_C.cpu_ops())
    assert _C.built_with_cuda == bool(_C.cuda_ops())
    assert not _C.cuda_ops() or ops <= set(_C.cuda_ops())
    assert all(hasattr(torch.ops.r4b, op) for op in ops)


def test_extension_imports_before_torch():
    """`import r4b._C` in a fresh interpreter that has not imported torch finds libc10 / libtorch by the module's
    run path (an editable install has no torch/lib beside it; seen failing on the H100 machine)."""
    from r4b import _C

    code = "import r4b._C as C; print(sorted(C.cpu_ops()))"
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(_C.__file__).parents[1],
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "group_advantages" in res.stdout


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


def _stub_cuda_torch(root: Path) -> Path:
    """A stand-in for a CUDA torch install built from this CPU wheel: its headers and libraries as symlinks, plus
    the one generated c10/cuda header the CPU wheel lacks and empty libc10_cuda.so / libtorch_cuda.so (a shared
    module may leave the c10::cuda symbols undefined at link time; they resolve at import on a GPU machine)."""
    real = Path(torch.__file__).resolve().parent
    fake = root / "torch"
    shutil.copytree(real / "include", fake / "include", copy_function=os.symlink)
    macros = fake / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True, exist_ok=True)
    macros.unlink(missing_ok=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    (fake / "lib").mkdir()
    for lib in (real / "lib").iterdir():
        (fake / "lib" / lib.name).symlink_to(lib)
    empty = root / "empty.c"
    empty.write_text("")
    for name in ("c10_cuda", "torch_cuda"):
        subprocess.run(["gcc", "-shared", "-fPIC", str(empty), "-o", str(fake / "lib" / f"lib{name}.so")], check=True)
    return fake


@pytest.mark.skipif(_nvcc() is None or shutil.which("cmake") is None or shutil.which("ninja") is None,
                    reason="needs nvcc, cmake and ninja")
def test_cmake_cuda_build_compiles_and_links(tmp_path):
    """The CUDA build of r4b._C as a GPU machine runs it (CMakeLists.txt with R4B_BUILD_CUDA=ON: the .cu kernels
    with nvcc for sm_80/sm_90, the CUDA glue, the link against c10_cuda/torch_cuda and cudart), against a stand-in
    of a CUDA torch (see _stub_cuda_torch). Catches CMake, include and link mistakes before a GPU run."""
    import pybind11

    fake = _stub_cuda_torch(tmp_path)
    build = tmp_path / "build"
    build.mkdir()
    nvcc = Path(_nvcc()).resolve()
    configure = ["cmake", str(ROOT), "-G", "Ninja", "-DR4B_BUILD_CUDA=ON", f"-DR4B_TORCH_DIR={fake}",
                 f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                 f"-DPython3_EXECUTABLE={sys.executable}", f"-DR4B_OUTPUT_DIR={build / 'out'}"]
    res = subprocess.run(configure, cwd=build, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "c10;torch;torch_cpu;c10_cuda;torch_cuda" in res.stdout
    res = subprocess.run(["cmake", "--build", ".", "--parallel", str(os.cpu_count() or 2)], cwd=build,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    (module,) = (build / "out").glob("_C*.so")
    needed = subprocess.run(["readelf", "-d", str(module)], capture_output=True, text=True, check=True).stdout
    assert "libcudart.so" in needed and "libtorch_cpu.so" in needed
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(module)], capture_output=True, text=True,
                               check=True).stdout
    assert "getCurrentCUDAStream" in undefined  # the glue launches on torch's current stream


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


def test_cuda_reason_names_an_extension_built_before_the_op(monkeypatch):
    from r4b.kernels import _dispatch

    class Ext:  # a CUDA build of r4b._C from before the op existed, and one without CUDA
        def __init__(self, cuda):
            self.cuda = cuda

        def cuda_ops(self):
            return self.cuda

        def cpu_ops(self):
            return []

    monkeypatch.setattr(_dispatch, "_extension", lambda: Ext(["pack"]))
    assert "none for 'store_kv' (built before it" in _dispatch.why_unavailable("store_kv", "cuda", "cuda")
    monkeypatch.setattr(_dispatch, "_extension", lambda: Ext([]))
    assert "built without CUDA" in _dispatch.why_unavailable("store_kv", "cuda", "cuda")
