"""Prefix caching: the BlockManager's registry of computed blocks (register / match / acquire, free blocks that keep
their content, eviction least recently freed first, clear_cache), checked by hand and by a seeded random walk that
simulates the cache's content; and the engine on it: a prompt seen before (the same one, a shared system prompt,
an earlier turn, a preempted sequence, the same image) takes its blocks from the cache and gives the tokens an
engine without the cache gives; a different image, or changed weights, never reuse a block."""

from __future__ import annotations

import random

import pytest
import torch
from test_block_manager import check_refs
from test_llm import TOK, naive, no_leak, prompts_of, tiny_model, tiny_r4b_chat
from tiny_models import torch_kernels_on_cpu  # noqa: F401  (fixture)

from r4b.engine.block_manager import BlockManager
from r4b.engine.llm import LLM, RequestOutput
from r4b.engine.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("torch_kernels_on_cpu")


def full(bm: BlockManager, seq, n: int, keys) -> list[int]:
    """A sequence of n tokens computed and its full blocks registered under keys."""
    assert bm.ensure(seq, n, 0) == []
    bm.register(seq, keys[: n // bm.block_size])
    return list(bm.table(seq))


# ------------------------------------------------------------------------------------------------ the registry
def test_registered_blocks_outlive_their_sequence_and_are_acquired():
    bm = BlockManager(8, 4, prefix_caching=True)
    a = full(bm, "a", 10, ["k0", "k1"])  # blocks 0, 1 full and registered, block 2 partial
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 5
    bm.free("a")
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2  # free, content kept
    assert bm.match(["k0", "k1", "k2"]) == a[:2]
    assert bm.match(["x", "k1"]) == []  # a run from the first block only (a key names the whole prefix)
    bm.acquire("b", bm.match(["k0", "k1"]))
    assert bm.table("b") == a[:2] and [bm.ref_count(x) for x in a[:2]] == [1, 1]
    assert bm.num_free_blocks == 6
    bm.acquire("c", bm.match(["k0"]))  # a shared hit: one more reference
    assert bm.ref_count(a[0]) == 2 and bm.num_free_blocks == 6
    assert bm.ensure("b", 9, 8) == []  # b goes on after its cached blocks: a new block, nothing copied
    assert bm.table("b")[:2] == a[:2] and len(bm.table("b")) == 3
    with pytest.raises(ValueError, match="already holds blocks"):
        bm.acquire("b", [a[0]])
    with pytest.raises(ValueError, match="block 7 is not registered"):
        bm.acquire("d", [7])
    with pytest.raises(ValueError, match="holds 0 blocks, cannot register 1"):
        bm.register("nobody", ["k"])
    for s in "bc":
        bm.free(s)
    assert bm.num_free_blocks == 8


def test_blank_blocks_go_first_then_the_least_recently_freed_tail_first():
    bm = BlockManager(6, 2, prefix_caching=True)
    a = full(bm, "a", 6, ["a0", "a1", "a2"])
    b = full(bm, "b", 2, ["b0"])
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4
    assert bm.ensure("x", 4, 0) == []  # the two blank blocks first: nothing evicted
    assert bm.evictions == 0 and bm.match(["a0", "a1", "a2"]) == a and bm.match(["b0"]) == b
    assert bm.ensure("y", 2, 0) == []  # then a's last block (freed before its first), then a1, a0, then b's
    assert bm.table("y") == [a[2]] and bm.evictions == 1 and bm.match(["a0", "a1", "a2"]) == a[:2]
    assert bm.ensure("y", 6, 2) == [] and bm.table("y")[1:] == [a[1], a[0]]
    assert bm.match(["a0"]) == [] and bm.match(["b0"]) == b and bm.num_cached_blocks == 1
    # an evicted block is blank: its new holder registers it under its own key
    bm.register("y", ["y0", "y1", "y2"])
    assert bm.match(["y0", "y1", "y2"]) == bm.table("y")


def test_a_key_is_held_by_one_block_and_clear_cache_forgets_them_all():
    bm = BlockManager(6, 2, prefix_caching=True)
    a = full(bm, "a", 4, ["k0", "k1"])
    b = full(bm, "b", 4, ["k0", "k1"])  # the same content computed twice (admitted in the same step)
    assert bm.num_cached_blocks == 2 and bm.match(["k0", "k1"]) == a
    assert bm.register("a", ["k0", "k1"]) == 0  # registering again changes nothing
    bm.free("b")  # b's blocks were never registered: blank again
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    bm.free("a")
    bm.clear_cache()
    assert bm.num_cached_blocks == 0 and bm.match(["k0"]) == [] and bm.num_free_blocks == 6
    assert bm.ensure("c", 12, 0) == [] and sorted(bm.table("c")) == list(range(6)) and bm.evictions == 0
    assert set(b) <= set(bm.table("c"))


def test_without_prefix_caching_register_does_nothing():
    bm = BlockManager(4, 2)
    full(bm, "a", 4, ["k0", "k1"])
    assert bm.num_cached_blocks == 0 and bm.match(["k0"]) == []
    bm.free("a")
    assert bm.num_free_blocks == 4


@pytest.mark.parametrize("seed", range(6))
def test_random_walk_hits_always_hold_the_right_content(seed):
    """Sequences over a 2-token alphabet (so prefixes repeat), grown, forked, freed, and admitted from the cache at
    random, against a simulated cache (each slot's token). A hit's blocks must hold exactly the sequence's tokens;
    writes never touch a block someone else holds; reference counts and free blocks stay consistent."""
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 3])
    bm = BlockManager(rng.choice([6, 12, 30]), bs, prefix_caching=True)
    content: dict[int, int] = {}  # slot -> token
    seqs: dict[int, list[int]] = {}  # live sequence -> its tokens
    cached: dict[int, int] = {}  # live sequence -> computed tokens
    hits = 0

    def keys(tokens, n):
        return [tuple(tokens[: (i + 1) * bs]) for i in range(n)]

    def write(s, upto):
        pairs = bm.ensure(s, upto, cached[s])
        if pairs is None:
            return False
        for src, dst in pairs:
            for o in range(bs):
                if src * bs + o in content:
                    content[dst * bs + o] = content[src * bs + o]
        for p in range(cached[s], upto):
            slot = bm.slot(s, p)
            assert all(bm.ref_count(b) == 1 for b in [slot // bs])  # nobody else holds a written block
            content[slot] = seqs[s][p]
        cached[s] = upto
        bm.register(s, keys(seqs[s], upto // bs))
        return True

    for step in range(400):
        op = rng.random()
        if op < 0.35 or not seqs:  # admit a new sequence, from the cache when it can
            s = step
            toks = [rng.randrange(2) for _ in range(rng.randrange(1, 4 * bs + 3))]
            hit = bm.match(keys(toks, (len(toks) - 1) // bs))
            seqs[s], cached[s] = toks, 0
            if hit:
                bm.acquire(s, hit)
                cached[s] = len(hit) * bs
                hits += 1
                for p in range(cached[s]):
                    assert content[bm.slot(s, p)] == toks[p], "a cache hit holds another sequence's content"
            if not write(s, len(toks)):
                bm.free(s)
                del seqs[s], cached[s]
        elif op < 0.6:  # grow
            s = rng.choice(list(seqs))
            seqs[s] += [rng.randrange(2) for _ in range(rng.randrange(1, bs + 2))]
            if not write(s, len(seqs[s])):
                del seqs[s][cached[s]:]
        elif op < 0.75:  # fork
            s = rng.choice(list(seqs))
            c = step
            bm.fork(s, c)
            seqs[c], cached[c] = list(seqs[s]), cached[s]
        else:  # free
            s = rng.choice(list(seqs))
            bm.free(s)
            del seqs[s], cached[s]
        for s, toks in seqs.items():  # every live sequence still reads its own tokens
            assert [content[bm.slot(s, p)] for p in range(cached[s])] == toks[: cached[s]]
        check_refs(bm, list(seqs))
    assert hits > 10


# ------------------------------------------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def model():
    return tiny_model()


def close(a, b) -> None:
    """The same tokens, log-probs within fp32 rounding (a cached prompt's tail runs through the paged extend path,
    not the prefill's)."""
    assert a.error is None and b.error is None
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    for x, y in zip(a.outputs, b.outputs, strict=True):
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_a_prompt_seen_before_is_taken_from_the_cache(model, block_size):
    prompts = prompts_of([1, 3, 9, 16, 17, 30])  # 16: a whole number of blocks (its last token is computed)
    llm = LLM(model, TOK, block_size=block_size, num_kv_blocks=128)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate(prompts, params, use_tqdm=False)
    assert [o.num_cached_tokens for o in first] == [0] * 6  # one prefill step: nothing was registered yet
    computed = llm.stats["prompt_tokens_computed"]
    again = llm.generate(prompts, params, use_tqdm=False)
    want = [(len(p) - 1) // block_size * block_size for p in prompts]
    assert [o.num_cached_tokens for o in again] == want
    assert llm.stats["prefix_cache_hit_tokens"] == sum(want)
    assert llm.stats["prompt_tokens_computed"] - computed == sum(map(len, prompts)) - sum(want)
    for p, a, b in zip(prompts, first, again, strict=True):
        close(a, b)
        assert b.outputs[0].token_ids == naive(model, p, 6, stop_ids=())
    no_leak(llm)


def test_a_shared_system_prompt_and_earlier_turns_are_reused(model):
    system = {"role": "system", "content": "You are a careful assistant. Think before answering hard questions."}
    q1 = [system, {"role": "user", "content": "What is 2 + 2?"}]
    q2 = [system, {"role": "user", "content": "Name a prime number."}]
    params = SamplingParams(temperature=0, max_tokens=8)
    cold = LLM(model, TOK, block_size=4, num_kv_blocks=128, prefix_caching=False)
    llm = LLM(model, TOK, block_size=4, num_kv_blocks=128)
    a1 = llm.generate([q1], params, use_tqdm=False)[0]
    a2 = llm.generate([q2], params, use_tqdm=False)[0]
    ids1, ids2 = a1.prompt_token_ids, a2.prompt_token_ids
    common = next(i for i, (x, y) in enumerate(zip(ids1, ids2, strict=False)) if x != y)
    assert a2.num_cached_tokens == common // 4 * 4 > 0
    close(a2, cold.generate([q2], params, use_tqdm=False)[0])
    # the next turn holds the first one: its whole earlier prompt is cached (and more, where the answer's blocks
    # match the re-rendered turn)
    turn2 = [*q1, {"role": "assistant", "content": a1.outputs[0].text}, {"role": "user", "content": "And 3 + 3?"}]
    for mode in ("long", "short"):
        b = llm.generate([turn2], params, thinking_mode=mode, use_tqdm=False)[0]
        assert b.num_cached_tokens >= (len(ids1) - 1) // 4 * 4
        close(b, cold.generate([turn2], params, thinking_mode=mode, use_tqdm=False)[0])
    assert cold.stats["prefix_cache_hit_tokens"] == 0 and cold.blocks.num_cached_blocks == 0
    no_leak(llm)


def test_changed_weights_never_reuse_a_block(model):
    model = tiny_model(seed=3)
    prompts = prompts_of([9, 20], seed=1)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(model, TOK, block_size=4, num_kv_blocks=128)

    def check(expect_hits: bool) -> None:
        before = llm.stats["prefix_cache_hit_tokens"]
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert (llm.stats["prefix_cache_hit_tokens"] > before) == expect_hits
        for p, o in zip(prompts, outs, strict=True):
            assert o.outputs[0].token_ids == naive(model, p, 6, stop_ids=())

    check(False)
    check(True)
    with torch.no_grad():  # an in-place update through the parameter (what an optimizer step does)
        model.model.layers[0].self_attn.q_proj.weight.mul_(-1.5)
    check(False)
    check(True)
    with torch.no_grad():  # a replaced parameter
        w = model.model.layers[1].mlp.down_proj.weight
        model.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(w * 2.0)
    check(False)
    check(True)
    with torch.no_grad():  # a replaced submodule (new parameter objects in a new module)
        import copy

        mlp = copy.deepcopy(model.model.layers[0].mlp)
        mlp.up_proj.weight.mul_(-1.0)
        model.model.layers[0].mlp = mlp
    check(False)
    with torch.no_grad():  # a change the engine cannot see (no version bump): reset_prefix_cache by hand
        model.model.layers[0].self_attn.k_proj.weight.data.mul_(0.5)
    llm.reset_prefix_cache()
    assert llm.blocks.num_cached_blocks == 0
    check(False)
    no_leak(llm)


@pytest.mark.parametrize("other_request", [False, True])
def test_weights_changed_while_a_request_runs(other_request):
    """A request computing across a weight change holds the old weights' keys and values: none of its blocks may be
    registered after the change. With other_request, the change is noticed at another add_request while it runs
    (the serving path); then a prompt made of its tokens, computed twice, must match an engine without the cache
    (its later blocks, were they registered, would be found after the new ones' first blocks)."""
    model = tiny_model(seed=4)
    prompt = prompts_of([20], seed=5)[0]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm = LLM(model, TOK, block_size=4, num_kv_blocks=128)
    a = llm.add_request(prompt, params)
    for _ in range(3):  # its prompt and two tokens: 5 blocks registered
        llm.step()
    assert llm.blocks.num_cached_blocks == 5
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(-2.0)
    if other_request:
        llm.add_request(prompts_of([9], seed=6)[0], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    outs = {}
    while llm.has_unfinished():
        outs.update({o.request_index: o for o in llm.step() if isinstance(o, RequestOutput)})
    registered = 2 if other_request else 0  # the other request's two full blocks (9 + 2 tokens computed: 10)
    assert llm.blocks.num_cached_blocks == registered
    whole = prompt + outs[a].outputs[0].token_ids
    cold = LLM(model, TOK, block_size=4, num_kv_blocks=128, prefix_caching=False)
    want = cold.generate([whole], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    for hits in (0, (len(whole) - 1) // 4 * 4):
        got = llm.generate([whole], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
        assert got.num_cached_tokens == hits
        close(got, want)
    no_leak(llm)


@pytest.mark.parametrize("n", [1, 2])
def test_preempted_sequences_come_back_through_the_cache_under_eviction(model, n):
    """n=2: each prompt is prefilled once and forked, so the preempted ones are completions that come back with
    their prompt and their own generated blocks from the cache; the request's num_cached_tokens still counts only
    what its prompt's first admission found."""
    prompts = prompts_of([5, 11, 17, 23, 29], seed=2)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=n)
    llm = LLM(model, TOK, block_size=2, num_kv_blocks=40)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats["preemptions"] > 0 and llm.stats["prefix_cache_hit_tokens"] > 0
    assert llm.blocks.evictions > 0
    for p, o in zip(prompts, outs, strict=True):
        assert [c.token_ids for c in o.outputs] == [naive(model, p, 12, stop_ids=())] * n
        assert o.num_cached_tokens == 0  # nothing was cached when the prompts came in
    no_leak(llm)


def test_an_image_is_part_of_the_key():
    model, tok, msgs = tiny_r4b_chat()
    other = torch.randint(0, 256, (3, 40, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    msgs2 = [{"role": "user", "content": [{"type": "image", "image": other}, {"type": "text", "text": "What?"}]}]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    cold = LLM(model, tok, num_kv_blocks=200, block_size=4, prefix_caching=False)
    llm = LLM(model, tok, num_kv_blocks=200, block_size=4)
    first = llm.generate([msgs], params, use_tqdm=False)[0]
    ids = first.prompt_token_ids
    image_at = ids.index(tok.image_id)
    same = llm.generate([msgs], params, use_tqdm=False)[0]
    assert same.num_cached_tokens == (len(ids) - 1) // 4 * 4 > image_at  # the image's blocks are reused
    close(same, first)
    diff = llm.generate([msgs2], params, use_tqdm=False)[0]
    assert diff.prompt_token_ids == ids  # the same tokens, another image
    assert diff.num_cached_tokens == image_at // 4 * 4  # only the blocks before the first image token
    want = cold.generate([msgs2], params, use_tqdm=False)[0]
    close(diff, want)
    assert [o.token_ids for o in diff.outputs] != [o.token_ids for o in first.outputs]  # the image matters here
    no_leak(llm)


@pytest.mark.gpu
def test_gpu_cached_prefixes_on_the_default_kernels(monkeypatch):
    """On a GPU in fp32 (TF32 off), the default kernels (a cached prompt's tail goes through the paged extend
    attention, decode through CUDA graphs): prompts seen before, forks in both modes, and preemption under eviction
    give the tokens of an engine without the cache, log-probs within 1e-4."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a dry run by hand
    model = tiny_model(4).to(dev)
    system = {"role": "system", "content": "You are a careful assistant. Think before answering hard questions."}
    chats = [[system, {"role": "user", "content": q}] for q in ("What is 3 + 4?", "Name a prime.", "hi")]
    params = SamplingParams(temperature=0, max_tokens=20, n=2, ignore_eos=True)
    cold = LLM(model, TOK, num_kv_blocks=30, block_size=4, max_num_batched_tokens=48, prefix_caching=False)
    llm = LLM(model, TOK, num_kv_blocks=30, block_size=4, max_num_batched_tokens=48)
    want = cold.generate(chats, params, thinking_mode=("long", "short"), use_tqdm=False)
    for _ in range(2):
        for i in range(len(chats)):  # one at a time: each later chat finds the system prompt cached
            got = llm.generate([chats[i]], params, thinking_mode=("long", "short"), use_tqdm=False)[0]
            close(got, want[i])
    assert llm.stats["prefix_cache_hit_tokens"] > 0 and llm.stats["preemptions"] > 0
    no_leak(llm)
