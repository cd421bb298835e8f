"""Test setup: without a GPU, Triton kernels run on the CPU under TRITON_INTERPRET=1 (set before triton is
imported); tests marked ``gpu`` are skipped when CUDA is unavailable."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs pytest-xdist workers, one per core: each worker's torch then gets one intra-op thread (unless
# OMP_NUM_THREADS says otherwise), else the workers' OpenMP pools oversubscribe the cores and spin. On the 2-core CI
# machine, the trainer and engine test files took 273 s with 2 workers of 2 threads each and 111 s with 1 thread.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    if _threads.isdigit() and int(_threads) > 0:  # (another OMP_NUM_THREADS form is OpenMP's to read)
        torch.set_num_threads(int(_threads))

import pytest  # noqa: E402


def _interpreter_descriptor_reduce() -> None:
    """triton 3.6's interpreter has no descriptor reduction (``desc.atomic_add``: a TMA bulk reduction on the GPU),
    which the atomic attention backward uses with R4B_VARLEN_LOADS=tma. Add it for the CPU tests with the
    hardware's semantics: the block at the offsets, clipped to the tensor's bounds, added element by element."""
    try:
        import triton.language as tl
        from triton._C.libtriton import ir
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except ImportError:
        return
    if hasattr(InterpreterBuilder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD or not value.dtype.scalar.is_floating():
            raise NotImplementedError(f"descriptor reduce {kind} of {value.dtype} in the test shim")
        ptrs, mask = desc.materialize_pointers(indices)
        return self.create_atomic_rmw(ir.ATOMIC_OP.FADD, ptrs, value, TensorHandle(mask, tl.int1),
                                      ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)

    InterpreterBuilder.create_descriptor_reduce = create_descriptor_reduce


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_descriptor_reduce()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_FAILURES_NOW = os.environ.get("R4B_FAILURES_NOW") == "1"
_config = None


def pytest_configure(config):
    global _config
    _config = config


def pytest_runtest_logreport(report):
    """R4B_FAILURES_NOW=1 (bench/gpu_check.sh): print a failure's report as soon as it happens. pytest prints them
    in its final summary, which a run killed at its time limit never reaches."""
    terminal = _config.pluginmanager.get_plugin("terminalreporter") if _config is not None else None
    if _FAILURES_NOW and report.failed and terminal is not None:
        text = report.longreprtext
        if len(text) > 4000:
            text = text[:1500] + "\n...\n" + text[-2500:]
        terminal.write_line(f"\n-- FAILED NOW: {report.nodeid} ({report.when})\n{text}\n-- end of {report.nodeid}",
                            flush=True)
