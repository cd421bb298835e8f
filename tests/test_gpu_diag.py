"""bench/gpu_diag.py off the GPU: its ncu-log parser and table on a log in the layout of ``ncu --csv --page raw``
(header row, units row, one row per kernel, ncu's own ==PROF== lines and the program's output in between), and the
refusal without a GPU. Its profiled programs run on the GPU machine only (bench/gpu_check.sh's diag phase)."""

import csv
import io
import math

import pytest
import torch

from bench import gpu_diag

STALL = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
HEADER = ["ID", "Process ID", "Kernel Name", "Block Size", "Grid Size", "gpu__time_duration.sum",
          "sm__throughput.avg.pct_of_peak_sustained_elapsed", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
          "launch__registers_per_thread", "launch__grid_size", "launch__block_size",
          "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
          "sm__inst_executed_pipe_tensor_op_hmma.avg.pct_of_peak_sustained_active",
          STALL.format("barrier"), STALL.format("long_scoreboard"), STALL.format("math_pipe_throttle"),
          STALL.format("wait"), STALL.format("mio_throttle"), STALL.format("selected")]
UNITS = ["", "", "", "", "", "usecond", "%", "%", "register/thread", "", "", "%", "%", "", "", "", "", "", ""]


def _log(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow(HEADER)
    w.writerow(UNITS)
    buf.write("==PROF== Disconnected from process 123\n")
    for r in rows:
        w.writerow(r)
    return "==PROF== Connected to process 123\nprofiled, in launch order: gluon fwd+bwd\n" + buf.getvalue()


ROWS = [
    ["0", "123", "_fwd_kernel", "(256, 1, 1)", "(4096, 1, 1)", "812.5", "71.2", "12.0", "200", "4096", "256",
     "63.5", "0", "3.5", "0.5", "1.25", "0.75", "2.0", "1.0"],
    ["1", "123", "void at::native::vectorized_elementwise_kernel<4, float>(int, float)", "(128, 1, 1)",
     "(1,024, 1, 1)", "1,200.0", "20", "88.5", "32", "1024", "128", "n/a", "0", "0", "4.0", "0", "0", "0", "1.0"],
]


def test_parse_ncu_raw_csv_gives_each_kernel_its_metrics_and_top_stalls():
    kernels = gpu_diag.parse_ncu_csv(_log(ROWS))
    assert [k["id"] for k in kernels] == [0, 1]
    fwd, ew = kernels
    assert fwd["name"] == "_fwd_kernel" and fwd["time_us"] == pytest.approx(812.5)
    assert ew["time_us"] == pytest.approx(1200.0)  # thousands separator
    assert (fwd["SM%"], fwd["dram%"], fwd["regs"], fwd["grid"], fwd["block"]) == (71.2, 12.0, 200, 4096, 256)
    assert "mem%" not in fwd  # not in the log: absent, not zero
    # the largest tensor-pipe metric found, and the one it came from; "n/a" is skipped
    assert fwd["tensor%"] == 63.5 and fwd["tensor_metric"].startswith("sm__pipe_tensor_op_gmma")
    assert ew["tensor%"] == 0.0
    assert fwd["stalls"] == [("barrier", 3.5), ("mio_throttle", 2.0), ("math_pipe_throttle", 1.25),
                             ("selected", 1.0)]
    assert ew["stalls"] == [("long_scoreboard", 4.0), ("selected", 1.0)]  # zeros left out


def test_time_units_follow_the_units_row():
    units = list(UNITS)
    units[5] = "nsecond"
    text = _log([ROWS[0]]).replace(",".join(f'"{u}"' for u in UNITS), ",".join(f'"{u}"' for u in units))
    assert gpu_diag.parse_ncu_csv(text)[0]["time_us"] == pytest.approx(0.8125)


def test_report_table_and_cli(tmp_path, capsys):
    table = gpu_diag.report(gpu_diag.parse_ncu_csv(_log(ROWS)))
    lines = table.splitlines()
    assert len(lines) == 4 and "top stalls" in lines[0]
    assert "_fwd_kernel" in lines[1] and "40.4" in lines[1] and "barrier 3.5" in lines[1]  # 812.5 of 2012.5 us
    assert "void at::native::vectorized_elemen " in lines[2] and "(int" not in lines[2]  # cut at "(", 34 chars
    assert lines[3].startswith("total 2012.5 us; tensor column: sm__pipe_tensor_op_gmma")
    log = tmp_path / "ncu.csv"
    log.write_text(_log(ROWS))
    assert gpu_diag.main(["report", str(log)]) == 0
    assert "_fwd_kernel" in capsys.readouterr().out
    empty = tmp_path / "empty.csv"
    empty.write_text("==PROF== ERR_NVGPUCTRPERM - no permission\n")
    assert gpu_diag.main(["report", str(empty)]) == 1
    assert "no kernels" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_profiled_programs_refuse_without_a_gpu(capsys):
    assert gpu_diag.main(["attn", "--small"]) == 2
    assert gpu_diag.main(["grpo"]) == 2
    assert gpu_diag.main(["ws"]) == 2
    assert gpu_diag.main(["gluon-ws"]) == 2
    assert gpu_diag.main(["host"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert gpu_diag.main(["nonsense"]) == 2


def test_profiled_programs_run_their_kernels_on_the_cpu(monkeypatch, capsys):
    """The profiled programs' own code (inputs, variants, the check against the reference) through the Triton
    interpreter at tiny sizes: attn runs the default Triton variant (the Gluon one needs a Hopper) and checks it
    against the op's fp32 reference; grpo runs the chunked loss and checks its gradients are finite."""
    monkeypatch.setenv("R4B_FUSED_LINEAR_IMPL", "chunked")
    assert gpu_diag.attn(False, False, device="cpu", shape=([5, 1, 0, 40], 4, 2, 32)) == 0
    out = capsys.readouterr().out
    assert "profiled, in launch order: triton fwd+bwd" in out
    err = float(out.split("fp32 reference: ")[1].split()[0])
    assert err < 1e-4  # fp32 on the CPU
    assert gpu_diag.attn(True, True, device="cpu") == 1  # --small --gluon-only: nothing to run off Hopper
    assert gpu_diag.grpo(device="cpu", shape=(33, 16, 300)) == 0
    assert "gradients finite: True" in capsys.readouterr().out
    for causal in (False, True):  # the ws program (compute-sanitizer's, on a GPU) under the interpreter
        assert gpu_diag.ws(causal, device="cpu", d=16) == 0
        out = capsys.readouterr().out
        assert "two runs the same bits: True" in out and float(out.split("reference ")[1].split()[0]) < 1e-4


def test_ws_all_configs_reports_each_forward_config(monkeypatch, capsys):
    """gpu_diag ws --all-configs under the interpreter: one line per forward config, the kept ones (CONFIGS) then
    the dropped ones (DROPPED_CONFIGS), each the same bits twice, no NaN and close to the fp32 reference; a kept
    config whose second run differs, or whose O has a row never written (NaN), fails the program; a dropped
    config's failure is printed, not counted."""
    import math

    from r4b.kernels import _varlen_ws as wsk

    configs = [*wsk.CONFIGS, *wsk.DROPPED_CONFIGS]
    assert wsk.DROPPED_CONFIGS and not set(wsk.DROPPED_CONFIGS) & set(wsk.CONFIGS)
    assert gpu_diag.ws(False, device="cpu", d=16, all_configs=True) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("ws forward")]
    assert len(lines) == len(configs), lines
    for line, config in zip(lines, configs, strict=True):
        assert f"config {config} " in line and ("dropped" in line) == (config in wsk.DROPPED_CONFIGS), line
        assert "two runs the same bits: True; NaN: none;" in line and line.endswith(": ok"), line
        assert float(line.split("reference ")[1].split(":")[0]) < 1e-4, line

    from r4b.kernels import varlen_attention_ref

    def real(q, k, v, o, lse, cu, scale_log2, causal, *a, **kw):
        """A fast stand-in for the kernel (checked just above) while the program's judging is checked below."""
        o.copy_(varlen_attention_ref(q, k, v, cu, causal=causal, softmax_scale=scale_log2 * math.log(2.0)))
        lse.zero_()

    def broken(which: int, how: str):
        calls = []

        def forward(q, k, v, o, lse, *a, **kw):
            real(q, k, v, o, lse, *a, **kw)
            calls.append(1)
            if len(calls) in (2 * which + 1, 2 * which + 2) and how == "unwritten row":
                o[5] = math.nan
            if len(calls) == 2 * which + 2 and how == "second run differs":
                o[3, 1, 0] += 1.0
            if len(calls) == 2 * which + 1 and how == "lse nan":
                lse[2, 7] = math.nan
        return forward

    for which, how, rc, want in ((1, "second run differs", 1, "two runs the same bits: False"),
                                 (0, "unwritten row", 1, "NaN: O run 0: 64; O run 1: 64"),
                                 (len(configs) - 1, "lse nan", 0, "NaN: LSE run 0: 1;")):
        monkeypatch.setattr(wsk, "forward", broken(which, how))
        assert gpu_diag.ws(False, device="cpu", d=16, all_configs=True) == rc, how
        lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("ws forward")]
        assert [i for i, x in enumerate(lines) if x.endswith("FAILED")] == [which], (how, lines)
        assert want in lines[which], (how, lines[which])


def _grads_from_lse(q, k, v, do, lse, delta, cu, scale, causal):
    """float64 dq, dk, dv of attention from a given LSE (log2 units) and delta, (Hq, T): the backward's formula."""
    import torch

    q, k, v, do, lse, delta = (t.double() for t in (q, k, v, do, lse, delta))
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(kk), torch.zeros_like(vv)
    bounds = cu.tolist()
    for s0, e0 in zip(bounds[:-1], bounds[1:], strict=True):
        sl = slice(s0, e0)
        s = torch.einsum("ihd,jhd->hij", q[sl], kk[sl]) * scale
        p = torch.exp2(s / math.log(2.0) - lse[:, sl, None])
        if causal:
            p = p * torch.ones(e0 - s0, e0 - s0, dtype=torch.float64).tril()
        dp = torch.einsum("ihd,jhd->hij", do[sl], vv[sl])
        ds = p * (dp - delta[:, sl, None])
        dq[sl] = torch.einsum("hij,jhd->ihd", ds, kk[sl]) * scale
        dk[sl] = torch.einsum("hij,ihd->jhd", ds, q[sl]) * scale
        dv[sl] = torch.einsum("hij,ihd->jhd", p, do[sl])
    fold = lambda t: t.view(t.shape[0], -1, group, t.shape[2]).sum(2)  # noqa: E731
    return dq, fold(dk), fold(dv)


def test_gluon_ws_program_reports_each_kernel_config(monkeypatch, capsys):
    """gpu_diag gluon-ws (compute-sanitizer's program for the warp-specialised Gluon kernels) on the CPU, the kernels
    replaced by float64 stand-ins that take the program's LSE and delta as the kernels do (so its own LSE / delta
    are checked too): one "ok" line per config of each kernel, causal and not; a stand-in that leaves a row
    unwritten, or whose second run differs, fails its config and the program."""

    from r4b.kernels import _varlen_gluon_ws as gws
    from r4b.kernels import varlen_attention_ref

    state = {"calls": 0, "break": None}

    def forward(q, k, v, o, lse, cu, scale_log2, causal, config=None):
        o.copy_(varlen_attention_ref(q, k, v, cu, causal=causal, softmax_scale=scale_log2 * math.log(2.0)))
        group = q.shape[1] // k.shape[1]
        bounds = cu.tolist()
        for s0, e0 in zip(bounds[:-1], bounds[1:], strict=True):  # the LSE in log2 units, from the scale given
            s = torch.einsum("ihd,jhd->hij", q[s0:e0].double(), k[s0:e0].double().repeat_interleave(group, 1))
            s = s * scale_log2 * math.log(2.0)
            if causal:
                s = s.masked_fill(~torch.ones(e0 - s0, e0 - s0, dtype=torch.bool).tril(), -math.inf)
            lse[:, s0:e0] = s.logsumexp(-1) / math.log(2.0)
        if state["break"] == "lse row":
            lse[1, 9] = float("nan")

    def backward_dq(do, q, k, v, lse, delta, dq, cu, scale, causal, config=None):
        state["calls"] += 1
        dq.copy_(_grads_from_lse(q, k, v, do, lse, delta, cu, scale, causal)[0])
        if state["break"] == "unwritten row":
            dq[7] = float("nan")
        if state["break"] == "second run differs" and state["calls"] % 2 == 0:
            dq[3, 1, 0] += 1.0

    def backward_dkdv(do, q, k, v, lse, delta, cu, scale, causal, config=None, out=None):
        _, dk, dv = _grads_from_lse(q, k, v, do, lse, delta, cu, scale, causal)
        out[0].copy_(dk)
        out[1].copy_(dv)
        return out

    monkeypatch.setattr(gws, "device_problem", lambda device, kernel="fwd": None)
    for name, fn in (("forward", forward), ("backward_dq", backward_dq), ("backward_dkdv", backward_dkdv)):
        monkeypatch.setattr(gws, name, fn)
    n = len(gws.CONFIGS) + len(gws.PINGPONG_CONFIGS) + len(gws.DQ_CONFIGS) + len(gws.DKDV_CONFIGS)
    for causal in (False, True):
        assert gpu_diag.gluon_ws(causal, device="cpu", d=16) == 0
        lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("gluon-ws ")]
        assert len(lines) == n, lines
        for line in lines:
            assert "two runs the same bits: True; NaN: 0;" in line and line.endswith(": ok"), line
            assert float(line.split("reference ")[1].split(":")[0]) < 1e-5, line
    for how, want in (("unwritten row", "NaN: 128;"), ("second run differs", "two runs the same bits: False")):
        state["break"] = how
        assert gpu_diag.gluon_ws(False, device="cpu", d=16) == 1, how
        lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("gluon-ws ")]
        failed = [x for x in lines if x.endswith("FAILED")]
        assert len(failed) == len(gws.DQ_CONFIGS) and all("dQ" in x and want in x for x in failed), (how, failed)
    state["break"] = "lse row"  # the forward's LSE is judged too
    assert gpu_diag.gluon_ws(False, device="cpu", d=16) == 1
    failed = [x for x in capsys.readouterr().out.splitlines() if x.endswith("FAILED")]
    assert len(failed) == len(gws.CONFIGS) + len(gws.PINGPONG_CONFIGS) and all("forward" in x for x in failed), failed


def test_host_split_runs_every_callable_on_the_cpu(capsys):
    """gpu_diag host's program under the interpreter at tiny shapes: one line per callable with its forward's and
    gradient's host times and the pair's time, all measured (positive), the pair's at least the two host times."""
    assert gpu_diag.host(device="cpu", n=2, shapes=(8, 32, 2, 1, 16)) == 0
    lines = capsys.readouterr().out.splitlines()
    names = ["built-in op (x * 2), hidden", "custom Function (a copy each way), hidden", "r4b rms_norm, hidden",
             "r4b qk_norm_rope", "r4b rms_norm + rope, q and k (unfused)"]
    assert [line[:44].rstrip() for line in lines[1:6]] == names, lines
    # then the profile of rms_norm's forward + grad (under the interpreter the kernels' own Python dominates it)
    assert lines[6].startswith("host profile of 2 calls of r4b rms_norm") and len(lines) == 7 + 18, lines
    for line in lines[1:6]:
        f_us, b_us, pair_ms = map(float, line[44:].split())
        assert f_us > 0 and b_us > 0 and pair_ms * 1e3 >= f_us + b_us, line


def test_profile_lines_report_each_function_per_call():
    """gpu_diag's host profile: a function's own time and calls per call of the profiled callable."""
    import time

    def slow():
        time.sleep(0.002)

    def fn():
        slow()
        slow()
        sum(range(10))

    lines = gpu_diag.profile_lines(fn, 5, top=3).splitlines()
    assert lines[0].startswith("host profile of 5 calls") and len(lines) == 4, lines
    own, total, calls, where = lines[1].split(maxsplit=3)
    assert "sleep" in where and calls == "x2" and 4000 <= float(own) <= 40000, lines  # two 2 ms sleeps a call


def test_paged_sweep_runs_every_launch_option_on_the_cpu(capsys):
    # the decode sweep's tiny run: each (BLOCK_N, stages, splits) launch through the launcher's tile override,
    # checked against the fp32 reference (exit 1 on an error past 2e-2)
    assert gpu_diag.main(["paged", "--tiny"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("triton")]
    assert len(lines) == 12 and all(float(ln.split("rel err")[1]) < 1e-5 for ln in lines), lines
