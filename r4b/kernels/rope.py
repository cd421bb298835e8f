"""rope: rotary position embedding in Qwen3's rotate-half form, positions taken from position_ids.

Owns the torch reference, the Triton kernel (forward rotates by +angle, backward by -angle, angles computed
in-kernel from the positions), the autograd Function and the public function.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _checks, _compile, _dispatch

OP = "rope"
_dispatch.register(OP, ("triton", "torch"))


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin: (T, head_dim) fp32, computed exactly as transformers' default RoPE does."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(x: Tensor, position_ids: Tensor, theta: float = 1e6) -> Tensor:
    """x: (T, H, D); returns x * cos + rotate_half(x) * sin with cos/sin (T, 1, D), in x.dtype."""
    cos, sin = rope_cos_sin(position_ids, x.shape[-1], theta)
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]  # (T, 1, D)
    return x * cos + _rotate_half(x) * sin


def _inv_freq(head_dim: int, theta: float, device: torch.device, cached: bool = True) -> Tensor:
    """(head_dim/2,) fp32, bit-identical to the inv_freq of rope_cos_sin. ``cached=False`` (the custom ops of
    torch.compile, r4b/kernels/_compile.py): computed for the call, never kept, as a tensor first allocated while
    inductor warms up a CUDA graph lives in the graph's memory pool, which the graph manager may hand out again."""
    if not cached:
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    key = (head_dim, float(theta), device)  # a tensor's device: cuda devices carry their index
    t = _INV_FREQ.get(key)
    if t is None:
        # a normal tensor even when first asked for under inference_mode (the engine's steps): an inference tensor
        # kept here could not be saved for a later training step's backward (a BPO rollout, then its update)
        with torch.inference_mode(False):
            t = _inv_freq(head_dim, theta, device, cached=False)
        if len(_INV_FREQ) > 16:
            _INV_FREQ.clear()
        _INV_FREQ[key] = t
    return t


_INV_FREQ: dict[tuple, Tensor] = {}

if _dispatch.triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def angles(POS, INV_FREQ, T, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, HALF: tl.constexpr):
        """This program's tokens (int64, (BLOCK_T, 1)), frequency columns and their mask, the (token, column) mask,
        and the fp32 cos / sin of the angles pos * inv_freq, (BLOCK_T, BLOCK_HALF) (the product in fp32, as
        position_ids.float() * inv_freq)."""
        toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_HALF)
        tmask = toks < T
        cmask = cols < HALF
        pos = tl.load(POS + toks, mask=tmask, other=0).to(tl.float32)
        inv = tl.load(INV_FREQ + cols, mask=cmask, other=0.0)
        ang = pos[:, None] * inv[None, :]
        return toks.to(tl.int64)[:, None], cols, cmask, tmask[:, None] & cmask[None, :], tl.cos(ang), tl.sin(ang)

    @triton.jit(do_not_specialize=["T", "H", "t_bucket"])
    def _rope_kernel(X, POS, INV_FREQ, Y, T, H, t_bucket, stride_xt, stride_xh, stride_yt, stride_yh,
                     HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, INVERSE: tl.constexpr):
        # One program rotates BLOCK_T tokens: cos and sin are formed once, as a (BLOCK_T, BLOCK_HALF) tile, and
        # applied to the token's heads one after another. (The first version evaluated them per (token, head):
        # 32 times the trigonometry for q; on an H100, 2026-11-26, it moved 1.7 TB/s for q and 1.5 for k where a
        # copy moves 3.0. A 3-D (tokens, heads, frequencies) tile computed them in a layout that repeats them
        # across thread groups, and grew with the head count.)
        t64, cols, _, mask, c32, s32 = angles(POS, INV_FREQ, T, BLOCK_T, BLOCK_HALF, HALF)
        # cos/sin rounded to x's dtype first, as the reference does.
        c = c32.to(X.dtype.element_ty).to(tl.float32)
        s = s32.to(X.dtype.element_ty).to(tl.float32)
        if INVERSE:
            s = -s
        xp = X + t64 * stride_xt + cols[None, :]  # head 0's rows; pointers step by a head stride (64-bit sums)
        yp = Y + t64 * stride_yt + cols[None, :]
        for _ in range(H):
            x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
            tl.store(yp, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
            tl.store(yp + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)
            xp += stride_xh
            yp += stride_yh

    @functools.lru_cache(maxsize=256)
    def _gpu_blocks(D: int) -> tuple[int, int]:
        """(BLOCK_HALF, BLOCK_T) of the first GPU config: about 1k element pairs per head step (cached: a pure
        function of D, in plain Python, as triton.next_power_of_2 costs microseconds a call)."""
        block_half = 1 << (D // 2 - 1).bit_length()  # triton.next_power_of_2(D // 2), D >= 2
        return block_half, max(1, min(64, 1024 // block_half))

    def _blocks(D: int, interpret: bool) -> tuple[int, int]:
        """(BLOCK_HALF, BLOCK_T) of the interpreter and of the first GPU config: about 1k element pairs per head
        step (``interpret``: _dispatch.triton_interpret(), read once by the caller)."""
        block_half, block_t = _gpu_blocks(D)
        if interpret:
            block_t = min(block_t, 4)
        return block_half, block_t

    # GPU: autotuned once per (heads, head dim, bucket of T: _dispatch.rows_bucket) over (BLOCK_T, warps). The
    # first is _blocks' choice at D=128 (16 tokens); tiles over 4k element pairs are pruned (registers). (32, 8)
    # and (64, 4) spilled 44 B and 60 B under ptxas: left out.
    CONFIGS = [(16, 4), (8, 4), (32, 4), (64, 8), (16, 2)]

    def _prune(configs, named_args, **kwargs):
        kept = [c for c in configs if c.kwargs["BLOCK_T"] * kwargs["BLOCK_HALF"] <= 4096]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_T"])]

    _rope_tuned = triton.autotune([triton.Config({"BLOCK_T": t}, num_warps=w) for t, w in CONFIGS],
                                  key=["H", "HALF", "t_bucket"],
                                  prune_configs_by={"early_config_prune": _prune})(_rope_kernel)

    def _launch(x: Tensor, pos: Tensor, inv_freq: Tensor, inverse: bool) -> Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        T, H, D = x.shape
        y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
        if T * H == 0:
            return y
        interpret = _dispatch.triton_interpret()
        block_half, block_t = _blocks(D, interpret)
        stride_xt, stride_xh, _ = x.stride()
        stride_yt, stride_yh, _ = y.stride()
        args = (x, pos, inv_freq, y, T, H, _dispatch.rows_bucket(T), stride_xt, stride_xh, stride_yt, stride_yh)
        if x.is_cuda and not interpret:
            # a config chosen before for this key and these dtypes is launched directly (_dispatch.tuned_config)
            cfg = _dispatch.tuned_config(_rope_tuned, (H, D // 2, args[6]), args[:4])
            if cfg is not None:
                _rope_kernel[(-(-T // cfg.kwargs["BLOCK_T"]),)](*args, HALF=D // 2, BLOCK_HALF=block_half,
                                                                INVERSE=inverse, **cfg.all_kwargs())
            else:
                _rope_tuned[lambda m: (-(-T // m["BLOCK_T"]),)](*args, HALF=D // 2, BLOCK_HALF=block_half,
                                                                INVERSE=inverse)
        else:
            _rope_kernel[(-(-T // block_t),)](*args, HALF=D // 2, BLOCK_HALF=block_half, BLOCK_T=block_t,
                                              INVERSE=inverse, num_warps=4)
        return y


    class _RopeFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: Tensor, pos: Tensor, theta: float) -> Tensor:
            inv_freq = _inv_freq(x.shape[-1], theta, x.device)
            ctx.save_for_backward(pos, inv_freq)
            return _launch(x, pos, inv_freq, False)

        @staticmethod
        @torch.autograd.function.once_differentiable  # a double backward raises instead of dropping terms
        def backward(ctx, dy: Tensor):
            pos, inv_freq = ctx.saved_tensors
            return _launch(dy, pos, inv_freq, True), None, None

    # under torch.compile (r4b/kernels/_compile.py): the same rotations as custom ops (the backward rotates back)
    @_compile.custom_op("rope")
    def _rope_op(x: Tensor, pos: Tensor, theta: float, inverse: bool) -> Tensor:
        return _launch(x, pos, _inv_freq(x.shape[-1], theta, x.device, cached=False), inverse)

    @_rope_op.register_fake
    def _(x, pos, theta, inverse):
        return x.new_empty(x.shape)

    def _rope_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.theta, ctx.inverse = inputs[2], inputs[3]

    def _rope_grads(ctx, dy):
        (pos,) = ctx.saved_tensors
        return _rope_op(dy, pos, ctx.theta, not ctx.inverse), None, None, None

    _rope_op.register_autograd(_rope_grads, setup_context=_rope_setup)


@_dispatch.on_tensor_device
def rope(x: Tensor, position_ids: Tensor, theta: float = 1e6, *, backend: str | None = None) -> Tensor:
    """Apply RoPE to one projection.

    x: (T, H, D) float, D even, any strides with a unit last stride (a head slice of a fused qkv works);
    position_ids: (T,) int64 (or int32) on the same device. Returns (T, H, D) in x.dtype, contiguous.
    Its backward is the inverse rotation.
    """
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES, ndim=3)
    _checks.tensor("position_ids", position_ids, dtypes=(torch.int64, torch.int32), ndim=1)
    _checks.same_device(x=x, position_ids=position_ids)
    _checks.same_len(x.shape[0], "x", position_ids=position_ids)
    if x.shape[-1] % 2 or x.shape[-1] == 0:
        raise ValueError(f"x's head dimension must be even and >= 2 for RoPE, got D={x.shape[-1]}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta}")
    if _dispatch.pick(OP, backend, x) == "triton":
        if _compile.compiling():
            return _rope_op(x, position_ids.contiguous(), float(theta), False)
        return _RopeFn.apply(x, position_ids.contiguous(), float(theta))
    return rope_ref(x, position_ids, theta)
