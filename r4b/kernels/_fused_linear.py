"""Shared engine of the fused-linear ops (log-probs, cross-entropy, GRPO loss): per-token log-probabilities of
``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)`` and their backward, without ever
holding the [N, V] logits.

Everything an op needs from the vocabulary projection is ``logp[i] = z[i, t_i] - logsumexp(z[i, :])`` and,
for the backward, ``d loss / d (hidden @ weight.T + bias)[i, j] = c_i * (onehot(t_i)_j - softmax(z[i])_j) / T``
with ``c_i = d loss / d logp[i]``. So each op computes its per-token loss from ``logp`` with ordinary torch
ops on [N] vectors, and autograd hands ``c`` to :class:`LinearLogprobs`, whose backward recomputes the
logits tile by tile. Two implementations of the forward/backward pair live here:

* torch (the reference backend, the CPU default): chunks of rows, fp32 logits of one chunk at a time;
* Triton: the forward tiles (rows x vocabulary), runs an online log-sum-exp over vocabulary tiles with
  ``tl.dot`` in fp32 accumulate, and splits the vocabulary over extra programs when there are few row blocks
  (partials are merged on [S, N] vectors); the backward launches one program per (row tile, vocabulary tile),
  recomputes that logits tile, forms the gradient tile in registers and adds ``dz @ W`` and ``dz^T @ h`` into
  fp32 dhidden / dweight buffers with atomics. Row tiles whose coefficients are all zero (masked tokens)
  return at once. Grids are 1-D (no 65,535 limit), offsets are int64.

Targets outside [0, V) (e.g. -100) are "no target": their log-prob is 0 and they get no gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _dispatch, _fused_linear_chunked

# Rows per chunk of the torch backend: at most this many fp32 logits at once (64 MiB).
_TORCH_CHUNK_ELEMS = 1 << 24

if _dispatch.triton_importable():
    import triton
    import triton.language as tl
else:  # pragma: no cover - torch-only installs
    triton = None
    tl = None


# ----------------------------------------------------------------------------------------------- torch


def _chunk_rows(n: int, v: int) -> int:
    return max(1, min(n, _TORCH_CHUNK_ELEMS // max(v, 1)))


def _valid_targets(targets: Tensor, v: int) -> Tensor:
    return (targets >= 0) & (targets < v)


@_fused_linear_chunked.no_autocast
def torch_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float
              ) -> tuple[Tensor, Tensor]:
    """(logp [N] f32, lse [N] f32) in row chunks; logp is 0 where the target is outside [0, V)."""
    n, v = hidden.shape[0], weight.shape[0]
    w32 = weight.float()
    b32 = bias.float() if bias is not None else None
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    step = _chunk_rows(n, v)
    for s in range(0, n, step):
        e = min(n, s + step)
        z = hidden[s:e].float() @ w32.T  # (rows, V)
        if b32 is not None:
            z += b32
        z /= temperature
        lse_c = torch.logsumexp(z, dim=-1)  # (rows,)
        t = targets[s:e]
        ok = _valid_targets(t, v)
        zt = z.gather(1, t.clamp(0, v - 1).unsqueeze(1)).squeeze(1)  # (rows,)
        logp[s:e] = torch.where(ok, zt - lse_c, 0.0)
        lse[s:e] = lse_c
    return logp, lse


@_fused_linear_chunked.no_autocast
def torch_bwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor, coef: Tensor,
              temperature: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dhidden [N,H] f32, dweight [V,H] f32, dbias [V] f32 or None) for d loss / d logp = coef [N]."""
    n, v = hidden.shape[0], weight.shape[0]
    w32 = weight.float()
    b32 = bias.float() if bias is not None else None
    ok = _valid_targets(targets, v)
    c = torch.where(ok, coef.float(), 0.0)
    dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    db = torch.zeros(v, dtype=torch.float32, device=weight.device) if bias is not None else None
    step = _chunk_rows(n, v)
    for s in range(0, n, step):
        e = min(n, s + step)
        h32 = hidden[s:e].float()  # (rows, H)
        z = h32 @ w32.T  # (rows, V)
        if b32 is not None:
            z += b32
        z /= temperature
        dz = torch.exp_(z.sub_(lse[s:e, None])).neg_()  # -softmax, (rows, V)
        rows = torch.arange(e - s, device=hidden.device)[ok[s:e]]
        dz[rows, targets[s:e][ok[s:e]]] += 1.0
        dz *= (c[s:e] / temperature)[:, None]
        dh[s:e] = dz @ w32
        dw += dz.T @ h32
        if db is not None:
            db += dz.sum(0)
    return dh, dw, db


# ---------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, b_ptr, rows64, row_ok, cols64, col_ok, stride_h, stride_w,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """(BLOCK_N, BLOCK_V) fp32 tile of hidden @ weight.T (+ bias) for the given rows and vocabulary columns."""
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            h = tl.load(h_ptr + rows64[:, None] * stride_h + ks[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols64[:, None] * stride_w + ks[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _fwd_kernel(
        h_ptr, w_ptr, b_ptr, t_ptr, m_ptr, l_ptr, zt_ptr,
        N, V, stride_h, stride_w, inv_temp, num_n_blocks,
        K: tl.constexpr, V_PER_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One (row tile, vocabulary split): online max / sum-exp / target logit over the split's V tiles."""
        pid = tl.program_id(0)
        pid_n = pid % num_n_blocks
        pid_s = pid // num_n_blocks
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        tgt = tl.load(t_ptr + rows64, mask=row_ok, other=-1)
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        zt = tl.zeros([BLOCK_N], tl.float32)
        v_start = pid_s * V_PER_SPLIT
        # Splits hold whole V tiles and never overlap; only the last one runs past V (masked tiles add 0).
        for dv in range(0, V_PER_SPLIT, BLOCK_V):
            cols = v_start + dv + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            cols64 = cols.to(tl.int64)
            acc = _logits_tile(h_ptr, w_ptr, b_ptr, rows64, row_ok, cols64, col_ok, stride_h, stride_w,
                               K, HAS_BIAS, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
            z = acc * inv_temp
            z = tl.where(col_ok[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
            m = m_new
            zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
        out = pid_s.to(tl.int64) * N + rows64
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(l_ptr + out, s, mask=row_ok)
        tl.store(zt_ptr + out, zt, mask=row_ok)

    @triton.jit
    def _bwd_kernel(
        h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, c_ptr, dh_ptr, dw_ptr, db_ptr,
        N, V, stride_h, stride_w, inv_temp, num_n_blocks, num_v_blocks,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One (row tile, vocabulary tile): recompute logits, dz = c (onehot - p) / T, add dz @ W and dz^T @ h."""
        pid = tl.program_id(0)
        # Grouped order: GROUP_N row tiles sweep the vocabulary together, so W tiles are reused from L2.
        per_group = GROUP_N * num_v_blocks
        first_n = (pid // per_group) * GROUP_N
        group = tl.minimum(num_n_blocks - first_n, GROUP_N)
        pid_n = first_n + (pid % per_group) % group
        pid_v = (pid % per_group) // group
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        c = tl.load(c_ptr + rows64, mask=row_ok, other=0.0)
        if tl.max(tl.abs(c), 0) > 0:  # masked row tiles cost nothing
            cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            cols64 = cols.to(tl.int64)
            tgt = tl.load(t_ptr + rows64, mask=row_ok, other=-1)
            lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
            acc = _logits_tile(h_ptr, w_ptr, b_ptr, rows64, row_ok, cols64, col_ok, stride_h, stride_w,
                               K, HAS_BIAS, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
            p = tl.exp(acc * inv_temp - lse[:, None])
            onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
            dz = (onehot - p) * (c * inv_temp)[:, None]
            dz = tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)
            if HAS_BIAS:
                tl.atomic_add(db_ptr + cols64, tl.sum(dz, 0), mask=col_ok)
            dzc = dz.to(h_ptr.dtype.element_ty)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                if COMPUTE_DH:
                    w = tl.load(w_ptr + cols64[:, None] * stride_w + ks[None, :],
                                mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                    dh = tl.dot(dzc, w, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_K)
                    tl.atomic_add(dh_ptr + rows64[:, None] * K + ks[None, :], dh,
                                  mask=row_ok[:, None] & k_ok[None, :])
                if COMPUTE_DW:
                    h = tl.load(h_ptr + rows64[:, None] * stride_h + ks[None, :],
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    dw = tl.dot(tl.trans(dzc), h, input_precision=DOT_PRECISION)  # (BLOCK_V, BLOCK_K)
                    tl.atomic_add(dw_ptr + cols64[:, None] * K + ks[None, :], dw,
                                  mask=col_ok[:, None] & k_ok[None, :])


def _pow2_at_least(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(x), 1)))


def gpu_tiles(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages) on a GPU. sm_90 compile (bench_grpo_loss --aot, bf16,
    H=2560): fwd 186 registers, bwd 255, no spills. fp32 (ieee dot, a correctness path, not the hot one): tiles
    twice the bytes, so a smaller K step and 2 stages; bwd spills ~300 B (64x128 or 4 warps spill more)."""
    if dtype == torch.float32:
        return 128, 128, 32, 8, 2
    return 128, 128, 64, 8, 3


def _config(n: int, v: int, k: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes, warps and vocabulary splits for one call.

    Interpreter (CPU tests): big tiles, so few programs run (it executes them one after another), and two
    vocabulary splits whenever V allows, so the split/merge path is always tested.
    GPU: 128x128x64 tiles (the standard bf16 tensor-core tile for H100/H200; not yet tuned on a card).
    Loop bounds (H and the V range of a split) are constexpr: the interpreter under numpy >= 2.4 cannot loop
    over a runtime scalar, and on the GPU a fixed trip count lets the pipeliner work; one compile per (H, split).
    """
    interpret = device.type == "cpu"
    if interpret:
        bn, bv, bk, warps, stages = 256, 1024, 64, 4, 1  # 1025x4097: 2.4 s fwd vs 15 s at 64x256
    else:
        bn, bv, bk, warps, stages = gpu_tiles(dtype)
    bn = min(bn, _pow2_at_least(n))
    bv = min(bv, _pow2_at_least(v))
    bk = min(bk, _pow2_at_least(k))
    n_blocks, v_blocks = triton.cdiv(n, bn), triton.cdiv(v, bv)
    if interpret:
        splits = min(2, v_blocks)
    else:
        sms = _dispatch.sm_count(device)
        # Enough programs for ~2 waves; a power of two so that few V_PER_SPLIT values get compiled.
        splits = min(v_blocks, triton.next_power_of_2(triton.cdiv(2 * sms, n_blocks)))
    v_per_split = triton.cdiv(v_blocks, splits) * bv
    splits = triton.cdiv(v, v_per_split)
    return dict(bn=bn, bv=bv, bk=bk, warps=warps, stages=stages, n_blocks=n_blocks, v_blocks=v_blocks,
                splits=splits, v_per_split=v_per_split,
                precision="ieee" if dtype == torch.float32 else "tf32")


def triton_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float
               ) -> tuple[Tensor, Tensor]:
    """(logp [N] f32, lse [N] f32), as :func:`torch_fwd`."""
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()  # kernels: unit strides
    bias = bias.contiguous() if bias is not None else None
    n, k = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    if n == 0:
        z = torch.zeros(0, dtype=torch.float32, device=dev)
        return z, z.clone()
    cfg = _config(n, v, k, hidden.dtype, dev)
    m = torch.empty(cfg["splits"], n, dtype=torch.float32, device=dev)  # (S, N)
    s = torch.empty_like(m)
    zt = torch.empty_like(m)
    grid = (cfg["n_blocks"] * cfg["splits"],)
    _fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, m, s, zt,
        n, v, hidden.stride(0), weight.stride(0), 1.0 / temperature, cfg["n_blocks"],
        K=k, V_PER_SPLIT=cfg["v_per_split"], HAS_BIAS=bias is not None, DOT_PRECISION=cfg["precision"],
        BLOCK_N=cfg["bn"], BLOCK_V=cfg["bv"], BLOCK_K=cfg["bk"], num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    mx = m.max(0).values  # (N,)
    lse = mx + torch.log((s * torch.exp(m - mx)).sum(0))
    ok = _valid_targets(targets, v)
    logp = torch.where(ok, zt.sum(0) - lse, 0.0)
    return logp, lse


def triton_bwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor, coef: Tensor,
               temperature: float, need_dh: bool = True, need_dw: bool = True
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dhidden [N,H] f32, dweight [V,H] f32, dbias [V] f32 or None), as :func:`torch_bwd`."""
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()  # kernels: unit strides
    bias = bias.contiguous() if bias is not None else None
    n, k = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    dh = torch.zeros(n, k, dtype=torch.float32, device=dev)
    dw = torch.zeros(v, k, dtype=torch.float32, device=dev)
    db = torch.zeros(v, dtype=torch.float32, device=dev) if bias is not None else None
    if n == 0:
        return dh, dw, db
    c = torch.where(_valid_targets(targets, v), coef.float(), 0.0).contiguous()
    cfg = _config(n, v, k, hidden.dtype, dev)
    grid = (cfg["n_blocks"] * cfg["v_blocks"],)
    _bwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, lse, c, dh, dw,
        db if db is not None else dh,
        n, v, hidden.stride(0), weight.stride(0), 1.0 / temperature, cfg["n_blocks"], cfg["v_blocks"],
        K=k, HAS_BIAS=bias is not None, COMPUTE_DH=need_dh, COMPUTE_DW=need_dw, DOT_PRECISION=cfg["precision"],
        GROUP_N=8, BLOCK_N=cfg["bn"], BLOCK_V=cfg["bv"], BLOCK_K=cfg["bk"],
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    return dh, dw, db


# -------------------------------------------------------------------------------------------- autograd


class LinearLogprobs(torch.autograd.Function):
    """logp [N] f32 from (hidden, weight, bias); backward recomputes logits with the chosen backend."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, backend):
        fwd = triton_fwd if backend == "triton" else torch_fwd
        logp, lse = fwd(hidden, weight, bias, targets, temperature)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.backend = temperature, backend
        ctx.mark_non_differentiable(lse)
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        if ctx.backend == "triton":
            dh, dw, db = triton_bwd(hidden, weight, bias, targets, lse, grad_logp, ctx.temperature,
                                    need_dh=need_dh, need_dw=need_dw)
        else:
            dh, dw, db = torch_bwd(hidden, weight, bias, targets, lse, grad_logp, ctx.temperature)
        return (
            dh.to(hidden.dtype) if need_dh else None,
            dw.to(weight.dtype) if need_dw else None,
            db.to(bias.dtype) if need_db and db is not None else None,
            None,
            None,
            None,
        )


def logprobs_no_grad(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                     backend: str) -> Tensor:
    """logp [N] f32 without autograd: torch reference, or the Triton implementation $R4B_FUSED_LINEAR_IMPL picks
    (chunked: cuBLAS GEMM + one read per chunk; tiled: online log-sum-exp). Inputs already validated."""
    with torch.no_grad():
        if backend == "triton" and _fused_linear_chunked.impl() == "chunked":
            return _fused_linear_chunked.chunked_logprobs(hidden, weight, bias, targets, temperature)
        fwd = triton_fwd if backend == "triton" else torch_fwd
        return fwd(hidden, weight, bias, targets, temperature)[0]


def linear_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                    backend: str) -> Tensor:
    """Differentiable logp [N] f32 (0 where the target is outside [0, V)); inputs already validated."""
    if not (hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return logprobs_no_grad(hidden, weight, bias, targets, temperature, backend)
    return LinearLogprobs.apply(hidden, weight, bias, targets, temperature, backend)


# ------------------------------------------------------------------------------------------ validation


def check_common(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                 ignore_index: int = -100) -> None:
    """Shared checks of (hidden [N,H], weight [V,H], bias [V], targets [N] int, temperature > 0)."""
    from . import _checks

    _checks.tensor("hidden", hidden, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    _checks.tensor("weight", weight, dtypes=(hidden.dtype,), ndim=2)
    if bias is not None:
        _checks.tensor("bias", bias, dtypes=(hidden.dtype,), ndim=1)
    _checks.tensor("targets", targets, dtypes=(torch.int64, torch.int32), ndim=1)
    _checks.same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, H) with H = hidden.shape[1] = {hidden.shape[1]}, "
                         f"got weight.shape={tuple(weight.shape)}")
    if weight.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"weight must have V >= 1 and H >= 1, got weight.shape={tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must be (V,) with V = {weight.shape[0]}, got bias.shape={tuple(bias.shape)}")
    _checks.same_len(hidden.shape[0], "hidden", targets=targets)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if targets.device.type == "cpu" and targets.numel():  # value check only where it costs no device sync
        v = weight.shape[0]
        bad = ~(_valid_targets(targets, v) | (targets == ignore_index))
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"targets must be in [0, {v}) or {ignore_index}, got targets[{i}]={int(targets[i])}")
