"""Backend selection for every op in r4b.kernels.

Each op registers which backends it implements (a subset of ``cuda``, ``triton``, ``cpp``, ``torch`` and the
opt-in peers below). The public function of the op calls :func:`pick` with the tensors it received; ``pick``
returns the backend to run:

* an explicit ``backend=`` argument wins, then the op's own environment variable (``R4B_ATTN_BACKEND`` for
  varlen_attention), then ``R4B_BACKEND`` (every op); a forced backend that cannot run raises
  ``RuntimeError`` saying why (never a silent fallback);
* otherwise the first that can run of ``cuda`` (the compiled extension has the op's CUDA kernel and the
  tensors are on a GPU) > ``triton`` (tensors on a GPU, or on the CPU with ``TRITON_INTERPRET=1``) >
  ``cpp`` (the extension's C++ CPU kernel, tensors on the CPU) > ``torch`` (the reference, runs anywhere).

Opt-in peers (``flash_attn``: flash-attn's ``flash_attn_varlen_func``; ``xformers``: xformers'
``memory_efficient_attention``) run only when forced by ``backend=`` or the op's variable (e.g.
``R4B_ATTN_BACKEND=flash_attn`` puts every attention call of a model on flash-attn and leaves the other ops
alone); ``backend=None`` never picks them, so results never depend on which packages happen to be installed.
They can run when their package imports and the tensors are on a GPU (flash-attn: fp16/bf16 only).
``R4B_BACKEND`` accepts only the four r4b backends, since it applies to every op.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("cuda", "triton", "cpp", "torch")  # r4b's own, in auto-dispatch order
PEER_BACKENDS = ("flash_attn", "xformers")  # other libraries' kernels: opt-in, never picked automatically
ALL_BACKENDS = BACKENDS + PEER_BACKENDS

# peer -> (module to import, package name, how to install, dtypes it accepts or None for any float)
_PEERS: dict[str, tuple[str, str, str, tuple[torch.dtype, ...] | None]] = {
    "flash_attn": (
        "flash_attn",
        "flash-attn",
        "pip install flash-attn --no-build-isolation",
        (torch.float16, torch.bfloat16),
    ),
    "xformers": ("xformers.ops", "xformers", "pip install xformers", None),
}

# Device types the peers accept. Test hook: tests/test_varlen_attention_peers.py adds "cpu" so that fake peer
# modules (plain torch) run on the CPU; nothing else changes it.
PEER_DEVICES: tuple[str, ...] = ("cuda",)

# op name -> tuple of backends the op implements (filled by register()).
_OPS: dict[str, tuple[str, ...]] = {}
# op name -> its own environment variable that forces a backend for that op only (filled by register()).
_OP_ENV: dict[str, str] = {}


def register(op: str, backends: tuple[str, ...], env: str | None = None) -> None:
    """Declare that ``op`` has implementations for ``backends`` (called once at import by each op file);
    ``env`` names an environment variable that forces a backend for this op only."""
    bad = [b for b in backends if b not in ALL_BACKENDS]
    if bad:
        raise ValueError(f"register({op!r}): unknown backends {bad}; expected a subset of {ALL_BACKENDS}")
    _OPS[op] = tuple(b for b in ALL_BACKENDS if b in backends)
    if env is not None:
        _OP_ENV[op] = env


def registered_ops() -> dict[str, tuple[str, ...]]:
    """Every registered op and the backends it implements."""
    return dict(_OPS)


@functools.cache
def _extension():
    """The compiled extension ``r4b._C`` or None when it is not built."""
    from . import _ext

    return _ext.load()


_TRITON_IMPORTABLE: bool | None = None


def triton_importable() -> bool:
    """Whether triton imports (tried once; a module global rather than functools.cache, which dynamo warns of
    when it traces a public op's dispatch under torch.compile)."""
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        try:
            import triton  # noqa: F401
        except Exception:
            _TRITON_IMPORTABLE = False
        else:
            _TRITON_IMPORTABLE = True
    return _TRITON_IMPORTABLE


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def on_tensor_device(fn):
    """Decorator of a public op: it runs with its first CUDA tensor argument's device as the current CUDA device.
    Triton launches kernels on the current device whatever device the tensors are on, so an op called with tensors
    on cuda:1 while cuda:0 is current would launch on the wrong GPU. (The backward needs nothing: autograd runs it
    in a thread per device, with that device current. The C++ CUDA ops have device guards.) A call traced by
    torch.compile passes through: the custom ops it calls (r4b/kernels/_compile.py) carry this guard themselves."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():  # traced: the custom ops the function calls guard the device at run time
            return fn(*args, **kwargs)
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and a.is_cuda:
                if a.device.index is not None and a.device.index != torch.cuda.current_device():
                    with torch.cuda.device(a.device):
                        return fn(*args, **kwargs)
                break
        return fn(*args, **kwargs)

    return wrapper


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the launchers size persistent grids with it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def rows_bucket(n: int) -> int:
    """Autotune key part for a row count that changes per call: 0 below 4096 rows (launch-bound sizes such as
    decoding share one tuning), then one bucket per power of two. Keyed on the width alone, the first call's
    size picked the tile for the whole process (a rollout's decode steps before a 16k-token training step)."""
    return max(0, n.bit_length() - 12)


def tuned_config(tuned, key: tuple, tensors: tuple):
    """The config ``tuned`` (a triton Autotuner) already chose for these key values and tensor arguments (in the
    kernel's argument order), or None. Its cache is keyed on the key values then every tensor argument's dtype
    string; a key built differently only misses (the autotuner then runs as before), never hits another's entry. A
    hit lets a launcher start the kernel with the config directly: the same launch as the autotuner's (when no
    config has a pre_hook), without its per-call key and argument dicts."""
    return tuned.cache.get((*key, *[str(t.dtype) for t in tensors]))


def extension_has(op: str, device: str) -> bool:
    """True when r4b._C registers ``op`` with a kernel for ``device`` ("cpu" or "cuda")."""
    ext = _extension()
    if ext is None:
        return False
    return op in (ext.cuda_ops() if device == "cuda" else ext.cpu_ops())


def _peer_why_not(backend: str, device: str, dtype: torch.dtype | None) -> str | None:
    """None if the peer library ``backend`` can run for tensors on ``device`` with ``dtype`` (None: any)."""
    module, package, install, dtypes = _PEERS[backend]
    if device not in PEER_DEVICES:
        return f"the tensors are on {device}, and the {backend} backend needs them on a GPU"
    try:
        importlib.import_module(module)  # not cached: a missing package costs an import attempt per call
    except Exception as ex:
        return f"the {package} package does not import ({type(ex).__name__}: {ex}); install it: {install}"
    if dtype is not None and dtypes is not None and dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"{package} needs dtype in ({names}), got dtype={str(dtype).replace('torch.', '')}"
    return None


def _why_not(op: str, backend: str, device: str, dtype: torch.dtype | None = None) -> str | None:
    """None if ``backend`` can run ``op`` on ``device`` (with ``dtype`` when given), else the reason it cannot."""
    if backend not in _OPS.get(op, ()):
        return f"op {op!r} has no {backend} implementation (it has: {', '.join(_OPS.get(op, ())) or 'none'})"
    if backend == "torch":
        return None
    if backend in _PEERS:
        return _peer_why_not(backend, device, dtype)
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
            if _extension().cuda_ops():
                return (f"r4b._C has CUDA kernels but none for {op!r} (built before it: rebuild with "
                        "pip install -e . --no-build-isolation)")
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


def _first_tensor(tensors) -> torch.Tensor | None:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t
    return None


def _forced(op: str, backend: str | None) -> tuple[str | None, str]:
    """The backend forced by the argument or the environment (None if none) and where it came from."""
    if backend is not None:
        if backend not in ALL_BACKENDS:
            raise ValueError(f"backend={backend!r} is not a backend; expected one of {ALL_BACKENDS}")
        return backend, "backend="
    env = _OP_ENV.get(op)
    if env and os.environ.get(env):
        value = os.environ[env]
        if value not in _OPS[op]:
            raise ValueError(f"{env}={value!r} is not a backend of {op}; expected one of {_OPS[op]}")
        return value, f"{env}="
    value = os.environ.get("R4B_BACKEND")
    if value:
        if value in PEER_BACKENDS:
            per_op = ", ".join(sorted(set(_OP_ENV.values()))) or "backend="
            raise ValueError(
                f"R4B_BACKEND={value!r} is not a backend of every op; the opt-in peers "
                f"{PEER_BACKENDS} are chosen per op: backend={value!r}, or {per_op}={value}"
            )
        if value not in BACKENDS:
            raise ValueError(f"R4B_BACKEND={value!r} is not a backend; expected one of {BACKENDS}")
        return value, "R4B_BACKEND="
    return None, ""


def pick(op: str, backend: str | None, *tensors) -> str:
    """The backend that runs ``op`` for ``tensors`` (see the module docstring for the order)."""
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_OPS)}")
    first = _first_tensor(tensors)
    device = first.device.type if first is not None else "cpu"
    forced, source = _forced(op, backend)
    if forced is not None:
        why = _why_not(op, forced, device, first.dtype if first is not None else None)
        if why is not None:
            raise RuntimeError(f"{op}: {source}{forced!r} cannot run: {why}")
        return forced
    for b in _OPS[op]:
        if b not in PEER_BACKENDS and _why_not(op, b, device) is None:
            return b
    raise RuntimeError(f"{op}: no backend can run on {device}")  # unreachable while torch is registered


def available_backends(op: str, device: str | torch.device = "cpu") -> list[str]:
    """The backends that can run ``op`` for tensors on ``device`` here: r4b's in dispatch order, then the
    opt-in peers (which ``backend=None`` never picks; their dtype limits are checked only when called)."""
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_OPS)}")
    dev = torch.device(device).type
    return [b for b in _OPS[op] if _why_not(op, b, dev) is None]


def why_unavailable(
    op: str, backend: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> str | None:
    """None if ``backend`` can run ``op`` for tensors on ``device`` (and ``dtype``), else why not (for skips)."""
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_OPS)}")
    return _why_not(op, backend, torch.device(device).type, dtype)
