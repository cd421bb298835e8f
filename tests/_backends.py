"""Helpers for tests that run an op on every backend available on this machine."""

from __future__ import annotations

import pytest

from r4b.kernels import available_backends, registered_ops


def backend_params(op: str, device: str = "cpu") -> list:
    """pytest params: one per backend the op implements; those that cannot run here are skipped, with why."""
    here = available_backends(op, device)
    return [
        pytest.param(b, marks=() if b in here else pytest.mark.skip(reason=f"{b} backend unavailable for {op} here"))
        for b in registered_ops()[op]
    ]
