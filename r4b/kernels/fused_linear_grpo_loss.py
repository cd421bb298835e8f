"""fused_linear_grpo_loss: the BPO/GRPO policy loss straight from hidden states (clipped surrogate, optional
k3 KL to a reference policy, three aggregations), with the per-token log-probs and the usual stats. The
vocabulary projection never exists as an [N, V] tensor. With gradients, the Triton backend runs the "chunked"
implementation by default (_fused_linear_chunked.py: 3 cuBLAS GEMMs per row chunk, the gradient formed in the
forward); R4B_FUSED_LINEAR_IMPL=tiled selects the tiled kernels of _fused_linear.py (log-probs tile by tile, a
backward that recomputes the logits). This file owns the per-token formula on [N] vectors and the public function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _compile, _dispatch, _fused_linear, _fused_linear_chunked

OP = "fused_linear_grpo_loss"
_dispatch.register(OP, ("triton", "torch"))

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum")
STAT_KEYS = ("clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max", "kl_mean")


def _dense_seq(seq_ids: Tensor) -> tuple[Tensor, int]:
    """((N,) dense sequence index, number of sequences) of seq_ids (one host sync)."""
    _, seq = torch.unique(seq_ids, return_inverse=True)
    return seq, int(seq.max()) + 1 if seq.numel() else 0


def _aggregate(per_token: Tensor, mask: Tensor, seq_ids: Tensor | None, aggregation: str,
               dense: tuple[Tensor, int] | None = None) -> Tensor:
    """Scalar loss from (N,) per-token losses; masked tokens are already 0 in ``per_token``. ``dense``:
    :func:`_dense_seq` of seq_ids when already computed (no second sort and host sync)."""
    if aggregation == "token_mean":
        return per_token.sum() / mask.sum().clamp(min=1)
    seq, n_seq = dense if dense is not None else _dense_seq(seq_ids)
    count = torch.zeros(n_seq, dtype=torch.float32, device=mask.device).index_add_(0, seq, mask.float())
    total = torch.zeros(n_seq, dtype=per_token.dtype, device=mask.device).index_add(0, seq, per_token)
    if aggregation == "seq_mean_token_mean":
        total = total / count.clamp(min=1)
    active = (count > 0).sum().clamp(min=1)  # sequences with >= 1 trained token
    return total.sum() / active


def _token_weights(mask: Tensor, seq_ids: Tensor | None, aggregation: str,
                   dense: tuple[Tensor, int] | None = None) -> Tensor:
    """(N,) f32 d loss / d per_token[i] of :func:`_aggregate` (0 at untrained tokens), computed up front."""
    m = mask.float()
    if aggregation == "token_mean":
        return m / mask.sum().clamp(min=1).float()
    seq, n_seq = dense if dense is not None else _dense_seq(seq_ids)
    count = torch.zeros(n_seq, dtype=torch.float32, device=mask.device).index_add_(0, seq, m)
    active = (count > 0).sum().clamp(min=1).float()
    if aggregation == "seq_mean_token_mean":
        return m / (count.clamp(min=1)[seq] * active)
    return m / active


def _surrogate(logp: Tensor, mask: Tensor, advantages: Tensor, old_logprobs: Tensor | None,
               ref_logprobs: Tensor | None, eps_low: float, eps_high: float, beta: float
               ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(per_token loss (N,), ratio, masked advantages, k3 KL or None) from logp (N,) f32."""
    # Masked positions are neutralised before any exp, so garbage there (e.g. old_logprobs=-inf) cannot leak.
    # advantages, old and reference log-probs are data: no gradient flows into them, whatever their requires_grad
    adv = torch.where(mask, advantages.detach().float(), 0.0)
    old = logp.detach() if old_logprobs is None else old_logprobs.detach().float()
    log_ratio = torch.where(mask, logp - old, 0.0)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = None
    if ref_logprobs is not None:
        d = torch.where(mask, ref_logprobs.detach().float() - logp, 0.0)
        kl = torch.exp(d) - d - 1.0  # k3 estimator of KL(pi || pi_ref), >= 0
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = torch.where(mask, per_token, 0.0)
    return per_token, ratio, adv, kl


def _needs_grad(*xs: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def _grpo(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor, old_logprobs: Tensor | None,
          ref_logprobs: Tensor | None, loss_mask: Tensor | None, seq_ids: Tensor | None, eps_low: float,
          eps_high: float, beta: float, temperature: float, aggregation: str, bias: Tensor | None, backend: str
          ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    v = weight.shape[0]
    mask = (targets >= 0) & (targets < v)  # (N,) a token without a target is never trained
    if loss_mask is not None:
        mask = mask & loss_mask
    sur_args = (mask, advantages, old_logprobs, ref_logprobs, eps_low, eps_high, beta)
    if backend == "triton" and _needs_grad(hidden, weight, bias) and _fused_linear_chunked.use_chunked(hidden.dtype):
        # 3 GEMMs, gradient computed in the forward (see _fused_linear_chunked.py)
        sur: list = []  # the surrogate's (per_token, ratio, adv, kl) of the loss, reused by the stats below
        # the dense sequence index once, up front: recomputed in the loss (after the chunks) its host sync would
        # wait for every chunk's GEMMs, and the GPU would idle while the host launched the rest
        dense = _dense_seq(seq_ids) if aggregation != "token_mean" else None

        def loss_fn(lp: Tensor) -> Tensor:
            sur[:] = _surrogate(lp, *sur_args)
            return _aggregate(sur[0], mask, seq_ids, aggregation, dense)

        w = _token_weights(mask, seq_ids, aggregation, dense)
        loss, logp = _fused_linear_chunked.chunked_loss(
            hidden, weight, bias, targets, w, loss_fn, adv=advantages, old=old_logprobs,
            ref=ref_logprobs if beta > 0 else None, temperature=temperature, eps_low=eps_low, eps_high=eps_high,
            beta=beta, mode=_fused_linear_chunked.MODE_GRPO)
        _, ratio, adv, kl = sur  # of the same log-probs (no second pass of small kernels)
    else:
        logp = _fused_linear.linear_logprobs(hidden, weight, bias, targets, temperature, backend)  # (N,) f32
        per_token, ratio, adv, kl = _surrogate(logp, *sur_args)
        loss = _aggregate(per_token, mask, seq_ids, aggregation)

    with torch.no_grad():
        n_tok = mask.sum().clamp(min=1).float()
        low = ((ratio < 1.0 - eps_low) & (adv < 0) & mask).sum() / n_tok
        high = ((ratio > 1.0 + eps_high) & (adv > 0) & mask).sum() / n_tok
        r_in = torch.where(mask, ratio.detach(), 0.0)
        zero = torch.zeros((), dtype=torch.float32, device=logp.device)
        stats = {
            "clip_frac": low + high,
            "clip_frac_low": low,
            "clip_frac_high": high,
            "ratio_mean": r_in.sum() / n_tok,
            "ratio_max": r_in.max() if r_in.numel() else zero,
            "kl_mean": torch.where(mask, kl.detach(), 0.0).sum() / n_tok if kl is not None else zero,
        }
    return loss, logp.detach(), stats


def fused_linear_grpo_loss_ref(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    loss_mask: Tensor | None = None,
    seq_ids: Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    temperature: float = 1.0,
    aggregation: str = "seq_mean_token_mean",
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Torch reference (row chunks of fp32 logits in the forward and the backward): the public op's contract."""
    return _grpo(hidden, weight, targets, advantages, old_logprobs, ref_logprobs, loss_mask, seq_ids, eps_low,
                 eps_high, beta, temperature, aggregation, bias, "torch")


@_compile.eager  # under torch.compile: runs eagerly (r4b/kernels/_compile.py)
@_dispatch.on_tensor_device
def fused_linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    loss_mask: Tensor | None = None,
    seq_ids: Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    temperature: float = 1.0,
    aggregation: str = "seq_mean_token_mean",
    bias: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """GRPO/BPO policy loss from hidden states, differentiable in hidden, weight and bias.

    Shapes and dtypes (N tokens, H hidden, V vocabulary; one device):
      hidden (N, H) float32/float16/bfloat16; weight (V, H) and bias (V,) optional, hidden's dtype;
      targets (N,) int64/int32 in [0, V) or -100 (no target: never trained);
      advantages (N,) float (per token, usually the sequence's advantage broadcast);
      old_logprobs, ref_logprobs (N,) float or None; loss_mask (N,) bool or None (None: every token with a
      target); seq_ids (N,) int32/int64, required by the seq_mean_* aggregations.

    Per token (logp = log softmax(logits / temperature)[target], r = exp(logp - old_logprobs); old_logprobs
    None means on-policy, r = exp(logp - logp.detach())):
      loss_t = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * (exp(ref - logp) - (ref - logp) - 1)
    Aggregation over trained tokens: "token_mean" (mean over all of them), "seq_mean_token_mean" (mean within
    each sequence, then mean over sequences with >= 1 trained token), "seq_mean_token_sum" (sum within each
    sequence, mean over those sequences). No trained token at all gives loss 0.0 (not NaN).

    Returns (loss () float32, logprobs (N,) float32 detached (0.0 where the target is -100), stats): stats
    maps each of STAT_KEYS to a 0-dim float32 tensor over trained tokens (no host sync): clip_frac_low
    (r < 1 - eps_low with A < 0), clip_frac_high (r > 1 + eps_high with A > 0), clip_frac (their sum),
    ratio_mean, ratio_max, kl_mean (mean k3 when ref_logprobs is given, else 0).
    """
    _fused_linear.check_common(hidden, weight, bias, targets, temperature)
    n = hidden.shape[0]
    _checks.tensor("advantages", advantages, dtypes=_checks.FLOAT_DTYPES, ndim=1)
    if old_logprobs is not None:
        _checks.tensor("old_logprobs", old_logprobs, dtypes=_checks.FLOAT_DTYPES, ndim=1)
    if ref_logprobs is not None:
        _checks.tensor("ref_logprobs", ref_logprobs, dtypes=_checks.FLOAT_DTYPES, ndim=1)
    if loss_mask is not None:
        _checks.tensor("loss_mask", loss_mask, dtypes=(torch.bool,), ndim=1)
    if seq_ids is not None:
        _checks.tensor("seq_ids", seq_ids, dtypes=(torch.int32, torch.int64), ndim=1)
    _checks.same_len(n, "hidden", advantages=advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                     loss_mask=loss_mask, seq_ids=seq_ids)
    _checks.same_device(hidden=hidden, advantages=advantages, old_logprobs=old_logprobs,
                        ref_logprobs=ref_logprobs, loss_mask=loss_mask, seq_ids=seq_ids)
    _checks.choice("aggregation", aggregation, AGGREGATIONS)
    if aggregation != "token_mean" and seq_ids is None:
        raise ValueError(f"aggregation={aggregation!r} needs seq_ids (N,), got seq_ids=None "
                         "(pass seq_ids, or aggregation='token_mean')")
    for name, val in (("eps_low", eps_low), ("eps_high", eps_high), ("beta", beta)):
        if not (isinstance(val, (int, float)) and val >= 0 and val != float("inf")):
            raise ValueError(f"{name} must be a finite number >= 0, got {val!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logprobs (N,), got ref_logprobs=None")
    chosen = _dispatch.pick(OP, backend, hidden)
    return _grpo(hidden, weight, targets, advantages, old_logprobs, ref_logprobs, loss_mask, seq_ids,
                 float(eps_low), float(eps_high), float(beta), float(temperature), aggregation, bias, chosen)
