"""Benchmark pack_sequences and unpack_padded: r4b's backends vs the torch reference (pack: cat +
repeat_interleave) and vs torch's pad_sequence over the split views (unpack_padded)."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from bench.harness import Case, Skip, backend_provider, default_device, run_bench
from r4b.kernels import pack_sequences, unpack, unpack_padded


def cases(quick: bool) -> list[Case]:
    shapes = [(64, 256)] if quick else [(256, 4096), (4096, 256), (100_000, 8)]
    out = []
    for op in ("pack", "unpack_padded"):
        for n, m in shapes:
            # pack: read + write the int64 tokens, write positions (8 B) and seq ids (4 B);
            # unpack_padded: read the tokens, write the padded rows (~1.5x the tokens with this length spread)
            nbytes = 2 * n * m * 8 + n * m * 12 if op == "pack" else n * m * 8 + n * int(1.5 * m) * 8
            out.append(Case(f"{op} seqs={n},len~{m}", {"op": op, "seqs": n, "mean_len": m}, bytes=nbytes))
    return out


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
            if case.params["op"] == "pack":
                return lambda: pack_sequences(seqs, backend=backend)
            if backend == "torch" and case.params["seqs"] > 10_000:
                raise Skip("the reference loops over sequences in Python; pad_sequence is the vectorised peer")
            p = pack_sequences(seqs)
            return lambda: unpack_padded(p.flat, p.cu_seqlens, p.max_seqlen, backend=backend)

        return make

    def pad_sequence_peer(case: Case):
        if case.params["op"] != "unpack_padded":
            raise Skip("pad_sequence is the peer of unpack_padded only")
        p = pack_sequences(inputs(case, device))
        return lambda: pad_sequence(unpack(p.flat, p.cu_seqlens), batch_first=True, padding_value=0)

    def both(backend: str):
        provs = {op: backend_provider(op, backend, device, r4b(backend)) for op in ("pack", "unpack_padded")}
        return lambda case: provs[case.params["op"]](case)

    return {"torch eager": both("torch"), "torch pad_sequence": pad_sequence_peer, "r4b cpp": both("cpp"),
            "r4b cuda": both("cuda")}


def main(argv: list[str] | None = None) -> list[dict]:
    argv = argv or []
    device = default_device()
    quick = "--quick" in argv or device == "cpu"
    return run_bench("pack", cases(quick), providers(device), device=device, quick=quick)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
