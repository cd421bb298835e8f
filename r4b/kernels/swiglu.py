"""swiglu: silu(gate) * up, the Qwen3 MLP activation. Owns the torch reference and the public function."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from . import _checks, _dispatch

OP = "swiglu"
_dispatch.register(OP, ("torch",))


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def swiglu(gate: Tensor, up: Tensor, *, backend: str | None = None) -> Tensor:
    """silu(gate) * up. gate, up: same shape (..., I), same float dtype and device. Returns (..., I)."""
    _checks.tensor("gate", gate, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("up", up, dtypes=_checks.FLOAT_DTYPES)
    _checks.same_device(gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got gate={tuple(gate.shape)} up={tuple(up.shape)}")
    _dispatch.pick(OP, backend, gate)
    return swiglu_ref(gate, up)
