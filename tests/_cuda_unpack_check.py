"""Child-process check of the CUDA pack / unpack_padded ops (python -m tests._cuda_unpack_check): what
tests/test_pack.py runs in a child, and what bench/gpu_check.sh runs under cuda-gdb while it fails.

On the H100 (2026-11-26, torch 2.11 cu130) the same steps in the pytest process ended in a segmentation fault
inside torch.ops.r4b.unpack_padded with bad cu_seqlens values, after the pack below had run under sync debug
mode "error". The CPU op's identical check raises ValueError here; the first step repeats that CPU call in this
process on the GPU machine's build of r4b._C, so that a crash there too would point at C++ exceptions leaving that
build at all (its compiler, its link against torch) rather than at the CUDA op. Each step prints before it runs,
so a crash shows which one it was."""

from __future__ import annotations

import r4b._C  # noqa: F401  (registers torch.ops.r4b.*)
import torch

BAD = (([0, 2, 9], "end at"), ([-3, 2, 5], "start at 0"), ([0, 4, 2, 5], "non-decreasing"))


def main() -> None:
    print("step cpu unpack_padded cu_seqlens=[0, 2, 9]", flush=True)
    try:
        torch.ops.r4b.unpack_padded(torch.arange(5), torch.tensor([0, 2, 9], dtype=torch.int32), 7)
    except ValueError as ex:
        print("cpu raised", "end at" in str(ex), flush=True)
    else:
        print("cpu no error", flush=True)
    seqs = [torch.arange(n, device="cuda") for n in (3, 1, 7)]
    torch.cuda.synchronize()
    print("step pack under sync debug mode 'error'", flush=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        flat, cu, _, _ = torch.ops.r4b.pack(seqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print("pack ok", cu.tolist() == [0, 3, 4, 11] and torch.equal(flat.cpu(), torch.cat([s.cpu() for s in seqs])),
          flush=True)
    for bad, match in BAD:
        print(f"step unpack_padded cu_seqlens={bad}", flush=True)
        try:
            torch.ops.r4b.unpack_padded(torch.arange(5, device="cuda"),
                                        torch.tensor(bad, dtype=torch.int32, device="cuda"), 7)
        except ValueError as ex:
            print("raised", match in str(ex), flush=True)
        else:
            print("no error", flush=True)


if __name__ == "__main__":
    main()
