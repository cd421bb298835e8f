"""Benchmark the SFT loss and the rollout log-probs from hidden states (the two other fused-linear ops).

cross_entropy (forward + backward into hidden and weight): eager torch (materialised logits, F.cross_entropy in
fp32), torch.compile of it, Liger's LigerFusedLinearCrossEntropyLoss when importable, r4b (torch, Triton
chunked and tiled). FLOPs = 3 GEMMs of 2*N*H*V.
logprobs (forward, no grad: old / reference log-probs): eager torch (materialised logits, fp32 log-softmax,
gather), torch.compile of it, r4b (torch, Triton chunked: cuBLAS GEMM + one read of the chunk; Triton tiled:
online log-sum-exp, O(N) memory). FLOPs = 1 GEMM of 2*N*H*V.
The ``x_floor`` column is the time over those FLOPs at the 8192^3 bf16 matmul rate measured in the same run.

    python -m bench fused_linear [--quick]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.bench_grpo_loss import ANCHOR, CHECK_TOL, _impl, _timed
from bench.harness import Case, Skip, backend_provider, default_device, matmul_floor_columns, run_bench
from r4b.kernels import fused_linear_cross_entropy, fused_linear_logprobs
from r4b.kernels._dispatch import triton_interpret


def cases(quick: bool) -> list[Case]:
    shapes = [(256, 64, 1000)] if quick else [(16384, 2560, 151936), (16384, 4096, 128256)]
    out = []
    for n, h, v in shapes:
        for op, gemms in (("cross_entropy", 3), ("logprobs", 1)):
            out.append(Case(f"{op} N={n},H={h},V={v}", {"op": op, "N": n, "H": h, "V": v},
                            flops=gemms * 2 * n * h * v))
    return out


def inputs(case: Case, device: str, dtype: torch.dtype):
    """hidden (N, H), weight (V, H) (requiring grad for cross_entropy), targets (N,) with ~10% ignored (-100)."""
    n, h, v = case.params["N"], case.params["H"], case.params["V"]
    grad = case.params["op"] == "cross_entropy"
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_(grad)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_(grad)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.1] = -100
    return hidden, weight, targets.to(device)


def eager_ce(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)  # (N, V) logits


@torch.no_grad()
def eager_logprobs(hidden, weight, targets):
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # (N, V)
    return torch.where(targets >= 0, logp.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)


def providers(device: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def call(case: Case, ce, lp):
        hidden, weight, targets = inputs(case, device, dtype)
        if case.params["op"] == "cross_entropy":
            return _timed(lambda: ce(hidden, weight, targets), hidden, weight)
        return lambda: lp(hidden, weight, targets)

    def eager(case: Case):
        return call(case, eager_ce, eager_logprobs)

    def compiled(case: Case):
        if device != "cuda":
            raise Skip("torch.compile provider is measured on the GPU only")
        if (case.params["N"], case.params["H"], case.params["V"]) != ANCHOR:
            raise Skip("torch.compile is measured at the anchor shape only (its compile time, per shape)")
        return call(case, torch.compile(eager_ce, dynamic=False), torch.compile(eager_logprobs, dynamic=False))

    def liger(case: Case):
        if case.params["op"] != "cross_entropy":
            raise Skip("Liger has no fused-linear log-probs op")
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as ex:
            raise Skip(f"liger-kernel not importable ({ex})") from None
        if device != "cuda" and not triton_interpret():
            raise Skip("Liger runs on a GPU, or on the CPU under TRITON_INTERPRET=1")
        loss_mod = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        return call(case, lambda h, w, t: loss_mod(w, h, t), None)

    def r4b(backend: str, impl: str | None = None):
        def ce(h, w, t):
            with _impl(impl):
                return fused_linear_cross_entropy(h, w, t, backend=backend)

        def lp(h, w, t):
            with _impl(impl):
                return fused_linear_logprobs(h, w, t, backend=backend)

        def make(case: Case):
            return call(case, ce, lp)

        op = "fused_linear_cross_entropy"
        return backend_provider(op, backend, device, make)

    # eager first: the reference of the result check; torch.compile last (its compile time is the longest)
    return {
        "torch eager": eager,
        "r4b triton chunked": r4b("triton", "chunked"),
        "liger fused linear CE": liger,
        "r4b triton tiled": r4b("triton", "tiled"),
        "r4b torch (chunked)": r4b("torch"),
        "torch.compile": compiled,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    argv = argv or []
    device = default_device()
    quick = "--quick" in argv or device == "cpu"
    return run_bench("fused_linear", cases(quick), providers(device), device=device, quick=quick,
                     extra_columns=matmul_floor_columns(device), check_tol=CHECK_TOL[device])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
