"""Input validation shared by the public kernel functions: errors name the argument and what was received."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(
    name: str,
    t,
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    ndim: int | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Check one argument: a tensor with one of ``dtypes``, ``ndim`` dimensions, and contiguity if asked."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got dtype={str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape={tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got stride={t.stride()} for shape={tuple(t.shape)}")
    return t


def same_device(**tensors: torch.Tensor | None) -> None:
    """All given (non-None) tensors live on one device."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    k0, v0 = items[0]
    for k, v in items[1:]:
        if v.device != v0.device:
            raise ValueError(f"{k} is on {v.device} but {k0} is on {v0.device}; all inputs must share a device")


def same_len(dim0: int, ref_name: str, **tensors: torch.Tensor | None) -> None:
    """Every given tensor's first dimension equals ``dim0`` (the size of ``ref_name``)."""
    for k, v in tensors.items():
        if v is not None and v.shape[0] != dim0:
            raise ValueError(f"{k} has {v.shape[0]} rows but {ref_name} has {dim0}; they must match")


def choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def cu_seqlens(name: str, cu: torch.Tensor, total: int | None = None, values: bool | None = None) -> torch.Tensor:
    """Check a cu_seqlens tensor: 1-D int32, starts at 0, non-decreasing, ends at ``total`` when given.

    The value checks read the tensor on the host; by default (``values=None``) they run only for CPU tensors,
    so a GPU hot path (one call per layer) does not synchronise, and not under torch.compile (values read on the
    host would break the graph). Pass ``values=True`` to force them.
    """
    tensor(name, cu, dtypes=(torch.int32,), ndim=1)
    if cu.numel() < 1:
        raise ValueError(f"{name} must hold at least one entry (0), got an empty tensor")
    if values is None:
        values = cu.device.type == "cpu" and not torch.compiler.is_compiling()
    if not values:
        return cu
    c = cu.detach().to("cpu", torch.int64)
    if int(c[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0]={int(c[0])}")
    if c.numel() > 1:
        d = c[1:] - c[:-1]
        if bool((d < 0).any()):
            i = int(torch.nonzero(d < 0)[0, 0])
            raise ValueError(
                f"{name} must be non-decreasing, got {name}[{i}]={int(c[i])} > {name}[{i + 1}]={int(c[i + 1])}"
            )
    if total is not None and int(c[-1]) != total:
        raise ValueError(f"{name} must end at the total token count {total}, got {name}[-1]={int(c[-1])}")
    return cu
