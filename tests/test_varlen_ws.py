"""The warp-specialised varlen kernels (R4B_VARLEN_FWD=ws, R4B_VARLEN_BWD=ws; r4b/kernels/_varlen_ws.py): the tile
table, their maths and masks against float64 (the interpreter runs the kernels with the specialisation ignored),
each with the other or with the default Triton kernels, sequence isolation, fp16 by STYLE.md's rule, what they
refuse; the sm_90 compile (the specialisation really applied); bf16 at the anchor on a Hopper GPU."""

import importlib
import os

import pytest
import torch

from bench.harness import same_bits
from r4b.kernels import varlen_attention, varlen_attention_ref
from tests._aot import run_aot_report
from tests._lowprec import assert_within_twice_plain
from tests.test_varlen_attention import (
    CASES,
    FP16_CASE,
    _attention64,
    _cu,
    _grads,
    _inputs,
    _sdpa_bf16_per_doc,
    check_fp16_within_twice_plain,
)

ws = importlib.import_module("r4b.kernels._varlen_ws")
# the GPU refuses the ws kernels while their warp-specialised compiles are known wrong (ws.GPU_BROKEN_FWD / _BWD):
# these tests are what lifting them must pass
# ($R4B_VARLEN_WS_UNVERIFIED=1, as bench/gpu_check.sh sets it for their step, runs them anyway)
_gpu_broken = pytest.mark.skipif(
    (ws.GPU_BROKEN_FWD is not None or ws.GPU_BROKEN_BWD is not None) and os.environ.get(ws.ENV_UNVERIFIED) != "1",
    reason=f"ws.GPU_BROKEN_FWD / _BWD: {ws.GPU_BROKEN_FWD} / {ws.GPU_BROKEN_BWD}")


def _spy(monkeypatch, name: str, arg: int) -> list:
    """The (T, H, D) shapes of argument ``arg`` of each call of ws.<name>."""
    ran = []
    real = getattr(ws, name)
    monkeypatch.setattr(ws, name, lambda *a, **kw: (ran.append(tuple(a[arg].shape)), real(*a, **kw))[1])
    return ran


@pytest.fixture(params=[("ws", "split"), ("ws", "ws"), ("triton", "ws")], ids=lambda p: "fwd-{}-bwd-{}".format(*p))
def ws_runs(request, monkeypatch):
    """R4B_VARLEN_FWD / R4B_VARLEN_BWD as the parameter says, and what ran: {"fwd": [(T, Hq, D) of each
    warp-specialised forward], "bwd": [... backward], "modes": the parameter}."""
    monkeypatch.setenv("R4B_VARLEN_FWD", request.param[0])
    monkeypatch.setenv("R4B_VARLEN_BWD", request.param[1])
    return {"fwd": _spy(monkeypatch, "forward", 0), "bwd": _spy(monkeypatch, "backward", 1), "modes": request.param}


def _expect(ws_runs, shape, calls: int = 1, takes: bool = True) -> None:
    """The warp-specialised kernels ran ``calls`` times on ``shape`` where the modes asked for them (and
    ``takes``: the inputs are ones they take), never elsewhere."""
    fwd, bwd = ws_runs["modes"]
    assert ws_runs["fwd"] == ([shape] * calls if fwd == "ws" and takes else [])
    assert ws_runs["bwd"] == ([shape] * calls if bwd == "ws" and takes else [])


def _table64(lens: list[int], block_m: int, items: int, reverse: bool) -> list[tuple[int, int]]:
    """Independent reference of the tile table: every (sequence, tile) in packed order (reversed), padded."""
    tiles = [(s, t) for s, n in enumerate(lens) for t in range(-(-n // block_m))]
    return (tiles[::-1] if reverse else tiles) + [(-1, 0)] * (items - len(tiles))


@pytest.mark.parametrize("lens,block_m", [([1, 37, 0, 1, 16, 5], 32), ([0], 16), ([300], 128), ([0, 0, 5, 0], 16),
                                          ([3] * 40 + [129, 1, 0, 250], 16), (list(range(70)), 32)])
@pytest.mark.parametrize("heavy_last", [True, False], ids=["query-tiles", "key-tiles"])
@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_tile_table_lists_every_tile_once(lens, block_m, heavy_last, impl, monkeypatch):
    """Per work item its sequence and tile: all tiles of every non-empty sequence once, in reversed packed order
    for query tiles (a causal sequence's last, heaviest tile first) or in packed order for key tiles (its first,
    heaviest), then empty items (-1) up to cdiv(T, BLOCK_M) + n; also past 16 sequences (a wider table) and with
    more items than one of the kernel's blocks. impl "torch": the path of batches with more than 1024 sequences."""
    if impl == "torch":
        monkeypatch.setattr(ws, "_TABLE_KERNEL_MAX_SEQS", 0)
    cu = _cu(lens)
    T = sum(lens)
    tab = ws.tile_table(cu, T, block_m, heavy_last)
    items = -(-T // block_m) + len(lens)
    assert tab.shape == (2, items) and tab.dtype == torch.int32
    assert list(zip(tab[0].tolist(), tab[1].tolist(), strict=True)) == _table64(lens, block_m, items, heavy_last)


@pytest.mark.parametrize("lens,Hq,Hkv,D,causal", CASES + [([1, 70, 2, 33], 4, 4, 32, True),
                                                         ([5, 0, 64, 1], 8, 1, 16, False),
                                                         ([100, 3, 28], 4, 2, 64, True)])
def test_ws_forward_matches_float64(lens, Hq, Hkv, D, causal, ws_runs):
    """Output and gradients (the default Triton backward after the warp-specialised forward, through its LSE)
    against float64; head dims it does not take (72, 80, 96) go to the Triton forward, by the spy."""
    _close_to_float64(lens, Hq, Hkv, D, causal)
    _expect(ws_runs, (sum(lens), Hq, D), takes=D in (16, 32, 64))


def _close_to_float64(lens, Hq, Hkv, D, causal, seed=0):
    """varlen_attention's output and gradients (fp32, the kernels the R4B_VARLEN_* variables choose) within fp32
    rounding of the float64 reference."""
    q, k, v, do = _inputs(lens, Hq, Hkv, D, seed=seed)
    cu = _cu(lens)
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, max(lens), causal=causal, backend="triton"),
                 q, k, v, do)
    ref = _grads(lambda a, b, c: _attention64(a, b, c, lens, causal, D**-0.5), q.double(), k.double(), v.double(),
                 do.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def _tuned_picks() -> str:
    """The ws autotuners' picks so far (key -> config), for a GPU failure's message: which config ran (on
    2026-11-27 a non-causal run differed between two runs and the pick was not known)."""
    return "; ".join(f"{name}: {dict((k, str(c)) for k, c in getattr(ws, name).cache.items())}"
                     for name in ("TUNED", "TUNED_DQ", "TUNED_DKDV"))


def _isolation(causal, change, ws_runs, device="cpu", lens=(7, 30, 11), D=64, dtype=torch.float32):
    lens = list(lens)
    Hq, Hkv = 4, 2
    cu = _cu(lens, device)
    q, k, v, do = _inputs(lens, Hq, Hkv, D, device=device, dtype=dtype)
    fn = lambda a, b, c: varlen_attention(a, b, c, cu, max(lens), causal=causal, backend="triton")
    base = _grads(fn, q, k, v, do)
    for name, a in zip(("out", "dq", "dk", "dv"), base, strict=True):  # (a NaN would also fail the comparisons)
        assert a.isfinite().all(), f"{name} not finite on finite inputs: {_where(a, a.nan_to_num(0.0), lens)}"
    again = _grads(fn, q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), base, again, strict=True):
        assert same_bits(a, b), (f"{name} differs between two runs on the same inputs: {_where(a, b, lens)}; "
                                 f"{_tuned_picks()}")
    s0, s1 = lens[0], lens[0] + lens[1]
    mid = slice(s0, s1)
    q2, k2, v2, do2 = (t.clone() for t in (q, k, v, do))
    if change == "finite":
        for t in (q2, k2, v2, do2):
            t[mid] = t[mid] * 3.0 + 1.0
    else:  # first, middle and last rows of sequence 1, next to both neighbours
        for t, bad in ((q2, float("nan")), (k2, float("inf")), (v2, float("-inf")), (do2, float("nan"))):
            t[[s0, (s0 + s1) // 2, s1 - 1]] = bad
    pert = _grads(fn, q2, k2, v2, do2)
    others = torch.ones(sum(lens), dtype=torch.bool, device=device)
    others[mid] = False
    for name, a, b in zip(("out", "dq", "dk", "dv"), base, pert, strict=True):
        assert same_bits(a[others], b[others]), f"{name} of the other sequences changed: {_where(a, b, lens)}"
        assert not same_bits(a[mid], b[mid]), name
    _expect(ws_runs, (sum(lens), Hq, D), calls=3)


def _where(a: torch.Tensor, b: torch.Tensor, lens: list[int]) -> str:
    """Where two (T, H, D) results differ: per sequence, the differing rows (first and last, count), the heads and
    the largest difference (what a GPU failure needs to be read without the GPU)."""
    diff = (a.double() - b.double()).abs().nan_to_num(float("inf")) + (a.isnan() ^ b.isnan()).double()
    parts, start = [], 0
    for s, n in enumerate(lens):
        d = diff[start:start + n]
        rows = d.flatten(1).amax(1).nonzero().flatten()
        if rows.numel():
            heads = d.amax((0, 2)).nonzero().flatten().tolist()
            parts.append(f"sequence {s} (rows {start}..{start + n - 1}): {rows.numel()} rows differ, local "
                         f"{rows[0].item()}..{rows[-1].item()}, heads {heads}, max diff {d.max().item():.3g}")
        start += n
    return "; ".join(parts) or "no difference"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("change", ["finite", "inf-nan"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on the planted NaNs
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_ws_no_information_crosses_a_boundary(causal, change, ws_runs):
    """Changing sequence 1 (finite, or inf / NaN at its first, middle and last rows) leaves sequences 0 and 2's
    outputs and gradients bit-identical: their tiles and key blocks reach into sequence 1's rows, which the
    per-sequence descriptors read as zeros."""
    _isolation(causal, change, ws_runs)


@pytest.mark.gpu
@_gpu_broken
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("change", ["finite", "inf-nan"])
def test_ws_no_information_crosses_a_boundary_gpu(causal, change, ws_runs):
    """The same on a Hopper GPU, bf16, D 128, tiles of 128 rows: the LSE / delta rows the TMA loads bring from the
    next sequence (NaN there) must not reach dK / dV or dQ."""
    _isolation(causal, change, ws_runs, device="cuda", lens=(100, 300, 77), D=128, dtype=torch.bfloat16)


@pytest.mark.parametrize("causal", [True, False])
def test_ws_fp16_within_twice_plain_fp16_error(causal, ws_runs):
    """STYLE.md's rule with fp16 on the CPU: against float64, the baseline PyTorch's SDPA per document in fp16."""
    check_fp16_within_twice_plain(causal)
    lens, Hq, _, D = FP16_CASE
    _expect(ws_runs, (sum(lens), Hq, D))


def test_ws_says_what_it_cannot_run(monkeypatch):
    """A GPU other than Hopper is refused by name (no silent fallback when asked for by name); inputs it cannot
    address go to the Triton forward: fp32 on a GPU, other head dims, unaligned rows, per-head offsets past int32."""
    cpu = torch.device("cpu")
    assert ws.device_problem(cpu, interpreted=True, part="fwd") is None
    assert "not a GPU" in ws.device_problem(cpu, interpreted=False, part="bwd")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert "not 9.x" in ws.device_problem(torch.device("cuda"), interpreted=False, part="fwd")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.delenv(ws.ENV_UNVERIFIED, raising=False)
    gpu = torch.device("cuda")
    # refused on Hopper too, each direction by its own reason (lifted one at a time as its GPU tests pass)
    monkeypatch.setattr(ws, "GPU_BROKEN_FWD", "fwd reason")
    monkeypatch.setattr(ws, "GPU_BROKEN_BWD", "bwd reason")
    assert ws.device_problem(gpu, interpreted=False, part="fwd") == "fwd reason"
    assert ws.device_problem(gpu, interpreted=False, part="bwd") == "bwd reason"
    assert ws.parts_problem(gpu, False, ("bwd", "fwd")) == "bwd reason"  # the first refused, in the given order
    monkeypatch.setattr(ws, "GPU_BROKEN_FWD", None)
    assert ws.device_problem(gpu, interpreted=False, part="fwd") is None
    assert ws.parts_problem(gpu, False, ("fwd",)) is None
    assert ws.parts_problem(gpu, False, ("fwd", "bwd")) == "bwd reason"
    assert ws.device_problem(gpu, interpreted=False, part="bwd") == "bwd reason"
    with pytest.raises(ValueError, match="part must be one of.*'both'"):
        ws.device_problem(gpu, interpreted=False, part="both")
    monkeypatch.setenv(ws.ENV_UNVERIFIED, "1")  # unless a GPU check asks for them to verify a fix
    assert ws.device_problem(gpu, interpreted=False, part="bwd") is None
    monkeypatch.setenv(ws.ENV_UNVERIFIED, "0")
    assert ws.device_problem(gpu, interpreted=False, part="bwd") == "bwd reason"
    q, k, v, _ = _inputs([5, 3], 2, 1, 64)
    assert ws.input_problem(q, k, v, interpreted=True) is None
    assert "dtype torch.float32" in ws.input_problem(q, k, v, interpreted=False)
    b = [t.bfloat16() for t in (q, k, v)]
    assert ws.input_problem(*b, interpreted=False) is None
    assert "head dim 80" in ws.input_problem(*(torch.zeros(8, 2, 80, dtype=torch.bfloat16) for _ in range(3)),
                                             interpreted=False)
    odd = torch.zeros(8, 2 * 64 + 1, dtype=torch.bfloat16)[:, 1:].view(8, 2, 64)
    assert "v is not TMA-addressable" in ws.input_problem(b[0], b[1], odd, interpreted=False)
    monkeypatch.setenv("R4B_VARLEN_FWD", "warp")
    with pytest.raises(ValueError, match="R4B_VARLEN_FWD.*'warp'"):
        varlen_attention(q, k, v, _cu([5, 3]), 5, backend="triton")
    assert ws.bwd_input_problem(q, q) is None
    assert "q has head stride" in ws.bwd_input_problem(q.transpose(0, 1).contiguous().transpose(0, 1), q)


def test_ws_each_direction_asks_for_its_own_refusal(monkeypatch):
    """R4B_VARLEN_FWD=ws asks device_problem about the forward, R4B_VARLEN_BWD=ws about the backward: so lifting
    one direction's GPU_BROKEN_* leaves the other refused."""
    asked = []
    real = ws.device_problem
    monkeypatch.setattr(ws, "device_problem", lambda dev, interp, part: (asked.append(part), real(dev, interp,
                                                                                              part))[1])
    monkeypatch.setenv("R4B_VARLEN_FWD", "ws")
    monkeypatch.setenv("R4B_VARLEN_BWD", "split")
    q, k, v, _ = _inputs([5, 3], 2, 1, 16)
    q.requires_grad_(True)
    varlen_attention(q, k, v, _cu([5, 3]), 5, backend="triton").sum().backward()
    assert asked == ["fwd"]
    monkeypatch.setenv("R4B_VARLEN_FWD", "triton")
    monkeypatch.setenv("R4B_VARLEN_BWD", "ws")
    varlen_attention(q, k, v, _cu([5, 3]), 5, backend="triton").sum().backward()
    assert asked == ["fwd", "bwd"]


@pytest.mark.parametrize("layout", ["head-major q", "broadcast dO", "narrowed dO"])
def test_ws_backward_layouts(layout, monkeypatch):
    """A q whose head stride is not D goes to the Triton backward (the dK/dV kernel reads Q as (L, Hq * D));
    a dO it cannot read (broadcast rows, a narrowed buffer) is copied; the gradients match float64 either way."""
    monkeypatch.setenv("R4B_VARLEN_BWD", "ws")
    ran = _spy(monkeypatch, "backward", 1)
    lens, Hq, Hkv, D = [9, 1, 22], 4, 2, 32
    q, k, v, do = _inputs(lens, Hq, Hkv, D)
    if layout == "head-major q":
        q = q.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "broadcast dO":
        do = do[:1].expand_as(do)
    else:
        do = torch.cat([do, do], 1)[:, :Hq]  # head stride D, row stride 2 * Hq * D
    cu = _cu(lens)
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 22, backend="triton"), q, k, v, do)
    ref = _grads(lambda a, b, c: _attention64(a, b, c, lens, True, D**-0.5), q.double(), k.double(), v.double(),
                 do.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert ran == ([] if layout == "head-major q" else [(sum(lens), Hq, D)])


def test_ws_kernels_are_warp_specialised_for_sm90():
    """triton's Hopper pass really specialised every config of the three kernels (both masks, D 128 and 64): a
    producer and two consumer warpgroups (12 warps) with setmaxnreg; the first config of each list (the
    autotuners' first guess) spills nothing. A change to a kernel's shape (a second loop, an early return, an if
    inside the loop, a pointer load before the loop that the loop reads) silently loses the specialisation or
    fails the pass: this catches both."""
    out = run_aot_report("bench.bench_varlen_attention", "--aot-ws")
    for kind, cfgs in (("fwd-ws", ws.CONFIGS), ("dq-ws", ws.DQ_CONFIGS), ("dkdv-ws", ws.DKDV_CONFIGS)):
        lines = [line for line in out.splitlines() if line.startswith(kind + " ")]
        assert len(lines) == 4 * len(cfgs), (kind, out)
        for i, line in enumerate(lines):
            assert "warps=12" in line and "setmaxnreg=0" not in line, line
            if i < 4:
                assert "0 bytes spill stores" in line, line
            # neither miscompilation of the first H200 run (bench.bench_varlen_attention.ws_ir_problems: a TMA
            # copy into a slot smaller than its block; a consumer's rows offset twice) is in the pass's output
            assert "ir problems=0" in line, line
            # no shared-memory overlap between buffers the partitions use at once (ws_smem_problems: the
            # hypothesis for the third H200 run's NaN and racecheck hazards, found absent in every config)
            assert "smem overlaps=0" in line, line
            assert "Potential Performance Loss" not in line, line  # ptxas did not serialise its wgmma


def test_ws_ir_check_finds_the_first_gpu_runs_miscompilations():
    """ws_ir_problems on TTGIR excerpts of the kind the pass made of the first ws kernels (dQ, 2026-11-27): a
    [1, 128] LSE block copied into a 64-element slot, and the second consumer's rows built from the remapped row
    coordinate (m0 + 64) plus a range from 64; and the fixed form (its own coordinate value) passes."""
    from bench.bench_varlen_attention import ws_ir_problems

    head = "tt.func @k() {\n  ttg.warp_specialize() default {\n  }\n"
    copy = ("      ttng.async_tma_copy_global_to_local %d[%h, %c] %s, %b, %true : !tt.tensordesc<tensor<1x128xf32, "
            "#shared2>>, !ttg.memdesc<1xi64, #shared, #smem, mutable> -> !ttg.memdesc<64xf32, #shared2, #smem>\n")
    consumer = ("  partition1(%a: i32) num_warps(4) {{\n"
                "      %m0 = arith.muli %t, %c128_i32 : i32\n"
                "      %do = arith.addi {base}, %c64_i32_14 : i32\n"
                "      %r = tt.make_range {{end = 128 : i32, start = 64 : i32}} : tensor<64xi32, #blocked>\n"
                "      %s = tt.splat %do : i32 -> tensor<64xi32, #blocked>\n"
                "      %q_loc = arith.addi %s, %r : tensor<64xi32, #blocked>\n  }}\n")
    bad = ws_ir_problems(head + copy + consumer.format(base="%m0"))
    assert len(bad) == 2 and "1x128xf32 block into a 64xf32 slot" in bad[0] and "offset twice" in bad[1], bad
    # the fixed kernels: a 1-D block split into 64-element halves, rows from the unremapped m0
    good = copy.replace("tensor<1x128xf32", "tensor<64xf32")
    fixed = consumer.format(base="%m0").replace("tt.splat %do", "tt.splat %m0")
    assert ws_ir_problems(head + good + fixed) == []


def test_padded_rows_start_every_sequence_at_a_multiple_of_4():
    """The backward's padded LSE / delta rows (ws.padded_rows): sequence s starts at 4 * ceil(cs / 4) + 4 * s,
    inside the buffer, in order, without overlap, the gaps zero; the kernels' _padded_start gives the same
    start (they read the rows through 1-D TMA blocks, whose coordinates must be 16-byte aligned)."""
    lens = [1, 37, 0, 1, 16, 5, 300, 2, 0]
    cu = _cu(lens, "cpu")
    T = sum(lens)
    x = torch.arange(1, 2 * T + 1, dtype=torch.float32).reshape(2, T)
    out = ws.padded_rows(x, cu)
    assert out.shape[1] % 4 == 0 and out.shape[1] == -(-T // 4) * 4 + 4 * (len(lens) + 1)
    want = torch.zeros_like(out)
    for s, (cs, L) in enumerate(zip(cu[:-1].tolist(), lens, strict=True)):
        start = -(-cs // 4) * 4 + 4 * s
        assert start % 4 == 0
        want[:, start : start + L] = x[:, cs : cs + L]
    assert torch.equal(out, want)


@pytest.mark.gpu
@_gpu_broken
@pytest.mark.parametrize("causal", [True, False])
def test_ws_bf16_anchor_gpu(causal, ws_runs):
    # anchor: 16384 packed tokens, 10 documents 128..4096, 32 query / 8 KV heads, D 128
    lens = [4096, 3072, 2560, 2048, 1536, 1280, 768, 512, 384, 128]
    q, k, v, do = _inputs(lens, 32, 8, 128, device="cuda")
    cu = _cu(lens, "cuda")
    ref = _grads(lambda a, b, c: varlen_attention_ref(a, b, c, cu, causal), q, k, v, do)  # fp32
    bf = [t.bfloat16() for t in (q, k, v, do)]
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 4096, causal=causal, backend="triton"), *bf)
    base = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, lens, causal), *bf)
    assert_within_twice_plain(got, base, ref, ("out", "dq", "dk", "dv"), atol_rel=1e-3)
    _expect(ws_runs, (16384, 32, 128))


@pytest.mark.gpu
@_gpu_broken
@pytest.mark.parametrize("D", [128, 64])
def test_ws_many_short_and_one_long_bf16_gpu(D, ws_runs):
    """Think/no-think packing (one long trace, hundreds of short answers; tiles and key blocks cross sequence
    ends everywhere), bf16 by the rule against fp32, GQA 4."""
    lens = [3000] + [1, 2, 3, 17, 40, 129] * 50
    q, k, v, do = _inputs(lens, 8, 2, D, device="cuda")
    cu = _cu(lens, "cuda")
    ref = _grads(lambda a, b, c: varlen_attention_ref(a, b, c, cu, True), q, k, v, do)
    bf = [t.bfloat16() for t in (q, k, v, do)]
    got = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, 3000, backend="triton"), *bf)
    base = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, lens, True), *bf)
    assert_within_twice_plain(got, base, ref, ("out", "dq", "dk", "dv"), atol_rel=1e-3)
    _expect(ws_runs, (sum(lens), 8, D))


@pytest.mark.gpu
@_gpu_broken
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("config", ws.CONFIGS)
def test_ws_every_config_gpu(config, causal, monkeypatch):
    """Each config run directly (the autotuner runs only its pick, which may differ between causal and not), twice:
    both runs finite (O and LSE start as NaN, so a row never written shows), the same bits (the third H200 run,
    2026-11-27: NaN from (64, 3), now dropped, and once 64 rows of one tile and head differing between two runs of an
    autotuned config), then output and LSE against float64."""
    lens = [700, 1, 129, 64, 3, 1100]
    q, k, v, _ = _inputs(lens, 8, 2, 128, device="cuda", dtype=torch.bfloat16)
    cu = _cu(lens, "cuda")
    T = sum(lens)
    va = importlib.import_module("r4b.kernels.varlen_attention")
    va._ensure_allocator()
    runs = []
    for _ in range(2):
        o = torch.full_like(q, float("nan"))
        lse = torch.full((8, T), float("nan"), dtype=torch.float32, device="cuda")
        ws.forward(q, k, v, o, lse, cu, 128**-0.5 * 1.4426950408889634, causal, False, config=config)
        runs.append((o, lse.t()[..., None]))  # LSE as (T, H, 1) for _where
    for i, run in enumerate(runs):
        for name, a in zip(("out", "lse"), run, strict=True):
            assert a.isfinite().all(), \
                f"config {config}: {name} of run {i} not finite: {_where(a, a.nan_to_num(0.0), lens)}"
    for name, a, b in zip(("out", "lse"), *runs, strict=True):
        assert same_bits(a, b), \
            f"config {config}: {name} differs between two runs on the same inputs: {_where(a, b, lens)}"
    o, lse = runs[0][0], runs[0][1][..., 0].t()
    ref = _attention64(q.double(), k.double(), v.double(), lens, causal, 128**-0.5)
    plain = _sdpa_bf16_per_doc(q, k, v, lens, causal).double()
    assert (o.double() - ref).abs().max() <= 2 * (plain - ref).abs().max() + 1e-3 * ref.abs().max()
    s = torch.einsum("ihd,jhd->hij", q.double(), k.double().repeat_interleave(4, 1)) * 128**-0.5
    doc = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))
    pos = torch.arange(T, device="cuda")
    ok = (doc[:, None] == doc[None, :]) & ((pos[None, :] <= pos[:, None]) | (not causal))
    lse_ref = torch.logsumexp(s.masked_fill(~ok, float("-inf")), -1) * 1.4426950408889634  # (Hq, T), log2 units
    torch.testing.assert_close(lse.double(), lse_ref, rtol=0, atol=2e-2)


@pytest.mark.gpu
@_gpu_broken
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("which", ["dq", "dkdv"])
def test_ws_backward_every_config_gpu(which, causal, monkeypatch):
    """Each dQ / dK/dV config run directly (the autotuners run only their pick, which may differ between causal
    and not), bf16, against float64 by the rule, on lengths whose total is not a multiple of 4 (the padded LSE /
    delta rows of the dQ kernel's TMA loads)."""
    lens = [700, 1, 129, 64, 3, 1100]
    q, k, v, do = _inputs(lens, 8, 2, 128, device="cuda")
    cu = _cu(lens, "cuda")
    scale = 128**-0.5
    ref = _grads(lambda a, b, c: _attention64(a, b, c, lens, causal, scale), q.double(), k.double(), v.double(),
                 do.double())
    bf = [t.bfloat16() for t in (q, k, v, do)]
    base = _grads(lambda a, b, c: _sdpa_bf16_per_doc(a, b, c, lens, causal), *bf)
    va = importlib.import_module("r4b.kernels.varlen_attention")
    va._ensure_allocator()
    qb, kb, vb, dob = bf
    T = sum(lens)
    # the plain Triton forward's output and LSE (the same (Hq, T) log2 layout): the backward is judged alone (on
    # 2026-11-27 the ws forward was the kernel that failed)
    monkeypatch.delenv("R4B_VARLEN_FWD", raising=False)
    o, lse = va._fwd(qb, kb, vb, cu, scale, causal)
    assert T == o.shape[0] and lse.shape == (8, T)
    delta = (o.float() * dob.float()).sum(-1).transpose(0, 1).contiguous()  # (Hq, T)
    for cfg in ws.DQ_CONFIGS if which == "dq" else ws.DKDV_CONFIGS:
        kw = {"dq_config": cfg} if which == "dq" else {"dkdv_config": cfg}
        got = ws.backward(dob, qb, kb, vb, lse, delta, cu, scale, causal, False, **kw)
        assert_within_twice_plain(got, base[1:], ref[1:], ("dq", "dk", "dv"), atol_rel=1e-3)


@pytest.mark.parametrize("causal", [True, False])
def test_ws_kernels_at_the_gpu_tiles_match_float64(causal, monkeypatch):
    """The interpreter with the GPU's tiles (forward 128 x 64, dQ 128 x 64, dK/dV 128 x 32) instead of its small
    ones: 128-row tiles spanning several sequences and ending past T, LSE / delta read from the padded rows at
    tile offsets of 128, sequences starting off a multiple of 4; ws forward and backward against float64."""
    monkeypatch.setenv("R4B_VARLEN_FWD", "ws")
    monkeypatch.setenv("R4B_VARLEN_BWD", "ws")
    monkeypatch.setattr(ws, "_INTERP_BLOCK", (ws.BLOCK_M, ws.CONFIGS[0][0]))
    monkeypatch.setattr(ws, "_INTERP_BWD", {"dq": (ws.BLOCK_M, ws.DQ_CONFIGS[0][0]),
                                            "dkdv": (ws.BLOCK_M, ws.DKDV_CONFIGS[0][0])})
    ran = {"fwd": _spy(monkeypatch, "forward", 0), "bwd": _spy(monkeypatch, "backward", 1)}
    lens, Hq, Hkv, D = [131, 1, 3, 200, 0, 70], 4, 2, 16
    _close_to_float64(lens, Hq, Hkv, D, causal, seed=9)
    assert ran == {"fwd": [(sum(lens), Hq, D)], "bwd": [(sum(lens), Hq, D)]}, ran


def test_ws_backward_leaves_padded_rows_past_int32_to_the_triton_kernels(monkeypatch):
    """The padded LSE / delta rows add up to 4 per sequence: where Hq times them would pass int32 offsets (many
    short sequences in a huge batch) the backward runs on the Triton kernels, with the same gradients."""
    assert ws.padded_problem(1000, 32, 300) is None
    # T = 2^25 - 4 passes input_problem (2 * Hq * T < 2^31); 2^23 sequences pad it to 2^26 rows: 32 * 2^26 = 2^31
    assert "2^31" in ws.padded_problem(2**25 - 4, 32, 2**23)
    assert ws.padded_problem(2**25 - 4, 32, 2**23 - 2) is None
    lens, Hq, Hkv, D = [7, 30, 11], 4, 2, 16
    q, k, v, do = _inputs(lens, Hq, Hkv, D)
    cu = _cu(lens)
    fn = lambda a, b, c: varlen_attention(a, b, c, cu, 30, backend="triton")  # noqa: E731
    monkeypatch.setenv("R4B_VARLEN_BWD", "ws")
    ran = _spy(monkeypatch, "backward", 1)
    want = _grads(fn, q, k, v, do)
    assert ran == [(sum(lens), Hq, D)]
    monkeypatch.setattr(ws, "padded_problem", lambda T, h, n: "past int32")
    got = _grads(fn, q, k, v, do)
    assert ran == [(sum(lens), Hq, D)]  # not run again
    monkeypatch.setenv("R4B_VARLEN_BWD", "split")
    split = _grads(fn, q, k, v, do)
    for a, b in zip(got, split, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def test_ws_smem_check_finds_overlapping_buffers():
    """ws_smem_problems on an allocated module of the ws forward's shape (a K ring, a Q half and mbarriers that
    ttg.warp_specialize captures, an unused partner barrier at offset 0 initialised before the region, each
    consumer's epilogue scratch, the dispatch state): the layout triton gave every config passes; each overlap
    that would let one partition write what another still reads is found (a consumer's scratch inside the Q
    buffer, two captured buffers sharing bytes, both consumers' scratch at one offset, the dispatch state on a
    barrier, the offset-0 barrier used in the region)."""
    from bench.bench_varlen_attention import ws_smem_problems

    ir = """module attributes {ttg.shared = 1096 : i32} {
  tt.func public @k(%a: i32 loc("k.py":1:0)) attributes {allocation.offset = 1088 : i32, noinline = false} {
    %0 = ttg.local_alloc {allocation.offset = 1024 : i32} : () -> !ttg.memdesc<2x1xi64, #shared, #smem, mutable>
    %1 = ttg.local_alloc {allocation.offset = 0 : i32} : () -> !ttg.memdesc<1x1xi64, #shared, #smem, mutable>
    %2 = ttg.memdesc_index %1[%c0_i32] : !ttg.memdesc<1x1xi64, #shared, #smem, mutable> -> !ttg.memdesc<1xi64>
    ttng.init_barrier %2, 1 : !ttg.memdesc<1xi64, #shared, #smem, mutable>
    %3 = ttg.local_alloc {allocation.offset = 0 : i32} : () -> !ttg.memdesc<2x8x16xbf16, #shared1, #smem, mutable>
    %4 = ttg.local_alloc {allocation.offset = 512 : i32} : () -> !ttg.memdesc<1x8x16xbf16, #shared1, #smem, mutable>
    ttg.warp_specialize(%a, %0, %3, %4) attributes {allocation.offset = 768 : i32, warpGroupStartIds = array<i32: 4, 8>}
    default {
      %5 = ttg.memdesc_index %0[%c0_i32] : !ttg.memdesc<2x1xi64, #shared, #smem, mutable> -> !ttg.memdesc<1xi64>
      ttng.wait_barrier %5, %c1_i32 : !ttg.memdesc<1xi64, #shared, #smem, mutable> loc(#loc3)
      ttg.warp_yield loc(#loc)
    }
    partition0(%arg0: i32, %arg1: !ttg.memdesc<2x1xi64, #shared, #smem, mutable>) num_warps(4) {
      %6 = ttg.convert_layout %x {allocation.offset = 768 : i32} : tensor<8x16xbf16, #mma> -> tensor<8x16xbf16, #b>
      ttg.warp_return loc(#loc)
    }
    partition1(%arg0: i32, %arg1: !ttg.memdesc<2x1xi64, #shared, #smem, mutable>) num_warps(4) {
      %6 = ttg.convert_layout %x {allocation.offset = 896 : i32} : tensor<8x16xbf16, #mma> -> tensor<8x16xbf16, #b>
      ttg.warp_return loc(#loc)
    }
  }
}
"""
    assert ws_smem_problems(ir) == []
    scratch_in_q = ws_smem_problems(ir.replace("allocation.offset = 896", "allocation.offset = 600"))
    assert len(scratch_in_q) == 1 and "scratch at 600 in partition1 lies in captured %4 (512, 768)" in scratch_in_q[0]
    rings = ws_smem_problems(ir.replace("allocation.offset = 512 : i32", "allocation.offset = 256 : i32"))
    assert rings == ["captured buffers %3 (0, 512) and %4 (256, 512) overlap"], rings
    same = ws_smem_problems(ir.replace("allocation.offset = 896", "allocation.offset = 768"))
    assert same == ["partition0 and partition1 both put scratch at 768"], same
    state = ws_smem_problems(ir.replace("allocation.offset = 1088", "allocation.offset = 1032"))
    assert state == ["dispatch state [1032, 1096) overlaps captured %0"], state
    dead = ws_smem_problems(ir.replace("%5 = ttg.memdesc_index %0[", "%5 = ttg.memdesc_index %1["))
    assert len(dead) == 1 and "%1 [0, 8) shares bytes with captured %3" in dead[0], dead
    assert ws_smem_problems(ir.replace("ttg.warp_specialize(", "ttg.foo(")) == ["no ttg.warp_specialize in the module"]
