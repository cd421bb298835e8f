"""Benchmark the GRPO loss from hidden states (lm_head GEMM + loss, forward + backward into hidden and weight).

Providers: eager torch (materialised bf16 logits, fp32 log-softmax), torch.compile of that, Liger's chunked
LigerFusedLinearGRPOLoss and Liger's Triton loss on materialised logits (when liger-kernel is importable),
r4b's chunked torch backend and r4b's two Triton implementations ("chunked": 3 cuBLAS GEMMs per row chunk
with the gradient formed in the forward; "tiled": tiled kernels whose backward recomputes the logits), the
chunked one also with 512 / 256 MiB chunks (tuning) and with its skipping of masked rows' backward GEMMs off
(10% of the rows are masked here: "no-skip" is r4b doing all the work every peer does).
FLOPs = 3 GEMMs of 2*N*H*V (logits, d hidden, d weight); the ``x_floor`` column is the time over those FLOPs
at the 8192^3 bf16 matmul rate measured in the same run.

    python -m bench grpo_loss [--quick]        (--quick: tiny shapes, what runs on a CPU)
    python -m bench.bench_grpo_loss --aot      (no GPU: compile the Triton kernels for sm_90, print registers)
"""

from __future__ import annotations

import contextlib

import torch

from bench.harness import (
    Case,
    Skip,
    backend_provider,
    default_device,
    env_var,
    global_memory_ops,
    matmul_floor_columns,
    ptxas_report,
    run_bench,
    sm90_compile,
    sm90_ptxas,
)
from r4b.kernels import fused_linear_grpo_loss
from r4b.kernels._dispatch import triton_interpret

OP = "grpo_loss"
SEQ_LEN = 1024  # tokens per sequence for the providers that want (B, T) batches (Liger)
EPS_LOW, EPS_HIGH = 0.2, 0.2
ANCHOR = (16384, 2560, 151936)  # N, H, V of ../shared/ANCHORS.md
# every provider's d hidden and d weight are compared with eager torch's before timing (harness check_tol):
# bf16 on the GPU, fp32 on the CPU; a row beyond this is flagged MISMATCH (it computes another loss)
CHECK_TOL = {"cuda": 5e-2, "cpu": 1e-4}


def cases(quick: bool) -> list[Case]:
    # the anchor shape first, then the other 16k one (a bench stopped at its time limit keeps the rows it wrote:
    # on 2026-11-26 the limit fell inside the third shape)
    shapes = [(256, 64, 1000)] if quick else [ANCHOR, (16384, 4096, 128256), (4096, 2560, 151936)]
    return [Case(f"N={n},H={h},V={v}", {"N": n, "H": h, "V": v}, flops=3 * 2 * n * h * v) for n, h, v in shapes]


def seq_shape(n: int) -> tuple[int, int]:
    """(B, T): the N tokens as B sequences of T tokens (T = SEQ_LEN, or N when smaller)."""
    t = min(n, SEQ_LEN)
    if n % t:
        raise ValueError(f"N={n} must be a multiple of {t}")
    return n // t, t


def inputs(case: Case, device: str, dtype: torch.dtype):
    """hidden (N, H) and weight (V, H) leaves that require grad; targets, advantages, old log-probs, mask (N,).
    The advantage is one value per sequence (as GRPO gives), so that every provider, Liger's per-sequence
    (B,) advantages included, computes the same loss."""
    n, h, v = case.params["N"], case.params["H"], case.params["V"]
    b, t = seq_shape(n)
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    adv = torch.randn(b, generator=g).repeat_interleave(t).to(device)
    old = (-torch.rand(n, generator=g) * 5 - 8).to(device)  # log-probs near those of random logits
    mask = (torch.rand(n, generator=g) < 0.9).to(device)
    return hidden, weight, targets, adv, old, mask


def eager_loss(hidden, weight, targets, adv, old, mask):
    """Plain PyTorch: (N, V) logits in the input dtype, fp32 log-softmax, clipped surrogate, token mean."""
    logits = hidden @ weight.T  # (N, V)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]  # (N,)
    ratio = torch.exp(logp - old)
    per = -torch.minimum(ratio * adv, ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * adv)
    return torch.where(mask, per, 0.0).sum() / mask.sum().clamp(min=1)


def _timed(loss_fn, hidden, weight):
    def step():
        loss = loss_fn()
        return torch.autograd.grad(loss, (hidden, weight))

    return step


def providers(device: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def eager(case: Case):
        hidden, weight, targets, adv, old, mask = inputs(case, device, dtype)
        return _timed(lambda: eager_loss(hidden, weight, targets, adv, old, mask), hidden, weight)

    def compiled(case: Case):
        if device != "cuda":
            raise Skip("torch.compile provider is measured on the GPU only")
        if (case.params["N"], case.params["H"], case.params["V"]) != ANCHOR:
            raise Skip("torch.compile is measured at the anchor shape only (its compile time, per shape)")
        hidden, weight, targets, adv, old, mask = inputs(case, device, dtype)
        fn = torch.compile(eager_loss, dynamic=False)
        return _timed(lambda: fn(hidden, weight, targets, adv, old, mask), hidden, weight)

    def liger_inputs(case: Case):
        """Inputs in Liger's (B, T) layout: hidden, weight, B, T, ids, mask, old log-probs, (B,) advantages."""
        if device != "cuda" and not triton_interpret():
            raise Skip("Liger runs on a GPU, or on the CPU under TRITON_INTERPRET=1")
        hidden, weight, targets, adv, old, mask = inputs(case, device, dtype)
        b, t = seq_shape(case.params["N"])
        seq_adv = adv.view(b, t)[:, 0].contiguous()  # (B,) Liger takes one advantage per sequence
        return hidden, weight, b, t, targets.view(b, t), mask.view(b, t), old.view(b, t), seq_adv

    def liger_chunked(case: Case):
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError as ex:
            raise Skip(f"liger-kernel not importable ({ex})") from None
        hidden, weight, b, t, ids, m2, old2, seq_adv = liger_inputs(case)
        m2 = m2.long()
        loss_mod = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, epsilon_low=EPS_LOW,
                                            epsilon_high=EPS_HIGH, loss_type="bnpo")
        h3 = hidden.view(b, t, -1)  # (B, T, H): a view keeps hidden the leaf

        def loss():
            out = loss_mod(h3, weight, ids, m2, seq_adv, old_per_token_logps=old2)
            return out[0] if isinstance(out, tuple) else out

        return _timed(loss, hidden, weight)

    def liger_triton(case: Case):
        try:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        except ImportError as ex:
            raise Skip(f"liger-kernel not importable ({ex})") from None
        hidden, weight, b, t, ids, m2, old2, seq_adv = liger_inputs(case)
        # Liger drops the last logit position of each sequence: one extra hidden row per sequence.
        extra = torch.randn(b, 1, hidden.shape[1], device=device, dtype=dtype)
        kw = dict(temperature=1.0, beta=0.0, eps_low=EPS_LOW, eps_high=EPS_HIGH, loss_type="bnpo", reduce=True)

        def loss():
            h3 = torch.cat([hidden.view(b, t, -1), extra], dim=1)  # (B, T+1, H)
            logits = h3 @ weight.T  # (B, T+1, V) in the input dtype, as Liger expects
            out = triton_grpo_loss(logits, old2, None, ids, seq_adv, m2, **kw)
            return out[0] if isinstance(out, tuple) else out  # (loss, metrics)

        return _timed(loss, hidden, weight)

    def gemms_only(case: Case):
        """The chunked loss's three GEMMs and nothing else, in its chunks, shapes and dtypes: z = hidden_c @ W.T
        into the reused [C, V] buffer; for the rows with a gradient (the unmasked ones, which the loss sorts
        first), the fp32 product P @ W and dW (+)= P.T @ hidden_c. r4b's time over this row is what its row
        kernel, small ops and host work add to its GEMMs; this row's x_floor is cuBLAS's rate on these shapes
        against the 8192^3 matmul's."""
        from r4b.kernels import _fused_linear_chunked as fc

        hidden, weight, _, _, _, mask = inputs(case, device, dtype)
        hidden, weight = hidden.detach(), weight.detach()
        n, v = hidden.shape[0], weight.shape[0]
        n_grad = int(mask.sum().item())  # setup (the loss counts them on the device, without a host sync)
        step = fc.chunk_rows(n, v, hidden.element_size())
        zbuf = torch.empty(step, v, dtype=dtype, device=device)
        dw = torch.empty_like(weight, dtype=fc.dweight_dtype(weight))
        wt = weight.T

        def gemms():
            for s in range(0, n, step):
                e = min(n, s + step)
                k = min(e, max(n_grad, s)) - s
                z = zbuf[: e - s]
                torch.mm(hidden[s:e], wt, out=z)
                if k == 0:
                    continue
                fc._mm_f32(z[:k], weight)
                if dw.dtype != z.dtype:  # the fp32 accumulator of a small half weight
                    if s == 0:
                        dw.copy_(fc._mm_f32(z[:k].T, hidden[s : s + k]))
                    else:
                        dw.add_(fc._mm_f32(z[:k].T, hidden[s : s + k]))
                elif s == 0:
                    torch.mm(z[:k].T, hidden[s : s + k], out=dw)
                else:
                    dw.addmm_(z[:k].T, hidden[s : s + k])

        gemms.unchecked = True
        return gemms

    def r4b(backend: str, impl: str | None = None, max_n: int | None = None, **knobs):
        def make(case: Case):
            if max_n is not None and case.params["N"] > max_n and device == "cuda":
                raise Skip(f"measured at N <= {max_n} only (a slow path; its anchor-shape time is in "
                           "bench/results/2026-11-26-nvidia-h100-80gb-hbm3)")
            hidden, weight, targets, adv, old, mask = inputs(case, device, dtype)

            def loss():
                with _impl(impl), _chunked_knobs(**knobs):
                    return fused_linear_grpo_loss(hidden, weight, targets, adv, old_logprobs=old, loss_mask=mask,
                                                  eps_low=EPS_LOW, eps_high=EPS_HIGH, aggregation="token_mean",
                                                  backend=backend)[0]

            return _timed(loss, hidden, weight)

        return backend_provider("fused_linear_grpo_loss", backend, device, make)

    # eager first: the reference of the result check; torch.compile last (its compile time is the longest)
    return {
        "torch eager": eager,
        "r4b triton chunked": r4b("triton", "chunked"),
        # its GEMMs alone (session 10: the floor read 795 TFLOP/s on a cool card and 686 under load, so x_floor
        # moved 1.10 -> 1.18 for the same kernel; this row splits r4b's time into GEMMs and the rest)
        "cublas gemms only": gemms_only,
        # the peers before the tuning rows: a call cut at its time limit (2026-11-27, H200: after the Liger chunked
        # row, the Liger Triton one lost) keeps the comparisons the targets read
        "liger triton": liger_triton,
        "liger chunked": liger_chunked,
        # without skipping the backward GEMMs of the masked rows (the 10% of rows no provider trains: the row a
        # peer computing every row compares with), then other chunk sizes (tuning data; 2026-11-26 H100 and three
        # H200 runs of 2026-11-27: 1664 MiB within noise of the 1 GiB default at 0.7 GiB more, 512 / 256 MiB
        # slower)
        "r4b chunked no-skip": r4b("triton", "chunked", skip_zero_rows=False),
        "r4b chunked 1664MiB": r4b("triton", "chunked", chunk_bytes=1664 << 20),
        "r4b chunked 512MiB": r4b("triton", "chunked", chunk_bytes=512 << 20),
        "r4b chunked 256MiB": r4b("triton", "chunked", chunk_bytes=256 << 20),
        # 0.8 s and 1.6 s per call at the anchor shape on an H100 (14x and 28x the chunked path): timed at the
        # N=4096 shape only, so that one GPU run has time for the cases after the anchor
        "r4b triton tiled": r4b("triton", "tiled", max_n=4096),
        "r4b torch (chunked)": r4b("torch", max_n=4096),
        "torch.compile": compiled,
    }


@contextlib.contextmanager
def _chunked_knobs(chunk_bytes: int | None = None, skip_zero_rows: bool | None = None):
    """Sets the chunked implementation's chunk size and row skipping for the duration of one call."""
    from r4b.kernels import _fused_linear_chunked as fc

    before = (fc._CHUNK_BYTES, fc._SKIP_ZERO_ROWS)
    if chunk_bytes is not None:
        fc._CHUNK_BYTES = chunk_bytes
    if skip_zero_rows is not None:
        fc._SKIP_ZERO_ROWS = skip_zero_rows
    try:
        yield
    finally:
        fc._CHUNK_BYTES, fc._SKIP_ZERO_ROWS = before


def _impl(impl: str | None):
    """Sets $R4B_FUSED_LINEAR_IMPL (chunked | tiled) for the duration of one call; None leaves it alone."""
    from r4b.kernels import _fused_linear_chunked as fc

    return env_var(fc.ENV_IMPL, impl)


def aot_report() -> list[str]:
    """Compile r4b's kernels for sm_90 with the GPU configs (tiled forward and backward: bf16 with and without
    bias, fp32, H=2560; the chunked implementation's row kernel: bf16 and fp32, V=151936), and print ptxas
    registers / spills per kernel. Needs no GPU (triton's bundled ptxas) and TRITON_INTERPRET unset; catches
    what the interpreter cannot (compile errors, spills)."""
    from r4b.kernels import _fused_linear as fl
    from r4b.kernels import _fused_linear_chunked as fc

    lines = []

    def report(label: str, kern, meta: dict, sig_of, warps: int, stages: int) -> None:
        info, _ = sm90_ptxas(kern, meta, sig_of, warps, stages)
        line = f"{label} warps={warps} stages={stages}: {info}"
        print(line, flush=True)
        lines.append(line)

    for dtype, tname, bias in ((torch.bfloat16, "bf16", False), (torch.bfloat16, "bf16", True),
                               (torch.float32, "fp32", False)):
        bn, bv, bk, warps, stages = fl.gpu_tiles(dtype)
        prec = "ieee" if dtype == torch.float32 else "tf32"
        common = dict(K=2560, HAS_BIAS=bias, DOT_PRECISION=prec, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk)
        kernels = (
            ("fwd", fl._fwd_kernel, {**common, "V_PER_SPLIT": 38016}),
            ("bwd", fl._bwd_kernel, {**common, "COMPUTE_DH": True, "COMPUTE_DW": True, "GROUP_N": 8}),
        )

        def sig_of(n, tname=tname):
            if n in ("h_ptr", "w_ptr", "b_ptr"):
                return f"*{tname}"
            if n == "t_ptr":
                return "*i64"
            if n.endswith("_ptr"):
                return "*fp32"
            return "fp32" if n == "inv_temp" else "i32"

        for kind, kern, meta in kernels:
            report(f"{kind} {tname} bias={bias} tiles={bn}x{bv}x{bk}", kern, meta, sig_of, warps, stages)

    # the chunked implementation's row kernel (V=151936): GRPO with old log-probs and KL, and the given-coefficient
    # mode (cross-entropy), in bf16 and fp32
    br, bvr, warps_r = fc.gpu_rows_config()
    for tname, mode, label in (("bf16", fc.MODE_GRPO, "grpo"), ("bf16", fc.MODE_COEF, "coef"),
                               ("fp32", fc.MODE_GRPO, "grpo")):
        meta = dict(V=151936, MODE=mode, HAS_OLD=True, HAS_KL=mode == fc.MODE_GRPO, BLOCK_R=br, BLOCK_V=bvr,
                    STAGES=1, RNE=False)

        def sig_of(n, tname=tname):
            if n == "z_ptr":
                return f"*{tname}"
            if n == "t_ptr":
                return "*i64"
            if n.endswith("_ptr"):
                return "*fp32"
            return "i32" if n in ("R", "R_grad", "stride_z") else "fp32"

        report(f"rows {tname} {label} tiles={br}x{bvr}", fc._rows_kernel, meta, sig_of, warps_r, 1)

    # the backward's row-scale kernel (H=2560): d hidden (fp32 product scattered to the sorted rows' places) and
    # alpha * hidden (bf16 in, bf16 out); its global accesses, to show the 16-byte vectors
    br, bh, warps_s = fc.gpu_scale_rows_config(2560)
    for xname, idx in (("fp32", True), ("bf16", False)):
        sig = {"x_ptr": f"*{xname}", "a_ptr": "*fp32", "idx_ptr": "*i64", "out_ptr": "*bf16"}
        meta = dict(HAS_IDX=idx, BLOCK_R=br, BLOCK_H=bh, RNE=False)
        compiled = sm90_compile(fc._scale_rows_kernel, meta, lambda n, sig=sig: sig.get(n, "i32"), warps_s, 3,
                                divisible=("H",))
        line = (f"scale_rows {xname}->bf16 idx={idx} tiles={br}x{bh} warps={warps_s}: {ptxas_report(compiled)}; "
                f"global ops {global_memory_ops(compiled.asm['ptx'])}")
        print(line, flush=True)
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    argv = argv or []
    if "--aot" in argv:
        aot_report()
        return []
    device = default_device()
    quick = "--quick" in argv or device == "cpu"
    extra = matmul_floor_columns(device)  # the 8192^3 bf16 matmul rate, this run, this card
    return run_bench(OP, cases(quick), providers(device), device=device, quick=quick, extra_columns=extra,
                     check_tol=CHECK_TOL[device])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
