"""JSON mode: the byte automaton against Python's json module, the token masks against a brute-force pass over the
vocabulary, and the engine's constrained answers."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_llm import TOK, tiny_model
from tiny_models import torch_kernels_on_cpu  # noqa: F401  (fixture)
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from r4b.engine import structured as S
from r4b.engine.chat import ChatTokenizer
from r4b.engine.llm import LLM
from r4b.engine.sampling import SamplingParams
from r4b.engine.server import parse_chat_request

pytestmark = pytest.mark.usefixtures("torch_kernels_on_cpu")


def _docs() -> list[str]:
    """JSON objects as models and json.dumps write them: nesting, every value kind, escapes, unicode, numbers in every
    form, several whitespace styles."""
    rng = random.Random(0)

    def value(depth: int):
        kind = rng.randrange(9 if depth < 4 else 6)
        if kind == 0:
            return rng.choice([0, -0.0, 7, -12, 3.25, 1e-7, -2.5e21, 10**20, 0.5])
        if kind == 1:
            return rng.choice(["", "a", 'say "hi"', "back\\slash", "tab\tnew\nline", "é😀", "\u0001", "/"])
        if kind == 2:
            return rng.choice([True, False, None])
        if kind in (3, 4, 5):
            return rng.choice(["x", "y z", "k"])
        if kind in (6, 7):
            return {rng.choice(["a", "b", "key", "é", 'q"']): value(depth + 1) for _ in range(rng.randrange(4))}
        return [value(depth + 1) for _ in range(rng.randrange(4))]

    out = ['{}', '{ }', '{"a":1}', '{"a": [1, 2.5e-3, -0, 0.0E+1, true, false, null, "x", {}, []]}',
           '{"u": "\\u00e9\\u0041\\n\\"\\\\\\/\\b\\f\\r\\t"}', '{\n  "a": {\n    "b": [\n      1\n    ]\n  }\n}']
    for _ in range(150):
        doc = {f"k{i}": value(0) for i in range(rng.randrange(1, 4))}
        out.append(json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]),
                              separators=rng.choice([None, (",", ":")])))
    return out


def closing(state) -> str:
    """A shortest text that completes a JSON-mode ``state`` to a whole JSON object (the test's witness that a prefix
    the automaton accepts can be completed)."""
    _, frames, mode, aux, _ = state
    out = ""
    if mode == S.STR:
        role, esc, _, _ = aux
        out += "n" if esc == -1 else "0" * max(esc, 0)
        out += '"'
        mode = S.COLON if role == "k" else S.AFTER
    elif mode == S.NUM:
        out += "1" if aux[0] in (S.N_MINUS, S.N_DOT, S.N_E, S.N_ESIGN) else ""
        mode = S.AFTER
    elif mode == S.LIT:
        cands, typed = aux
        out += cands[0][len(typed):].decode()
        mode = S.AFTER
    if mode == S.DONE:
        return out
    if mode == S.START:
        return out + "{}"
    if mode == S.COLON:
        out += ":0"
    elif mode == S.VALUE:
        out += "0"
    elif mode == S.OBJ_KEY:
        out += '"k":0'
    return out + "".join("}" if f[0] == "o" else "]" for f in reversed(frames))


def test_every_prefix_of_a_json_object_is_accepted_and_only_the_whole_is_complete():
    for doc in _docs():
        data = doc.encode()
        state = S.INITIAL
        for k, b in enumerate(data):
            state = S.step(state, b)
            assert state is not None, (doc, k)
            assert S.is_complete(state) == (k == len(data) - 1), (doc, k)
        assert json.loads(data) == json.loads(doc)


def test_random_texts_agree_with_json_loads():
    """Random texts over JSON's alphabet: the automaton calls one complete exactly when json.loads reads an object
    from it (and its whitespace runs are short), and any prefix it accepts has a completion json.loads reads."""
    rng = random.Random(1)
    alphabet = list('{}[]:,"\\ \n0123456789-+.eEtruefalsn') + ["ab", "u00", '"k"', '{"', '":', "\t", "\x01", "é"]
    docs = _docs()
    accepted = complete = 0
    for _ in range(20000):
        if rng.random() < 0.3:  # random text over the alphabet
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 14)))
        else:  # a real object (or a prefix of one) with a few random edits
            text = rng.choice(docs)
            text = text[:rng.randrange(1, len(text) + 1)] if rng.random() < 0.5 else text
            for _ in range(rng.randrange(3)):
                k = rng.randrange(len(text) + 1)
                edit = rng.randrange(3)
                text = text[:k] + (rng.choice(alphabet) if edit else "") + text[k + (edit != 1):]
        if not text:
            continue
        state = S.advance(S.INITIAL, text.encode())
        try:
            obj = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
            is_obj = isinstance(obj, dict) and text[:1] in "{ \t\n\r" and text == text.rstrip(" \t\n\r")
        except ValueError:
            is_obj = False
        assert S.is_complete(state) == is_obj, text
        if state is not None:
            accepted += 1
            complete += is_obj
            whole = text + closing(state)
            assert isinstance(json.loads(whole), dict), (text, whole)
            assert S.is_complete(S.advance(S.INITIAL, whole.encode())), whole
    assert accepted > 5000 and complete > 1000  # the sample reaches both


def test_whitespace_runs_and_nesting_are_capped():
    assert S.advance(S.INITIAL, b"{" + b" " * S.WS_MAX) is not None
    assert S.advance(S.INITIAL, b"{" + b" " * (S.WS_MAX + 1)) is None
    assert S.advance(S.INITIAL, b'{"a":' + b"[" * (S.MAX_DEPTH - 1)) is not None
    assert S.advance(S.INITIAL, b'{"a":' + b"[" * S.MAX_DEPTH) is None
    assert S.advance(S.INITIAL, b"{}") is not None and S.advance(S.INITIAL, b"{} ") is None  # nothing after
    assert S.advance(S.INITIAL, b" " * S.WS_MAX_START + b"{") is not None
    assert S.advance(S.INITIAL, b" " * (S.WS_MAX_START + 1)) is None


def _json_tokenizer() -> ChatTokenizer:
    """A byte-level BPE trained on JSON text (tokens such as '":', '"},', '\\n  ', '\\\\"'), with the chat tokens."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(_docs() * 3, trainer=trainer)
    t.add_tokens([AddedToken("<think>", normalized=False), AddedToken("</think>", normalized=False),
                  AddedToken("<tool_call>", normalized=False), AddedToken("</tool_call>", normalized=False)])
    return ChatTokenizer(t)  # like Qwen3's: the think and call tags are plain (not special) added tokens


@pytest.mark.parametrize("which", ["demo", "json-trained"])
def test_masks_are_the_brute_force_sets(which):
    tok = ChatTokenizer.demo() if which == "demo" else _json_tokenizer()
    V = tok.vocab_size + 7  # a model vocabulary padded past the tokenizer's: those ids are never allowed
    masker = S.JsonMasker(tok, V)
    multi = [i for i, b in enumerate(masker.bytes) if b and len(b) > 1 and any(c in b for c in b'"{}[],:\\')]
    assert len(multi) > (5 if which == "demo" else 200)  # tokens that span structure are there to test
    states, rng = set(), random.Random(2)
    for doc in rng.sample(_docs(), 40):
        state = S.INITIAL
        for b in doc.encode():
            states.add(state)
            state = S.step(state, b)
        states.add(state)
    states |= {S.advance(S.INITIAL, t) for t in (b'{"a": ["\\', b'{"\\u0', b'{"a": {"b": 1e', b'{"a": [tr')}
    eos = (tok.im_end_id, 0)
    for state in sorted(states, key=repr):
        want = torch.zeros(V, dtype=torch.bool)
        if S.is_complete(state):
            want[list(eos)] = True
        else:
            for i, data in enumerate(masker.bytes):
                if data and S.advance(state, data) is not None:
                    want[i] = True
        got = masker.mask(state, eos)
        assert torch.equal(got, want), (state, (got ^ want).nonzero()[:5, 0].tolist())
        assert torch.equal(masker.mask(state, eos), want)  # cached
    assert masker.stats["hits"] >= len(states)
    # a vocabulary without a byte the text needs: no mask (the engine then drops the constraint)
    masker.bytes = [None if d and b'"' in d else d for d in masker.bytes]
    masker.root, masker._cache = S._Node(), type(masker._cache)()
    for i, d in enumerate(masker.bytes):
        if d:
            node = masker.root
            for b in d:
                node = node.children.setdefault(b, S._Node())
            node.ids.append(i)
    assert masker.mask(S.advance(S.INITIAL, b"{"), eos) is not None  # whitespace or "}" still go
    assert masker.mask(S.advance(S.INITIAL, b"{ "), (10**6,)) is not None
    assert masker.mask(S.advance(S.INITIAL, b'{"a":1,' + b" " * S.WS_MAX), eos) is None  # only a quote could follow
    # special tokens never pass (their bytes are not the text's)
    assert not any(masker.mask(S.INITIAL, eos)[i] for i in (tok.think_id, tok.end_think_id, tok.im_start_id))


@pytest.fixture(scope="module")
def model():
    return tiny_model(3)


@pytest.mark.parametrize("mode", ["short", "auto"])
def test_json_mode_answers_are_json_objects(model, mode):
    llm = LLM(model, TOK, num_kv_blocks=256, block_size=8)
    params = SamplingParams(temperature=1.0, max_tokens=120, n=4, seed=5, response_format="json_object")
    outs = llm.generate(["Give me a JSON object.", "Another one."], params, thinking_mode=mode,
                        max_thinking_tokens=4, use_tqdm=False)
    stopped = 0
    for out in outs:
        for c in out.outputs:
            start = c.token_ids.index(TOK.end_think_id) + 2 if mode == "auto" else 0  # after "\n</think>\n\n"
            answer = b"".join(TOK.token_bytes(t) for t in c.token_ids[start:] if t not in (TOK.im_end_id, 0))
            state = S.advance(S.INITIAL, answer)
            assert state is not None, answer  # every token kept the answer a JSON-object prefix
            if c.finish_reason == "stop":
                stopped += 1
                assert S.is_complete(state) and isinstance(json.loads(c.answer), dict), c.answer
                assert c.token_ids[-1] in (TOK.im_end_id, 0)  # an end-of-turn token
            else:
                assert c.finish_reason == "length" and not S.is_complete(state)
    # without the constraint the same seeds write no JSON at all
    free = llm.generate(["Give me a JSON object."], SamplingParams(temperature=1.0, max_tokens=120, n=4, seed=5),
                        thinking_mode=mode, max_thinking_tokens=4, use_tqdm=False)[0]
    assert not any(c.answer.lstrip().startswith("{") and c.finish_reason == "stop" for c in free.outputs)
    assert stopped + sum(c.finish_reason == "length" for o in outs for c in o.outputs) == 8


def test_json_mode_is_steered_by_the_mask_not_the_model(model):
    """A bias towards '}' closes the object at once: '{' is the only way in, '}' then completes it, and the end of
    turn is the only token left. Greedy, so the output is exactly that."""
    llm = LLM(model, TOK, num_kv_blocks=256, block_size=8)
    close = TOK.encode("}")
    assert len(close) == 1
    params = SamplingParams(temperature=0, max_tokens=20, response_format="json_object", logit_bias={close[0]: 100})
    c = llm.generate(["x"], params, thinking_mode="short", use_tqdm=False)[0].outputs[0]
    # this random model likes whitespace: it writes the most allowed before the brace, then "{", "}" and the end
    assert c.answer == "{}" and c.text.startswith("\t") and c.finish_reason == "stop"
    assert len(TOK.decode(c.token_ids[:-2]).encode()) <= S.WS_MAX_START + 1 and c.token_ids[-1] in (TOK.im_end_id, 0)
    # the reported log-probs are the model's (the mask is not in them): the same as an unconstrained forced run
    forced = LLM(model, TOK, num_kv_blocks=256, block_size=8)
    ref = forced.generate([[*TOK.encode_chat([{"role": "user", "content": "x"}], "short").input_ids.tolist(),
                            *c.token_ids[:-1]]], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                          use_tqdm=False)[0]
    n = len(c.token_ids) - 1
    assert ref.prompt_logprobs[-n:] == pytest.approx(c.logprobs[:n], abs=1e-5)
    with pytest.raises(ValueError, match="response_format"):
        SamplingParams(response_format="yaml")
    # ignore_eos: the object's end ends the completion (only end-of-turn tokens could follow it)
    c = llm.generate(["x"], SamplingParams(temperature=0, max_tokens=20, response_format="json_object",
                                           logit_bias={close[0]: 100}, ignore_eos=True),
                     thinking_mode="short", use_tqdm=False)[0].outputs[0]
    assert c.answer == "{}" and c.finish_reason == "stop" and c.token_ids[-1] == close[0]


def test_server_json_mode(model):
    from test_server import serving

    r = parse_chat_request({"messages": [{"role": "user", "content": "q"}], "response_format": {"type": "json_object"}})
    assert r.params.response_format == "json_object"
    assert parse_chat_request({"messages": [{"role": "user", "content": "q"}],
                               "response_format": {"type": "text"}}).params.response_format is None
    llm = LLM(model, TOK, num_kv_blocks=256, block_size=8)
    with serving(llm, default_max_tokens=120) as (server, client):
        # the masker is built beside the engine at start, not in the first JSON request's step
        assert server.json_warmup is not None
        server.json_warmup.join(60)
        masker = llm._masker
        assert masker is not None and llm.warm_json_masker() is None
        body = {"messages": [{"role": "user", "content": "JSON please"}], "response_format": {"type": "json_object"},
                "thinking_mode": "short", "n": 4, "seed": 5, "temperature": 1.0}
        status, plain = client.request("POST", "/v1/chat/completions", body)
        assert status == 200, plain
        done = [c for c in plain["choices"] if c["finish_reason"] == "stop"]
        assert done and all(isinstance(json.loads(c["message"]["content"]), dict) for c in done)
        assert all(S.advance(S.INITIAL, c["message"]["content"].encode()) is not None for c in plain["choices"])
        status, chunks = client.request("POST", "/v1/chat/completions", {**body, "stream": True})
        assert status == 200
        for c in plain["choices"]:  # seeded: the stream writes the same JSON
            got = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[:-1]
                          if ch["choices"] and ch["choices"][0]["index"] == c["index"])
            assert got == c["message"]["content"]
        status, err = client.request("POST", "/v1/chat/completions", {**body, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array"}}}})  # not an object
        assert status == 400 and err["error"]["param"] == "response_format"
        assert llm._masker is masker  # the requests used the warmed one


@pytest.mark.gpu
def test_gpu_json_mode_with_cuda_graphs_matches_eager(monkeypatch):
    """On a GPU: the masks live on the device and apply after the graph-replayed decode steps; JSON answers with
    CUDA graphs are those of the eager engine (fp32, TF32 off), and every one is a JSON-object prefix."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = tiny_model(3).cuda()
    params = SamplingParams(temperature=1.0, max_tokens=60, n=4, seed=5, response_format="json_object")

    def run(graphs: bool):
        llm = LLM(model, TOK, num_kv_blocks=256, block_size=8, cuda_graphs=graphs)
        out = llm.generate(["JSON please", "More JSON"], params, thinking_mode="short", use_tqdm=False)
        return [c for o in out for c in o.outputs], llm.stats["graph_steps"]

    got, graph_steps = run(True)
    want, _ = run(False)
    assert graph_steps > 0
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    for c in got:
        answer = b"".join(TOK.token_bytes(t) for t in c.token_ids if t not in (TOK.im_end_id, 0))
        assert S.advance(S.INITIAL, answer) is not None
