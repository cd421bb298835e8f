"""Benchmark pack_sequences: r4b's backends vs the torch reference (cat + repeat_interleave)."""

from __future__ import annotations

import torch

from bench.harness import Case, backend_provider, default_device, run_bench
from r4b.kernels import pack_sequences


def cases(quick: bool) -> list[Case]:
    shapes = [(64, 256)] if quick else [(256, 4096), (4096, 256), (100_000, 8)]
    return [Case(f"seqs={n},len~{m}", {"seqs": n, "mean_len": m}, bytes=2 * n * m * 8 + n * m * 12) for n, m in shapes]


def inputs(case: Case, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    m = case.params["mean_len"]
    lengths = torch.randint(max(1, m // 2), m + m // 2 + 1, (case.params["seqs"],), generator=gen).tolist()
    flat = torch.randint(0, 151936, (sum(lengths),), generator=gen).to(device)
    return [t.clone() for t in torch.split(flat, lengths)]


def providers(device: str) -> dict:
    def r4b(backend: str):
        def make(case: Case):
            seqs = inputs(case, device)
            return lambda: pack_sequences(seqs, backend=backend)

        return backend_provider("pack", backend, device, make)

    return {"torch eager": r4b("torch"), "r4b cpp": r4b("cpp"), "r4b cuda": r4b("cuda")}


def main(argv: list[str] | None = None) -> list[dict]:
    argv = argv or []
    device = default_device()
    quick = "--quick" in argv or device == "cpu"
    return run_bench("pack", cases(quick), providers(device), device=device, quick=quick)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
