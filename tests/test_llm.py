"""The inference engine (r4b.engine.llm) against a naive full-recompute loop on the same model: greedy and seeded
outputs through every scheduling path (prefill, paged decode, chunked prefill, preemption, shared-prompt forks
with copy-on-write), the thinking modes and budget, stop conditions, log-probs (equal to the training op
fused_linear_logprobs), streaming, multimodal prompts, transformers' own greedy generate, and bad requests.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import randomize, torch_kernels_on_cpu  # noqa: F401  (fixture)

from r4b.engine.chat import ChatTokenizer
from r4b.engine.llm import LLM, RequestOutput, StreamEvent
from r4b.engine.model import Qwen3Config, Qwen3ForCausalLM, last_rows
from r4b.engine.sampling import SamplingParams, make_generator
from r4b.kernels import fused_linear_logprobs, pack_sequences

TOK = ChatTokenizer.demo()
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the GPU tests below, dry-run on the CPU by hand
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def tiny_model(seed: int = 0, **kw) -> Qwen3ForCausalLM:
    cfg = dict(vocab_size=TOK.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    torch.manual_seed(seed)
    return randomize(Qwen3ForCausalLM(Qwen3Config(**{**cfg, **kw})), seed).eval()


@pytest.fixture(scope="module")
def model() -> Qwen3ForCausalLM:
    return tiny_model()


@torch.no_grad()
def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits (len(ids), V) of one sequence from a plain forward (no cache)."""
    b = pack_sequences([torch.tensor(ids, dtype=torch.int64)])
    return model.compute_logits(model(b.flat, b.position_ids, b.cu_seqlens, b.max_seqlen))


def naive(model, prompt: list[int], max_new: int, *, temperature: float = 0.0, seed: int | None = None,
          index: int = 0, forced_after: dict[int, list[int]] | None = None, stop_ids=TOK.eos_ids) -> list[int]:
    """Generate by recomputing the whole sequence for every token; ``forced_after[k]``: tokens forced once k
    tokens were generated."""
    gen = make_generator(seed, index, torch.device("cpu"))
    ids, out, forced = list(prompt), [], []
    while len(out) < max_new:
        if forced_after and len(out) in forced_after and not forced:
            forced = list(forced_after[len(out)])
        logits = full_logits(model, ids)[-1].float()
        if forced:
            t = forced.pop(0)
        elif temperature == 0:
            t = int(logits.argmax())
        else:
            t = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[0])
        out.append(t)
        ids.append(t)
        if t in stop_ids:
            break
    return out


def prompts_of(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, TOK.vocab_size, (n,), generator=g).tolist() for n in lengths]


def chat_ids(text: str, mode: str) -> list[int]:
    return TOK.encode_chat([{"role": "user", "content": text}], thinking_mode=mode).input_ids.tolist()


def no_leak(llm: LLM) -> None:
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
    assert not llm.running and not llm.waiting


pytestmark = pytest.mark.usefixtures("torch_kernels_on_cpu")


# ---------------------------------------------------------------------------------------------- scheduling paths
@pytest.mark.parametrize("block_size,blocks,batched,expect", [
    (16, 64, 4096, "plain"),  # one prefill step, then paged decode
    (1, 200, 4096, "plain"),  # a block per token
    (4, 64, 7, "chunked"),  # prompts longer than a step: later chunks through the cache
    (4, 14, 4096, "preempted"),  # too few blocks for all: sequences are preempted and recomputed
])
def test_greedy_matches_full_recompute(model, block_size, blocks, batched, expect):
    prompts = prompts_of([1, 3, 9, 17, 30])
    llm = LLM(model, TOK, block_size=block_size, num_kv_blocks=blocks, max_num_batched_tokens=batched)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs, strict=True):
        assert o.error is None and o.prompt_token_ids == p
        assert o.outputs[0].token_ids == naive(model, p, 10, stop_ids=())
        assert o.outputs[0].finish_reason == "length"
    no_leak(llm)
    if expect == "chunked":
        assert llm.stats["prefill_steps"] < llm.stats["steps"] - 10  # prompt chunks ran as extend steps
        assert llm.stats["prompt_tokens_computed"] == sum(map(len, prompts))
    if expect == "preempted":
        assert llm.stats["preemptions"] > 0
    else:
        assert llm.stats["preemptions"] == 0


@pytest.mark.parametrize("block_size,blocks,batched", [(4, 64, 4096), (4, 14, 4096), (2, 40, 9)])
def test_padded_decode_steps_give_the_same_tokens(model, block_size, blocks, batched):
    """Decode steps through DecodeGraphs' padded buffers (what the CUDA graphs replay; run eagerly here): batches
    of 1..7 sequences padded to buckets 1/2/4/8, whose padding rows must write no slot and read no context, give
    the tokens and log-probs of the unpadded steps, with forks, preemption and chunked prefill around them."""
    prompts = ["What is 3 + 4?", *prompts_of([1, 9, 17, 30, 5])]
    params = SamplingParams(temperature=0.9, max_tokens=10, n=2, seed=11, ignore_eos=True)

    def run(padded: bool):
        llm = LLM(model, TOK, block_size=block_size, num_kv_blocks=blocks, max_num_batched_tokens=batched,
                  max_num_seqs=7)
        if padded:
            llm._padded_decode(capture=False)
        outs = llm.generate(prompts, params, thinking_mode=("long", "short"), use_tqdm=False)
        no_leak(llm)
        return outs, llm.stats

    ref, ref_stats = run(False)
    got, stats = run(True)
    assert stats["graph_steps"] > 0 and ref_stats["graph_steps"] == 0
    assert stats["prompt_tokens_computed"] == ref_stats["prompt_tokens_computed"]
    for g, r in zip(got, ref, strict=True):
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in r.outputs]
        for a, b in zip(g.outputs, r.outputs, strict=True):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_a_failed_capture_falls_back_to_eager_steps(model, monkeypatch, caplog):
    """A capture that raises (here: any capture, faked on the CPU) is logged once and the decode steps run eagerly
    with the same tokens; replaced weights mark the graphs stale, and the next generate drops them."""
    from r4b.engine.graphs import DecodeGraphs

    calls = []

    def broken(self, b):
        calls.append(b)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphs, "_capture", broken)
    p = prompts_of([5])[0]
    llm = LLM(model, TOK, num_kv_blocks=64, block_size=4)
    llm._padded_decode(capture=True)
    out = llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == naive(model, p, 12) and llm.stats["graph_steps"] > 0
    assert calls == [1] and "decode steps run eagerly" in caplog.text and not llm._graphs.capture
    graphs = llm._graphs
    graphs._params = tuple(q.data_ptr() for q in model.language_model.parameters())
    assert not graphs.stale()
    graphs.graphs[1] = "a captured graph"
    graphs._params = (0,) + graphs._params[1:]  # as if a weight had been replaced
    assert graphs.stale()
    llm.generate([p], GREEDY, use_tqdm=False)
    assert graphs.graphs == {} and graphs._params is None


def test_decode_graph_buckets():
    from r4b.engine.graphs import buckets

    assert buckets(1) == [1]
    assert buckets(7) == [1, 2, 4, 7]
    assert buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert buckets(200)[-3:] == [160, 192, 200]
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        LLM(tiny_model(), TOK, num_kv_blocks=4, cuda_graphs=True, device="cpu")


@pytest.mark.parametrize("seed", range(8))
def test_random_schedules_give_the_roomy_engines_outputs(model, seed):
    """Random tight engines (block size, cache, step budget, max_num_seqs, padded decode) on random requests
    (n, modes, thinking budget, top-k / top-p, seeds) give exactly the outputs of an engine with room for
    everything, which the tests above check against the full-recompute loop; no block leaks."""
    import random

    rng = random.Random(seed)
    texts = ["What is 3 + 4?", "hi", "Name a prime.", *prompts_of([rng.randint(1, 40) for _ in range(2)], seed)]
    reqs = rng.sample(texts, rng.randint(2, len(texts)))
    params = [SamplingParams(temperature=rng.choice([0, 0.7, 1.0]), top_k=rng.choice([0, 5]),
                             top_p=rng.choice([1.0, 0.9]), max_tokens=rng.randint(3, 14), n=rng.randint(1, 3),
                             seed=rng.randint(0, 99), ignore_eos=rng.random() < 0.5) for _ in reqs]
    modes = rng.choice([None, "short", ("long", "short"), ("auto", "long", "short")])
    budget = rng.choice([None, 0, 2, 5])
    roomy = LLM(model, TOK, num_kv_blocks=512, block_size=16)
    want = roomy.generate(reqs, params, thinking_mode=modes, max_thinking_tokens=budget, use_tqdm=False)
    bs = rng.choice([1, 2, 4, 8])
    longest = max(len(chat_ids(r, "short")) if isinstance(r, str) else len(r) for r in reqs) + 20
    tight = LLM(model, TOK, block_size=bs, num_kv_blocks=-(-longest // bs) + rng.randint(1, 6),
                max_num_batched_tokens=rng.randint(4, 64), max_num_seqs=rng.randint(1, 6))
    if rng.random() < 0.5:
        tight._padded_decode(capture=False)
    got = tight.generate(reqs, params, thinking_mode=modes, max_thinking_tokens=budget, use_tqdm=False)
    no_leak(tight)
    for g, w in zip(got, want, strict=True):
        assert g.error == w.error
        assert [(o.token_ids, o.finish_reason, o.text) for o in g.outputs] == \
            [(o.token_ids, o.finish_reason, o.text) for o in w.outputs]
        for a, b in zip(g.outputs, w.outputs, strict=True):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_max_num_seqs_limits_a_step(model):
    prompts = prompts_of([5] * 6)
    llm = LLM(model, TOK, num_kv_blocks=64, block_size=4, max_num_seqs=2)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [naive(model, p, 3, stop_ids=()) for p in prompts]
    assert llm.stats["prefill_steps"] == 3  # two sequences admitted at a time


def test_seeded_sampling_matches_naive_and_ignores_the_batch(model):
    p = prompts_of([6])[0]
    params = SamplingParams(temperature=0.8, max_tokens=8, seed=1234, n=3, ignore_eos=True)
    llm = LLM(model, TOK, num_kv_blocks=64, block_size=4)
    alone = llm.generate([p], params, use_tqdm=False)[0]
    crowd = llm.generate([prompts_of([9], 1)[0], p, prompts_of([4], 2)[0]],
                         [SamplingParams(temperature=1.0, max_tokens=5), params, SamplingParams(temperature=0)],
                         use_tqdm=False)[1]
    got = [o.token_ids for o in alone.outputs]
    assert got == [o.token_ids for o in crowd.outputs]
    assert got == [naive(model, p, 8, temperature=0.8, seed=1234, index=j, stop_ids=()) for j in range(3)]
    assert len({tuple(t) for t in got}) == 3  # n completions are different draws


# ---------------------------------------------------------------------------------------------- thinking modes
def test_modes_share_one_prefill_and_match_their_own_prompts(model):
    text = "What is 3 + 4? Think about it."
    llm = LLM(model, TOK, num_kv_blocks=64, block_size=4)
    out = llm.generate([text], SamplingParams(temperature=0, max_tokens=10, n=2), thinking_mode=("long", "short"),
                       use_tqdm=False)[0]
    base = chat_ids(text, "auto")[:-1]  # the prompt up to <|im_start|>assistant\n
    assert out.prompt_token_ids == base
    assert [o.thinking_mode for o in out.outputs] == ["long", "long", "short", "short"]
    for o in out.outputs:
        full = chat_ids(text, o.thinking_mode)
        assert full[: len(base)] == base
        assert o.token_ids == naive(model, full, 10)
    # the shared prompt ran once (all but its last token), then each completion fed its last token + suffix
    suffixes = sum(len(chat_ids(text, o.thinking_mode)) - len(base) + 1 for o in out.outputs)
    assert llm.stats["prompt_tokens_computed"] == len(base) - 1 + suffixes
    assert llm.stats["prefill_steps"] == 1
    no_leak(llm)


def test_forked_prompt_shares_blocks_and_copies_the_partial_one(model):
    """A 10-token shared prompt in blocks of 4 (9 tokens prefilled: its third block partly filled) forked into 4
    completions: each takes a private copy of that block before writing, so they all match the naive loop."""
    p = prompts_of([10])[0]
    llm = LLM(model, TOK, num_kv_blocks=40, block_size=4)
    seen = []
    ensure = llm.blocks.ensure

    def spy(seq_id, num_tokens, num_cached):
        pairs = ensure(seq_id, num_tokens, num_cached)
        seen.extend(pairs or [])
        return pairs

    llm.blocks.ensure = spy
    out = llm.generate([p], SamplingParams(temperature=0.7, max_tokens=6, n=4, seed=7, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(seen) == 3  # the first three writers copy the shared block; the last one owns it by then
    assert len({src for src, _ in seen}) == 1
    for j, o in enumerate(out.outputs):
        assert o.token_ids == naive(model, p, 6, temperature=0.7, seed=7, index=j, stop_ids=())
    no_leak(llm)


def test_auto_mode_is_the_default_for_chats_and_raw_ids_run_as_given(model):
    llm = LLM(model, TOK, num_kv_blocks=64, block_size=8)
    chat = llm.generate(["hello"], GREEDY, use_tqdm=False)[0].outputs[0]
    assert chat.thinking_mode == "auto" and chat.token_ids == naive(model, chat_ids("hello", "auto"), 12)
    raw = chat_ids("hello", "short")
    out = llm.generate([raw], GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.thinking_mode is None and out.token_ids == naive(model, raw, 12)
    forced = llm.generate([raw], GREEDY, thinking_mode="long", use_tqdm=False)[0].outputs[0]
    assert forced.token_ids == naive(model, raw + TOK.encode("<think>\n"), 12)


@pytest.mark.parametrize("budget", [0, 3])
def test_max_thinking_tokens_forces_the_end_of_the_thought(model, budget):
    text = "Why is the sky blue?"
    end = TOK.encode("\n</think>\n\n")
    llm = LLM(model, TOK, num_kv_blocks=64, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out = llm.generate([text], params, thinking_mode="long", max_thinking_tokens=budget, use_tqdm=False)[0]
    o = out.outputs[0]
    full = chat_ids(text, "long")
    ref = naive(model, full, 12, forced_after={budget: end}, stop_ids=())
    assert TOK.end_think_id not in ref[:budget]  # (else the model closed the thought itself: pick another text)
    assert o.token_ids == ref and o.token_ids[budget : budget + len(end)] == end
    assert o.num_thinking_tokens == budget + end.index(TOK.end_think_id)
    assert o.mode == ("think" if budget else "no_think")  # a zero budget leaves an empty thought
    assert o.answer == TOK.decode(ref[budget + len(end) :]).strip()
    # the short mode has no open thought: the budget does not apply
    short = llm.generate([text], params, thinking_mode="short", max_thinking_tokens=budget, use_tqdm=False)[0]
    assert short.outputs[0].token_ids == naive(model, chat_ids(text, "short"), 12, stop_ids=())
    assert short.outputs[0].num_thinking_tokens == 0


def test_outputs_parse_thinking_and_answer():
    """Forced tokens (the path max_thinking_tokens takes) steer a completion to a known thought, </think>, an
    answer and <|im_end|>: the output's fields split it as the chat template does."""
    model = tiny_model(1)
    script = TOK.encode("ok") + [TOK.end_think_id] + TOK.encode("\n\n42") + [TOK.im_end_id]
    llm = LLM(model, TOK, num_kv_blocks=64, block_size=4)
    reqs = llm._start(["Q"], GREEDY, "long", None)
    seq = reqs[0].seqs[0]
    seq.forced.extend(script)
    for _ in llm._loop():
        pass
    o = llm._output(reqs[0]).outputs[0]
    assert o.token_ids == script and o.finish_reason == "stop"
    assert (o.thinking, o.answer, o.mode, o.num_thinking_tokens) == ("ok", "42", "think", len(TOK.encode("ok")))
    assert o.text == "ok</think>\n\n42<|im_end|>"
    no_leak(llm)


# ---------------------------------------------------------------------------------------------- stops, log-probs
def test_stop_conditions(model):
    p = prompts_of([7])[0]
    ref = naive(model, p, 12, stop_ids=())
    llm = LLM(model, TOK, num_kv_blocks=64, block_size=4)
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ref[4]]),
                     use_tqdm=False)[0].outputs[0]
    first = ref.index(ref[4])
    assert o.token_ids == ref[: first + 1] and o.finish_reason == "stop"
    # a stop string: the text is cut before it, generation ends once it appears
    full_text = TOK.decode(ref)
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 2]
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, stop=stop), use_tqdm=False)[0].outputs[0]
    assert o.finish_reason == "stop" and o.text == full_text[: full_text.find(stop)]
    assert TOK.decode(o.token_ids).find(stop) >= 0 and stop not in TOK.decode(o.token_ids[:-1])
    # end of turn: <|im_end|> stops unless ignore_eos
    eos_model = LLM(model, TOK, num_kv_blocks=64, block_size=4, eos_token_ids=[ref[2]])
    o = eos_model.generate([p], GREEDY, use_tqdm=False)[0].outputs[0]
    assert o.token_ids == ref[: ref.index(ref[2]) + 1] and o.finish_reason == "stop"
    o = eos_model.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert o.token_ids == ref and o.finish_reason == "length"


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_the_training_ops_logprobs(model, temperature):
    """The engine's per-token log-probs equal fused_linear_logprobs over the finished sequence's hidden states at
    the sampling temperature (1 when greedy): the BPO trainer's old log-probs."""
    p = prompts_of([11])[0]
    llm = LLM(model, TOK, num_kv_blocks=64, block_size=4)
    params = SamplingParams(temperature=temperature, max_tokens=9, seed=3, logprobs=3, ignore_eos=True)
    o = llm.generate([p], params, use_tqdm=False)[0].outputs[0]
    ids = p + o.token_ids
    b = pack_sequences([torch.tensor(ids)])
    with torch.no_grad():
        hidden = model(b.flat, b.position_ids, b.cu_seqlens, b.max_seqlen)
    targets = torch.tensor(ids[1:] + [-100])
    lp = fused_linear_logprobs(hidden, model.lm_head.weight, targets, temperature=temperature or 1.0)
    ref = lp[len(p) - 1 : -1]
    assert torch.allclose(torch.tensor(o.logprobs, dtype=torch.float64), ref.double(), atol=2e-5, rtol=0)
    t = temperature or 1.0
    logits = full_logits(model, ids).double()[len(p) - 1 : -1] / t
    ref64 = torch.log_softmax(logits, -1)
    for step, top in enumerate(o.top_logprobs):
        vals, idx = ref64[step].topk(3)
        assert list(top) == idx.tolist()
        assert torch.allclose(torch.tensor(list(top.values()), dtype=torch.float64), vals, atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- streaming
def test_stream_yields_every_token_and_the_outputs(model):
    prompts = ["hi", "What is 2 + 2?"]
    # no prefix cache: the stream must equal the generate bit for bit (a cached prompt's tail is computed by the
    # paged extend path instead of the prefill's, which moves fp32 log-probs by an ulp; tests/test_prefix_cache.py)
    llm = LLM(model, TOK, num_kv_blocks=64, block_size=4, prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=8, n=2)
    ref = llm.generate(prompts, params, thinking_mode=("long", "short"), use_tqdm=False)
    events = list(llm.stream(prompts, params, thinking_mode=("long", "short")))
    outputs = [e for e in events if isinstance(e, RequestOutput)]
    tokens = [e for e in events if isinstance(e, StreamEvent)]
    assert sorted(o.request_index for o in outputs) == [0, 1]
    assert sorted(outputs, key=lambda o: o.request_index) == ref
    for r in ref:
        for o in r.outputs:
            mine = [e for e in tokens if (e.request_index, e.index) == (r.request_index, o.index)]
            assert [e.token_id for e in mine] == o.token_ids
            assert "".join(e.text for e in mine) == o.text
            assert [e.finished for e in mine] == [False] * (len(mine) - 1) + [True]
            assert mine[-1].finish_reason == o.finish_reason
    no_leak(llm)


def test_an_abandoned_stream_leaves_the_engine_clean(model):
    llm = LLM(model, TOK, num_kv_blocks=64, block_size=4)
    it = llm.stream(prompts_of([5, 6]), SamplingParams(temperature=0, max_tokens=8))
    next(it)
    it.close()
    no_leak(llm)
    it = llm.stream([[], prompts_of([5])[0]], GREEDY)  # closed after the skipped request's output, before a step
    assert next(it).error is not None
    it.close()
    no_leak(llm)
    p = prompts_of([5])[0]
    assert llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == naive(model, p, 12)


def forced_run(llm: LLM, script: list[int], params: SamplingParams, stream: bool = False):
    """Run one "long" completion of "Q" whose tokens are all forced to ``script`` (the path max_thinking_tokens
    takes): the output for a known text. With ``stream``, also the joined text of its stream events."""
    reqs = llm._start(["Q"], params, "long", None)
    reqs[0].seqs[0].forced.extend(script)
    text = "".join(llm._delta(seq) for events in llm._loop() for seq, _ in events) if stream else None
    return llm._output(reqs[0]).outputs[0], text


def test_a_multibyte_stop_string_is_found_and_the_stream_never_resends(model):
    """A stop string of 8 CJK characters is 24 byte-level tokens: the stop check's window counts bytes. The stream
    holds back a possible start of the stop string and sends exactly the final (cut) text."""
    llm = LLM(model, TOK, num_kv_blocks=64, block_size=4)
    stop = "你好世界再见朋友"
    script = TOK.encode("ab 你好世界 " + stop + " cd")
    assert len(TOK.encode(stop)) > len(stop) + 8  # more tokens than a window of its characters + 8
    o, streamed = forced_run(llm, script, SamplingParams(temperature=0, max_tokens=80, stop=stop), stream=True)
    assert o.finish_reason == "stop" and o.text == "ab 你好世界 "
    assert TOK.decode(o.token_ids).endswith(stop)  # generation ended where the stop string completed
    assert streamed == o.text
    o, streamed = forced_run(llm, script, SamplingParams(temperature=0, max_tokens=80, stop=["K me", "你好世界再"]),
                             stream=True)
    assert o.text == "ab 你好世界 " and streamed == o.text  # the 2nd 你好世界 was held back, never sent
    no_leak(llm)


def test_a_stream_reports_a_completion_the_cache_cannot_hold(model):
    p = prompts_of([6])[0]
    llm = LLM(model, TOK, num_kv_blocks=3, block_size=4)
    events = list(llm.stream([p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)))
    last, out = events[-2], events[-1]
    assert isinstance(out, RequestOutput) and out.outputs[0].finish_reason == "length"
    assert (last.token_id, last.finished, last.finish_reason) == (None, True, "length")
    assert [e.token_id for e in events[:-2]] == out.outputs[0].token_ids
    no_leak(llm)


def test_sampling_logits_are_fp32_for_a_bf16_model():
    """A bf16 model's sampling rows get fp32 logits (bf16 inputs, fp32 products), the values fused_linear_logprobs
    uses in training; a plain bf16 lm_head would round them (checked to differ, so this test can fail)."""
    model = tiny_model(3).to(torch.bfloat16)
    llm = LLM(model, TOK, num_kv_blocks=8, block_size=4)
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(5, 64, generator=g) * 4).to(torch.bfloat16)
    ref = rows.double() @ model.lm_head.weight.double().t()
    got = llm._logits(rows)
    assert got.dtype == torch.float32
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (model.lm_head(rows).double() - ref).abs().max() > 1e-3 * ref.abs().max()


# ---------------------------------------------------------------------------------------------- errors
def test_bad_requests_are_reported_and_skipped(model, caplog):
    good = prompts_of([5])[0]
    llm = LLM(model, TOK, num_kv_blocks=8, block_size=4, max_model_len=40)
    reqs = [[], good, [0, TOK.vocab_size + 3], list(range(10, 50)), [{"role": "robot", "content": "x"}],
            list(range(10, 42))]
    outs = llm.generate(reqs, GREEDY, use_tqdm=False)
    assert outs[1].error is None and outs[1].outputs[0].token_ids == naive(model, good, 12)
    assert "empty" in outs[0].error
    assert f"token id {TOK.vocab_size + 3}" in outs[2].error
    assert "max_model_len=40" in outs[3].error
    assert "messages[0].role" in outs[4].error
    assert "KV blocks" in outs[5].error  # 32 tokens + the next one need 9 blocks of 4: more than 8
    assert all(not o.outputs for i, o in enumerate(outs) if i != 1)
    assert caplog.text.count("skipped") == 5
    no_leak(llm)


def test_a_completion_that_outgrows_the_cache_ends_with_length(model):
    p = prompts_of([6])[0]
    llm = LLM(model, TOK, num_kv_blocks=3, block_size=4)  # 12 tokens at most
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    assert o.error is None and o.outputs[0].finish_reason == "length"
    assert o.outputs[0].token_ids == naive(model, p, 7, stop_ids=())  # 6 + 6 cached, the 7th sampled from them
    no_leak(llm)


def test_argument_errors(model):
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got 0"):
        LLM(model, TOK, block_size=0)
    with pytest.raises(ValueError, match="num_kv_blocks must be an int >= 1, got 0"):
        LLM(model, TOK, num_kv_blocks=0)
    with pytest.raises(ValueError, match="kv_cache_fraction"):
        LLM(model, TOK, kv_cache_fraction=1.5)
    with pytest.raises(ValueError, match="model must be a Qwen3ForCausalLM"):
        LLM(torch.nn.Linear(2, 2), TOK)
    llm = LLM(model, TOK, num_kv_blocks=16)
    with pytest.raises(ValueError, match="requests must be a list"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="thinking_mode must be one of"):
        llm.generate(["hi"], thinking_mode="medium")
    with pytest.raises(ValueError, match="max_thinking_tokens must be None or an int >= 0, got -1"):
        llm.generate(["hi"], max_thinking_tokens=-1)
    with pytest.raises(ValueError, match=r"one per request \(2\), got 1"):
        llm.generate(["a", "b"], [GREEDY])
    with pytest.raises(ValueError, match="needs the LLM's tokenizer"):
        LLM(model, None, num_kv_blocks=16).generate([[5, 6]], thinking_mode="long")
    with pytest.raises(ValueError, match=r"SamplingParams.stop \(strings\) needs the LLM's tokenizer"):
        LLM(model, None, num_kv_blocks=16).generate([[5, 6]], SamplingParams(stop="x"))
    no_leak(llm)


# ---------------------------------------------------------------------------------------------- other backends
def test_default_backends_give_the_same_tokens(model, monkeypatch):
    """The fixture runs the torch references; the default dispatch (the Triton interpreter or the C++ twins here,
    Triton / CUDA on a GPU) must generate the same greedy tokens through prefill, fork and decode."""
    prompts = ["What is 3 + 4?"]
    params = SamplingParams(temperature=0, max_tokens=6, n=2)
    ref = LLM(model, TOK, num_kv_blocks=32, block_size=4).generate(prompts, params, thinking_mode=("long", "short"),
                                                                    use_tqdm=False)
    monkeypatch.delenv("R4B_BACKEND", raising=False)
    got = LLM(model, TOK, num_kv_blocks=32, block_size=4).generate(prompts, params, thinking_mode=("long", "short"),
                                                                    use_tqdm=False)
    assert [o.token_ids for o in got[0].outputs] == [o.token_ids for o in ref[0].outputs]
    assert torch.allclose(torch.tensor([o.logprobs for o in got[0].outputs]),
                          torch.tensor([o.logprobs for o in ref[0].outputs]), atol=1e-4, rtol=0)


def test_greedy_matches_transformers_generate():
    """transformers' Qwen3ForCausalLM (random weights, fp32) greedy generate vs the engine on the same weights."""
    transformers = pytest.importorskip("transformers")
    from tiny_models import qwen3_hf_config

    from r4b.engine.model import from_pretrained

    torch.manual_seed(0)
    ref = randomize(transformers.Qwen3ForCausalLM(qwen3_hf_config(tie=False, vocab=TOK.vocab_size)), 3).eval()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        model = from_pretrained(d)
    prompts = prompts_of([4, 13, 21], 5)
    llm = LLM(model, TOK, num_kv_blocks=32, block_size=4)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs, strict=True):
        with torch.no_grad():
            hf = ref.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert o.outputs[0].token_ids == hf[0, len(p) :].tolist()


# ---------------------------------------------------------------------------------------------- multimodal
def tiny_r4b_chat():
    """A one-layer R-4B with random weights, its demo tokenizer and a chat holding one 40 x 70 image."""
    from test_chat import _tiny_r4b_config

    from r4b.engine.model import R4BForConditionalGeneration

    cfg = _tiny_r4b_config()
    torch.manual_seed(0)
    model = randomize(R4BForConditionalGeneration(cfg), 2).eval()
    tok = ChatTokenizer.demo(model_config=cfg)
    img = torch.randint(0, 256, (3, 40, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What?"}]}]
    return model, tok, msgs


def test_image_prompt_matches_the_full_multimodal_forward():
    model, tok, msgs = tiny_r4b_chat()
    # small steps: the prompt's image tokens are split across chunks; few blocks: a completion is preempted
    llm = LLM(model, tok, num_kv_blocks=40, block_size=4, max_num_batched_tokens=40)
    out = llm.generate([msgs], SamplingParams(temperature=0, max_tokens=8, n=2, ignore_eos=True),
                       thinking_mode=("long", "short"), use_tqdm=False)[0]
    for o in out.outputs:
        enc = tok.encode_chat(msgs, thinking_mode=o.thinking_mode)
        ids, gen = enc.input_ids.tolist(), []
        for _ in range(8):
            b = pack_sequences([torch.tensor(ids + gen)])
            with torch.no_grad():
                h = model(b.flat, b.position_ids, b.cu_seqlens, b.max_seqlen, enc.pixel_values, enc.image_sizes)
                gen.append(int(model.compute_logits(h, last_rows(b.cu_seqlens))[0].argmax()))
        assert o.token_ids == gen
    assert llm.stats["preemptions"] > 0
    no_leak(llm)
    # a bad image (any exception while preparing a request) and image tokens without images: reported, skipped
    bad = [{"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "?"}]}]
    outs = llm.generate([bad, [7, tok.image_id, 8], "hi"], GREEDY, use_tqdm=False)
    assert outs[0].error is not None and "image tokens (id 5) but no images" in outs[1].error
    assert outs[2].error is None and len(outs[2].outputs[0].token_ids) == 12
    no_leak(llm)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_engine_on_the_default_kernels_matches_the_torch_references(monkeypatch):
    """On a GPU in fp32 (TF32 off): the default dispatch (Triton / CUDA store_kv and paged decode, Triton varlen
    attention and small ops) generates the tokens of the torch references, through forks, chunks and preemption,
    and leaves no block behind."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = tiny_model(4).cuda()
    prompts = ["What is 3 + 4?", prompts_of([37])[0], prompts_of([3], 1)[0]]
    params = SamplingParams(temperature=0, max_tokens=24, n=2, ignore_eos=True)

    def run():
        llm = LLM(model, TOK, num_kv_blocks=40, block_size=4, max_num_batched_tokens=32)
        outs = llm.generate(prompts, params, thinking_mode=("long", "short"), use_tqdm=False)
        no_leak(llm)
        return outs, llm.stats["preemptions"]

    got, preempted = run()
    monkeypatch.setenv("R4B_BACKEND", "torch")
    ref, _ = run()
    assert preempted > 0
    for g, r in zip(got, ref, strict=True):
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in r.outputs]
        for a, b in zip(g.outputs, r.outputs, strict=True):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_gpu_bf16_engine_logprobs_by_the_low_precision_rule(monkeypatch):
    """A bf16 model on the GPU (default kernels): each completion's log-probs against the fp32 model's (a plain
    forward of the finished sequence, fused_linear_logprobs in fp32) are within STYLE.md's rule: at most twice the
    error of plain PyTorch in bf16 (the torch references' forward of the same sequence) plus 1e-2 of the largest."""
    from _lowprec import assert_within_twice_plain

    model32 = tiny_model(5).to(DEV)
    model = tiny_model(5).to(DEV).to(torch.bfloat16)
    llm = LLM(model, TOK, num_kv_blocks=64, block_size=16)
    texts = ["What is 3 + 4?", "hi"]
    outs = llm.generate(texts, SamplingParams(temperature=1.0, max_tokens=16, n=2, seed=0),
                        thinking_mode=("long", "short"), use_tqdm=False)
    no_leak(llm)

    def logprobs(m, ids, n_prompt):
        b = pack_sequences([torch.tensor(ids, device=DEV)])
        with torch.no_grad():
            hidden = m(b.flat, b.position_ids, b.cu_seqlens, b.max_seqlen)
        targets = torch.tensor(ids[1:] + [-100], device=DEV)
        return fused_linear_logprobs(hidden, m.lm_head.weight, targets)[n_prompt - 1 : -1]

    for out in outs:
        for o in out.outputs:
            prompt = chat_ids(texts[out.request_index], o.thinking_mode)
            ids = prompt + o.token_ids
            want = logprobs(model32, ids, len(prompt))
            with monkeypatch.context() as mp:
                mp.setenv("R4B_BACKEND", "torch")
                plain = logprobs(model, ids, len(prompt))
            ours = torch.tensor(o.logprobs, device=DEV)
            assert torch.isfinite(ours).all()
            assert_within_twice_plain([ours], [plain], [want], ["logprobs"], 1e-2)


@pytest.mark.gpu
def test_gpu_bf16_cuda_graph_decode_matches_eager():
    """bf16 on the GPU (the fp32-output logits GEMM outside the graph, the Triton / CUDA kernels inside): greedy
    decoding replayed from graphs gives the eager engine's tokens (short runs: a long bf16 greedy run may part ways
    where two logits nearly tie) and log-probs within bf16 noise."""
    model = tiny_model(7).cuda().to(torch.bfloat16)
    prompts = prompts_of([3, 11, 25], 4)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = []
    for graphs in (False, True):
        llm = LLM(model, TOK, num_kv_blocks=64, block_size=16, cuda_graphs=graphs)
        outs.append(llm.generate(prompts, params, use_tqdm=False))
        no_leak(llm)
    assert llm.stats["graph_steps"] > 0
    for a, b in zip(*outs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert torch.allclose(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs), atol=5e-2)


@pytest.mark.gpu
def test_gpu_prompt_logprobs_stay_off_the_decode_graphs(monkeypatch):
    """A token budget of 1 a step puts every prompt row after the first in a one-row step, the shape the decode
    graphs take: those rows must run eagerly (the graphs return only the sampling rows), and their prompt log-probs
    match the float64 reference, with graphs as without."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model, cpu_model = tiny_model(6).to(DEV), tiny_model(6)
    prompts = prompts_of([2, 9, 17], 5)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2)
    for graphs in (False, True):
        llm = LLM(model, TOK, num_kv_blocks=64, block_size=4, max_num_batched_tokens=1, cuda_graphs=graphs)
        outs = llm.generate(prompts, params, use_tqdm=False)
        for p, o in zip(prompts, outs, strict=True):
            ref = full_logits(cpu_model, p).double().log_softmax(-1)[:-1].gather(1, torch.tensor(p[1:])[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(o.prompt_logprobs[1:], dtype=torch.float64), ref, atol=1e-4,
                                       rtol=0)
        assert llm.stats["graph_steps"] > 0 or not graphs  # the completions' decode steps still replay graphs
        no_leak(llm)


@pytest.mark.gpu
def test_gpu_cuda_graph_decode_matches_eager(monkeypatch):
    """On a GPU in fp32: decode steps replayed from CUDA graphs (captured per bucket at first use) give the eager
    engine's tokens and log-probs, across batch sizes that change from step to step as sequences finish."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = tiny_model(6).cuda()
    prompts = ["What is 3 + 4?", *prompts_of([1, 9, 17, 30, 5])]
    params = [SamplingParams(temperature=0.9, max_tokens=4 + 3 * i, n=2, seed=i, ignore_eos=True) for i in range(6)]

    def run(graphs: bool):
        llm = LLM(model, TOK, num_kv_blocks=200, block_size=4, max_num_seqs=16, cuda_graphs=graphs)
        outs = llm.generate(prompts, params, thinking_mode=("long", "short"), use_tqdm=False)
        no_leak(llm)
        return outs, llm

    ref, _ = run(False)
    got, llm = run(True)
    assert llm.stats["graph_steps"] > 0 and len(llm._graphs.graphs) >= 3
    for g, r in zip(got, ref, strict=True):
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in r.outputs]
        for a, b in zip(g.outputs, r.outputs, strict=True):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("rep,freq,pres", [(1.6, 0.7, 0.4), (1.0, 1.5, 0.0), (1.0, 0.0, 2.0), (1.8, 0.0, 0.0)])
def test_penalties_follow_the_tokens_of_each_completion(model, rep, freq, pres):
    """Greedy with repetition / frequency / presence penalties against a loop that recomputes the logits and applies
    the float64 reference of the penalties (the prompt counts for the repetition penalty only: the second prompt
    holds the start of plain greedy's answer, so counting the prompt as generated, or not counting it for the
    repetition penalty, changes the tokens of some case); a row without penalties in the same batch is plain greedy; n=2
    completions of one shared prompt each follow their own."""
    from test_sampling import ref_penalised

    base = [5, 9, 5, 9, 5, 9, 11]
    greedy = naive(model, base, 10, stop_ids=())
    prompts = [base, base + greedy[:6]]
    pen = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=rep,
                         frequency_penalty=freq, presence_penalty=pres, n=2)
    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    llm = LLM(model, TOK, block_size=4, num_kv_blocks=128)
    outs = llm.generate(prompts + prompts[:1], [pen, pen, plain], use_tqdm=False)

    def reference(prompt: list[int]) -> list[int]:
        ids = list(prompt)
        while len(ids) - len(prompt) < 10:
            logits = full_logits(model, ids)[-1].double().tolist()
            penalised = ref_penalised(logits, ids, len(prompt), rep, freq, pres)
            ids.append(max(range(len(logits)), key=penalised.__getitem__))
        return ids[len(prompt):]

    for p, o in zip(prompts, outs, strict=False):
        want = reference(p)
        assert [c.token_ids for c in o.outputs] == [want, want]
        # the reported log-probs are the model's (unpenalised) ones
        full = full_logits(model, p + want).double().log_softmax(-1)
        got_lp = torch.tensor(o.outputs[0].logprobs, dtype=torch.float64)
        want_lp = full[len(p) - 1 : -1].gather(1, torch.tensor(want)[:, None])[:, 0]
        torch.testing.assert_close(got_lp, want_lp, atol=1e-5, rtol=0)
    assert outs[2].outputs[0].token_ids == greedy
    assert greedy != outs[0].outputs[0].token_ids  # the penalties changed something
    no_leak(llm)


@pytest.mark.parametrize("batched,n,k,temperature", [(4096, 1, 0, 0.0), (4096, 2, 3, 0.7), (5, 1, 2, 1.0),
                                                     (5, 2, 0, 0.0), (1, 1, 1, 0.0)])
def test_prompt_logprobs_are_the_models(model, batched, n, k, temperature, monkeypatch):
    """prompt_logprobs: each prompt token's log-prob given the ones before, at the sampling temperature (1 when
    greedy), and its top-k, against a float64 log-softmax of a plain forward; through one prefill, chunks of 5
    (a chunk's rows score the next chunk's first token), chunks of 1 (prompt rows in decode-shaped steps), the
    shared prompt of n=2; a prompt the prefix cache
    holds is computed again (no hit) and gives the same; a request without it gets None."""
    prompts = prompts_of([1, 2, 9, 23], seed=7)
    monkeypatch.setattr(LLM, "PROMPT_LOGPROB_ROWS", 4)  # a step's prompt rows scored in several chunks
    params = SamplingParams(temperature=temperature, max_tokens=3, ignore_eos=True, n=n, prompt_logprobs=k, seed=1)
    llm = LLM(model, TOK, block_size=4, num_kv_blocks=128, max_num_batched_tokens=batched)
    first = llm.generate(prompts, params, use_tqdm=False)
    again = llm.generate(prompts, params, use_tqdm=False)
    t = temperature or 1.0
    for p, a, b in zip(prompts, first, again, strict=True):
        assert b.num_cached_tokens == 0
        ref = (full_logits(model, p).double() / t).log_softmax(-1)
        for out in (a, b):
            assert len(out.prompt_logprobs) == len(p) and out.prompt_logprobs[0] is None
            got = torch.tensor(out.prompt_logprobs[1:], dtype=torch.float64)
            want = ref[:-1].gather(1, torch.tensor(p[1:])[:, None])[:, 0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            if k:
                assert out.prompt_top_logprobs[0] is None
                for j in range(1, len(p)):
                    vals, ids = ref[j - 1].topk(k)
                    top = out.prompt_top_logprobs[j]
                    assert list(top) == ids.tolist()
                    torch.testing.assert_close(torch.tensor(list(top.values()), dtype=torch.float64), vals,
                                               atol=1e-5, rtol=0)
            else:
                assert out.prompt_top_logprobs is None
    plain = llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None and plain.prompt_top_logprobs is None
    no_leak(llm)


def test_prompt_logprobs_survive_preemption(model):
    prompts = prompts_of([5, 11, 17, 23, 29], seed=2)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=0)
    llm = LLM(model, TOK, block_size=2, num_kv_blocks=40)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats["preemptions"] > 0
    for p, o in zip(prompts, outs, strict=True):
        ref = full_logits(model, p).double().log_softmax(-1)[:-1].gather(1, torch.tensor(p[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(o.prompt_logprobs[1:], dtype=torch.float64), ref, atol=1e-5, rtol=0)
        assert o.outputs[0].token_ids == naive(model, p, 12, stop_ids=())
    no_leak(llm)


@pytest.mark.parametrize("api", ["stream", "step"])
def test_a_requests_output_follows_all_its_tokens(model, api):
    """n=3 completions that end in the same step: every completion's last StreamEvent comes before its request's
    RequestOutput (a stream reader that stops at the output loses nothing), and the events add up to the outputs."""
    prompts = prompts_of([4, 9], seed=11)
    params = SamplingParams(temperature=1.0, seed=2, n=3, max_tokens=5, ignore_eos=True, logprobs=1)
    llm = LLM(model, TOK, block_size=4, num_kv_blocks=128)
    if api == "stream":
        items = list(llm.stream(prompts, params))
    else:
        for p in prompts:
            llm.add_request(p, params)
        items = []
        while llm.has_unfinished():
            items += llm.step()
    for r in range(2):
        mine = [x for x in items if x.request_index == r]
        assert isinstance(mine[-1], RequestOutput) and sum(isinstance(x, RequestOutput) for x in mine) == 1
        out = mine[-1]
        for c in out.outputs:
            evs = [x for x in mine[:-1] if x.index == c.index]
            assert [e.token_id for e in evs] == c.token_ids and evs[-1].finished
            assert "".join(e.text for e in evs) == c.text
            assert [e.logprob for e in evs] == c.logprobs
    no_leak(llm)


def test_a_logit_bias_past_the_vocabulary_is_refused_up_front(model):
    llm = LLM(model, TOK, block_size=4, num_kv_blocks=32)
    bad = SamplingParams(logit_bias={llm.vocab_size: 5.0})
    with pytest.raises(ValueError, match="logit_bias names token"):
        llm.generate([[1, 2]], bad, use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias names token"):
        llm.add_request([1, 2], bad)
    assert not llm.has_unfinished()
    ok = SamplingParams(temperature=0, max_tokens=2, logit_bias={llm.vocab_size - 1: 100.0})
    assert llm.generate([[1, 2]], ok, use_tqdm=False)[0].outputs[0].token_ids == [llm.vocab_size - 1] * 2
    no_leak(llm)


def test_penalties_through_preemption_and_forks_leave_no_counts_behind(model, monkeypatch):
    """Penalised completions (n=2 from one prefill) preempted and recomputed: the same tokens as a loop over the float64
    reference; the device counts of each completion are built once per admission and fed a token a step, and none is
    left when they finish."""
    from test_sampling import ref_penalised

    prompts = prompts_of([5, 11, 17, 23], seed=2)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2, repetition_penalty=1.5,
                            frequency_penalty=0.6, presence_penalty=0.3)
    import r4b.engine.sampling as sampling

    built = []  # rows of counts built from a sequence's tokens (a (re-)admission), against tokens sampled (96)
    real = sampling.token_counts
    monkeypatch.setattr(sampling, "token_counts", lambda h, *a: built.append(len(h)) or real(h, *a))
    llm = LLM(model, TOK, block_size=2, num_kv_blocks=40)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats["preemptions"] > 0
    assert 8 <= sum(built) <= 8 + 2 * llm.stats["preemptions"] < 96
    for p, o in zip(prompts, outs, strict=True):
        ids = list(p)
        while len(ids) - len(p) < 12:
            logits = full_logits(model, ids)[-1].double().tolist()
            pen = ref_penalised(logits, ids, len(p), 1.5, 0.6, 0.3)
            ids.append(max(range(len(pen)), key=pen.__getitem__))
        assert [c.token_ids for c in o.outputs] == [ids[len(p):]] * 2
    assert not llm._penalties.slot_of
    no_leak(llm)
