"""Backend selection for every op in r4b.kernels.

Each op registers which backends it implements (a subset of ``cuda``, ``triton``, ``torch``). The public
function of the op calls :func:`pick` with the tensors it received; ``pick`` returns the backend to run:

* an explicit ``backend=`` argument wins, then the ``R4B_BACKEND`` environment variable;
  a forced backend that cannot run raises ``RuntimeError`` saying why (never a silent fallback);
* otherwise the first that can run of ``cuda`` (the compiled extension has the op's CUDA kernel and the
  tensors are on a GPU) > ``triton`` (tensors on a GPU, or on the CPU with ``TRITON_INTERPRET=1``) >
  ``cpp`` (the extension's C++ CPU kernel, tensors on the CPU) > ``torch`` (the reference, runs anywhere).
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("cuda", "triton", "cpp", "torch")

# op name -> tuple of backends the op implements (filled by register()).
_OPS: dict[str, tuple[str, ...]] = {}


def register(op: str, backends: tuple[str, ...]) -> None:
    """Declare that ``op`` has implementations for ``backends`` (called once at import by each op file)."""
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise ValueError(f"register({op!r}): unknown backends {bad}; expected a subset of {BACKENDS}")
    _OPS[op] = tuple(b for b in BACKENDS if b in backends)


def registered_ops() -> dict[str, tuple[str, ...]]:
    """Every registered op and the backends it implements."""
    return dict(_OPS)


@functools.cache
def _extension():
    """The compiled extension ``r4b._C`` or None when it is not built."""
    from . import _ext

    return _ext.load()


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def extension_has(op: str, device: str) -> bool:
    """True when r4b._C registers ``op`` with a kernel for ``device`` ("cpu" or "cuda")."""
    ext = _extension()
    if ext is None:
        return False
    return op in (ext.cuda_ops() if device == "cuda" else ext.cpu_ops())


def _why_not(op: str, backend: str, device: str) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    if backend not in _OPS.get(op, ()):
        return f"op {op!r} has no {backend} implementation (it has: {', '.join(_OPS.get(op, ())) or 'none'})"
    if backend == "torch":
        return None
    if backend == "cpp":
        if device != "cpu":
            return f"the tensors are on {device}, and the cpp backend (C++ CPU kernels) needs them on the CPU"
        if _extension() is None:
            return "the compiled extension r4b._C is not built (pip install -e . --no-build-isolation)"
        if not extension_has(op, "cpu"):
            return f"r4b._C has no C++ kernel for {op!r}"
        return None
    if backend == "cuda":
        if device != "cuda":
            return f"the tensors are on {device}, and the cuda backend needs them on a GPU"
        if _extension() is None:
            return "the compiled extension r4b._C is not built (pip install -e . --no-build-isolation)"
        if not extension_has(op, "cuda"):
            return "r4b._C was built without CUDA (R4B_BUILD_CUDA=1 and nvcc + a CUDA torch are needed)"
        return None
    # triton
    if not triton_importable():
        return "triton is not installed"
    if device == "cuda":
        return None
    if device == "cpu" and triton_interpret():
        return None
    return f"the tensors are on {device}; triton needs a GPU, or TRITON_INTERPRET=1 to run on the CPU"


def _device_of(tensors) -> str:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device.type
    return "cpu"


def pick(op: str, backend: str | None, *tensors) -> str:
    """The backend that runs ``op`` for ``tensors`` (see the module docstring for the order)."""
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_OPS)}")
    device = _device_of(tensors)
    forced, source = backend, "backend="
    if forced is None and os.environ.get("R4B_BACKEND"):
        forced, source = os.environ["R4B_BACKEND"], "R4B_BACKEND="
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"{source}{forced!r} is not a backend; expected one of {BACKENDS}")
        why = _why_not(op, forced, device)
        if why is not None:
            raise RuntimeError(f"{op}: {source}{forced!r} cannot run: {why}")
        return forced
    for b in _OPS[op]:
        if _why_not(op, b, device) is None:
            return b
    raise RuntimeError(f"{op}: no backend can run on {device}")  # unreachable while torch is registered


def available_backends(op: str, device: str | torch.device = "cpu") -> list[str]:
    """The backends that can run ``op`` for tensors on ``device`` here, in dispatch order."""
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_OPS)}")
    dev = torch.device(device).type
    return [b for b in _OPS[op] if _why_not(op, b, dev) is None]
