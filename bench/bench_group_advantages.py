"""Benchmark group_advantages: r4b's backends vs torch eager (the reference) and torch.compile of it."""

from __future__ import annotations

import torch

from bench.harness import Case, Skip, backend_provider, default_device, run_bench
from r4b.kernels import group_advantages


def cases(quick: bool) -> list[Case]:
    # BPO: one group of 2g rollouts per prompt; 512 prompts x 16 is a large RL batch.
    shapes = [(64, 16)] if quick else [(512, 16), (4096, 16), (65536, 8)]
    return [Case(f"prompts={p},2g={g}", {"prompts": p, "group": g}, bytes=p * g * (4 + 8 + 4)) for p, g in shapes]


def inputs(case: Case, device: str):
    n = case.params["prompts"] * case.params["group"]
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (n,), generator=gen).float().to(device)
    ids = torch.arange(case.params["prompts"]).repeat_interleave(case.params["group"])
    return rewards, ids[torch.randperm(n, generator=gen)].to(device)


def providers(device: str) -> dict:
    def r4b(backend: str):
        def make(case: Case):
            r, g = inputs(case, device)
            return lambda: group_advantages(r, g, backend=backend)

        return backend_provider("group_advantages", backend, device, make)

    def compiled(case: Case):
        from r4b.kernels.group_advantages import group_advantages_ref

        if device != "cuda":
            raise Skip("torch.compile provider is measured on the GPU only")
        r, g = inputs(case, device)
        fn = torch.compile(group_advantages_ref, dynamic=False)
        return lambda: fn(r, g)

    provs = {"torch eager": r4b("torch"), "torch.compile": compiled}
    for b in ("cpp", "triton", "cuda"):
        provs[f"r4b {b}"] = r4b(b)
    return provs


def main(argv: list[str] | None = None) -> list[dict]:
    argv = argv or []
    device = default_device()
    quick = "--quick" in argv or device == "cpu"
    return run_bench("group_advantages", cases(quick), providers(device), device=device, quick=quick)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
