"""Benchmark (tuning data) the row kernel of the chunked fused-linear loss alone: one chunk's [C, V] logits buffer
at the anchor shape (C=3328 rows, V=151936, bf16), swept over (BLOCK_R, BLOCK_V, num_warps, programs per SM,
pipeline stages).

The kernel reads the buffer once and writes it once (the log-sum-exp and the gradient's P in place, one pass).
It overwrites its input, and a second call on its own output would take the rare rescale path (P read as
logits), so each timed call first restores the logits (a copy of the same buffer, which is exactly the ``torch
copy`` row): ``kernel_ms`` = the row's ms minus the copy's, ``gbps`` counts the kernel's 2 passes over
``kernel_ms``, and ``pct_copy`` = copy ms / kernel ms (both move the same bytes). The default config is the row
named ``default``.

    python -m bench grpo_rows [--quick]
"""

from __future__ import annotations

import sys

import torch

from bench.harness import Case, Skip, default_device, run_bench

# (BLOCK_R, BLOCK_V, num_warps, programs per SM, stages): rows per program, vocabulary block, warps; "p" caps the
# grid at that many programs per SM (0: one program per row block), each walking row blocks; "s" > 1 pipelines
# the vocabulary loop's loads (cp.async in the sm_90 PTX). sm_90 ptxas of the one-pass kernel: 56-232 registers;
# 4x2048 w8 spills 8 B, the others none. First GPU run (H100, 2026-11-26, the two-pass kernel, the first eight
# without p/s): 1x4096 w4 best at 92% of copy bandwidth, the default 1x4096 w8 tied; wider blocks and two rows
# per program were slower. Second (H200, 2026-11-27, Nsight Compute inside the loss): the default at 3.2 TB/s,
# about 75% of that run's copy rate; the sweep itself was cut before its first row. Third (H200, 2026-11-27, cut
# after eight): 1x4096 w4 0.601 ms (80% of a same-size copy), now the default; 1x4096 w8 0.652 ms (74%); pipelined
# loads (s2, s3) and persistent programs (p1, p2) all slower (49-67%). So the order: the default and the old one,
# then the configs not yet run, fewer warps first.
CONFIGS = [(1, 4096, 4, 0, 1), (1, 4096, 8, 0, 1), (1, 2048, 4, 0, 1), (1, 2048, 2, 0, 1), (1, 4096, 2, 0, 1),
           (1, 8192, 8, 0, 1), (1, 8192, 16, 1, 1), (1, 8192, 16, 0, 1), (1, 16384, 16, 0, 1), (2, 4096, 8, 0, 1),
           (4, 2048, 8, 0, 1), (1, 4096, 8, 0, 3), (1, 4096, 4, 0, 2), (1, 8192, 8, 1, 3), (1, 4096, 8, 2, 3)]


def cases(quick: bool) -> list[Case]:
    c, v, el = (64, 1000, 4) if quick else (3328, 151936, 2)
    return [Case(f"rows C={c},V={v}", {"C": c, "V": v}, bytes=2 * c * v * el)]


def _inputs(case: Case, device: str):
    from r4b.kernels import _fused_linear_chunked as fc

    c, v = case.params["C"], case.params["V"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    z0 = torch.randn(c, v, generator=g).to(device, dtype)
    z = z0.clone()
    targets = torch.randint(0, v, (c,), generator=g).to(device)
    w = torch.full((c,), 1.0 / c, device=device)
    adv = torch.randn(c, generator=g).to(device)
    old = (-torch.rand(c, generator=g) * 5 - 8).to(device)
    logp = torch.empty(c, device=device)
    coef = torch.empty(c, device=device)
    alpha = torch.empty(c, device=device)

    def launch(config):
        def call():
            z.copy_(z0)
            fc._launch_rows(z, targets, w, adv, old, None, logp, coef, alpha, 1.0, 0.8, 1.2, 0.0, fc.MODE_GRPO,
                            config=config)

        return call

    return z0, launch


def providers(device: str) -> dict:
    from r4b.kernels import _dispatch, available_backends
    from r4b.kernels import _fused_linear_chunked as fc

    def kernel(config):
        def setup(case: Case):
            if "triton" not in available_backends("fused_linear_grpo_loss", device):
                raise Skip(f"triton unavailable on {device} (set TRITON_INTERPRET=1 on the CPU)")
            if device == "cpu" and config is not None and config[1] > 1024:
                raise Skip("the CPU interpreter runs the default config only")
            _, launch = _inputs(case, device)
            return launch(config)

        return setup

    def copy(case: Case):
        z, _ = _inputs(case, device)
        out = torch.empty_like(z)
        return lambda: out.copy_(z)

    provs = {"torch copy": copy, "default": kernel(None)}
    default = fc.gpu_rows_config()
    sms = _dispatch.sm_count(torch.device("cuda", 0)) if device == "cuda" else 1
    for br, bv, warps, per_sm, stages in CONFIGS:
        if (br, bv, warps, per_sm, stages) != (*default, 0, 1):
            label = f"rows {br}x{bv} w{warps}" + (f" p{per_sm}" if per_sm else "")
            label += f" s{stages}" if stages > 1 else ""
            provs[label] = kernel((br, bv, warps, per_sm * sms, stages))
    return provs


def main(argv: list[str] | None = None) -> list[dict]:
    argv = argv or []
    device = default_device()
    quick = "--quick" in argv or device == "cpu"
    copy_ms: dict[str, float] = {}

    def extra(case: Case, row: dict) -> dict:
        if row["provider"] == "torch copy":
            copy_ms[case.label] = row["ms"]
            return {"kernel_ms": row["ms"], "pct_copy": 100.0}
        if case.label not in copy_ms:
            return {}
        kernel_ms = row["ms"] - copy_ms[case.label]
        return {"kernel_ms": kernel_ms, "gbps": case.bytes / kernel_ms / 1e6 if kernel_ms > 0 else None,
                "pct_copy": 100 * copy_ms[case.label] / kernel_ms if kernel_ms > 0 else None}

    return run_bench("grpo_rows", cases(quick), providers(device), device=device, quick=quick, extra_columns=extra)


if __name__ == "__main__":
    main(sys.argv[1:])
