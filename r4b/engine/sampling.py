"""Sampling parameters and the sampler: next tokens and their log-probs from the last rows' logits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to sample the completions of one request.

    temperature: 0 is greedy (argmax); top_p in (0, 1] keeps the smallest set of tokens whose probability
    reaches it; top_k: keep the k most likely (0 = all); max_tokens: generated tokens at most (a forced
    ``</think>`` counts); stop: strings that end a completion (the text stops before them); stop_token_ids: token
    ids that end it (kept in token_ids, like the end-of-turn tokens); seed: a seeded completion draws from its own
    generator (seeded by (seed, completion index)), so it does not depend on the rest of the batch; n:
    completions per request and thinking mode; logprobs: also return the top-k alternatives at each step (the
    chosen token's log-prob is always returned); ignore_eos: do not stop at the end-of-turn tokens.

    Log-probs are those of the model's distribution at the sampling temperature (1 when greedy), before
    top-k / top-p: exactly what ``fused_linear_logprobs(..., temperature=temperature)`` recomputes in training.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an int >= 0 (0: no limit)")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "an int >= 1")
        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an int >= 1")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "None or an int")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise bad("logprobs", "None or an int >= 0")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "a non-empty string or a list of them")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids)
        if not all(isinstance(i, int) and i >= 0 for i in ids):
            raise bad("stop_token_ids", "a list of token ids >= 0")
        object.__setattr__(self, "stop_token_ids", ids)


def make_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    """The generator of completion ``index`` of a seeded request (None without a seed)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(hash((seed, index)) & (2**63 - 1))  # hash of an int tuple is the same in every process
    return g


def sample(
    logits: Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    forced: list[int | None] | None = None,
) -> tuple[list[int], list[float], list[dict[int, float]] | None]:
    """Next token of each row of ``logits`` (R, V).

    params / generators: per row. forced: per row, a token to take instead of sampling (its log-prob is still
    reported), or None. Returns (tokens, their log-probs, per row the top-``logprobs`` alternatives as {token:
    log-prob} when any row asked for them, else None).
    """
    R = logits.shape[0]
    if R == 0:
        return [], [], None
    logits = logits.float()
    dev = logits.device
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
    scaled = logits / temps[:, None]
    logp = torch.log_softmax(scaled, dim=-1)  # (R, V): the reported distribution
    tokens = logits.argmax(dim=-1)  # greedy rows (and placeholders for the others)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0 and (forced is None or forced[i] is None)]
    if sampled:
        idx = torch.tensor(sampled, device=dev)
        probs = _filtered_probs(scaled[idx], [params[i] for i in sampled])
        shared = [j for j, i in enumerate(sampled) if generators[i] is None]
        if shared:
            tokens[idx[shared]] = torch.multinomial(probs[shared], 1)[:, 0]
        for j, i in enumerate(sampled):
            if generators[i] is not None:
                tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    if forced is not None:
        for i, f in enumerate(forced):
            if f is not None:
                tokens[i] = f
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    top = None
    k_max = max((p.logprobs or 0) for p in params)
    if k_max:
        vals, ids = logp.topk(min(k_max, logp.shape[1]), dim=-1)
        vals, ids = vals.tolist(), ids.tolist()
        top = [dict(zip(ids[i][: p.logprobs or 0], vals[i][: p.logprobs or 0], strict=True))
               for i, p in enumerate(params)]
    return tokens.tolist(), chosen.tolist(), top


def _filtered_probs(scaled: Tensor, params: list[SamplingParams]) -> Tensor:
    """Softmax of the temperature-scaled logits after each row's top-k and top-p filters."""
    V = scaled.shape[1]
    top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
    top_p = [float(p.top_p) for p in params]
    if any(k < V for k in top_k) or any(p < 1 for p in top_p):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(V, device=scaled.device)[None, :]
        drop = ranks >= torch.tensor(top_k, device=scaled.device)[:, None]
        probs = torch.softmax(sorted_logits.masked_fill(drop, -math.inf), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        p = torch.tensor(top_p, device=scaled.device)[:, None]
        drop |= (before >= p) & (p < 1)  # the top token is always kept; top_p=1 keeps all (cumsum rounds to 1)
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        scaled = torch.full_like(scaled, -math.inf).scatter(1, order, sorted_logits)
    return torch.softmax(scaled, dim=-1)
