"""Sampling parameters and the sampler: next tokens and their log-probs from the last rows' logits."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
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
    chosen token's log-prob is always returned); ignore_eos: do not stop at the end-of-turn tokens;
    prompt_logprobs: also return the log-prob of each prompt token after the first (0), and its top-k
    alternatives (k) (the request's prompt is then computed in full: no prefix-cache hit).

    min_p in [0, 1]: keep the tokens whose probability is at least min_p times the most likely one's (0 = all).
    Penalties (0 / 1 = none), applied to the logits before the temperature, in this order:
    repetition_penalty > 0 (a token seen in the prompt or the completion has its logit divided by it when
    positive, multiplied when negative; > 1 discourages repeats), then frequency_penalty and presence_penalty in
    [-2, 2] (OpenAI's: ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``, count = times the
    token was generated in this completion). logit_bias: {token id: bias in [-100, 100]} added to those logits
    after the penalties (OpenAI's; -100 bans a token, 100 all but forces it). A greedy completion takes the argmax
    of the penalised, biased logits.

    Log-probs are those of the model's distribution at the sampling temperature (1 when greedy), before the
    penalties and top-k / top-p / min-p: exactly what ``fused_linear_logprobs(..., temperature=temperature)``
    recomputes in training (so a trainer's importance ratio sees the model, not the sampler's filters).

    response_format: None, or "json_object" (JSON mode: the answer, after the thought, is constrained to one JSON
    object, then the end of turn; r4b/engine/structured.py); json_schema: a JSON schema (a dict, or its JSON text)
    the answer's object must follow (response_format becomes "json_schema"; what the schema can constrain is in
    structured.py, and a schema it cannot enforce is refused). The constraint masks tokens like a -inf bias: the
    reported log-probs stay the model's.
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
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    response_format: str | None = None
    json_schema: str | None = None  # canonical JSON text (a dict given here is stored so: the params stay hashable)

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
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or isinstance(self.prompt_logprobs, bool) or self.prompt_logprobs < 0):
            raise bad("prompt_logprobs", "None or an int >= 0")
        def number(name: str) -> bool:
            v = getattr(self, name)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not number("min_p") or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not number(name) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2]")
        if not number("repetition_penalty") or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a finite number > 0 (1: none)")
        try:
            raw = list(self.logit_bias.items()) if isinstance(self.logit_bias, dict) else list(self.logit_bias)
            bias = tuple(sorted((t, b) for t, b in raw))
        except (TypeError, ValueError):
            raise bad("logit_bias", "a {token id: bias} mapping") from None
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 and isinstance(b, (int, float))
                   and not isinstance(b, bool) and -100 <= b <= 100 for t, b in bias) \
                or len({t for t, _ in bias}) != len(bias):
            raise bad("logit_bias", "a {token id >= 0: bias in [-100, 100]} mapping")
        object.__setattr__(self, "logit_bias", tuple((t, float(b)) for t, b in bias))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "a non-empty string or a list of them")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids)
        if not all(isinstance(i, int) and i >= 0 for i in ids):
            raise bad("stop_token_ids", "a list of token ids >= 0")
        object.__setattr__(self, "stop_token_ids", ids)
        if self.json_schema is not None:
            from .structured import SchemaError, compile_schema

            try:
                schema = compile_schema(self.json_schema)
            except SchemaError as e:
                raise ValueError(f"SamplingParams.json_schema: {e}") from None
            if self.response_format not in (None, "json_schema"):
                raise bad("response_format", '"json_schema" (or None) with a json_schema')
            object.__setattr__(self, "json_schema", schema.text)
            object.__setattr__(self, "response_format", "json_schema")
        elif self.response_format not in (None, "json_object"):
            raise bad("response_format", 'None or "json_object" (or give json_schema)')

    @property
    def has_penalties(self) -> bool:
        """Whether sampling needs the tokens so far (a repetition, frequency or presence penalty)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def changes_logits(self) -> bool:
        """Whether the logits are changed before sampling (penalties or a logit bias)."""
        return self.has_penalties or bool(self.logit_bias)


def apply_penalties(logits: Tensor, params: list[SamplingParams],
                    history: Sequence[tuple[Sequence[int], int]] | None = None,
                    state: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The logits (R, V) with each row's repetition, frequency and presence penalties, then its logit bias (see
    SamplingParams). Rows with penalties need, either, ``history``: per row, (its tokens so far, how many of them
    are the prompt); or ``state``: (counts, seen), one row each per penalised row in order, the completion's token
    counts (float) and a mask of every token seen, prompt included (what :class:`PenaltyCounts` keeps). Rows with
    neither are left as they are; without any, the same tensor comes back."""
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return _with_bias(logits, params, biased) if biased else logits
    dev = logits.device
    if state is None:
        if history is None or len(history) != len(params):
            raise ValueError("sampling penalties need each row's tokens so far (history) or their counts (state)")
        state = token_counts([history[i] for i in rows], logits.shape[1], dev)
    counts, seen = state
    idx = torch.tensor(rows, device=dev)
    sub = logits[idx]
    counts = counts.to(sub.dtype)

    def column(name: str) -> Tensor:
        return torch.tensor([getattr(params[i], name) for i in rows], device=dev, dtype=sub.dtype)[:, None]

    rp = column("repetition_penalty")  # multiplicative, on the prompt's and the completion's tokens (1: no change)
    sub = torch.where(seen, torch.where(sub > 0, sub / rp, sub * rp), sub)
    # additive, on the completion's counts
    sub = sub - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0).to(sub.dtype)
    out = logits.clone()
    out[idx] = sub
    return _with_bias(out, params, biased) if biased else out


def token_counts(history: Sequence[tuple[Sequence[int], int]], vocab_size: int,
                 device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(counts (R, V) float32 of each row's completion tokens, seen (R, V) bool of all its tokens) from (tokens,
    prompt length) per row."""
    gen_r, gen_t, all_r, all_t = [], [], [], []
    for j, (toks, num_prompt) in enumerate(history):
        gen = list(toks[num_prompt:])
        gen_r += [j] * len(gen)
        gen_t += gen
        all_r += [j] * len(toks)
        all_t += list(toks)
    counts = torch.zeros(len(history), vocab_size, device=device)
    seen = torch.zeros(len(history), vocab_size, device=device, dtype=torch.bool)
    if gen_t:
        counts.index_put_((torch.tensor(gen_r, device=device), torch.tensor(gen_t, device=device)),
                          torch.ones(len(gen_t), device=device), accumulate=True)
    if all_t:
        seen[torch.tensor(all_r, device=device), torch.tensor(all_t, device=device)] = True
    return counts, seen


class PenaltyCounts:
    """The engine's penalty state: each penalised sequence's completion-token counts and seen-token mask on the
    device, a row of a (slots, V) pool. A sequence's row is built once from its tokens (:meth:`rows`), then takes
    one scatter a step (:meth:`add`), so a step's host work does not grow with the completion's length. The pool
    grows by doubling; a slot costs 5 bytes a vocabulary entry (0.76 MB at Qwen3's 151,936). It is freed whenever
    no penalised sequence is left (between generate calls; a server between bursts of such requests)."""

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.counts = torch.zeros(0, vocab_size, device=device)
        self.seen = torch.zeros(0, vocab_size, device=device, dtype=torch.bool)
        self.slot_of: dict[Hashable, int] = {}
        self._free: list[int] = []

    def _grow(self, need: int) -> None:
        cap = self.counts.shape[0]
        new = max(need, 2 * cap, 8)
        counts = torch.zeros(new, self.vocab_size, device=self.device)
        seen = torch.zeros(new, self.vocab_size, device=self.device, dtype=torch.bool)
        counts[:cap], seen[:cap] = self.counts, self.seen
        self.counts, self.seen = counts, seen
        self._free += range(new - 1, cap - 1, -1)

    def rows(self, keys: Sequence[Hashable], history: Sequence[tuple[Sequence[int], int]]) -> Tensor:
        """The slots of these sequences (a new one is filled from its (tokens, prompt length))."""
        new = [j for j, k in enumerate(keys) if k not in self.slot_of]
        if len(new) > len(self._free):
            self._grow(len(self.slot_of) + len(new))
        if new:
            slots = [self._free.pop() for _ in new]
            for j, s in zip(new, slots, strict=True):
                self.slot_of[keys[j]] = s
            idx = torch.tensor(slots, device=self.device)
            self.counts[idx], self.seen[idx] = token_counts([history[j] for j in new], self.vocab_size, self.device)
        return torch.tensor([self.slot_of[k] for k in keys], device=self.device)

    def add(self, slots: Tensor, tokens: Sequence[int]) -> None:
        """Each slot's sequence took one more token."""
        t = torch.tensor(list(tokens), device=self.device)
        self.counts.index_put_((slots, t), torch.ones(len(tokens), device=self.device), accumulate=True)
        self.seen[slots, t] = True

    def release(self, key: Hashable) -> None:
        s = self.slot_of.pop(key, None)
        if s is not None:
            self._free.append(s)
            if not self.slot_of:
                self.clear()

    def clear(self) -> None:
        """Release every sequence and free the pool."""
        self.slot_of.clear()
        self._free = []
        self.counts = torch.zeros(0, self.vocab_size, device=self.device)
        self.seen = torch.zeros(0, self.vocab_size, device=self.device, dtype=torch.bool)


def _with_bias(logits: Tensor, params: list[SamplingParams], rows: list[int]) -> Tensor:
    """A copy of the logits with the rows' logit_bias added (token ids past the vocabulary: a ValueError)."""
    r, t, b = [], [], []
    for i in rows:
        for tok, bias in params[i].logit_bias:
            r.append(i)
            t.append(tok)
            b.append(bias)
    if max(t) >= logits.shape[1]:
        raise ValueError(f"SamplingParams.logit_bias names token {max(t)}; the vocabulary has {logits.shape[1]}")
    dev = logits.device
    out = logits.clone()
    out.index_put_((torch.tensor(r, device=dev), torch.tensor(t, device=dev)),
                   torch.tensor(b, device=dev, dtype=out.dtype), accumulate=True)
    return out


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
    history: Sequence[tuple[Sequence[int], int]] | None = None,
    state: tuple[Tensor, Tensor] | None = None,
    allowed: list[Tensor | None] | None = None,
) -> tuple[list[int], list[float], list[dict[int, float]] | None]:
    """Next token of each row of ``logits`` (R, V).

    params / generators: per row. forced: per row, a token to take instead of sampling (its log-prob is still
    reported), or None. history / state: what rows with penalties need (see :func:`apply_penalties`). allowed: per
    row, None or a bool (V,) mask of the tokens it may take (constrained decoding; applied after the penalties and
    the bias, so a greedy or sampled row takes an allowed token).
    Returns (tokens, their log-probs, per row the top-``logprobs`` alternatives as {token:
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
    penalised = apply_penalties(logits, params, history, state)
    if allowed is not None and any(m is not None for m in allowed):
        if penalised is logits:
            penalised = logits.clone()
        for i, m in enumerate(allowed):
            if m is not None:
                penalised[i].masked_fill_(~m, -math.inf)
    if penalised is not logits:
        scaled = penalised / temps[:, None]
    tokens = penalised.argmax(dim=-1)  # greedy rows (and placeholders for the others)
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
    """Softmax of the temperature-scaled logits after each row's top-k, top-p and then min-p filters."""
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
    min_p = [float(p.min_p) for p in params]
    if any(m > 0 for m in min_p):  # last (as in transformers): p >= min_p * p_max, i.e. a logit >= max + log min_p
        m = torch.tensor(min_p, device=scaled.device)[:, None]
        scaled = scaled.masked_fill((scaled < scaled.max(dim=-1, keepdim=True).values + m.log()) & (m > 0), -math.inf)
    return torch.softmax(scaled, dim=-1)
