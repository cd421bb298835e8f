"""The serving path: LLM.add_request / step / abort, and the OpenAI-compatible server (r4b.engine.server,
``r4b serve``) against the engine's own generate: plain and streamed responses in each thinking mode, concurrent
clients, a client that disconnects, a failing engine step, bad requests, the CLI."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_llm import TOK, tiny_model
from test_train_sft import make_model_dir
from tiny_models import torch_kernels_on_cpu  # noqa: F401  (fixture)

from r4b.engine.chat import parse_response
from r4b.engine.llm import LLM, RequestOutput, StreamEvent
from r4b.engine.sampling import SamplingParams
from r4b.engine.server import BadRequest, EngineLoop, Server, ThinkSplitter, client_gone, parse_chat_request

pytestmark = pytest.mark.usefixtures("torch_kernels_on_cpu")

PROMPTS = ["What is 3 + 4?", "Name a prime number.", "hi", "Repeat 7.", "Add 12 and 30.", "Say yes."]


@pytest.fixture(scope="module")
def model():
    return tiny_model(5)


def new_llm(model, **kw) -> LLM:
    return LLM(model, TOK, num_kv_blocks=256, block_size=8, **kw)


def run_steps(llm: LLM) -> tuple[list[StreamEvent], dict[int, RequestOutput]]:
    events, outs = [], {}
    while llm.has_unfinished():
        for ev in llm.step():
            (events.append(ev) if isinstance(ev, StreamEvent) else outs.__setitem__(ev.request_index, ev))
    return events, outs


# ------------------------------------------------------------------------------------------- the engine's API


def test_add_request_and_step_match_generate(model):
    """Requests added one at a time (two of them while others run) give what generate gives each of them."""
    llm = new_llm(model)
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=3, n=2)
    want = [llm.generate([p], params, thinking_mode=m, max_thinking_tokens=b, use_tqdm=False)[0]
            for p, m, b in zip(PROMPTS[:4], ("auto", "long", "short", "long"), (None, 2, None, None), strict=True)]
    ids = [llm.add_request(PROMPTS[0], params, thinking_mode="auto"),
           llm.add_request(PROMPTS[1], params, thinking_mode="long", max_thinking_tokens=2)]
    outs: dict[int, RequestOutput] = {}
    for _ in range(3):
        for ev in llm.step():
            if isinstance(ev, RequestOutput):
                outs[ev.request_index] = ev
    ids += [llm.add_request(PROMPTS[2], params, thinking_mode="short"),
            llm.add_request(PROMPTS[3], params, thinking_mode="long")]
    assert len(set(ids)) == 4
    _, rest = run_steps(llm)
    outs.update(rest)
    # the budget is the request's own: request 1 (2 thought tokens) closes its thought, request 3 (none) does not
    assert all(c.num_thinking_tokens <= 3 for c in outs[ids[1]].outputs)  # 2 + the forced "\n"
    assert all(c.num_thinking_tokens > 3 for c in outs[ids[3]].outputs)
    for rid, w in zip(ids, want, strict=True):
        got = outs[rid]
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in w.outputs]
        assert [(c.text, c.thinking, c.answer, c.finish_reason, c.num_thinking_tokens) for c in got.outputs] == \
            [(c.text, c.thinking, c.answer, c.finish_reason, c.num_thinking_tokens) for c in w.outputs]
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks and not llm.has_unfinished()
    with pytest.raises(ValueError, match="max_thinking_tokens"):
        llm.add_request("x", params, max_thinking_tokens=-1)
    with pytest.raises(ValueError, match="thinking_mode"):
        llm.add_request("x", params, thinking_mode="sideways")


def test_abort_frees_blocks_and_refused_requests_report_at_once(model):
    llm = new_llm(model)
    keep = llm.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6))
    drop = llm.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=50, n=3), thinking_mode="long")
    bad = llm.add_request([10**6], SamplingParams(max_tokens=3))  # a token id outside the vocabulary
    first = llm.step()
    refused = [ev for ev in first if isinstance(ev, RequestOutput)]
    assert [r.request_index for r in refused] == [bad] and "outside the vocabulary" in refused[0].error
    llm.step()
    assert llm.abort(drop) and not llm.abort(drop) and not llm.abort(12345)
    events, outs = run_steps(llm)
    assert set(outs) == {keep} and all(ev.request_index == keep for ev in events)
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
    with pytest.raises(RuntimeError, match="already generating"):  # generate is refused while requests are live
        llm.add_request(PROMPTS[0])
        llm.generate([PROMPTS[0]], use_tqdm=False)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model, monkeypatch):
    llm = new_llm(model)
    rid = llm.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, n=2), thinking_mode="long")
    assert not any(isinstance(ev, RequestOutput) for ev in llm.step())  # the prefill: blocks are taken
    assert llm.blocks.num_free_blocks < llm.blocks.num_blocks
    monkeypatch.setattr(llm, "_step", lambda: (_ for _ in ()).throw(RuntimeError("device lost")))
    outs = llm.step()
    assert len(outs) == 1 and outs[0].request_index == rid and "device lost" in outs[0].error
    monkeypatch.undo()
    assert not llm.has_unfinished() and not llm.waiting and not llm.running
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
    llm.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4))
    _, done = run_steps(llm)
    assert all(o.error is None and o.outputs for o in done.values())


def test_engine_loop_batches_what_arrives_together(model):
    llm = new_llm(model)
    loop = EngineLoop(llm)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    handles = [loop.submit(parse_chat_request(body)) for _ in range(4)]
    loop.start()  # all four are in the inbox when the engine first looks
    try:
        outs = []
        for h in handles:
            while not isinstance(ev := h.events.get(timeout=60), RequestOutput):
                pass
            outs.append(ev)
    finally:
        loop.shutdown()
    assert loop.max_batch == 4 and len({tuple(o.outputs[0].token_ids) for o in outs}) == 1


# ------------------------------------------------------------------------------------------------ parsing, split


def test_parse_chat_request_fields_and_errors():
    r = parse_chat_request({"messages": [{"role": "user", "content": "q"}], "max_completion_tokens": 7,
                            "temperature": 0.5, "top_k": 4, "n": 2, "stop": "END", "seed": 1, "stream": True,
                            "stream_options": {"include_usage": True},
                            "chat_template_kwargs": {"enable_thinking": False}})
    assert (r.params.max_tokens, r.params.temperature, r.params.top_k, r.params.n, r.params.stop, r.params.seed) == \
        (7, 0.5, 4, 2, ("END",), 1)
    assert r.thinking_mode == "short" and r.stream and r.include_usage
    assert not r.logprobs and r.params.logprobs is None
    r = parse_chat_request({"messages": [{"role": "user", "content": "q"}], "presence_penalty": 0.5,
                            "frequency_penalty": -1, "repetition_penalty": 1.1, "min_p": 0.05})
    p = r.params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p) == (0.5, -1.0, 1.1, 0.05)
    r = parse_chat_request({"messages": [{"role": "user", "content": "q"}], "logit_bias": {"17": -100, "3": 2}})
    assert r.params.logit_bias == ((3, 2.0), (17, -100.0))
    r = parse_chat_request({"messages": [{"role": "user", "content": "q"}], "logprobs": True, "top_logprobs": 3})
    assert r.logprobs and r.params.logprobs == 3
    r = parse_chat_request({"messages": [{"role": "user", "content": "q"}], "logprobs": True, "top_logprobs": 0})
    assert r.logprobs and r.params.logprobs is None  # the chosen token's log-prob only
    assert parse_chat_request({"messages": [{"role": "user", "content": "q"}]}, default_mode="long").thinking_mode \
        == "long"
    img = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (5, 4), (9, 8, 7)).save(img, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(img.getvalue()).decode()
    r = parse_chat_request({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]}]})
    assert r.messages[0]["content"][0]["image"].size == (5, 4) and r.messages[0]["content"][1]["text"] == "what?"
    msg = [{"role": "user", "content": "q"}]
    for body, param in (({}, "messages"), ({"messages": "hi"}, "messages"),
                        ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
                        ({"messages": msg + [{"role": "assistant", "content": "a"}]}, "messages"),
                        ({"messages": msg, "thinking_mode": "sideways"}, "thinking_mode"),
                        ({"messages": msg, "temperature": -1}, "temperature"), ({"messages": msg, "n": 0}, "n"),
                        ({"messages": msg, "max_tokens": "9"}, "max_tokens"), ({"messages": msg, "top_p": 2}, "top_p"),
                        ({"messages": msg, "tools": [{}]}, "tools"), ({"messages": msg, "logprobs": "yes"}, "logprobs"),
                        ({"messages": msg, "top_logprobs": 3}, "top_logprobs"),
                        ({"messages": msg, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"messages": msg, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
                        ({"messages": msg, "stop": [""]}, "stop"), ({"messages": msg, "seed": 1.5}, "seed"),
                        ({"messages": msg, "presence_penalty": 3}, "presence_penalty"),
                        ({"messages": msg, "frequency_penalty": "x"}, "frequency_penalty"),
                        ({"messages": msg, "repetition_penalty": 0}, "repetition_penalty"),
                        ({"messages": msg, "min_p": 2}, "min_p"),
                        ({"messages": msg, "logit_bias": {"x": 1}}, "logit_bias"),
                        ({"messages": msg, "logit_bias": {"5": 200}}, "logit_bias"),
                        ({"messages": msg, "logit_bias": [1]}, "logit_bias"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
                            "url": "http://example.com/x.png"}}]}]}, "messages"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
                            "url": "data:image/png;base64,!!!"}}]}]}, "messages")):
        with pytest.raises(BadRequest) as e:
            parse_chat_request(body)
        assert e.value.param == param, (body, str(e.value))
        assert param in str(e.value) or param == "messages"


def test_think_splitter_holds_back_tags_and_whitespace():
    text = "  Let me see.\n\n</think>\n\nThe answer is 7.<|im_end|>"
    for step in (1, 2, 3, 5, len(text)):
        sp, thought, answer = ThinkSplitter(True), "", ""
        for i in range(0, len(text), step):
            t, a = sp.feed(text[i : i + step])
            assert "<" not in t + a and "|" not in t + a  # no piece of a tag is ever sent
            thought, answer = thought + t, answer + a
        assert (thought, answer) == ("Let me see.", "The answer is 7.")
        assert sp.finish("Let me see.", "The answer is 7.") == ("", "")
    sp = ThinkSplitter(False)
    assert sp.feed(" 4") == ("", "4") and sp.feed(" 2 ") == ("", " 2") and sp.feed("<|endoftext|>x") == ("", "")
    # the rules of parse_response: a thought the output (re)opens, a preamble before it in short mode; and the one
    # rule a stream cannot follow (two </think>: the stream ends the thought at the first), reported as diverged
    for in_thought, mode, text in ((True, "long", "\n<think>\nLet me see.\n</think>\n\n7"),
                                   (False, "short", "Sure. <think>\nreason\n</think>\n\n7<|im_end|>"),
                                   (True, "auto", "\n\n</think>\n\nDirect."),
                                   (True, "long", "Hmm.\n</think>\n\nMaybe 7.\n</think>\n\nThe answer is 7.")):
        p = parse_response(text, thinking_mode=mode)
        sp, thought, answer = ThinkSplitter(in_thought), "", ""
        for ch in text:
            t, a = sp.feed(ch)
            thought, answer = thought + t, answer + a
        t, a = sp.finish(p.thinking, p.answer)
        if text.count("</think>") > 1:
            assert sp.diverged and (thought, answer) == ("Hmm.", "Maybe 7.\n</think>\n\nThe answer is 7.")
        else:
            assert not sp.diverged and (thought + t, answer + a) == (p.thinking, p.answer) and (t, a) == ("", "")


def test_think_splitter_agrees_with_parse_response_on_random_texts():
    """Random completions (tags, pieces of tags, whitespace, end-of-turn tokens) in random chunks, in each mode: the
    stream's deltas add up to parse_response's split, so nothing sent is ever taken back (except after a second
    </think>, which is reported as diverged)."""
    import random

    rng = random.Random(11)
    pieces = ["<think>", "</think>", "<|im_end|>", "<|endoftext|>", "<thi", "</th", "<|im", "\n", "\n\n", " ", "a",
              "Let me see.", "7", "<", "é"]
    for _ in range(4000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(10)))
        mode = rng.choice(["auto", "long", "short"])
        sp, thought, answer, k = ThinkSplitter(mode != "short"), "", "", 0
        while k < len(text):
            n = rng.randrange(1, 7)
            t, a = sp.feed(text[k:k + n])
            thought, answer, k = thought + t, answer + a, k + n
        p = parse_response(text, thinking_mode=mode)
        t, a = sp.finish(p.thinking, p.answer)
        if not sp.diverged:
            assert (thought + t, answer + a) == (p.thinking, p.answer), (mode, text)
        else:
            cut = min([i for i in (text.find("<|im_end|>"), text.find("<|endoftext|>")) if i >= 0] or [len(text)])
            assert text[:cut].count("</think>") > 1, (mode, text)


# ------------------------------------------------------------------------------------------------------- HTTP


class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    def request(self, method: str, path: str, body=None, raw: bytes | None = None, headers: dict | None = None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        c.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        payload = r.read()
        c.close()
        if r.getheader("Content-Type") == "text/event-stream":
            return r.status, [json.loads(x[6:]) if x[6:] != "[DONE]" else "[DONE]"
                              for x in payload.decode().split("\n\n") if x.startswith("data: ")]
        return r.status, json.loads(payload)

    def chat(self, prompt: str, **kw):
        return self.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **kw})


@contextlib.contextmanager
def serving(llm: LLM, **kw):
    """A Server over ``llm`` on a free port, in a thread: (server, client); shut down after."""
    server = Server(("127.0.0.1", 0), llm, model_name="tiny", **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server, Client(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served(model):
    with serving(new_llm(model), default_max_tokens=12) as (server, client):
        yield server, client


def test_responses_are_the_engines_outputs(served, model):
    server, client = served
    ref = new_llm(model)
    for mode in ("auto", "long", "short"):
        want = ref.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12), thinking_mode=mode,
                            use_tqdm=False)[0]
        status, r = client.chat(PROMPTS[0], temperature=0, thinking_mode=mode, model="tiny")
        assert status == 200, r
        c, w = r["choices"][0], want.outputs[0]
        assert c["message"] == {"role": "assistant", "content": w.answer, "reasoning_content": w.thinking or None}
        assert (c["finish_reason"], c["thinking_mode"], c["mode"], c["num_thinking_tokens"]) == \
            (w.finish_reason, mode, w.mode, w.num_thinking_tokens)
        assert r["usage"]["completion_tokens"] == len(w.token_ids) and r["usage"]["prompt_tokens"] == \
            len(want.prompt_token_ids) + len(ref.mode_suffix_ids(mode))  # the mode suffix is prompt too
        assert r["object"] == "chat.completion" and r["model"] == "tiny"
        # streamed: the deltas add up to the same message
        status, chunks = client.chat(PROMPTS[0], temperature=0, thinking_mode=mode, stream=True,
                                     stream_options={"include_usage": True})
        assert status == 200 and chunks[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        deltas = [ch["choices"][0]["delta"] for ch in chunks[:-1] if ch["choices"]]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == w.thinking
        assert "".join(d.get("content", "") for d in deltas) == w.answer
        last = [ch for ch in chunks[:-1] if ch["choices"]][-1]["choices"][0]
        assert last["finish_reason"] == w.finish_reason and last["delta"]["mode"] == w.mode
        # the same prompt again: its full blocks come from the prefix cache (the last token is always computed)
        cached = chunks[-2]["usage"].pop("prompt_tokens_details")["cached_tokens"]
        assert cached == (r["usage"]["prompt_tokens"] - 1) // 8 * 8 > 0
        # the first plain request found nothing; the later modes' share the chat's full blocks (not the suffix)
        shared = 0 if mode == "auto" else len(want.prompt_token_ids) // 8 * 8
        assert r["usage"].pop("prompt_tokens_details")["cached_tokens"] == shared
        assert chunks[-2]["usage"] == r["usage"]
    status, r = client.chat(PROMPTS[1], temperature=0, chat_template_kwargs={"enable_thinking": False}, n=2)
    assert status == 200 and [c["thinking_mode"] for c in r["choices"]] == ["short", "short"]
    assert all(c["message"]["reasoning_content"] is None for c in r["choices"])


def test_logprobs_are_the_engines_and_their_bytes_spell_the_completion(served, model):
    """logprobs / top_logprobs: one entry per generated token (the thought's included), the engine's log-probs and
    top alternatives; each entry's bytes, joined, are the completion's text; streamed, the entries arrive in order
    and are the same."""
    server, client = served
    ref = new_llm(model)
    for mode, top in (("long", 3), ("short", 0)):
        want = ref.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, logprobs=top or None),
                            thinking_mode=mode, use_tqdm=False)[0].outputs[0]
        status, r = client.chat(PROMPTS[0], temperature=0, thinking_mode=mode, logprobs=True, top_logprobs=top)
        assert status == 200, r
        content = r["choices"][0]["logprobs"]["content"]
        assert len(content) == len(want.token_ids) > 0
        for i, e in enumerate(content):
            assert e["logprob"] == pytest.approx(want.logprobs[i], abs=1e-5)
            assert e["token"] == bytes(e["bytes"]).decode("utf-8", errors="replace")
            assert len(e["top_logprobs"]) == top
            if top:
                alts = list(want.top_logprobs[i].items())
                assert [x["logprob"] for x in e["top_logprobs"]] == pytest.approx([v for _, v in alts], abs=1e-5)
                assert [bytes(x["bytes"]) for x in e["top_logprobs"]] == [TOK.token_bytes(t) for t, _ in alts]
        # (a random model emits stray UTF-8 pieces: both sides replace them the same way)
        assert b"".join(bytes(e["bytes"]) for e in content).decode(errors="replace") == TOK.decode(want.token_ids)
        status, chunks = client.chat(PROMPTS[0], temperature=0, thinking_mode=mode, logprobs=True, top_logprobs=top,
                                     stream=True)
        assert status == 200
        streamed = [e for ch in chunks[:-1] for c in ch.get("choices", []) for e in
                    (c.get("logprobs") or {}).get("content", [])]
        # the same entries (the repeated prompt came from the prefix cache: log-probs within fp32 rounding)
        assert len(streamed) == len(content)
        for a, b in zip(streamed, content, strict=True):
            assert (a["token"], a["bytes"]) == (b["token"], b["bytes"]) and a["logprob"] == pytest.approx(b["logprob"],
                                                                                                      abs=1e-5)
            assert [x["bytes"] for x in a["top_logprobs"]] == [x["bytes"] for x in b["top_logprobs"]]
    status, r = client.chat(PROMPTS[0], temperature=0)
    assert status == 200 and "logprobs" not in r["choices"][0]


def test_concurrent_clients_get_their_own_answers(served, model):
    server, client = served
    ref = new_llm(model)
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=9)
    want = {p: ref.generate([p], params, use_tqdm=False)[0].outputs[0].answer for p in PROMPTS}
    got, errors = {}, []

    def ask(p):
        try:
            status, r = client.chat(p, temperature=1.0, max_tokens=12, seed=9)
            got[p] = (status, r["choices"][0]["message"]["content"])
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == {p: (200, want[p]) for p in PROMPTS}
    assert server.engine.llm.blocks.num_free_blocks == server.engine.llm.blocks.num_blocks


def test_bad_requests_are_refused_with_the_field(served):
    server, client = served
    assert client.request("GET", "/health") == (200, {"status": "ok"})
    status, models = client.request("GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny"
    assert client.request("GET", "/v2/nothing")[0] == 404
    status, r = client.request("POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "not JSON" in r["error"]["message"]
    status, r = client.chat("hi", thinking_mode="sideways")
    assert status == 400 and r["error"]["param"] == "thinking_mode"
    status, r = client.chat("hi", temperature=-2)
    assert status == 400 and r["error"]["param"] == "temperature"
    status, r = client.chat("hi", model="gpt-4")
    assert status == 404 and r["error"]["param"] == "model"
    status, r = client.chat("word " * 600)  # longer than the model (512 positions): the engine refuses it
    assert status == 400 and "max_model_len" in r["error"]["message"]
    status, r = client.chat("word " * 600, stream=True)
    assert status == 400 and "max_model_len" in r["error"]["message"]
    status, r = client.chat("hi", n=10_000)  # more completions than the engine's seats
    assert status == 400 and r["error"]["param"] == "n"
    bomb = io.BytesIO()  # a PNG that claims to be 20000 x 20000: refused, not a dropped connection
    from PIL import Image

    Image.new("L", (1, 1)).save(bomb, format="PNG")
    raw = bytearray(bomb.getvalue())
    raw[16:24] = (20000).to_bytes(4, "big") * 2  # the IHDR width and height
    url = "data:image/png;base64," + base64.b64encode(bytes(raw)).decode()
    status, r = client.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]})
    assert status == 400 and r["error"]["param"] == "messages", r
    # a keep-alive connection survives a 404 on a POST (its body was read) and refuses a bad Content-Length
    c = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)
    for path, want in (("/v1/embeddings", 404), ("/v1/chat/completions", 200)):
        c.request("POST", path, body=json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        resp = c.getresponse()
        resp.read()
        assert resp.status == want
    c.close()
    c = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)
    c.putrequest("POST", "/v1/chat/completions")
    c.putheader("Content-Length", "-1")
    c.endheaders()
    resp = c.getresponse()
    assert resp.status == 400 and "Content-Length" in json.loads(resp.read())["error"]["message"]
    c.close()
    assert client.chat("hi", temperature=0)[0] == 200  # and the server goes on


def test_a_failing_engine_step_gives_500_and_the_server_goes_on(served, monkeypatch):
    server, client = served
    llm = server.engine.llm
    real = llm._step
    calls = []

    def fail_once():
        if not calls:
            calls.append(1)
            raise RuntimeError("device lost")
        return real()

    monkeypatch.setattr(llm, "_step", fail_once)
    status, r = client.chat("hi")
    assert status == 500 and "device lost" in r["error"]["message"]
    assert client.chat("hi", temperature=0)[0] == 200
    for stream in (False, True):  # a text completion's failed step is the server's fault too (the client may retry)
        calls.clear()
        status, r = client.request("POST", "/v1/completions", {"prompt": ["a", "b"], "stream": stream}
                                   if not stream else {"prompt": "a", "stream": True})
        assert status == 500 and r["error"]["type"] == "server_error" and "device lost" in r["error"]["message"]
    assert client.request("POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200
    # a failure in the engine loop itself (here: building an output) is a 500 too, streamed or not
    real_output = llm._output
    broken = []

    def output_fails_once(req):
        if len(broken) < 2:
            broken.append(1)
            raise KeyError("boom")
        return real_output(req)

    monkeypatch.setattr(llm, "_output", output_fails_once)
    status, r = client.chat("hi", max_tokens=2)
    assert status == 500 and "boom" in r["error"]["message"] and r["error"]["type"] == "server_error"
    status, chunks = client.chat("hi", max_tokens=2, stream=True)
    assert status == 200 and any("error" in ch and "boom" in ch["error"]["message"] for ch in chunks if ch != "[DONE]")
    assert client.chat("hi", temperature=0)[0] == 200
    assert server.engine.llm.blocks.num_free_blocks == server.engine.llm.blocks.num_blocks


def test_text_completions_are_the_engines_outputs(served, model):
    """/v1/completions: prompts (text or token ids, several at once) run as given, n choices each at index
    prompt * n + sample; echo puts the prompt first, logprobs=k gives the tokens, their log-probs (the prompt's
    too with echo: the first one None), k alternatives and text offsets; streamed deltas add up to the same."""
    server, client = served
    ref = new_llm(model)
    text, ids = "The answer to 3 + 4 is", TOK.encode("Count: 1 2 3")
    status, r = client.request("POST", "/v1/completions", {"prompt": [text, ids], "temperature": 0.8, "seed": 5,
                                                          "n": 2, "max_tokens": 6, "model": "tiny"})
    assert status == 200, r
    want = ref.generate([TOK.encode(text), ids], SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=6),
                        use_tqdm=False)
    assert r["object"] == "text_completion" and [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in r["choices"]] == [c.text for w in want for c in w.outputs]
    assert [c["finish_reason"] for c in r["choices"]] == [c.finish_reason for w in want for c in w.outputs]
    assert all(c["logprobs"] is None for c in r["choices"])
    assert r["usage"]["prompt_tokens"] == len(TOK.encode(text)) + len(ids)
    assert r["usage"]["completion_tokens"] == sum(len(c.token_ids) for w in want for c in w.outputs)

    # a logit bias of 100 takes over greedy decoding; its log-probs stay the model's
    status, r = client.request("POST", "/v1/completions", {"prompt": ids, "temperature": 0, "max_tokens": 3,
                                                          "logprobs": 0, "logit_bias": {"77": 100}})
    w = ref.generate([ids], SamplingParams(temperature=0, max_tokens=3, logit_bias={77: 100}), use_tqdm=False)[0]
    assert status == 200 and w.outputs[0].token_ids == [77, 77, 77]
    assert r["choices"][0]["logprobs"]["tokens"] == [TOK.token_bytes(77).decode()] * 3
    assert r["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(w.outputs[0].logprobs, abs=1e-6)
    assert max(w.outputs[0].logprobs) < -1  # the model alone would not pick it

    # echo + logprobs: a loglikelihood request (what evaluation harnesses send)
    status, r = client.request("POST", "/v1/completions", {"prompt": text, "temperature": 0, "max_tokens": 3,
                                                          "echo": True, "logprobs": 2})
    assert status == 200, r
    w = ref.generate([TOK.encode(text)], SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=2),
                     use_tqdm=False)[0]
    c, lp = r["choices"][0], r["choices"][0]["logprobs"]
    assert c["text"] == text + w.outputs[0].text
    all_ids = w.prompt_token_ids + w.outputs[0].token_ids
    assert lp["tokens"] == [TOK.token_bytes(t).decode("utf-8", errors="replace") for t in all_ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]),
                               torch.tensor(w.prompt_logprobs[1:] + w.outputs[0].logprobs), atol=1e-6, rtol=0)
    tops = w.prompt_top_logprobs[1:] + w.outputs[0].top_logprobs
    assert [len(t) for t in lp["top_logprobs"][1:]] == [len(t) for t in tops]
    for got, top in zip(lp["top_logprobs"][1:], tops, strict=True):
        assert max(got.values()) == pytest.approx(max(top.values()), abs=1e-6)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    for tok_text, off in zip(lp["tokens"], lp["text_offset"], strict=True):
        assert c["text"][off:].startswith(tok_text)

    # streamed, n=2, with logprobs and usage
    body = {"prompt": text, "temperature": 0.9, "seed": 3, "n": 2, "max_tokens": 8, "logprobs": 1, "stream": True,
            "stream_options": {"include_usage": True}}
    status, chunks = client.request("POST", "/v1/completions", body)
    assert status == 200 and chunks[-1] == "[DONE]"
    plain = client.request("POST", "/v1/completions", {**body, "stream": False})[1]
    for i in range(2):
        mine = [ch["choices"][0] for ch in chunks[:-1] if ch["choices"] and ch["choices"][0]["index"] == i]
        assert "".join(m["text"] for m in mine) == plain["choices"][i]["text"]
        assert [x for m in mine if m["logprobs"] for x in m["logprobs"]["token_logprobs"]] == \
            plain["choices"][i]["logprobs"]["token_logprobs"]
        assert mine[-1]["finish_reason"] == plain["choices"][i]["finish_reason"]
    assert chunks[-2]["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    # echo streamed: the prompt comes first
    status, chunks = client.request("POST", "/v1/completions", {"prompt": ids, "temperature": 0, "max_tokens": 4,
                                                               "echo": True, "stream": True})
    got = "".join(ch["choices"][0]["text"] for ch in chunks[:-1] if ch["choices"])
    assert status == 200 and got == TOK.decode(ids) + ref.generate(
        [ids], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0].outputs[0].text


def test_text_completion_errors(served):
    server, client = served
    for body, param in (({}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"),
                        ({"prompt": [1, -2]}, "prompt"), ({"prompt": [["a"]]}, "prompt"), ({"prompt": 7}, "prompt"),
                        ({"prompt": ["a", "b"], "stream": True}, "prompt"),
                        ({"prompt": "a", "stream": True, "echo": True, "logprobs": 1}, "echo"),
                        ({"prompt": "a", "best_of": 3}, "best_of"), ({"prompt": "a", "suffix": "z"}, "suffix"),
                        ({"prompt": "a", "logit_bias": {"1000000000": 5}}, None),  # past the vocabulary: the engine
                        ({"prompt": "a", "logprobs": 21}, "logprobs"), ({"prompt": "a", "echo": "yes"}, "echo"),
                        ({"prompt": "a", "max_tokens": 0}, "max_tokens"), ({"prompt": "a", "top_p": 0}, "top_p"),
                        ({"prompt": ["ok", [10 ** 9]]}, "prompt")):  # an unknown token id: the engine refuses it
        status, r = client.request("POST", "/v1/completions", body)
        assert status == 400 and r["error"]["param"] == param, (body, r)
    status, r = client.request("POST", "/v1/completions", {"prompt": "a", "model": "other"})
    assert status == 404 and r["error"]["param"] == "model"
    assert client.request("POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200  # still serving
    assert server.engine.llm.blocks.num_free_blocks == server.engine.llm.blocks.num_blocks


def test_metrics_count_responses_and_the_engine(model):
    """GET /metrics (Prometheus text): responses by route and status, the engine's token counters and gauges."""
    server = Server(("127.0.0.1", 0), new_llm(model), model_name="tiny", default_max_tokens=5, api_key="k")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = Client(server.server_address[1])
    ok = {"Authorization": "Bearer k"}
    try:
        done = 0
        for _ in range(2):
            status, r = client.request("POST", "/v1/completions", {"prompt": "a", "max_tokens": 5, "temperature": 0},
                                       headers=ok)
            assert status == 200
            done += r["usage"]["completion_tokens"]
        assert client.request("POST", "/v1/completions", {"prompt": ""}, headers=ok)[0] == 400
        assert client.request("GET", "/v1/models")[0] == 401
        c = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)
        c.request("GET", "/metrics")  # open, like /health
        resp = c.getresponse()
        text = resp.read().decode()
        c.close()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
        values = {}
        for line in text.splitlines():
            if not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
            else:
                assert line.startswith(("# HELP r4b_", "# TYPE r4b_"))
        assert values['r4b_http_responses_total{route="/v1/completions",code="200"}'] == 2
        assert values['r4b_http_responses_total{route="/v1/completions",code="400"}'] == 1
        assert values['r4b_http_responses_total{route="/v1/models",code="401"}'] == 1
        assert values["r4b_generated_tokens_total"] == done > 0
        assert values["r4b_prefix_cache_hit_tokens_total"] == 0  # a one-token prompt: nothing to cache
        assert values["r4b_requests_running"] == values["r4b_requests_waiting"] == 0
        llm = server.engine.llm
        assert values['r4b_kv_blocks{state="all"}'] == llm.blocks.num_blocks
        assert values['r4b_kv_blocks{state="free"}'] == llm.blocks.num_free_blocks
    finally:
        server.shutdown()
        server.server_close()


def test_an_api_key_guards_the_v1_routes(model):
    server = Server(("127.0.0.1", 0), new_llm(model), model_name="tiny", default_max_tokens=4, api_key="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = Client(server.server_address[1])
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    try:
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer s3cre"}):
            for method, path, b in (("POST", "/v1/chat/completions", body), ("GET", "/v1/models", None)):
                status, r = client.request(method, path, b, headers=headers)
                assert status == 401 and r["error"]["code"] == "invalid_api_key", (headers, path)
        ok = {"Authorization": "Bearer s3cret"}
        status, r = client.request("POST", "/v1/chat/completions", body, headers=ok)
        assert status == 200 and r["choices"][0]["message"]["role"] == "assistant"
        assert client.request("GET", "/v1/models", headers={"Authorization": "bearer  s3cret"})[0] == 200
        assert client.request("GET", "/health")[0] == 200  # a load balancer's probe needs no key
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match="api_key"):
        Server(("127.0.0.1", 0), new_llm(model), api_key="  ")


def test_an_api_key_read_with_a_newline_and_a_client_without_it(model):
    """A key from a file (its trailing newline) still matches; a client without the key gets 401 before its body is
    read (a bad or huge body is not looked at) and the connection closes."""
    server = Server(("127.0.0.1", 0), new_llm(model), model_name="tiny", default_max_tokens=4, api_key="k2\n")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = Client(server.server_address[1])
    try:
        assert client.request("POST", "/v1/completions", {"prompt": "a"}, headers={"Authorization": "Bearer k2"})[0] \
            == 200
        status, r = client.request("POST", "/v1/completions", raw=b"{not json")
        assert status == 401 and r["error"]["code"] == "invalid_api_key"
        c = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)
        c.putrequest("POST", "/v1/chat/completions")
        c.putheader("Content-Length", str(64 * 2**20))  # announced, never sent
        c.endheaders()
        resp = c.getresponse()
        assert resp.status == 401 and resp.getheader("Connection") == "close"
        resp.read()
        c.close()
        # a client that sends its whole (large) body before reading reads the 401 too: the server drops the body
        # it will not parse instead of closing on it (which reset the connection: BrokenPipeError before)
        for body, chunked in ((b"x" * 24 * 2**20, False), (iter([b"y" * 2**20] * 16), True)):
            c = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)
            c.request("POST", "/v1/chat/completions", body=body, encode_chunked=chunked,
                      headers={"Transfer-Encoding": "chunked"} if chunked else {})
            resp = c.getresponse()
            assert resp.status == 401 and json.loads(resp.read())["error"]["code"] == "invalid_api_key"
            c.close()
        # Expect: 100-continue without the key: the 401 comes instead of the 100, before any of the body is sent
        with socket.create_connection(("127.0.0.1", client.port), timeout=10) as raw:
            raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n"
                        b"Expect: 100-continue\r\n\r\n")
            head = raw.recv(4096)
            assert head.startswith(b"HTTP/1.1 401") and b"100 Continue" not in head
        with socket.create_connection(("127.0.0.1", client.port), timeout=10) as raw:  # with the key: the 100
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k2\r\n"
                        b"Content-Length: 2\r\nExpect: 100-continue\r\n\r\n")
            assert raw.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        c = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)  # the key, but a chunked body: 400
        c.request("POST", "/v1/chat/completions", body=iter([b"z" * 2**20] * 16), encode_chunked=True,
                  headers={"Authorization": "Bearer k2", "Transfer-Encoding": "chunked"})
        resp = c.getresponse()
        assert resp.status == 400 and "chunked request bodies are not read" in json.loads(resp.read())["error"][
            "message"]
        c.close()
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("high_fd", [False, True])
def test_client_gone_tells_a_close_from_data(high_fd):
    """A connection with a pending request (data) is not gone; one the peer closed is. high_fd: the server's socket
    on a descriptor above 1023, where select() raises (a busy server has such descriptors)."""
    ours, peer = socket.socketpair()
    if high_fd:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard <= 1500:
            pytest.skip(f"the descriptor limit ({hard}) is too low for a descriptor above 1023")
        if soft <= 1500:
            resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
        fd = os.dup2(ours.fileno(), 1500)
        ours.close()
        ours = socket.socket(fileno=fd)
        assert ours.fileno() >= 1024
    try:
        assert not client_gone(ours)  # open, nothing sent
        peer.sendall(b"GET / HTTP/1.1\r\n")
        assert not client_gone(ours) and not client_gone(ours)  # data waiting: peeked, not consumed
        assert ours.recv(100).startswith(b"GET")
        peer.close()
        assert client_gone(ours)
    finally:
        ours.close()
        peer.close()
    assert client_gone(ours)  # closed on this side too


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_has_its_request_aborted(model, stream):
    """Streamed: the next write fails. Plain: nothing is written until the end, so the waiting handler watches the
    connection and notices the close."""
    llm = new_llm(model, eos_token_ids=())  # never stops early: it would run to the model's 512 positions
    real_step = llm.step
    llm.step = lambda: time.sleep(0.005) or real_step()  # 480 tokens take seconds: the close comes mid-request
    server = Server(("127.0.0.1", 0), llm, model_name="tiny", disconnect_poll=0.05)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    aborted = []
    real_abort = llm.abort
    llm.abort = lambda rid: aborted.append(rid) or real_abort(rid)
    try:
        c = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 480, "stream": stream,
                "thinking_mode": "short"}
        c.request("POST", "/v1/chat/completions", body=json.dumps(body).encode())
        if stream:
            r = c.getresponse()
            assert r.status == 200
            r.fp.read(200)  # a few chunks, then the client goes away
        else:
            deadline = time.time() + 60
            while not llm.running and time.time() < deadline:  # running, then the client goes away
                time.sleep(0.01)
            assert llm.running
        c.sock.close()
        c.close()
        deadline = time.time() + 60
        while (not aborted or llm.has_unfinished()) and time.time() < deadline:
            time.sleep(0.05)
        assert len(aborted) == 1 and not llm.has_unfinished()
        time.sleep(0.1)  # the engine thread finishes its turn
        assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
    finally:
        server.shutdown()
        server.server_close()


def test_cli_serve(tmp_path):
    model_dir = make_model_dir(tmp_path / "model", seed=1)
    env = {**os.environ, "R4B_BACKEND": "torch", "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "r4b.cli", "serve", str(model_dir), "--port", "0", "--device", "cpu",
                          "--served-model-name", "m", "--max-tokens", "5"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**env, "R4B_API_KEY": "k1"})
    try:
        line = p.stdout.readline()
        assert "r4b serve: m on http://127.0.0.1:" in line, line + p.stderr.read()
        assert "an API key is required" in line  # from $R4B_API_KEY
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert Client(port).chat("hi", temperature=0)[0] == 401
        status, r = Client(port).request("POST", "/v1/chat/completions", {"messages": [
            {"role": "user", "content": "hi"}], "temperature": 0}, headers={"Authorization": "Bearer k1"})
        assert status == 200 and r["usage"]["completion_tokens"] <= 5 and r["model"] == "m"
    finally:
        p.terminate()
        p.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "r4b.cli", "serve", str(tmp_path / "nowhere")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "r4b serve:" in bad.stderr


@pytest.mark.gpu
def test_gpu_server_with_cuda_graphs_matches_generate(monkeypatch):
    """On a GPU in fp32 (TF32 off) the engine thread runs the default kernels and captures its decode graphs itself;
    concurrent clients get the greedy answers of a generate call in the main thread on the same weights."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = tiny_model(6).cuda()
    params = SamplingParams(temperature=0, max_tokens=16)
    ref = LLM(model, TOK, num_kv_blocks=64, block_size=16, cuda_graphs=True)
    want = {p: ref.generate([p], params, thinking_mode="long", use_tqdm=False)[0].outputs[0] for p in PROMPTS}
    del ref
    server = Server(("127.0.0.1", 0), LLM(model, TOK, num_kv_blocks=64, block_size=16, cuda_graphs=True),
                    model_name="tiny")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client, got = Client(server.server_address[1]), {}
    try:
        threads = [threading.Thread(target=lambda p=p: got.__setitem__(p, client.chat(
            p, temperature=0, max_tokens=16, thinking_mode="long"))) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        for p in PROMPTS:
            status, r = got[p]
            assert status == 200, r
            msg = r["choices"][0]["message"]
            assert (msg["content"], msg["reasoning_content"] or "") == (want[p].answer, want[p].thinking)
        assert server.engine.llm.stats["graph_steps"] > 0
    finally:
        server.shutdown()
        server.server_close()
