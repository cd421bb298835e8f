"""STYLE.md's rule for low-precision kernels (flash-attn's): the error against a high-precision reference is at
most twice plain PyTorch's own low-precision error on the same inputs, plus a small atol given as a fraction of
the reference's largest magnitude."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def assert_within_twice_plain(ours: Sequence[torch.Tensor], plain: Sequence[torch.Tensor],
                              want: Sequence[torch.Tensor], names: Sequence[str], atol_rel: float) -> None:
    """For each named tensor: max|ours - want| <= 2 max|plain - want| + atol_rel * max|want| (in float64)."""
    for name, o, p, w in zip(names, ours, plain, want, strict=True):
        w = w.detach().double()
        err_ours = (o.detach().double() - w).abs().max().item()
        err_plain = (p.detach().double() - w).abs().max().item()
        assert err_ours <= 2 * err_plain + atol_rel * w.abs().max().item(), (name, err_ours, err_plain)
