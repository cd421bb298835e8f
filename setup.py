"""Build r4b with its compiled extension r4b._C by driving CMake + Ninja (CMakeLists.txt is the build definition).

    pip install -e . --no-build-isolation        # editable, compiled against the installed torch
    pip wheel . --no-build-isolation -w dist      # a wheel

Environment: R4B_BUILD_CUDA=0/1 forces the CUDA kernels off/on (default: on when torch has CUDA and nvcc is
found); R4B_CUDA_ARCHS="80;90" picks the architectures; MAX_JOBS caps the parallel compile jobs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _want_cuda() -> bool:
    flag = os.environ.get("R4B_BUILD_CUDA")
    if flag is not None:
        return flag.strip() not in ("0", "", "false", "False", "OFF")
    import torch

    has_nvcc = shutil.which("nvcc") is not None or Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc").exists()
    return torch.version.cuda is not None and has_nvcc


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cuda = _want_cuda()
        args = [
            f"-DR4B_TORCH_DIR={Path(torch.__file__).resolve().parent}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DR4B_OUTPUT_DIR={out_dir}",
            f"-DR4B_BUILD_CUDA={'ON' if cuda else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-G",
            "Ninja",
        ]
        if os.environ.get("R4B_CUDA_ARCHS"):
            args.append(f"-DR4B_CUDA_ARCHS={os.environ['R4B_CUDA_ARCHS']}")
        if cuda and not shutil.which("nvcc"):
            nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        print(f"r4b: building r4b._C with CUDA {'ON' if cuda else 'OFF'}", flush=True)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)


setup(ext_modules=[CMakeExtension("r4b._C")], cmdclass={"build_ext": CMakeBuild})
