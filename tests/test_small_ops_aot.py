"""The small memory-bound ops' Triton kernels (rms_norm, rope, swiglu) compiled for sm_90 without a GPU, at the
bench shapes with the launchers' own blocks and warps: no register spills, and tiles read and written in 16-byte
vectors. (swiglu with its column count unspecialised read bf16 element by element: 64 ld.global.b16 a thread, and
moved 2.0 TB/s on an H100 where torch.compile moved 3.0.)"""

from __future__ import annotations

import ast
import importlib
import re

from tests._aot import run_aot_report

ROPE_CONFIGS = importlib.import_module("r4b.kernels.rope").CONFIGS
SWIGLU_CONFIGS = importlib.import_module("r4b.kernels.swiglu").CONFIGS


def test_small_ops_compile_for_sm90_vectorised_without_spills():
    out = run_aot_report("bench.bench_norms")
    lines = [line for line in out.splitlines() if "global memory ops" in line]
    labels = [line.split(" warps=")[0] for line in lines]
    # rms_norm at both widths; every rope and swiglu autotune config that its pruning keeps at the bench shapes
    assert {"rms_norm fwd D=2560", "rms_norm bwd D=2560", "rms_norm fwd D=128", "rms_norm bwd D=128"} <= set(labels)
    assert sum(x.startswith("rope D=128 T") for x in labels) == len(ROPE_CONFIGS), out
    assert sum(x.startswith("swiglu fwd I=9728 ") for x in labels) == len(SWIGLU_CONFIGS), out
    assert sum(x.startswith("swiglu bwd I=9728 ") for x in labels) == len(SWIGLU_CONFIGS), out
    for line in lines:
        assert "0 bytes spill stores" in line, line
        ops = ast.literal_eval(line.split("global memory ops ")[1])
        # vector accesses (16 bytes, or 8 where a thread holds 4 bf16 of a small tile)
        vec = {kind: sum(n for op, n in ops.items() if op.startswith(kind) and (".v4." in op or ".v2." in op))
               for kind in ("ld.global", "st.global")}
        assert vec["ld.global"] > 0 and vec["st.global"] > 0, line
        # at most one scalar bf16 load a thread (the D=128 norm's weight: 128 values over 128 threads), no
        # scalar bf16 store
        assert ops.get("ld.global.b16", 0) <= 1 and ops.get("st.global.b16", 0) == 0, line
        assert re.search(r"Used \d+ registers", line), line


def test_gpu_autotune_pruning_keeps_sane_tiles():
    """The GPU autotuners' early pruning (no GPU needed): swiglu drops column tiles wider than twice the row,
    rope drops tiles over 4k element pairs, and each always keeps a config."""
    import triton

    swi = importlib.import_module("r4b.kernels.swiglu")
    rope = importlib.import_module("r4b.kernels.rope")
    widths = lambda cfgs: sorted({c.kwargs["BLOCK_N"] for c in cfgs})
    assert widths(swi._prune(swi._cfgs, {"n_cols": 9728})) == [512, 1024, 2048, 4096]
    assert widths(swi._prune(swi._cfgs, {"n_cols": 64})) == [512]
    cfgs = [triton.Config({"BLOCK_T": t}, num_warps=w) for t, w in rope.CONFIGS]
    assert len(rope._prune(cfgs, {}, BLOCK_HALF=64)) == len(cfgs)
    assert sorted(c.kwargs["BLOCK_T"] for c in rope._prune(cfgs, {}, BLOCK_HALF=128)) == [8, 16, 16, 32]
    assert [c.kwargs["BLOCK_T"] for c in rope._prune(cfgs, {}, BLOCK_HALF=8192)] == [8]


def test_rms_norm_backward_autotune_pruning():
    """2k..8k elements a step, 16 warps only from 4k; the fixed tiles timed on the H100 are kept; rows too wide
    or too narrow for the window fall back to the fixed tile."""
    import triton

    rms = importlib.import_module("r4b.kernels.rms_norm")
    cfgs = [triton.Config({"BLOCK_M": m}, num_warps=w) for m, w in rms.BWD_CONFIGS]
    kept = lambda D: {(c.kwargs["BLOCK_M"], c.num_warps) for c in rms._bwd_prune(cfgs, {}, D=D,
                                                                                  BLOCK_D=triton.next_power_of_2(D))}
    assert kept(2560) == {(1, 4), (1, 8), (2, 4), (2, 8), (1, 16), (2, 16)}
    assert kept(128) == {(16, 4), (16, 8), (32, 4), (32, 8), (64, 4), (64, 8)}
    assert kept(16) == {(64, 4)} and kept(16384) == {(1, 8)}
