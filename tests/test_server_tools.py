"""Tool calling through the engine and the server: tools rendered into the prompt, the answers' <tool_call> blocks
returned as OpenAI tool_calls (plain and streamed), tool results sent back in the history.

A tiny random model cannot call a tool by itself, so the tests script its outputs: each request's completions are
forced to a given text (the engine's forced-token path, the one that closes a thought at a budget), everything else
(sampling the forced tokens, streaming, parsing, the HTTP layer) is the real path."""

from __future__ import annotations

import json
import random

import pytest
from test_llm import TOK, tiny_model
from test_server import new_llm, serving
from tiny_models import torch_kernels_on_cpu  # noqa: F401  (fixture)

from r4b.engine.chat import ToolCall, parse_tool_calls
from r4b.engine.llm import LLM
from r4b.engine.sampling import SamplingParams
from r4b.engine.server import BadRequest, ToolCallStream, parse_chat_request

pytestmark = pytest.mark.usefixtures("torch_kernels_on_cpu")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS = [WEATHER]
ASK = [{"role": "user", "content": "Weather in Paris and Rome?"}]
CALL_P = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_R = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'


SET_UNIT = {"type": "function", "function": {"name": "set_unit", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"]}}}
SET_MODE = {"type": "function", "function": {"name": "set_mode", "parameters": {
    "type": "object", "properties": {"mode": {"enum": ["on", "off"]}, "loud": {"type": "boolean"}},
    "required": ["mode"]}}}


@pytest.fixture(scope="module")
def model():
    return tiny_model(5, max_position_embeddings=2048)


def script(llm: LLM, texts: list[str], end: bool = True) -> None:
    """Each request added from now on generates the next of ``texts`` (then its end of turn, with ``end``), all its
    completions alike (after what the request itself forces at its start: an answer prefix)."""
    queue = list(texts)
    set_budget = llm._set_budget

    def scripted(req, *args, **kw):
        set_budget(req, *args, **kw)
        if req.error is None and queue:
            ids = TOK.encode(queue.pop(0)) + ([TOK.im_end_id] if end else [])
            for seq in req.seqs:
                seq.forced.extend(ids)

    llm._set_budget = scripted


# ------------------------------------------------------------------------------------------------- the engine


def test_generate_renders_tools_and_parses_the_calls(model):
    llm = new_llm(model)
    script(llm, ["\n\n</think>\n\nChecking both.\n" + CALL_P + "\n" + CALL_R,
                 "Look it up.\n</think>\n\nRome is sunny.", CALL_P])
    params = SamplingParams(temperature=0, max_tokens=400)
    outs = llm.generate([ASK, ASK, ASK], params, tools=TOOLS, use_tqdm=False)
    want_prompt = TOK.encode_chat(ASK, "auto", tools=TOOLS).input_ids.tolist()[:-1]  # without the <think> suffix
    assert all(o.prompt_token_ids == want_prompt for o in outs)
    assert "# Tools" in TOK.decode(outs[0].prompt_token_ids)
    first = outs[0].outputs[0]
    assert (first.thinking, first.mode, first.finish_reason) == ("", "no_think", "stop")
    assert first.answer == "Checking both.\n" + CALL_P + "\n" + CALL_R  # the answer keeps the blocks
    assert first.tool_calls == [ToolCall("get_weather", {"city": "Paris"}), ToolCall("get_weather", {"city": "Rome"})]
    assert outs[1].outputs[0].tool_calls == []  # a thought, then a plain answer: no calls
    assert (outs[1].outputs[0].thinking, outs[1].outputs[0].answer) == ("Look it up.", "Rome is sunny.")
    # a call inside an unfinished thought is no call (only the answer is parsed)
    assert outs[2].outputs[0].thinking == CALL_P and outs[2].outputs[0].tool_calls == []
    # without tools nothing is parsed, and the prompt has no tools block
    plain = llm.generate([ASK], params, use_tqdm=False)[0]
    assert plain.outputs[0].tool_calls is None and len(plain.prompt_token_ids) < len(want_prompt)
    # a token-id request cannot take tools: that request is reported and skipped, the others run
    outs = llm.generate([[5, 6, 7], ASK], SamplingParams(temperature=0, max_tokens=3), tools=TOOLS, use_tqdm=False)
    assert "tools apply to chats" in outs[0].error and outs[1].error is None
    with pytest.raises(ValueError, match=r"tools\[0\] must be a JSON object"):
        llm.generate([ASK], params, tools=["get_weather"], use_tqdm=False)
    with pytest.raises(ValueError, match="tools need the LLM's tokenizer"):
        LLM(model, None, num_kv_blocks=64, block_size=8).generate([[5, 6]], params, tools=TOOLS, use_tqdm=False)


@pytest.mark.parametrize("mode", ["short", "auto"])
def test_answer_prefix_is_forced_after_the_thought(model, mode):
    llm = new_llm(model)
    prefix = "The answer is"
    params = SamplingParams(temperature=0, max_tokens=40, n=2, seed=1)
    out = llm.generate([ASK], params, thinking_mode=mode, answer_prefix=prefix, max_thinking_tokens=3,
                       use_tqdm=False)[0]
    ref = llm.generate([ASK], params, thinking_mode=mode, max_thinking_tokens=3, use_tqdm=False)[0]
    for c, r in zip(out.outputs, ref.outputs, strict=True):
        assert c.answer.startswith(prefix) and c.finish_reason == "length"
        head = TOK.encode(prefix)
        if mode == "short":  # no thought open: the prefix is the first generated tokens
            assert c.token_ids[:len(head)] == head
        else:  # the budget's forced end of thought, then the prefix; the thought is the one without a prefix
            k = c.token_ids.index(TOK.end_think_id)
            assert c.token_ids[k + 2:k + 2 + len(head)] == head and c.thinking == r.thinking
            assert c.token_ids[:k] == r.token_ids[:k]
    # a thought the model closes itself: "\n\n" + the prefix follow its </think>
    llm = new_llm(model)
    script(llm, ["Hmm.</think>"], end=False)
    c = llm.generate([ASK], SamplingParams(temperature=0, max_tokens=30), thinking_mode="long",
                     answer_prefix=prefix, use_tqdm=False)[0].outputs[0]
    assert c.text.startswith("Hmm.</think>\n\n" + prefix) and c.thinking == "Hmm." and c.answer.startswith(prefix)
    with pytest.raises(ValueError, match="answer_prefix must be None or a str"):
        llm.generate([ASK], params, answer_prefix=3, use_tqdm=False)


# ------------------------------------------------------------------------------------------------- parsing


def test_parse_chat_request_tools_fields_and_errors():
    history = [*ASK, {"role": "assistant", "content": None, "reasoning_content": "two calls",
                      "tool_calls": [{"id": "c1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}]}]
    r = parse_chat_request({"messages": history, "tools": TOOLS})
    assert r.tools == TOOLS and r.parallel_tool_calls
    assert r.messages[1] == {"role": "assistant", "content": "", "reasoning_content": "two calls", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert r.messages[2] == {"role": "tool", "content": "sunny"}
    assert parse_chat_request({"messages": ASK, "tools": TOOLS, "tool_choice": "none"}).tools is None
    assert parse_chat_request({"messages": ASK, "tools": TOOLS, "tool_choice": "auto",
                               "parallel_tool_calls": False}).parallel_tool_calls is False
    assert parse_chat_request({"messages": ASK, "tools": []}).tools is None
    assert parse_chat_request({"messages": ASK, "tools": TOOLS}).tool_choice is None
    r = parse_chat_request({"messages": ASK, "tools": TOOLS, "tool_choice": "required"})
    assert r.tools == TOOLS and r.tool_choice == "required"
    r = parse_chat_request({"messages": ASK, "tools": TOOLS,
                            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert r.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    # a tool may be called "none" or "required": the name goes on in the dict form, not as the keyword
    odd = [{"type": "function", "function": {"name": n}} for n in ("none", "required")]
    for n in ("none", "required"):
        r = parse_chat_request({"messages": ASK, "tools": odd, "tool_choice": {"type": "function",
                                                                              "function": {"name": n}}})
        assert r.tool_choice == {"type": "function", "function": {"name": n}} and r.tools == odd
    for tools, param in (([{"type": "function", "function": {"name": "\ud800"}}], "tools"),
                         ([SET_UNIT, SET_UNIT], "tools")):
        with pytest.raises(BadRequest) as e:
            parse_chat_request({"messages": ASK, "tools": tools, "tool_choice": "required"})
        assert e.value.param == param, str(e.value)
    with pytest.raises(BadRequest) as e:
        parse_chat_request({"messages": ASK, "tools": TOOLS, "tool_choice": "required", "stop": ["\n"]})
    assert e.value.param == "stop"
    bad_params = [{"type": "function", "function": {"name": "f", "parameters": {"allOf": [{}]}}}]
    with pytest.raises(BadRequest, match="tools\\[0\\] \\(f\\).parameters: .*allOf") as e:
        parse_chat_request({"messages": ASK, "tools": bad_params, "tool_choice": "required"})
    assert e.value.param == "tools"
    assert parse_chat_request({"messages": ASK, "tools": bad_params}).tools == bad_params  # auto: not compiled
    bad_call = [*ASK, {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]},
                {"role": "user", "content": "?"}]
    for body, param in (({"messages": ASK, "tools": {"a": 1}}, "tools"),
                        ({"messages": ASK, "tools": [{"type": "function"}]}, "tools"),
                        ({"messages": ASK, "tools": [{"type": "code_interpreter"}]}, "tools"),
                        ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "f",
                                                                                      "parameters": []}}]}, "tools"),
                        ({"messages": ASK, "tools": TOOLS, "tool_choice": {"type": "function",
                                                                           "function": {"name": "get_time"}}},
                         "tool_choice"),
                        ({"messages": ASK, "tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
                        ({"messages": ASK, "tool_choice": "required"}, "tool_choice"),
                        ({"messages": ASK, "tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
                        ({"messages": ASK, "functions": [{"name": "f"}]}, "functions"),
                        ({"messages": ASK, "response_format": {"type": "json_schema"}}, "response_format"),
                        ({"messages": ASK, "response_format": "json"}, "response_format"),
                        ({"messages": ASK, "tools": TOOLS, "response_format": {"type": "json_object"}},
                         "response_format"),
                        ({"messages": bad_call}, "messages"),
                        ({"messages": [{"role": "tool", "content": [{"type": "image_url"}]}]}, "messages")):
        with pytest.raises(BadRequest) as e:
            parse_chat_request(body)
        assert e.value.param == param, (body, str(e.value))


def test_tool_call_stream_sends_a_prefix_of_the_final_parse():
    answer = "Checking.\n" + CALL_P + "\n" + CALL_R + "\nDone <tool_call>oops</tool_call>"
    for step in (1, 3, 7):
        ts = ToolCallStream()
        content, calls = "", []
        for k in range(0, len(answer), step):
            d, new = ts.feed(answer[k:k + step])
            content += d
            calls += new
        d, new = ts.finish(answer)
        content += d
        calls += new
        assert content == "Checking.\n\n\nDone <tool_call>oops</tool_call>" and not ts.diverged
        assert calls == [ToolCall("get_weather", {"city": "Paris"}), ToolCall("get_weather", {"city": "Rome"})]
    ts = ToolCallStream(parallel=False)
    assert ts.feed(CALL_P + CALL_R) == ("", [ToolCall("get_weather", {"city": "Paris"})])
    assert ts.finish(CALL_P + CALL_R) == ("", [])


def test_tool_call_stream_agrees_with_the_parse_on_random_answers():
    """Random answers of calls, broken blocks, partial tags and whitespace, streamed in random chunks: what the stream
    sends adds up to parse_tool_calls' content and calls, with parallel calls or without."""
    rng = random.Random(7)
    pieces = [CALL_P, CALL_R, "<tool_call>bad</tool_call>", "<tool_c", "<tool_call", " text ", "\n", "\n\n", "é",
              "</tool_call>", '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>', "<", "x"]
    for _ in range(3000):
        answer = "".join(rng.choice(pieces) for _ in range(rng.randrange(8)))
        if rng.random() < 0.3:
            answer += '<tool_call>{"name": "g"}'  # unclosed at the end
        for parallel in (True, False):
            ts = ToolCallStream(parallel)
            content, calls, k = "", [], 0
            while k < len(answer):
                n = rng.randrange(1, 6)
                d, new = ts.feed(answer[k:k + n])
                content, calls, k = content + d, calls + new, k + n
            d, new = ts.finish(answer)
            want_content, want_calls, _ = parse_tool_calls(answer)
            assert (content + d, calls + new) == (want_content, want_calls if parallel else want_calls[:1]), answer
            assert not ts.diverged


# ------------------------------------------------------------------------------------------------- the server


@pytest.fixture
def served(model):
    llm = new_llm(model)
    with serving(llm, default_max_tokens=400) as (server, client):
        yield server, llm, client


def _args(call: dict) -> tuple[str, dict]:
    assert call["type"] == "function" and call["id"].startswith("call_")
    return call["function"]["name"], json.loads(call["function"]["arguments"])


def test_server_returns_tool_calls(served):
    server, llm, client = served
    texts = ["\n\nTwo cities.\n</think>\n\nChecking both.\n" + CALL_P + "\n" + CALL_R,  # auto: inside a thought
             CALL_P + "\n" + CALL_R,  # short: the answer is the calls
             CALL_P + "\n" + CALL_R,  # parallel_tool_calls false
             "No tool needed.",
             CALL_P]  # tool_choice none: not parsed
    script(llm, texts)
    body = {"messages": ASK, "tools": TOOLS, "temperature": 0}
    status, r = client.request("POST", "/v1/chat/completions", body)
    assert status == 200, r
    c = r["choices"][0]
    assert c["finish_reason"] == "tool_calls" and c["message"]["content"] == "Checking both."
    assert c["message"]["reasoning_content"] == "Two cities."
    assert [_args(x) for x in c["message"]["tool_calls"]] == [("get_weather", {"city": "Paris"}),
                                                              ("get_weather", {"city": "Rome"})]
    ids = [x["id"] for x in c["message"]["tool_calls"]]
    assert len(set(ids)) == 2
    # the prompt holds the tools (its token count is the template's)
    prompt = TOK.encode_chat(ASK, "auto", tools=TOOLS).input_ids.numel()
    assert r["usage"]["prompt_tokens"] == prompt
    status, r = client.request("POST", "/v1/chat/completions", {**body, "thinking_mode": "short", "n": 2})
    assert status == 200 and len(r["choices"]) == 2
    for c in r["choices"]:
        assert c["message"]["content"] is None and len(c["message"]["tool_calls"]) == 2
    status, r = client.request("POST", "/v1/chat/completions", {**body, "parallel_tool_calls": False,
                                                                "thinking_mode": "short"})
    assert [_args(x) for x in r["choices"][0]["message"]["tool_calls"]] == [("get_weather", {"city": "Paris"})]
    status, r = client.request("POST", "/v1/chat/completions", {**body, "thinking_mode": "short"})
    c = r["choices"][0]
    assert c["finish_reason"] == "stop" and "tool_calls" not in c["message"]
    assert c["message"]["content"] == "No tool needed."
    status, r = client.request("POST", "/v1/chat/completions", {**body, "thinking_mode": "short",
                                                                "tool_choice": "none"})
    c = r["choices"][0]
    assert "tool_calls" not in c["message"] and c["message"]["content"] == CALL_P
    assert r["usage"]["prompt_tokens"] == TOK.encode_chat(ASK, "short").input_ids.numel()  # no tools block


def test_server_streams_tool_calls_as_the_plain_response_has_them(served):
    server, llm, client = served
    text = "\n\nThinking.\n</think>\n\nChecking <b>both</b>.\n" + CALL_P + "\n" + CALL_R + "\nAnd <tool_call>bad"
    script(llm, [text, text])
    body = {"messages": ASK, "tools": TOOLS, "temperature": 0, "logprobs": True}
    status, plain = client.request("POST", "/v1/chat/completions", body)
    assert status == 200
    status, chunks = client.request("POST", "/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and chunks[-1] == "[DONE]"
    deltas = [ch["choices"][0] for ch in chunks[:-1] if ch["choices"]]
    msg = plain["choices"][0]["message"]
    assert "".join(d["delta"].get("reasoning_content", "") for d in deltas) == msg["reasoning_content"]
    assert "".join(d["delta"].get("content") or "" for d in deltas) == msg["content"] == \
        "Checking <b>both</b>.\n\n\nAnd <tool_call>bad"
    streamed = [x for d in deltas for x in d["delta"].get("tool_calls", [])]
    assert [x["index"] for x in streamed] == [0, 1]
    assert [_args(x) for x in streamed] == [_args(x) for x in msg["tool_calls"]]
    assert deltas[-1]["finish_reason"] == plain["choices"][0]["finish_reason"] == "tool_calls"
    # every generated token's log-prob entry came along, in order
    entries = [e for d in deltas for e in (d.get("logprobs") or {}).get("content", [])]
    assert [e["token"] for e in entries] == [e["token"] for e in plain["choices"][0]["logprobs"]["content"]]
    assert len(entries) == len(TOK.encode(text)) + 1  # the forced text and its <|im_end|>


def test_tool_results_go_back_into_the_prompt(served):
    server, llm, client = served
    script(llm, ["Paris is sunny."])
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    status, r = client.request("POST", "/v1/chat/completions", {"messages": history, "tools": TOOLS,
                                                                "temperature": 0, "thinking_mode": "short"})
    assert status == 200, r
    assert r["choices"][0]["message"]["content"] == "Paris is sunny." and r["choices"][0]["finish_reason"] == "stop"
    want = TOK.apply_chat_template(history, "short", tools=TOOLS)
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in want
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in want
    assert r["usage"]["prompt_tokens"] == len(TOK.encode(want))


def _valid_call(call: ToolCall) -> bool:
    if call.name == "set_unit":
        return call.arguments in ({"unit": "celsius"}, {"unit": "fahrenheit"})
    return call.name == "set_mode" and call.arguments.get("mode") in ("on", "off") and \
        set(call.arguments) <= {"mode", "loud"} and isinstance(call.arguments.get("loud", True), bool)


@pytest.mark.parametrize("mode", ["short", "auto"])
def test_a_forced_call_is_one_valid_call(model, mode):
    """tool_choice "required" / a name: whatever this random model samples, the answer is one call of an offered
    tool whose arguments follow its parameters schema, then the end of the turn (auto: after its thought)."""
    llm = new_llm(model)
    params = SamplingParams(temperature=1.0, max_tokens=150, n=6, seed=3)
    for choice in ("required", "set_mode", {"type": "function", "function": {"name": "set_unit"}}):
        out = llm.generate([ASK], params, tools=[SET_UNIT, SET_MODE], tool_choice=choice, thinking_mode=mode,
                           max_thinking_tokens=2, use_tqdm=False)[0]
        names = set()
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text  # the grammar ends the turn within the budget
            assert len(c.tool_calls) == 1 and _valid_call(c.tool_calls[0]), c.answer
            assert parse_tool_calls(c.answer)[0] == ""  # nothing but the call
            names.add(c.tool_calls[0].name)
        want = {"set_unit", "set_mode"} if choice == "required" else {"set_mode"} if choice == "set_mode" \
            else {"set_unit"}
        assert names <= want
    with pytest.raises(ValueError, match="tool_choice: no tool is named 'nope'"):
        llm.generate([ASK], params, tools=[SET_UNIT], tool_choice="nope", use_tqdm=False)
    with pytest.raises(ValueError, match="needs tools"):
        llm.generate([ASK], params, tool_choice="required", use_tqdm=False)
    with pytest.raises(ValueError, match="stop strings could cut it"):
        llm.generate([ASK], SamplingParams(stop=["x"]), tools=[SET_UNIT], tool_choice="required", use_tqdm=False)
    with pytest.raises(ValueError, match="is not the start of the tool call"):
        llm.generate([ASK], params, tools=[SET_UNIT], tool_choice="required", answer_prefix="Sure", use_tqdm=False)
    with pytest.raises(ValueError, match="tool_choice must be"):
        llm.generate([ASK], params, tools=[SET_UNIT], tool_choice={"function": {}}, use_tqdm=False)
    with pytest.raises(ValueError, match="a second tool named 'set_unit'"):
        llm.generate([ASK], params, tools=[SET_UNIT, SET_UNIT], tool_choice="required", use_tqdm=False)
    with pytest.raises(ValueError, match="not a function tool with a name"):
        llm.generate([ASK], params, tools=[{"type": "x", "function": {"name": "f"}}], tool_choice="required",
                     use_tqdm=False)
    with pytest.raises(ValueError, match="cannot go with SamplingParams.response_format"):
        llm.generate([ASK], SamplingParams(response_format="json_object"), tools=[SET_UNIT], tool_choice="required",
                     use_tqdm=False)
    # "none": the tools stay out of the prompt
    none = llm.generate([ASK], SamplingParams(max_tokens=2), tools=[SET_UNIT], tool_choice="none", use_tqdm=False)[0]
    assert "# Tools" not in TOK.decode(none.prompt_token_ids)


def test_server_tool_choice_required_streams_one_valid_call(served):
    server, llm, client = served
    body = {"messages": ASK, "tools": [SET_UNIT, SET_MODE], "tool_choice": "required", "temperature": 1.0,
            "seed": 4, "n": 3, "thinking_mode": "short"}
    status, r = client.request("POST", "/v1/chat/completions", body)
    assert status == 200, r
    for c in r["choices"]:
        assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None
        (call,) = c["message"]["tool_calls"]
        assert _valid_call(ToolCall(*_args(call)))
    status, chunks = client.request("POST", "/v1/chat/completions", {**body, "stream": True})
    for c in r["choices"]:  # seeded: the stream makes the same calls
        deltas = [ch["choices"][0] for ch in chunks[:-1] if ch["choices"] and ch["choices"][0]["index"] == c["index"]]
        assert [_args(x) for d in deltas for x in d["delta"].get("tool_calls", [])] == \
            [_args(x) for x in c["message"]["tool_calls"]]
        assert deltas[0]["delta"] == {"role": "assistant", "content": None}  # OpenAI's tool-call streams
        assert not "".join(d["delta"].get("content") or "" for d in deltas)


def test_a_call_whose_argument_holds_the_closing_tag():
    """An argument string may hold "</tool_call>" (code, XML): the block ends at the first closing tag that makes it
    a call, in the parse and in the stream, and a forced call that writes one still comes back as that call."""
    args = {"code": "print('</tool_call>')", "n": 1}
    text = "Here.\n<tool_call>\n" + json.dumps({"name": "run", "arguments": args}) + "\n</tool_call>"
    assert parse_tool_calls(text) == ("Here.", [ToolCall("run", args)], 0)
    for step in (1, 5, 13):
        ts, content, calls = ToolCallStream(), "", []
        for k in range(0, len(text), step):
            d, new = ts.feed(text[k:k + step])
            content, calls = content + d, calls + new
        assert calls == [ToolCall("run", args)] and content == "Here." and ts.finish(text) == ("", [])
    # a block that no closing tag makes a call stays text up to its first one; numbers out of float range are no call
    assert parse_tool_calls("<tool_call>{\"a\": </tool_call> b </tool_call>")[0] == \
        "<tool_call>{\"a\": </tool_call> b </tool_call>"
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 1e999}}</tool_call>')[1] == []
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 10000000000000000000001}}</tool_call>')[1] \
        == [ToolCall("f", {"x": 10000000000000000000001})]
