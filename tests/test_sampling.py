"""The sampler (r4b.engine.sampling) against independent float64 references: greedy / forced / seeded / unseeded
rows, the reported log-probs and top-logprobs, the top-k / top-p filter (exactly and by empirical frequencies),
and SamplingParams' validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from r4b.engine.sampling import (
    PenaltyCounts,
    SamplingParams,
    _filtered_probs,
    apply_penalties,
    make_generator,
    sample,
    token_counts,
)

CPU = torch.device("cpu")


def ref_logp(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The reported distribution: log-softmax in float64 at the sampling temperature (1 when greedy)."""
    t = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits.double() / t, dim=-1)


def ref_filtered(scaled: list[float], top_k: int, top_p: float) -> list[float]:
    """Plain Python float64: sort descending, keep the first k (0 or >= V: all), softmax over them, keep the
    smallest prefix whose cumulative probability reaches top_p, renormalise."""
    V = len(scaled)
    order = sorted(range(V), key=lambda i: -scaled[i])
    kept = order[: top_k if 0 < top_k < V else V]
    m = max(scaled[i] for i in kept)
    e = {i: math.exp(scaled[i] - m) for i in kept}
    s = sum(e.values())
    prefix, cum = [], 0.0
    for i in kept:
        prefix.append(i)
        cum += e[i] / s
        if cum >= top_p:
            break
    s2 = sum(e[i] for i in prefix)
    out = [0.0] * V
    for i in prefix:
        out[i] = e[i] / s2
    return out


def assert_logp(got: list[float], want: torch.Tensor) -> None:
    # float32 log-softmax vs float64: measured at most 6e-7 * (1 + |want|) for logits of scale 3, T in [0.3, 1.9]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-6, atol=1e-6)


def randn(*shape: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ----------------------------------------------------------------------------------------------- greedy / forced


def test_greedy_is_argmax_with_temperature_one_logprobs():
    logits = randn(6, 37, seed=1)
    # the filters and a seed do not matter to a greedy row
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, top_k=3),
              SamplingParams(temperature=0, top_p=0.1), SamplingParams(temperature=0, seed=5),
              SamplingParams(temperature=0, top_k=1, top_p=0.5), SamplingParams(temperature=0.0)]
    gens = [None, None, None, make_generator(5, 0, CPU), None, None]
    state = torch.get_rng_state()
    tokens, logps, top = sample(logits, params, gens)
    assert torch.equal(torch.get_rng_state(), state), "greedy rows must not draw from the global RNG"
    want = logits.double().argmax(dim=-1)
    assert tokens == want.tolist()
    assert_logp(logps, ref_logp(logits, 1.0).gather(1, want[:, None])[:, 0])
    assert top is None


def test_greedy_logprob_is_at_temperature_one_not_another():
    # a row at temperature 0.5 that is forced to the argmax reports a different log-prob than the greedy row:
    # the check above would notice a greedy row reported at any temperature other than 1
    logits = randn(1, 11, seed=2)
    a = logits.argmax().item()
    _, (lp_greedy,), _ = sample(logits, [SamplingParams(temperature=0)], [None])
    _, (lp_half,), _ = sample(logits, [SamplingParams(temperature=0.5)], [None], forced=[a])
    assert_logp([lp_greedy], ref_logp(logits, 1.0)[0, a : a + 1])
    assert_logp([lp_half], ref_logp(logits, 0.5)[0, a : a + 1])
    assert abs(lp_greedy - lp_half) > 1e-2


def test_sampled_logprobs_are_at_the_sampling_temperature_before_the_filters():
    logits = randn(5, 29, seed=3)
    temps = [0.5, 1.3, 2.0, 0.7, 1.0]
    params = [SamplingParams(temperature=0.5), SamplingParams(temperature=1.3), SamplingParams(temperature=2.0),
              SamplingParams(temperature=0.7, top_k=2), SamplingParams(top_p=0.5)]
    torch.manual_seed(0)
    tokens, logps, _ = sample(logits, params, [None] * 5)
    assert all(0 <= t < 29 for t in tokens)
    want = torch.stack([ref_logp(logits[i], temps[i])[tokens[i]] for i in range(5)])
    assert_logp(logps, want)
    # the filtered rows report the unfiltered log-prob, which differs from the renormalised filtered one
    for i, p in [(3, params[3]), (4, params[4])]:
        filt = ref_filtered((logits[i].double() / temps[i]).tolist(), p.top_k, p.top_p)
        assert abs(math.log(filt[tokens[i]]) - logps[i]) > 1e-3


def test_forced_tokens_replace_the_sample_and_report_their_own_logprob():
    logits = randn(5, 23, seed=4)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8), SamplingParams(seed=3, top_k=2),
              SamplingParams(temperature=1.5), SamplingParams(temperature=0, logprobs=3)]
    gens = [None, None, make_generator(3, 0, CPU), None, None]
    # forced tokens far from the argmax (the least likely token), one row left to sample
    least = logits.argmin(dim=-1).tolist()
    forced = [least[0], least[1], least[2], None, least[4]]
    torch.manual_seed(0)
    tokens, logps, top = sample(logits, params, gens, forced)
    assert tokens[:3] == least[:3] and tokens[4] == least[4]
    assert tokens[0] != logits[0].argmax().item()
    temps = [1.0, 0.8, 1.0, 1.5, 1.0]
    want = torch.stack([ref_logp(logits[i], temps[i])[tokens[i]] for i in range(5)])
    assert_logp(logps, want)
    # the top alternatives of a forced row are still the distribution's best, not the forced token
    ids = ref_logp(logits[4], 1.0).topk(3).indices.tolist()
    assert list(top[4]) == ids and least[4] not in top[4]
    assert top[:4] == [{}, {}, {}, {}]


def test_forced_all_none_is_the_same_as_no_forced():
    logits = randn(4, 19, seed=5)
    params = [SamplingParams(), SamplingParams(temperature=0.6), SamplingParams(temperature=0), SamplingParams()]
    torch.manual_seed(11)
    a = sample(logits, params, [None] * 4)
    torch.manual_seed(11)
    b = sample(logits, params, [None] * 4, [None] * 4)
    assert a == b


# ------------------------------------------------------------------------------------------ filters that are greedy


def test_top_k_one_at_temperature_one_equals_greedy():
    logits = randn(64, 50, seed=6)
    greedy = sample(logits, [SamplingParams(temperature=0)] * 64, [None] * 64)
    torch.manual_seed(0)
    params = [SamplingParams(top_k=1, seed=i if i % 2 else None) for i in range(64)]
    gens = [make_generator(p.seed, 0, CPU) for p in params]
    got = sample(logits, params, gens)
    assert got[0] == greedy[0] == logits.argmax(dim=-1).tolist()
    assert got[1] == greedy[1]  # both at temperature 1: the same log-probs


def test_tiny_top_p_equals_greedy():
    logits = randn(64, 50, seed=7)
    torch.manual_seed(0)
    params = [SamplingParams(temperature=0.8, top_p=1e-6, seed=i if i % 3 == 0 else None) for i in range(64)]
    gens = [make_generator(p.seed, 0, CPU) for p in params]
    tokens, logps, _ = sample(logits, params, gens)
    want = logits.argmax(dim=-1)
    assert tokens == want.tolist()
    assert_logp(logps, ref_logp(logits, 0.8).gather(1, want[:, None])[:, 0])


# ------------------------------------------------------------------------------------------------- RNG behaviour


def _seeded_run(steps: int, seed: int, index: int, others: list[SamplingParams] | None, at: int) -> list[int]:
    """The tokens of one seeded row over ``steps`` steps (logits from a fixed stream), alone (others None) or at
    position ``at`` in a batch with other, unseeded rows."""
    g = make_generator(seed, index, CPU)
    me = SamplingParams(seed=seed, temperature=1.1, top_k=40)
    out = []
    for s in range(steps):
        if others is None:
            logits = randn(1, 64, seed=1000 + s, scale=1.0)
            tokens, _, _ = sample(logits, [me], [g])
            out.append(tokens[0])
        else:
            logits = randn(len(others) + 1, 64, seed=5000 + s, scale=1.0)
            logits[at] = randn(1, 64, seed=1000 + s, scale=1.0)[0]
            params = others[:at] + [me] + others[at:]
            gens: list[torch.Generator | None] = [None] * len(params)
            gens[at] = g
            torch.manual_seed(s)  # the global RNG is in some other state at each step
            tokens, _, _ = sample(logits, params, gens)
            out.append(tokens[at])
    return out


def test_seeded_row_is_reproducible_and_independent_of_the_batch():
    alone = _seeded_run(40, seed=7, index=0, others=None, at=0)
    assert len(set(alone)) > 5  # actually sampled, not a constant
    assert _seeded_run(40, seed=7, index=0, others=None, at=0) == alone
    others = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=3, temperature=0.5),
              SamplingParams(top_p=0.6)]
    assert _seeded_run(40, seed=7, index=0, others=others, at=2) == alone
    assert _seeded_run(40, seed=7, index=0, others=others[:1], at=1) == alone
    # another completion index or another seed: another stream
    assert _seeded_run(40, seed=7, index=1, others=None, at=0) != alone
    assert _seeded_run(40, seed=8, index=0, others=None, at=0) != alone


def test_make_generator():
    assert make_generator(None, 0, CPU) is None
    a, b = make_generator(3, 2, CPU), make_generator(3, 2, CPU)
    assert torch.equal(torch.rand(16, generator=a), torch.rand(16, generator=b))
    c = make_generator(3, 1, CPU)
    assert not torch.equal(torch.rand(16, generator=c), torch.rand(16, generator=make_generator(3, 2, CPU)))


def test_seeded_rows_do_not_touch_the_global_rng():
    logits = randn(3, 30, seed=8)
    params = [SamplingParams(seed=1), SamplingParams(seed=2, top_p=0.7), SamplingParams(temperature=0)]
    gens = [make_generator(1, 0, CPU), make_generator(2, 0, CPU), None]
    state = torch.get_rng_state()
    sample(logits, params, gens)
    assert torch.equal(torch.get_rng_state(), state)


def test_unseeded_rows_draw_from_the_global_rng():
    logits = randn(32, 40, seed=9, scale=1.0)
    params = [SamplingParams(temperature=1.2, top_k=20 if i % 2 else 0) for i in range(32)]
    torch.manual_seed(123)
    a, _, _ = sample(logits, params, [None] * 32)
    after = torch.get_rng_state()
    torch.manual_seed(123)
    b, _, _ = sample(logits, params, [None] * 32)
    torch.manual_seed(124)
    c, _, _ = sample(logits, params, [None] * 32)
    assert a == b
    assert a != c  # 32 draws from near-uniform rows over 20..40 tokens: equal by chance with probability < 20^-32
    torch.manual_seed(123)
    assert not torch.equal(after, torch.get_rng_state())  # the draw consumed the global RNG


# --------------------------------------------------------------------------------------------------- the filters


def test_filtered_probs_matches_the_float64_reference():
    V = 50
    cases = [(0, 1.0), (1, 1.0), (5, 1.0), (49, 1.0), (50, 1.0), (80, 1.0), (0, 0.3), (0, 0.9), (7, 0.5),
             (3, 0.95), (0, 1e-9), (10, 0.999)]
    scaled = randn(len(cases), V, seed=10, scale=1.5)
    params = [SamplingParams(top_k=k, top_p=p) for k, p in cases]
    got = _filtered_probs(scaled, params).double()
    want = torch.tensor([ref_filtered(scaled[i].double().tolist(), k, p) for i, (k, p) in enumerate(cases)],
                        dtype=torch.float64)
    # the cut-offs are not within float32 rounding of a cumulative probability (else the supports could differ)
    for i, (k, p) in enumerate(cases):
        srt = torch.softmax(scaled[i].double().sort(descending=True).values[: k if 0 < k < V else V], 0)
        assert (srt.cumsum(0) - p).abs().min() > 1e-4 or p == 1.0
    assert torch.equal(got > 0, want > 0), "support"
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # each row on its own gives the same
    for i in range(len(cases)):
        torch.testing.assert_close(_filtered_probs(scaled[i : i + 1], [params[i]]).double(), want[i : i + 1],
                                   rtol=1e-6, atol=1e-7)


def test_filtered_probs_without_filters_is_the_softmax():
    scaled = randn(4, 33, seed=11)
    got = _filtered_probs(scaled, [SamplingParams()] * 4).double()
    torch.testing.assert_close(got, torch.softmax(scaled.double(), -1), rtol=1e-6, atol=1e-7)


LOGITS5 = [2.0, 1.2, 0.7, 0.1, -0.6]


@pytest.mark.parametrize("temperature,top_k,top_p,seeded", [
    (0.7, 3, 1.0, False),  # reference [.678 .216 .106 0 0]
    (1.3, 0, 0.8, False),  # cumulative [.440 .677 .839 ...]: keeps 3, reference [.524 .283 .193 0 0]
    (0.5, 4, 0.9, False),  # top-k then top-p: reference [.832 .168 0 0 0]
    (1.3, 0, 0.8, True),   # the per-row generators' path
])
def test_sample_frequencies_match_the_filtered_reference(temperature, top_k, top_p, seeded):
    """N = 20000 draws of V = 5. Bound per token: |freq - p| <= 5 sqrt(p (1 - p) / N) (0 for a filtered token: it
    is never drawn); a correct sampler exceeds it with probability < 5 * 6e-7. The alternatives (no filter at
    this temperature, the filter at temperature 1, the temperature applied twice) differ from the reference by
    more than that bound plus 5 of their own sigmas on some token (smallest margin 0.022, asserted below), so
    each of them fails with probability > 1 - 6e-7 (a token that the reference filters out but the unfiltered
    sampler draws with probability >= 0.004 appears ~80 times)."""
    N, V = 20000, 5
    ref = ref_filtered([x / temperature for x in LOGITS5], top_k, top_p)
    bound = [5 * math.sqrt(p * (1 - p) / N) for p in ref]
    alternatives = {
        "no filter": ref_filtered([x / temperature for x in LOGITS5], 0, 1.0),
        "temperature 1": ref_filtered(LOGITS5, top_k, top_p),
        "temperature twice": ref_filtered([x / temperature**2 for x in LOGITS5], top_k, top_p),
    }
    for name, alt in alternatives.items():
        margin = max(abs(a - p) - b - 5 * math.sqrt(a * (1 - a) / N) for a, p, b in zip(alt, ref, bound, strict=True))
        assert margin > 0.02, (name, margin)  # the test can tell this wrong sampler apart

    logits = torch.tensor(LOGITS5).expand(N, V)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=1 if seeded else None)] * N
    if seeded:
        g = make_generator(1, 0, CPU)  # one completion's generator, drawn N times in a row
        tokens, logps, _ = sample(logits, params, [g] * N)
    else:
        torch.manual_seed(2024)
        tokens, logps, _ = sample(logits, params, [None] * N)
    freq = (torch.bincount(torch.tensor(tokens), minlength=V).double() / N).tolist()
    for t in range(V):
        assert abs(freq[t] - ref[t]) <= bound[t], (t, freq, ref)
    want = ref_logp(torch.tensor(LOGITS5), temperature)
    assert_logp(logps[:200], want[torch.tensor(tokens[:200])])


# ---------------------------------------------------------------------------------------------- top-logprobs etc.


def test_top_logprobs_hold_the_best_tokens_with_reference_values():
    V = 17
    logits = randn(6, V, seed=12)
    params = [SamplingParams(logprobs=3), SamplingParams(), SamplingParams(temperature=0.6, logprobs=5),
              SamplingParams(temperature=0, logprobs=1), SamplingParams(logprobs=0), SamplingParams(logprobs=40)]
    torch.manual_seed(0)
    tokens, logps, top = sample(logits, params, [None] * 6)
    assert isinstance(top, list) and len(top) == 6
    temps = [1.0, 1.0, 0.6, 1.0, 1.0, 1.0]
    for i, p in enumerate(params):
        k = min(p.logprobs or 0, V)
        lp = ref_logp(logits[i], temps[i])
        ids = lp.topk(k).indices.tolist() if k else []
        assert list(top[i]) == ids, i  # the k best, best first
        assert len(top[i]) == k
        if k:
            assert_logp(list(top[i].values()), lp[ids])
    assert top[1] == {} and top[4] == {}
    # the chosen token of a greedy row with logprobs=1 is its only alternative, with the same value
    assert list(top[3]) == [tokens[3]] and top[3][tokens[3]] == logps[3]


def test_no_top_logprobs_when_no_row_asks():
    logits = randn(3, 9, seed=13)
    params = [SamplingParams(), SamplingParams(logprobs=0), SamplingParams(temperature=0)]
    assert sample(logits, params, [None] * 3)[2] is None


def test_empty_batch():
    assert sample(torch.empty(0, 11), [], []) == ([], [], None)
    assert sample(torch.empty(0, 11), [], [], []) == ([], [], None)


def test_half_precision_logits_are_sampled_in_float32():
    logits = randn(4, 21, seed=14).to(torch.bfloat16)
    tokens, logps, _ = sample(logits, [SamplingParams(temperature=0)] * 4, [None] * 4)
    want = logits.double().argmax(dim=-1)
    assert tokens == want.tolist()
    assert_logp(logps, ref_logp(logits, 1.0).gather(1, want[:, None])[:, 0])


# ---------------------------------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"seed": 1.5}, "seed"),
    ({"logprobs": -1}, "logprobs"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a", ""]}, "stop"),
    ({"stop": ["a", 3]}, "stop"),
    ({"stop_token_ids": [1, -2]}, "stop_token_ids"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"logit_bias": {5: 101}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"logit_bias": {True: 1}}, "logit_bias"),
    ({"logit_bias": [(5, 1), (5, 2)]}, "logit_bias"),
    ({"logit_bias": 3}, "logit_bias"),
    ({"prompt_logprobs": True}, "prompt_logprobs"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": float("nan")}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": float("inf")}, "frequency_penalty"),
    ({"presence_penalty": True}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
])
def test_sampling_params_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_the_edges_and_normalises():
    p = SamplingParams(temperature=0, top_p=1, top_k=0, max_tokens=1, n=1, logprobs=0, seed=-3, stop="x",
                       stop_token_ids=[5, 0])
    assert p.stop == ("x",) and SamplingParams(stop="</s>").stop == ("</s>",) and p.stop_token_ids == (5, 0)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(top_p=1e-9).top_p == 1e-9
    d = SamplingParams()
    assert (d.temperature, d.top_p, d.top_k, d.stop, d.stop_token_ids, d.seed, d.n, d.logprobs) == \
        (1.0, 1.0, 0, (), (), None, 1, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.temperature = 0.5  # type: ignore[misc]


def test_top_p_one_keeps_every_token_on_the_sort_path():
    """With top_p=1 the float32 cumsum rounds to 1 before the tail: no tail token may be dropped for it, whether
    the sort path runs for the row's own top_k or another row's filter."""
    scaled = randn(1, 4096, seed=0, scale=8.0)
    alone = _filtered_probs(scaled, [SamplingParams()])
    assert bool((alone > 0).all())
    batched = _filtered_probs(scaled.expand(2, -1), [SamplingParams(), SamplingParams(top_k=2)])[:1]
    assert torch.equal(batched > 0, alone > 0)  # a row's support must not depend on the other rows


# ------------------------------------------------------------------------------------------- min-p and penalties


def ref_penalised(logits: list[float], toks: list[int], num_prompt: int, rep: float, freq: float,
                  pres: float) -> list[float]:
    """Plain Python float64: the repetition penalty on every token seen, then frequency and presence on the counts of
    the generated ones."""
    out = list(logits)
    for t in set(toks):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    gen = toks[num_prompt:]
    for t in set(gen):
        out[t] -= freq * gen.count(t) + pres
    return out


def test_penalties_match_the_float64_reference():
    V = 40
    logits = randn(6, V, seed=20)
    cases = [  # (repetition, frequency, presence, tokens, prompt length)
        (1.0, 0.0, 0.0, [1, 2, 3], 2),  # no penalty: the row is left bit for bit
        (1.3, 0.0, 0.0, [5, 5, 7, 9, 7], 3),
        (0.8, 0.0, 0.0, [0, 39], 1),  # < 1 encourages repeats
        (1.0, 0.5, 0.0, [4, 4, 4, 6, 4, 6], 2),
        (1.0, -1.0, 1.5, [8, 8, 3], 0),
        (1.2, 2.0, -2.0, [11, 12, 12, 11, 13, 12], 2),
    ]
    params = [SamplingParams(repetition_penalty=r, frequency_penalty=f, presence_penalty=p) for r, f, p, _, _ in cases]
    history = [(t, n) for *_, t, n in cases]
    got = apply_penalties(logits, params, history)
    for i, (r, f, p, toks, n) in enumerate(cases):
        want = torch.tensor(ref_penalised(logits[i].double().tolist(), toks, n, r, f, p), dtype=torch.float64)
        torch.testing.assert_close(got[i].double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[0], logits[0])
    assert not torch.equal(got[1], logits[1]) and not torch.equal(got[5], logits[5])
    plain = [SamplingParams()] * 6
    assert apply_penalties(logits, plain, None) is logits  # nothing to do: no copy, no history needed
    with pytest.raises(ValueError, match="history"):
        apply_penalties(logits, params, None)


def test_min_p_is_applied_after_top_k_and_top_p():
    V = 30
    cases = [(0, 1.0, 0.1), (0, 1.0, 0.5), (5, 1.0, 0.3), (0, 0.9, 0.2), (0, 1.0, 1.0), (0, 1.0, 0.0)]
    scaled = randn(len(cases), V, seed=21, scale=1.5)
    params = [SamplingParams(top_k=k, top_p=p, min_p=m) for k, p, m in cases]
    got = _filtered_probs(scaled, params).double()
    for i, (k, p, m) in enumerate(cases):
        probs = ref_filtered(scaled[i].double().tolist(), k, p)
        top = max(probs)
        kept = [x if x >= m * top else 0.0 for x in probs]
        assert min(abs(x - m * top) for x in probs if 0 < x < top) > 1e-6  # no cut-off within rounding
        want = torch.tensor(kept, dtype=torch.float64) / sum(kept)
        assert torch.equal(got[i] > 0, want > 0), i
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-7)
    assert int((got[4] > 0).sum()) == 1  # min_p=1: only the most likely token
    # the order shows: top-p 0.6 keeps [.25 .25 .2] and min-p 0.5 (>= .125) keeps them; min-p first would renormalise
    # to [.357 .357 .286] and top-p would then keep two
    row = torch.tensor([[0.25, 0.25, 0.2, 0.1, 0.1, 0.1]]).log()
    got = _filtered_probs(row, [SamplingParams(top_p=0.6, min_p=0.5)]).double()
    torch.testing.assert_close(got[0], torch.tensor([0.25, 0.25, 0.2, 0, 0, 0], dtype=torch.float64) / 0.7)


def test_penalties_steer_greedy_and_sampling_but_not_the_reported_logprobs():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    hist = [([2, 3, 0, 0], 2), ([9 % 4, 0] + [0] * 50, 2)]
    greedy = SamplingParams(temperature=0, presence_penalty=2.0)  # token 0: 5 - 2 < 4
    toks, lps, _ = sample(logits[:1], [greedy], [None], history=hist[:1])
    assert toks == [1]
    assert lps[0] == pytest.approx(float(torch.log_softmax(logits[0].double(), -1)[1]), abs=1e-6)
    # a sampled row: token 0 drawn 52 times already at frequency 2 (logit 5 - 104); unpenalised it takes ~95%
    p = SamplingParams(temperature=1.0, frequency_penalty=2.0)
    for seed in range(3):
        g = make_generator(seed, 0, torch.device("cpu"))
        drawn = [sample(logits[1:], [p], [g], history=hist[1:])[0][0] for _ in range(200)]
        assert 0 not in drawn
    drawn = [sample(logits[1:], [SamplingParams()], [None])[0][0] for _ in range(200)]
    assert drawn.count(0) > 150


def test_logit_bias_is_added_after_the_penalties_and_steers_but_does_not_report():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    p = SamplingParams(temperature=0, logit_bias={2: 2.5, 0: -100})
    assert p.logit_bias == ((0, -100.0), (2, 2.5)) and p.changes_logits and not p.has_penalties
    got = apply_penalties(logits, [p, SamplingParams()], None)  # no penalties: no history needed
    assert torch.equal(got[0], torch.tensor([-97.0, 2.0, 3.5, 0.5])) and torch.equal(got[1], logits[1])
    # with a repetition penalty: the bias comes after it (token 2 seen: 1 / 2, then + 2.5)
    q = SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={2: 2.5})
    got = apply_penalties(logits[:1], [q], [([2], 1)])
    assert torch.equal(got[0], torch.tensor([3.0, 2.0, 3.0, 0.5]))
    toks, lps, _ = sample(logits[:1], [p], [None])
    assert toks == [2]
    assert lps[0] == pytest.approx(float(torch.log_softmax(logits[0].double(), -1)[2]), abs=1e-6)
    banned = SamplingParams(temperature=1.0, logit_bias={0: -100, 1: -100})
    draws = [sample(logits[:1], [banned], [make_generator(s, 0, torch.device("cpu"))])[0][0] for s in range(100)]
    assert set(draws) <= {2, 3} and len(set(draws)) == 2


def test_penalty_counts_pool_grows_reuses_slots_and_matches_the_history():
    """The engine's pool: 20 sequences (past the first 8 slots, so it grows), each built from its tokens and then fed
    tokens one at a time; a released slot taken by another sequence holds that one's counts only. At every stage
    the pool's rows give apply_penalties the values of the history path."""
    V, rng = 50, torch.Generator().manual_seed(3)
    hist = {}
    for k in range(20):  # (tokens, prompt length <= their number)
        toks = torch.randint(0, V, (int(torch.randint(1, 30, (1,), generator=rng)),), generator=rng).tolist()
        hist[k] = (toks, int(torch.randint(0, len(toks) + 1, (1,), generator=rng)))
    pool = PenaltyCounts(V, "cpu")
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.2)] * 20

    def check(keys):
        slots = pool.rows(keys, [hist[k] for k in keys])
        logits = randn(len(keys), V, seed=len(keys))
        want = apply_penalties(logits, params[: len(keys)], [hist[k] for k in keys])
        got = apply_penalties(logits, params[: len(keys)], state=(pool.counts[slots], pool.seen[slots]))
        assert torch.equal(got, want)
        counts, seen = token_counts([hist[k] for k in keys], V, "cpu")
        assert torch.equal(pool.counts[slots], counts) and torch.equal(pool.seen[slots], seen)
        return slots

    keys = list(range(20))
    slots = check(keys)
    assert pool.counts.shape[0] >= 20 and len(set(slots.tolist())) == 20
    for step in range(5):  # each sequence takes a token (a repeat now and then)
        new = [hist[k][0][-1] if (k + step) % 3 == 0 else (7 * k + step) % V for k in keys]
        pool.add(slots, new)
        for k, t in zip(keys, new, strict=True):
            hist[k][0].append(t)
        slots = check(keys)
    for k in range(0, 20, 2):
        pool.release(k)
        del hist[k]
    hist.update({100 + k: ([k % V, (k + 1) % V, k % V], 1) for k in range(10)})  # they take the freed slots
    cap = pool.counts.shape[0]
    keys = [100 + k for k in range(10)] + list(range(1, 20, 2))
    check(keys)
    assert pool.counts.shape[0] == cap  # reused, not grown
    pool.clear()
    assert not pool.slot_of and pool.counts.shape[0] == 0 and pool.seen.shape[0] == 0  # the pool's memory freed
    slots = check([3, 5])  # and built again as needed
    pool.release(3)
    assert pool.counts.shape[0] > 0  # a sequence is left: kept
    pool.release(5)
    assert pool.counts.shape[0] == 0 and not pool._free  # the last one released: freed
