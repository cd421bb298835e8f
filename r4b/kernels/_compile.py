"""torch.compile support of the ops' Triton paths.

Eagerly, an op's Triton path is a ``torch.autograd.Function`` (the cheapest call from Python: a custom op costs
about 50 us more per forward + backward on the host). Under torch.compile, dynamo would trace into that Function's
Python (autotuner caches, launch grids, the Triton interpreter on the CPU) and break the graph or fail. So while
compiling, the public functions call the same forward and backward as ``torch.library`` custom ops instead
(namespace ``r4b_triton``: ``torch.ops.r4b_triton.rms_norm`` and ``rms_norm_backward``, ...), which dynamo and
AOTAutograd treat as opaque calls with fake (shape-only) implementations: a model built from the ops compiles with
``fullgraph=True``, and its compiled graph calls the very kernels the eager path calls (same results, bit for bit).

Every custom op here returns fresh contiguous tensors (as its fake says: inductor plans the graph around the fake's
strides) and keeps no tensor beyond the call (with inductor's CUDA graphs, a tensor first allocated during a
graph's warm-up lives in the graph's memory pool). The backward ops have no autograd of their own (rope's backward
is the rope op rotating back), and AOTAutograd refuses a double backward through a compiled graph, as the eager
Functions' ``once_differentiable`` does. The backend is picked when the public function is traced (``backend=``, the
R4B_* variables and the tensors' device, as eagerly); changing a variable afterwards does not retrace.

The fused-linear losses are not custom ops: their chunked implementation computes the gradients in the forward
and reads a row count on the host (one sync). Their public functions run eagerly under torch.compile (a graph
break: :func:`eager`), so a compiled model or training step can call them.
"""

from __future__ import annotations

import functools

import torch

NAMESPACE = "r4b_triton"


def name(op: str) -> str:
    """The qualified name of one of the custom ops (``r4b_triton::<op>``)."""
    return f"{NAMESPACE}::{op}"


def custom_op(op: str):
    """Decorator: the function as the custom op ``r4b_triton::<op>`` (no mutated arguments; schema from its
    annotations), run with its first CUDA tensor's device current (``_dispatch.on_tensor_device``: Triton launches
    on the current device)."""
    from . import _dispatch

    def wrap(fn):
        schema = torch.library.infer_schema(fn, mutates_args=())
        return torch.library.custom_op(name(op), _dispatch.on_tensor_device(fn), mutates_args=(), schema=schema)

    return wrap


def compiling() -> bool:
    """True while dynamo traces the caller (torch.compile), False when it runs eagerly."""
    return torch.compiler.is_compiling()


def contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as a custom op must return them: contiguous, as its fake says (no copy when they are)."""
    return tuple(t.contiguous() for t in tensors)


def eager(fn):
    """Run the public function ``fn`` eagerly under torch.compile (dynamo breaks the graph around the call and
    resumes after it); a plain call when not compiling. Through torch's lazy form of ``torch.compiler.disable``
    (which imports torch._dynamo when the decorator runs: ``import r4b.kernels`` took 2.1 s instead of 1.1), and
    only while compiling (its wrapper imports torch._dynamo at its first call and adds a context to every call)."""
    disabled = torch._disable_dynamo(fn, recursive=True)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)  # dynamo skips torch._compile's wrapper: a graph break, run eagerly
        return fn(*args, **kwargs)

    return wrapper
