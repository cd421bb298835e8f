"""The small memory-bound ops' Triton kernels (rms_norm, add_rms_norm, rope, swiglu, qk_norm_rope) compiled for
sm_90 without a GPU, at the bench shapes with the launchers' own blocks and warps: no register spills, and tiles read
and written in 16-byte vectors. (swiglu with its column count unspecialised read bf16 element by element: 64
ld.global.b16 a thread, and moved 2.0 TB/s on an H100 where torch.compile moved 3.0.)"""

from __future__ import annotations

import ast
import importlib
import re

from tests._aot import run_aot_report

ROPE_CONFIGS = importlib.import_module("r4b.kernels.rope").CONFIGS
SWIGLU_CONFIGS = importlib.import_module("r4b.kernels.swiglu").CONFIGS
QKR_CONFIGS = importlib.import_module("r4b.kernels.qk_norm_rope").CONFIGS


def test_small_ops_compile_for_sm90_vectorised_without_spills():
    out = run_aot_report("bench.bench_norms")
    lines = [line for line in out.splitlines() if "global memory ops" in line]
    labels = [line.split(" warps=")[0] for line in lines]
    rms = importlib.import_module("r4b.kernels.rms_norm")
    # rms_norm's forward at both widths and every backward autotune config that its pruning keeps there (the
    # GPU backward is always autotuned); every rope and swiglu autotune config that its pruning keeps
    assert {"rms_norm fwd D=2560", "rms_norm fwd D=128", "add_rms_norm fwd D=2560"} <= set(labels)
    for name, D in (("rms_norm", 2560), ("rms_norm", 128), ("add_rms_norm", 2560)):
        tuned, prune = (rms._bwd_add_tuned, rms._bwd_add_prune) if name == "add_rms_norm" else (rms._bwd_tuned,
                                                                                                  rms._bwd_prune)
        kept = prune(tuned.configs, {}, D=D, BLOCK_D=1 << (D - 1).bit_length())
        assert sum(x.startswith(f"{name} bwd D={D} ") for x in labels) == len(kept) >= 1, out
    assert sum(x.startswith("rope D=128 T") for x in labels) == len(ROPE_CONFIGS), out
    assert sum(x.startswith("swiglu fwd I=9728 ") for x in labels) == len(SWIGLU_CONFIGS), out
    for direction in ("fwd", "bwd"):
        assert sum(x.startswith(f"qk_norm_rope {direction} D=128 T") for x in labels) == len(QKR_CONFIGS), out
        # the pipelined configs load through cp.async (8 or 16 bytes a copy, checked below)
        for line in lines:
            m = re.match(rf"qk_norm_rope {direction} D=128 T(\d+) S(\d+) warps=\d+:", line)
            if m and int(m.group(2)) > 1:
                assert "cp.async" in line, line
    assert sum(x.startswith("swiglu bwd I=9728 ") for x in labels) == len(SWIGLU_CONFIGS), out
    for line in lines:
        assert "0 bytes spill stores" in line, line
        ops = ast.literal_eval(line.split("global memory ops ")[1])
        # vector accesses (16 bytes, or 8 where a thread holds 4 bf16 of a small tile), cp.async copies
        # (global -> shared) included
        vec = {kind: sum(n for op, n in ops.items() if op.startswith(kind) and (".v4." in op or ".v2." in op))
               for kind in ("ld.global", "st.global")}
        cp = {int(op.rsplit(".", 1)[1]): n for op, n in ops.items() if op.startswith("cp.async")}
        assert vec["ld.global"] + cp.get(16, 0) + cp.get(8, 0) > 0 and vec["st.global"] > 0, line
        # at most one scalar bf16 load a thread (the D=128 norm's weight: 128 values over 128 threads), no
        # scalar bf16 store or copy
        assert ops.get("ld.global.b16", 0) <= 1 and ops.get("st.global.b16", 0) == 0 and 2 not in cp, line
        regs = re.search(r"Used (\d+) registers", line)
        assert regs, line
        m = re.match(r"(?:add_)?rms_norm bwd D=\d+ M\d+ S(\d+) P(\d+) warps=(\d+):", line)
        if m:
            stages, per_sm, warps = map(int, m.groups())
            # the row loop is pipelined through cp.async, x and dy in 16-byte copies
            assert stages > 1 and cp.get(16, 0) > 0, line
            # the grid of per_sm programs an SM is one wave on an H100: registers (allocated 8 a thread at a
            # time, 64k an SM) and shared memory (228 kB an SM, 1 kB of it reserved a block) let them all reside
            smem = int(re.search(r"; (\d+) bytes smem", line).group(1))
            assert per_sm * -(-int(regs.group(1)) // 8) * 8 * 32 * warps <= 65536, line
            assert per_sm * (smem + 1024) <= 228 * 1024, line


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
    """Tiles of 2k..8k elements a step (one row from 4096), each with its warps, pipeline stages and programs an
    SM; rows too wide or too narrow for them fall back to the fixed tile; the list starts with D=2560's tile."""
    rms = importlib.import_module("r4b.kernels.rms_norm")
    kept = lambda D: {(c.kwargs["BLOCK_M"], c.num_warps, c.kwargs["STAGES"], c.kwargs["PROGS_PER_SM"])
                      for c in rms._bwd_prune(rms._bwd_tuned.configs, {}, D=D, BLOCK_D=1 << (D - 1).bit_length())}
    assert rms.BWD_CONFIGS[0] == (1, 4, 3, 4)
    assert kept(2560) == {(1, 4, 3, 4), (1, 4, 3, 3), (1, 16, 3, 2), (1, 16, 4, 2)}
    assert kept(128) == {(16, 4, 3, 4), (32, 4, 3, 4), (32, 4, 3, 3), (32, 16, 3, 2), (32, 16, 4, 2), (64, 8, 3, 2),
                         (64, 8, 3, 1)}
    assert kept(5120) == {(1, 8, 3, 2), (1, 8, 3, 1)} and kept(1024) >= {(2, 4, 3, 4), (4, 4, 3, 3)}
    assert kept(16) == {(64, 4, 3, 4)} and kept(16384) == {(1, 8, 3, 1)}
    # add_rms_norm's (ADD_DS): at most three programs an SM (8 warps, 80 registers), two where a 4-warp program
    # holds ~196 registers
    kept_add = {(c.kwargs["BLOCK_M"], c.num_warps, c.kwargs["STAGES"], c.kwargs["PROGS_PER_SM"])
                for c in rms._bwd_add_prune(rms._bwd_add_tuned.configs, {}, D=2560, BLOCK_D=4096)}
    assert kept_add == {(1, 8, 3, 3), (1, 8, 4, 2), (1, 4, 3, 2), (1, 4, 4, 2), (1, 16, 3, 2), (1, 16, 4, 2)}
    assert {c.kwargs["PROGS_PER_SM"] for c in rms._bwd_add_prune(rms._bwd_add_tuned.configs, {}, D=16,
                                                                   BLOCK_D=16)} == {2}
    # the persistent grid: one wave of programs, never more than there are row blocks
    assert rms._bwd_grid(16384, 1, 4, 132) == 528 and rms._bwd_grid(40, 32, 4, 132) == 2
