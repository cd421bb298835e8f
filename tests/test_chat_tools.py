"""Tool calling in the chat template (Qwen3's, checked against its Jinja through transformers) and
parse_tool_calls."""

import json
import random
from pathlib import Path

import pytest

from r4b.engine.chat import DEMO_TOKENIZER, ChatTokenizer, ToolCall, parse_tool_calls

# Qwen3's chat template (tokenizer_config.json of the Qwen3 checkpoints), the reference r4b's renderer must match
# character for character; rendered by transformers' own chat-template code.
QWEN3_TEMPLATE = (Path(__file__).parent / "qwen3_chat_template.jinja").read_text()

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "description": "Search the web",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
TOOLS = [WEATHER, SEARCH]


@pytest.fixture(scope="module")
def tok():
    return ChatTokenizer.demo()


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    t = transformers.PreTrainedTokenizerFast(tokenizer_file=str(DEMO_TOKENIZER))
    t.chat_template = QWEN3_TEMPLATE
    return t


def _jinja(hf, messages, tools=None, add_generation_prompt=False, **kw) -> str:
    return hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
                                  **kw)


def _call(name, args, wrapped=True, as_string=False):
    args = json.dumps(args, ensure_ascii=False) if as_string else args
    fn = {"name": name, "arguments": args}
    return {"id": f"call_{name}", "type": "function", "function": fn} if wrapped else fn


AGENT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Weather in Zürich and in Paris?"},
    {"role": "assistant", "content": None, "reasoning_content": "\nTwo cities: two calls.\n",
     "tool_calls": [_call("get_weather", {"city": "Zürich"}), _call("get_weather", {"city": "Paris", "unit": "c"})]},
    {"role": "tool", "tool_call_id": "call_get_weather", "content": '{"temp": 3}'},
    {"role": "tool", "tool_call_id": "call_get_weather", "content": '{"temp": 7}'},
    {"role": "assistant", "content": "<think>\nBoth known.\n</think>\n\nZürich 3 °C, Paris 7 °C."},
]

CASES = {
    "tools, no system": ([{"role": "user", "content": "hi"}], TOOLS),
    "tools and system": (AGENT[:2], TOOLS),
    "agent loop": (AGENT, TOOLS),
    "agent loop, no tools offered": (AGENT, None),
    "content and string arguments": ([{"role": "user", "content": "find cats"},
                                      {"role": "assistant", "content": "Searching.",
                                       "tool_calls": [_call("search", {"q": "cats"}, as_string=True)]},
                                      {"role": "tool", "content": "many cats"}], [SEARCH]),
    "flat call, later system": ([{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "",
                                  "tool_calls": [_call("search", {"q": "x"}, wrapped=False)]},
                                 {"role": "tool", "content": "r"}, {"role": "system", "content": "Be brief."},
                                 {"role": "assistant", "content": "done"}], [SEARCH]),
    "multi-step: thoughts after the last query are kept": (
        [{"role": "user", "content": "plan"},
         {"role": "assistant", "content": "<think>step 1</think>",
          "tool_calls": [_call("search", {"q": "a"})]},
         {"role": "tool", "content": "A"},
         {"role": "assistant", "content": "ok", "tool_calls": [_call("search", {"q": "b", "n": [1, 2]})]},
         {"role": "tool", "content": "B"}], TOOLS),
    "a tool message first": ([{"role": "tool", "content": "orphan"}, {"role": "user", "content": "q"}], None),
    "empty tools list": ([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}], []),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tools_template_matches_qwen3_jinja(tok, hf, name):
    messages, tools = CASES[name]
    assert tok.apply_chat_template(messages, tools=tools, add_generation_prompt=False) == _jinja(hf, messages, tools)
    if messages[-1]["role"] != "assistant":
        # short mode is Qwen3's enable_thinking=False; auto / long add r4b's suffix to Qwen3's generation prompt
        base = _jinja(hf, messages, tools, add_generation_prompt=True)
        assert tok.apply_chat_template(messages, "short", tools=tools) == _jinja(
            hf, messages, tools, add_generation_prompt=True, enable_thinking=False)
        assert tok.apply_chat_template(messages, "auto", tools=tools) == base + "<think>"
        assert tok.apply_chat_template(messages, "long", tools=tools) == base + "<think>\n"


def _random_chat(rng: random.Random) -> list[dict]:
    texts = ["", "a", "\n\nb\n", "<think>t</think>x", "<think>\nr1\n</think>\n\nans", "r</think>s</think>\nu",
             "<tool_response>\nz\n</tool_response>", "Zürich 😀", '{"k": "v"}']
    msgs = []
    for _ in range(rng.randint(1, 8)):
        role = rng.choice(["user", "user", "assistant", "assistant", "tool", "system"])
        m = {"role": role, "content": rng.choice(texts)}
        if role == "assistant":
            if rng.random() < 0.3:
                m["reasoning_content"] = rng.choice(["", "why", "\nwhy\n"])
            if rng.random() < 0.5:
                m["tool_calls"] = [_call(rng.choice(["search", "get_weather"]),
                                         rng.choice([{}, {"q": "é"}, {"city": "Paris", "n": [1, 2.5, None]}]),
                                         wrapped=rng.random() < 0.7, as_string=rng.random() < 0.4)
                                   for _ in range(rng.randint(1, 3))]
                if rng.random() < 0.3:
                    m["content"] = None
        msgs.append(m)
    return msgs


def test_random_chats_match_qwen3_jinja(tok, hf):
    rng = random.Random(0)
    for k in range(300):
        messages = _random_chat(rng)
        tools = rng.choice([None, TOOLS, [SEARCH]])
        gen = rng.random() < 0.5
        want = _jinja(hf, messages, tools, add_generation_prompt=gen, enable_thinking=False)
        got = tok.apply_chat_template(messages, "short", add_generation_prompt=gen, tools=tools)
        assert got == want, (k, messages, tools)


def test_tool_calls_are_trained_and_results_are_not(tok):
    enc, labels = tok.encode_chat_for_training(AGENT, tools=TOOLS)
    text = tok.decode(enc.input_ids)
    assert text == tok.apply_chat_template(AGENT, tools=TOOLS, add_generation_prompt=False)
    trained = tok.decode(enc.input_ids[labels])
    # both assistant turns come after the last user query: their thoughts are kept (and trained)
    assert trained == ("<think>\nTwo cities: two calls.\n</think>\n\n"
                       '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
                       '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
                       '</tool_call><|im_end|>'
                       "<think>\nBoth known.\n</think>\n\nZürich 3 °C, Paris 7 °C.<|im_end|>")
    assert "temp" not in trained and "# Tools" not in trained


def test_bad_tools_raise(tok):
    msgs = [{"role": "user", "content": "q"}]
    with pytest.raises(ValueError, match="tools must be a list"):
        tok.apply_chat_template(msgs, tools={"name": "f"})
    with pytest.raises(ValueError, match=r"tools\[1\] must be a JSON object"):
        tok.apply_chat_template(msgs, tools=[WEATHER, "search"])
    with pytest.raises(ValueError, match=r"tools\[0\] is not JSON-serialisable"):
        tok.apply_chat_template(msgs, tools=[{"f": object()}])
    bad = [*msgs, {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}]
    with pytest.raises(ValueError, match=r"messages\[1\].tool_calls\[0\]: a tool call needs a function name"):
        tok.apply_chat_template(bad)
    with pytest.raises(ValueError, match=r"messages\[1\].tool_calls must be a list"):
        tok.apply_chat_template([*msgs, {"role": "assistant", "content": "", "tool_calls": "f()"}])


def test_parse_tool_calls_round_trip(tok):
    calls = [ToolCall("get_weather", {"city": "Zürich"}), ToolCall("search", {"q": "a \"b\"", "n": [1, None]})]
    text = tok.apply_chat_template([{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "Let me check.", "tool_calls": calls}],
                                   "short", add_generation_prompt=False)
    answer = text.split("</think>\n\n")[-1].removesuffix("<|im_end|>\n")
    assert parse_tool_calls(answer) == ("Let me check.", calls, 0)
    assert calls[1].arguments_json() == '{"q": "a \\"b\\"", "n": [1, null]}'


@pytest.mark.parametrize("text, content, calls", [
    ("no calls here", "no calls here", []),
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', "", [ToolCall("f", {"x": 1})]),
    # arguments given as a JSON string of an object; "parameters" for "arguments"; no arguments
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 2}"}</tool_call>', "", [ToolCall("f", {"x": 2})]),
    ('<tool_call>{"name": "f", "parameters": {"y": 3}}</tool_call> <tool_call>{"name": "g"}</tool_call>', "",
     [ToolCall("f", {"y": 3}), ToolCall("g", {})]),
    # a block that is not a call stays in the content as written; the others still count
    ('A <tool_call>not json</tool_call> B <tool_call>{"name": "f", "arguments": {}}</tool_call> C',
     "A <tool_call>not json</tool_call> B  C", [ToolCall("f", {})]),
    ('<tool_call>{"name": "", "arguments": {}}</tool_call>', '<tool_call>{"name": "", "arguments": {}}</tool_call>',
     []),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
     []),
    # the turn ended without </tool_call>: a whole call counts, a cut one stays text
    ('x <tool_call>\n{"name": "f", "arguments": {}}\n', "x", [ToolCall("f", {})]),
    ('x <tool_call>\n{"name": "f", "argu', 'x <tool_call>\n{"name": "f", "argu', []),
])
def test_parse_tool_calls(text, content, calls):
    assert parse_tool_calls(text) == (content, calls, 0)


def test_parse_tool_calls_so_far_holds_what_is_undecided():
    full = 'Sure. <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>{"name": "g"}</tool_call>'
    final = parse_tool_calls(full)
    assert final == ("Sure.", [ToolCall("f", {"a": 1}), ToolCall("g", {})], 0)
    seen_calls = 0
    for k in range(len(full) + 1):
        content, calls, held = parse_tool_calls(full[:k], final=False)
        # what a stream would send so far is a prefix of the final content (up to trailing whitespace), and its
        # calls a prefix of the final calls; a partial tag or an open block is held back
        assert final[0].startswith(content.rstrip()), k
        assert calls == final[1][:len(calls)] and len(calls) >= seen_calls
        seen_calls = len(calls)
        assert "<" not in content and held >= 0
    assert parse_tool_calls("ab <tool_c", final=False) == ("ab ", [], 10 - 3)
    assert parse_tool_calls('<tool_call>{"name": "f"}', final=False) == ("", [], 24)
