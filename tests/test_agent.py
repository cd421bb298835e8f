"""Multi-turn tool use (r4b.engine.agent): tool schemas from Python functions, the Toolbox's execution (arguments
checked, failures and timeouts reported as results, calls in parallel), the tool turn against the chat template,
the conversation loop through the engine (tokens, log-probs, prefix cache, stop reasons, images) and BPO rollouts
over whole conversations.

A tiny random model cannot call a tool by itself, so the loop's tests script its turns: a policy reads the
conversation so far (the request's tokens, decoded) and the engine is made to generate the policy's text (forced
tokens: their log-probs are still the model's)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from typing import Literal, Optional

import pytest
import torch
from test_llm import TOK, no_leak, tiny_model, tiny_r4b_chat
from tiny_models import torch_kernels_on_cpu  # noqa: F401  (fixture)

from r4b.engine.agent import MALFORMED, Toolbox, function_schema, run_tool_loop
from r4b.engine.chat import ToolCall, tool_turn
from r4b.engine.llm import LLM
from r4b.engine.rollout import bpo_rollouts
from r4b.engine.sampling import SamplingParams
from r4b.kernels import fused_linear_logprobs, pack_sequences

pytestmark = pytest.mark.usefixtures("torch_kernels_on_cpu")


# ---------------------------------------------------------------------------------------------------- schemas
def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Args:
        a: the first number.
        b (int): the second number,
            zero by default.

    Returns:
        the sum.
    """
    return a + b


def lookup(city: str, unit: Literal["c", "f"] = "c", tags: list[str] | None = None,
           limit: Optional[float] = None, extra: dict = None):  # noqa: RUF013, UP045 - typing.Union on purpose
    return {"city": city, "unit": unit, "tags": tags, "limit": limit}


def test_function_schema_from_the_signature_and_docstring():
    assert function_schema(add) == {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "description": "the first number."},
            "b": {"type": "integer", "description": "the second number, zero by default."}},
            "required": ["a"]}}}
    props = function_schema(lookup)["function"]["parameters"]["properties"]
    assert props == {"city": {"type": "string"}, "unit": {"enum": ["c", "f"], "type": "string"},
                     "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
                     "limit": {"type": ["number", "null"]}, "extra": {"type": "object"}}
    assert "description" not in function_schema(lookup)["function"]
    assert function_schema(add, name="plus")["function"]["name"] == "plus"

    def star(*xs: int): ...

    def pos(x: int, /): ...

    def odd(x: set): ...

    with pytest.raises(ValueError, match="parameter 'xs' is variadic positional"):
        function_schema(star)
    with pytest.raises(ValueError, match="parameter 'x' is positional-only"):
        function_schema(pos)
    with pytest.raises(ValueError, match=r"tool 'odd' parameter 'x': annotation <class 'set'> has no JSON schema"):
        function_schema(odd)
    with pytest.raises(ValueError, match="a tool's name must match"):
        function_schema(lambda x: x)


# ---------------------------------------------------------------------------------------------------- Toolbox
def boom(x: int) -> int:
    raise RuntimeError(f"broken for {x}")


def slow(seconds: float) -> str:
    time.sleep(seconds)
    return "late"


def test_toolbox_runs_calls_and_reports_every_failure_as_a_result(caplog):
    box = Toolbox([add, lookup, boom, slow], timeout=0.5, max_result_chars=30)
    calls = [ToolCall("add", {"a": 2, "b": 3}), ToolCall("lookup", {"city": "Zürich"}),
             ToolCall("nope", {}), ToolCall("add", {"b": 1}), ToolCall("add", {"a": "2"}),
             ToolCall("lookup", {"city": "x", "unit": "k"}), ToolCall("boom", {"x": 7}),
             ToolCall("slow", {"seconds": 30}), ToolCall("add", {"a": 1.0, "c": 2}),
             ToolCall("lookup", {"city": "y" * 40})]
    res = box.run(calls)
    assert [r.name for r in res] == [c.name for c in calls] and res[0].arguments == {"a": 2, "b": 3}
    assert (res[0].content, res[0].error) == ("5", None)
    assert res[1].content == '{"city": "Zürich", "unit": "c"' + "\n... [30 more characters cut]" \
        and res[1].error is None  # JSON (not ASCII-escaped), cut to max_result_chars
    assert res[2].error == "no tool named 'nope' (the tools are ['add', 'lookup', 'boom', 'slow'])"
    assert res[3].error == "arguments is missing the required 'a'"
    assert res[4].error == 'arguments.a must be integer, got "2"'
    assert res[5].error == 'arguments.unit must be one of ["c", "f"], got "k"'
    assert res[6].error == "boom raised RuntimeError: broken for 7"
    assert res[7].error == "slow timed out after 0.5 s" and res[7].seconds < 5
    # an integral float is an integer; a parameter the function lacks reaches it (no additionalProperties: false)
    assert res[8].error == "add raised TypeError: add() got an unexpected keyword argument 'c'"
    assert res[9].error is None
    for r in res:
        assert (r.error is None) == (not r.content.startswith("Error: "))
        if r.error is not None:
            assert r.content == "Error: " + r.error
    assert "slow timed out" in caplog.text


class NoText:
    def __str__(self):
        raise RuntimeError("no text")

    def __repr__(self):
        raise RuntimeError("no repr")


def quits(code: int) -> None:
    raise SystemExit(code)


def unprintable() -> object:
    return NoText()


class Mute(Exception):
    def __str__(self):
        raise RuntimeError("no message")


def mute() -> None:
    raise Mute


def count_to(n: int) -> list:
    return list(range(n))  # range() refuses a float: the schema's integer must arrive as an int


def test_toolbox_survives_what_model_written_code_does():
    """SystemExit in a tool (model-written code calling exit()) and a result with no text are the call's errors;
    an integral float for an integer arrives as an int; only KeyboardInterrupt propagates."""
    box = Toolbox([quits, unprintable, count_to, mute])
    res = box.run([ToolCall("quits", {"code": 3}), ToolCall("unprintable", {}), ToolCall("count_to", {"n": 3.0}),
                   ToolCall("count_to", {"n": 2.5}), ToolCall("mute", {})])
    assert res[4].error == "mute raised Mute: (its message could not be read)"
    assert res[0].error == "quits raised SystemExit: 3"
    assert res[1].error == "unprintable raised RuntimeError: no text"
    assert (res[2].content, res[2].error) == ("[0, 1, 2]", None)
    assert res[3].error == "arguments.n must be integer, got 2.5"

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Toolbox([interrupted]).run([ToolCall("interrupted", {})])


def test_calls_stuck_past_their_timeout_cannot_pile_up():
    """max_workers calls still running after their timeout: further calls are refused (as errors) until they
    finish, so a hanging tool leaks at most max_workers threads."""
    release = threading.Event()

    def hang() -> str:
        release.wait(10)
        return "done"

    box = Toolbox([hang, add], timeout=0.2, max_workers=2)
    try:
        first = box.run([ToolCall("hang", {})] * 2)
        assert all(r.error == "hang timed out after 0.2 s" for r in first)
        refused = box.run([ToolCall("add", {"a": 1})])[0]
        assert refused.error == ("2 earlier tool calls are still running past their timeout; no new call runs "
                                 "until they finish")
    finally:
        release.set()
    for th in list(box._stuck):
        th.join(5)
    assert box.run([ToolCall("add", {"a": 1})])[0].content == "1"


def test_toolbox_runs_a_turns_calls_in_parallel():
    """Four calls that each wait for the other three finish only when they run at the same time (a barrier);
    with max_workers=2 they run two at a time and time out."""
    def meet(barrier_id: int) -> str:
        BARRIERS[barrier_id].wait()
        return "met"

    BARRIERS[0] = threading.Barrier(4, timeout=5)
    assert [r.content for r in Toolbox([meet], timeout=10).run([ToolCall("meet", {"barrier_id": 0})] * 4)] \
        == ["met"] * 4
    BARRIERS[1] = threading.Barrier(4, timeout=0.3)
    res = Toolbox([meet], timeout=10, max_workers=2).run([ToolCall("meet", {"barrier_id": 1})] * 4)
    assert all(r.error == "meet raised BrokenBarrierError: " for r in res)


BARRIERS: dict[int, threading.Barrier] = {}


def test_toolbox_arguments_and_loading(tmp_path):
    schema = {"type": "function", "function": {"name": "shout", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
        "additionalProperties": False}}}
    box = Toolbox([(schema, lambda text: text.upper()), add])
    assert box.schemas[0] is schema and box.names == ["shout", "add"]
    res = box.run([ToolCall("shout", {"text": "hi"}), ToolCall("shout", {"text": "a", "loud": True})])
    assert res[0].content == "HI" and res[1].error == "arguments has no parameter 'loud' (it takes ['text'])"
    for bad, msg in (([], "tools must be a non-empty list"), ([add, add], "two tools are named 'add'"),
                     ([3], r"tools\[0\] must be a function or a \(schema, function\) pair"),
                     ([({"type": "function", "function": {}}, add)], r"tools\[0\]'s schema needs a function name")):
        with pytest.raises(ValueError, match=msg):
            Toolbox(bad)
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        Toolbox([add], timeout=0)
    f = tmp_path / "my_tools.py"
    f.write_text("def double(x: int) -> int:\n    '''Twice x.'''\n    return 2 * x\n\n"
                 "def half(x: float) -> float:\n    return x / 2\n\nTOOLS = [double, half]\n")
    assert Toolbox.load(f"{f}:double,half").names == ["double", "half"]
    loaded = Toolbox.load(f"{f}:TOOLS", timeout=3)
    assert loaded.names == ["double", "half"] and loaded.timeout == 3.0
    assert loaded.run([ToolCall("double", {"x": 4})])[0].content == "8"
    assert Toolbox.load("test_agent:add").names == ["add"]
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('half written')\ndef f() -> int:\n    return 1\n")
    for _ in range(2):  # refused every time: the half-initialised module is not kept
        with pytest.raises(ValueError, match="broken.py failed to load: RuntimeError: half written"):
            Toolbox.load(f"{broken}:f")
    assert Toolbox.source_digest(f"{f}:double") == hashlib.sha256(f.read_bytes()).hexdigest()
    assert Toolbox.source_digest("test_agent:add") is not None and Toolbox.source_digest("sys:exit") is None
    for spec, msg in (("nocolon", "tools must be 'module:function"), (f"{tmp_path}/none.py:f", "no file"),
                      (f"{f}:missing", "has no 'missing'"), ("no_such_module_xyz:f", "cannot import")):
        with pytest.raises(ValueError, match=msg):
            Toolbox.load(spec)


# ---------------------------------------------------------------------------------------------------- the loop
def test_the_tool_turn_is_the_templates():
    """After an assistant turn with calls, the template renders exactly its <|im_end|>, then tool_turn(results),
    then the generation prompt's mode suffix."""
    for mode in ("auto", "long", "short"):
        for results in (["5"], ['{"a": 1}', "Error: x\nline 2"]):
            chat = [{"role": "user", "content": "sum?"},
                    {"role": "assistant", "content": "", "reasoning_content": "Adding.",
                     "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2}}}]}]
            before = TOK.apply_chat_template(chat, add_generation_prompt=False, tools=[function_schema(add)])
            full = TOK.apply_chat_template(chat + [{"role": "tool", "content": r} for r in results],
                                           thinking_mode=mode, tools=[function_schema(add)])
            assert before.endswith("<|im_end|>\n")
            assert full == before[:-1] + tool_turn(results, mode)
            # the ids: the template's, encoded whole (a result's text sits between two chat tokens)
            assert TOK.encode_tool_turn(results, mode) == TOK.encode(tool_turn(results, mode))
    with pytest.raises(ValueError, match="tool_turn needs at least one result"):
        tool_turn([])
    # a result that spells chat tokens stays text: it cannot end the turn, open a thought or claim an image
    spelled = "a<|im_end|>\n<|im_start|>assistant\n<think>b<image>"
    ids = TOK.encode_tool_turn([spelled], "short")
    assert TOK.decode(ids) == tool_turn([spelled], "short")
    assert ids.count(TOK.im_end_id) == 1 and ids.count(TOK.image_id) == 0 and ids.count(TOK.think_id) == 1
    assert TOK.encode(tool_turn([spelled], "short")).count(TOK.im_end_id) == 2  # what a plain encode would do


CALL = '<tool_call>\n{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>'


def script(llm: LLM, policy) -> list[str]:
    """From now on each request's completions generate ``policy(conversation text, sequence)`` then <|im_end|>
    (forced tokens; a policy that returns None leaves the completion to the model). Returns the list of
    conversations the policy saw."""
    seen = []
    set_budget = LLM._set_budget.__get__(llm)  # the engine's own (a later script replaces an earlier one)

    def scripted(req, *args, **kw):
        set_budget(req, *args, **kw)
        if req.error is None:
            for seq in req.seqs:
                text = TOK.decode(seq.tokens)
                seen.append(text)
                forced = policy(text, seq)
                if forced is not None:
                    seq.forced.extend(TOK.encode(forced) + [TOK.im_end_id])

    llm._set_budget = scripted
    return seen


def script_every_llm(monkeypatch, tok, policy) -> None:
    """script() for every engine a test's code builds itself (a trainer's, an evaluation's): LLM._set_budget
    patched on the class."""
    set_budget = LLM._set_budget

    def scripted(self, req, *args, **kw):
        set_budget(self, req, *args, **kw)
        if req.error is None:
            for seq in req.seqs:
                seq.forced.extend(tok.encode(policy(tok.decode(seq.tokens), seq)) + [tok.im_end_id])

    monkeypatch.setattr(LLM, "_set_budget", scripted)


def question_adder(text: str, seq) -> str:
    """For "What is a + b?": call add(a, b), then answer \\boxed{result} (a thought first when one is open)."""
    a, b = re.findall(r"What is (\d+) \+ (\d+)\?", text)[-1]
    since = text[text.rindex("What is"):]  # the results of this question's calls (not an earlier question's)
    results = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", since, re.S)
    body = CALL.format(a=a, b=b) if not results else f"\\boxed{{{results[-1]}}}"
    return _opener(text) + body


def _opener(text: str) -> str:
    return ("Let me add.\n</think>\n\n" if text.endswith("<think>\n") else
            "\n\n</think>\n\n" if text.endswith("<think>") else "")


def adder(text: str, seq) -> str:
    """Call add(2, 3), then add(result, 10), then answer with the last result; a thought first when one is open."""
    results = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text, re.S)
    body = CALL.format(a=2, b=3) if not results else CALL.format(a=results[-1], b=10) if len(results) == 1 \
        else f"The sum is {results[-1]}."
    return _opener(text) + body


def full_logprobs(model, ids: list[int], pixel_values=None, image_sizes=None) -> torch.Tensor:
    """log p(ids[p + 1] | ids[: p + 1]) of a plain forward (with the images, for an R-4B model), per position p."""
    dev = model.lm_head.weight.device
    b = pack_sequences([torch.tensor(ids, device=dev)])
    images = (pixel_values, image_sizes) if pixel_values else ()
    with torch.no_grad():
        h = model(b.flat, b.position_ids, b.cu_seqlens, b.max_seqlen, *images)
    return fused_linear_logprobs(h, model.lm_head.weight, torch.tensor(ids[1:] + [-100], device=dev))


def assert_turns_are_the_forwards(model, t, pixel_values=None, image_sizes=None, atol: float = 2e-5) -> None:
    """Every turn's log-probs are those of a forward of the whole conversation."""
    lp = full_logprobs(model, t.token_ids, pixel_values, image_sizes).cpu()
    for turn in t.turns:
        want = lp[turn.gen_start - 1 : turn.gen_start - 1 + len(turn.output.token_ids)]
        assert torch.allclose(torch.tensor(turn.output.logprobs), want, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model(3, max_position_embeddings=1024)


def test_conversations_run_the_tools_and_keep_the_tokens(model):
    llm = LLM(model, TOK, num_kv_blocks=256, block_size=8)
    script(llm, adder)
    box = Toolbox([add])
    chat = [{"role": "user", "content": "What is 2 + 3 + 10?"}]
    params = SamplingParams(temperature=1.0, max_tokens=200, n=2, seed=0)
    outs = run_tool_loop(llm, [chat, "hi"], box, params, thinking_mode=("long", "short", "auto"), max_turns=4)
    no_leak(llm)
    assert len(outs) == 2 and all(o.error is None and len(o.trajectories) == 6 for o in outs)
    for out in outs:
        assert [t.mode for t in out.trajectories] == ["long", "long", "short", "short", "auto", "auto"]
        assert [t.index for t in out.trajectories] == list(range(6))
        for t in out.trajectories:
            assert t.stop_reason == "answer" and len(t.turns) == 3 and t.answer == "The sum is 15."
            assert [c for turn in t.turns for c in turn.calls] == [ToolCall("add", {"a": 2, "b": 3}),
                                                                    ToolCall("add", {"a": 5, "b": 10})]
            assert [r.content for turn in t.turns for r in turn.results] == ["5", "15"]
            assert t.num_tool_calls == 2 and t.tool_errors == 0
            # the tokens render as the template renders the conversation (the prompt with the tools, each turn
            # in the conversation's mode)
            msgs = (chat if isinstance(out.prompt_token_ids, list) and "2 + 3" in TOK.decode(out.prompt_token_ids)
                    else [{"role": "user", "content": "hi"}])
            text = TOK.apply_chat_template(msgs + t.messages(), add_generation_prompt=False,
                                           tools=box.schemas)
            got = TOK.decode(t.token_ids) + "\n"
            if t.mode != "long":  # Qwen3's template drops an earlier turn's empty thought; the tokens keep it
                empty = "<think>\n\n</think>\n\n"
                assert got.count(empty) == 3 and text.count(empty) == 1
                got, text = got.replace(empty, ""), text.replace(empty, "")
            assert got == text
            assert t.token_ids[: t.prompt_len] == out.prompt_token_ids
            # every turn: its mode suffix at start, its generated tokens at gen_start, with the model's log-probs
            for turn in t.turns:
                assert t.token_ids[turn.start : turn.gen_start] == llm.mode_suffix_ids(t.mode)
                gen = t.token_ids[turn.gen_start : turn.gen_start + len(turn.output.token_ids)]
                assert gen == turn.output.token_ids and gen[-1] == TOK.im_end_id
                assert turn.output.thinking_mode == t.mode and turn.output.index == t.index
            assert_turns_are_the_forwards(model, t)
            assert t.turns[0].output.tool_calls == t.turns[0].calls and t.turns[-1].output.tool_calls == []
            assert t.turns[-1].gen_start + len(t.turns[-1].output.token_ids) == len(t.token_ids)
            # forced thinking thinks at every turn; forced non-thinking never; auto (scripted) never
            assert [turn.output.mode for turn in t.turns] == ["think" if t.mode == "long" else "no_think"] * 3
    msgs = outs[0].trajectories[0].messages()
    assert [m["role"] for m in msgs] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert msgs[0]["reasoning_content"] == "Let me add." and msgs[0]["content"] == ""
    assert msgs[0]["tool_calls"] == [{"type": "function", "function": {"name": "add",
                                                                        "arguments": '{"a": 2, "b": 3}'}}]
    assert msgs[1] == {"role": "tool", "name": "add", "content": "5"}
    # later turns' prompts are the conversations so far: the prefix cache serves them
    assert llm.stats["prefix_cache_hit_tokens"] > 0


def test_stop_reasons_and_failing_tools(model, caplog):
    llm = LLM(model, TOK, num_kv_blocks=256, block_size=8)
    box = Toolbox([add, boom])
    greedy = SamplingParams(temperature=0, max_tokens=200)
    # always calling: the turns run out (the last turn's calls are not run)
    script(llm, lambda text, seq: CALL.format(a=1, b=1))
    (t,) = run_tool_loop(llm, ["x"], box, greedy, thinking_mode="short", max_turns=3)[0].trajectories
    assert t.stop_reason == "max_turns" and len(t.turns) == 3 and t.num_tool_calls == 2
    assert t.turns[-1].calls == [] and t.turns[-1].output.tool_calls == [ToolCall("add", {"a": 1, "b": 1})]
    # a failing tool: the model reads the error, the conversation goes on
    script(llm, lambda text, seq: '<tool_call>\n{"name": "boom", "arguments": {"x": 1}}\n</tool_call>'
           if "tool_response" not in text else "gave up")
    (t,) = run_tool_loop(llm, ["x"], box, greedy, thinking_mode="short")[0].trajectories
    assert t.stop_reason == "answer" and t.answer == "gave up" and t.tool_errors == 1
    assert "Error: boom raised RuntimeError: broken for 1" in TOK.decode(t.token_ids)
    # a turn cut by max_tokens ends the conversation, calls or not
    script(llm, lambda text, seq: CALL.format(a=1, b=1))
    (t,) = run_tool_loop(llm, ["x"], box, SamplingParams(temperature=0, max_tokens=5),
                         thinking_mode="short")[0].trajectories
    assert t.stop_reason == "length" and len(t.turns) == 1 and t.final.finish_reason == "length"
    # a turn ended by a stop string (no <|im_end|>) is not continued
    script(llm, lambda text, seq: CALL.format(a=1, b=1) + " STOP")
    (t,) = run_tool_loop(llm, ["x"], box, SamplingParams(temperature=0, max_tokens=200, stop=["STOP"]),
                         thinking_mode="short")[0].trajectories
    assert t.stop_reason == "no_end" and len(t.turns) == 1
    # the next turn would not fit max_model_len (its tool turn alone is longer than 5 tokens)
    script(llm, lambda text, seq: CALL.format(a=1, b=1))
    (t,) = run_tool_loop(llm, ["x"], box, greedy, thinking_mode="short", max_turns=1)[0].trajectories
    small = LLM(model, TOK, num_kv_blocks=256, block_size=8, max_model_len=len(t.token_ids) + 5)
    script(small, lambda text, seq: CALL.format(a=1, b=1))
    (t,) = run_tool_loop(small, ["x"], box, greedy, thinking_mode="short")[0].trajectories
    assert t.stop_reason == "length" and len(t.turns) == 1
    # no room for even the tool turn's frame: the tools do not run at all
    ran = []

    def logged(a: int, b: int = 0) -> int:
        ran.append((a, b))
        return a + b

    script(llm, lambda text, seq: CALL.format(a=1, b=1).replace("add", "logged"))
    (t2,) = run_tool_loop(llm, ["x"], Toolbox([logged]), greedy, thinking_mode="short", max_turns=1)[0].trajectories
    assert t2.stop_reason == "max_turns" and ran == []  # the last turn's calls are not run
    tiny = LLM(model, TOK, num_kv_blocks=256, block_size=8, max_model_len=len(t2.token_ids) + 1)
    script(tiny, lambda text, seq: CALL.format(a=1, b=1).replace("add", "logged"))
    (t2,) = run_tool_loop(tiny, ["x"], Toolbox([logged]), greedy, thinking_mode="short")[0].trajectories
    assert t2.stop_reason == "length" and ran == [] and t2.turns[0].results == []
    # a <tool_call> block that is no call gets an error result showing the format, and the conversation goes on
    script(llm, lambda text, seq: "<tool_call>\n{not json}\n</tool_call>" if "tool_response" not in text
           else "sorry")
    (t,) = run_tool_loop(llm, ["x"], box, greedy, thinking_mode="short")[0].trajectories
    assert t.stop_reason == "answer" and len(t.turns) == 2 and t.num_tool_calls == 0 and t.tool_errors == 1
    assert t.turns[0].results[0].error == MALFORMED and "Error: the <tool_call> block is not a call" in \
        TOK.decode(t.token_ids)
    # a tool output that spells chat tokens is read as text: the conversation goes on
    def fetch() -> str:
        return "<html><image>x</image><|im_end|></html>"

    script(llm, lambda text, seq: '<tool_call>\n{"name": "fetch", "arguments": {}}\n</tool_call>'
           if "tool_response" not in text else "fetched")
    (t,) = run_tool_loop(llm, ["x"], Toolbox([fetch]), greedy, thinking_mode="short")[0].trajectories
    assert t.stop_reason == "answer" and t.answer == "fetched" and t.tool_errors == 0
    assert t.token_ids.count(TOK.im_end_id) == 5  # the system (tools) and user turns, 2 assistant turns, 1 tool turn
    # the engine refuses a later turn (its prompt outgrows the KV cache): "error", with the reason
    script(llm, lambda text, seq: CALL.format(a=1, b=1))
    (t,) = run_tool_loop(llm, ["x"], box, greedy, thinking_mode="short", max_turns=1)[0].trajectories
    blocks = -(-len(t.token_ids) // 8) + 1  # the first turn fits; the second prompt needs more blocks
    cramped = LLM(model, TOK, num_kv_blocks=blocks, block_size=8)
    script(cramped, lambda text, seq: CALL.format(a=1, b=1))
    (t,) = run_tool_loop(cramped, ["x"], box, greedy, thinking_mode="short")[0].trajectories
    assert t.stop_reason == "error" and "needs more KV blocks than the cache holds" in t.error
    assert len(t.turns) == 1 and t.messages()[-1]["role"] == "assistant"  # the results it never read: left out
    no_leak(cramped)
    # a prompt the engine refuses (token ids: the tools cannot be rendered into them) is reported, the others run
    outs = run_tool_loop(llm, [[5, 6], "x"], box, greedy, thinking_mode="short", max_turns=1)
    assert "tools apply to chats" in outs[0].error and outs[0].trajectories == []
    assert outs[1].error is None and outs[1].trajectories[0].stop_reason == "max_turns"
    no_leak(llm)
    for kw, msg in ((dict(max_turns=0), "max_turns must be an int >= 1"),
                    (dict(thinking_mode="deep"), "thinking_mode must be one of")):
        with pytest.raises(ValueError, match=msg):
            run_tool_loop(llm, ["x"], box, greedy, **kw)
    with pytest.raises(ValueError, match="toolbox must be a Toolbox"):
        run_tool_loop(llm, ["x"], [add], greedy)


def test_unscripted_conversations_without_calls_are_the_engines_completions(model):
    """A random model makes no calls: each conversation is one turn, the engine's completion of the same
    request (same seed)."""
    llm = LLM(model, TOK, num_kv_blocks=256, block_size=8)
    box = Toolbox([add])
    params = SamplingParams(temperature=1.0, max_tokens=12, n=2, seed=4)
    outs = run_tool_loop(llm, ["a question", "another"], box, params, thinking_mode=("long", "short"))
    ref = llm.generate(["a question", "another"], params, thinking_mode=("long", "short"), tools=box.schemas,
                       use_tqdm=False)
    for out, r in zip(outs, ref, strict=True):
        assert [t.final for t in out.trajectories] == r.outputs
        assert all(len(t.turns) == 1 and t.stop_reason in ("answer", "length") for t in out.trajectories)


def test_later_turns_are_sampled_from_the_prompts_own_seed(model):
    """Turn 1 scripted (a call), turn 2 sampled: a prompt with its own seed samples the same conversation alone
    or after another prompt (r4b eval's samples do not depend on the batch), and n > 1 siblings differ."""
    llm = LLM(model, TOK, num_kv_blocks=256, block_size=8)
    script(llm, lambda text, seq: CALL.format(a=1, b=2) if "tool_response" not in text else None)
    box = Toolbox([add])

    def seeded(seed):
        return SamplingParams(temperature=1.0, max_tokens=80, n=2, seed=seed)

    both = run_tool_loop(llm, ["first", "second"], box, [seeded(7), seeded(9)], thinking_mode="short")
    alone = run_tool_loop(llm, ["second"], box, [seeded(9)], thinking_mode="short")
    got = [t.token_ids for t in both[1].trajectories]
    assert got == [t.token_ids for t in alone[0].trajectories]
    assert all(len(t.turns) == 2 for t in both[1].trajectories)
    assert got[0][both[1].trajectories[0].turns[1].gen_start:] != got[1][both[1].trajectories[1].turns[1].gen_start:]
    with pytest.raises(ValueError, match=r"params must be a SamplingParams or one per prompt \(2\)"):
        run_tool_loop(llm, ["a", "b"], box, [seeded(1)])


def test_token_prompt_dicts_carry_images():
    """The engine's {"prompt_token_ids", "pixel_values", "image_sizes"} request: a multimodal conversation goes on
    token for token (the same tokens as the chat request's), and a count of image tokens that does not fit the
    images is refused."""
    model, tok, msgs = tiny_r4b_chat()
    llm = LLM(model, tok, num_kv_blocks=128, block_size=8)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate([msgs], greedy, thinking_mode="short", use_tqdm=False)[0]
    suffix = llm.mode_suffix_ids("short")
    again = llm.generate([{"prompt_token_ids": first.prompt_token_ids + suffix, "pixel_values": first.pixel_values,
                           "image_sizes": first.image_sizes}], greedy, use_tqdm=False)[0]
    assert again.error is None and again.outputs[0].token_ids == first.outputs[0].token_ids
    assert again.num_cached_tokens > 0  # the same images and tokens: the prefix cache serves them
    ids = first.prompt_token_ids
    at = ids.index(tok.image_id)
    bad = [{"prompt_token_ids": ids[:at] + ids[at + 1 :], "pixel_values": first.pixel_values,
            "image_sizes": first.image_sizes},
           {"prompt_token_ids": ids, "pixel_values": first.pixel_values, "image_sizes": []},
           {"prompt_token_ids": ids, "images": []}, {"prompt_token_ids": []}]
    outs = llm.generate(bad, greedy, use_tqdm=False)
    n = sum(t == tok.image_id for t in ids)
    assert f"its images need {n} <image> tokens (id {tok.image_id}), prompt_token_ids holds {n - 1}" \
        in outs[0].error
    assert "has 1 pixel_values but 0 image_sizes" in outs[1].error
    assert "unknown keys ['images']" in outs[2].error
    assert "prompt_token_ids must be a non-empty list" in outs[3].error
    (shrunk,) = llm.generate([{"prompt_token_ids": ids, "pixel_values": [first.pixel_values[0][:, :, :8]],
                               "image_sizes": first.image_sizes}], greedy, use_tqdm=False)
    assert "pixel_values[0] must be tiles" in shrunk.error
    (fewer,) = llm.generate([{"prompt_token_ids": ids, "pixel_values": [first.pixel_values[0][:1]],
                              "image_sizes": first.image_sizes}], greedy, use_tqdm=False)
    assert "tiles (base + grid)" in fewer.error
    with pytest.raises(ValueError, match="requests must be a list of requests"):
        llm.generate({"prompt_token_ids": ids}, greedy)
    # a chat whose text spells <image> beside a real image: reported and skipped (the step's embedding would fail
    # for every request in it), the other request runs
    spelled = [{"role": "user", "content": [msgs[0]["content"][0], {"type": "text", "text": "what is <image>?"}]}]
    outs = llm.generate([spelled, msgs], greedy, use_tqdm=False)
    assert f"the chat's images need {n} <image> tokens (id {tok.image_id}), its text holds {n + 1}" in outs[0].error
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 6
    no_leak(llm)


def test_multimodal_conversations_keep_their_images():
    model, tok, msgs = tiny_r4b_chat()
    assert tok.tokenizer.to_str() == TOK.tokenizer.to_str()  # the demo tokenizer: script()'s TOK works here
    llm = LLM(model, tok, num_kv_blocks=256, block_size=8)
    script(llm, adder)
    (out,) = run_tool_loop(llm, [msgs], Toolbox([add]), SamplingParams(temperature=1.0, max_tokens=200),
                           thinking_mode="long")
    (t,) = out.trajectories
    assert t.stop_reason == "answer" and t.answer == "The sum is 15." and len(out.pixel_values) == 1
    assert_turns_are_the_forwards(model, t, out.pixel_values, out.image_sizes)


# ---------------------------------------------------------------------------------------------------- BPO
def test_bpo_rollouts_pack_whole_conversations(model):
    """With a toolbox, each sequence is a conversation: every turn's mode tokens and generated tokens are trained,
    the tool turns are not; the rollout log-probs sit on the generated tokens and equal the training op's; the
    reward reads the last answer."""
    llm = LLM(model, TOK, num_kv_blocks=256, block_size=8)
    script(llm, lambda text, seq: adder(text, seq) if "2 + 3" in text else "No tools needed.")
    box = Toolbox([add])
    b = bpo_rollouts(llm, ["2 + 3 + 10?", "hello"], ["15", "x"], lambda ans, ref: float(ref in ans), g=1,
                     params=SamplingParams(temperature=1.0, max_tokens=200, seed=0), toolbox=box)
    assert b.modes == ["long", "short"] * 2 and b.rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert [len(t.turns) for t in b.trajectories] == [3, 3, 1, 1]
    assert b.outputs == [t.final for t in b.trajectories]
    cu = b.cu_seqlens.tolist()
    with torch.no_grad():
        old = fused_linear_logprobs(model(**b.model_inputs()), model.lm_head.weight, b.targets)
    for i, t in enumerate(b.trajectories):
        seq = b.input_ids[cu[i] : cu[i + 1]].tolist()
        assert seq == t.token_ids
        trained = set()
        for turn in t.turns:
            trained |= set(range(turn.start + 1, turn.gen_start + len(turn.output.token_ids)))
        mask = b.loss_mask[cu[i] : cu[i + 1]].tolist()
        assert mask == [p + 1 in trained for p in range(len(seq))]
        tool_text = TOK.decode([seq[p + 1] for p in range(len(seq) - 1) if not mask[p]][t.prompt_len:])
        assert ("<tool_response>" in tool_text) == (len(t.turns) > 1)
        lp = b.rollout_logprobs[cu[i] : cu[i + 1]]
        known = ~torch.isnan(lp)
        assert int(known.sum()) == t.generated_tokens
        assert torch.allclose(lp[known], old[cu[i] : cu[i + 1]][known], atol=2e-5, rtol=0)
    assert b.stats["turns_long"] == 2 and b.stats["tool_calls_short"] == 1 and b.stats["tool_errors"] == 0
    assert b.stats["max_turns_hit"] == 0 and b.stats["tokens_long"] == sum(
        t.generated_tokens for t in b.trajectories[0::2]) / 2
    sub = b.select(1, 3)
    assert sub.trajectories == b.trajectories[1:3]
    # train_mode_tokens=False: each turn's generated tokens only
    nm = bpo_rollouts(llm, ["2 + 3 + 10?"], ["15"], lambda ans, ref: 1.0, g=1, toolbox=box, train_mode_tokens=False,
                      params=SamplingParams(temperature=1.0, max_tokens=200, seed=0))
    for i, t in enumerate(nm.trajectories):
        gen = {p for turn in t.turns for p in range(turn.gen_start, turn.gen_start + len(turn.output.token_ids))}
        n = len(t.token_ids)
        assert nm.loss_mask[nm.cu_seqlens[i] : nm.cu_seqlens[i + 1]].tolist() == [p + 1 in gen for p in range(n)]
    # a reward with a trajectory parameter gets the conversation too (here: it charges for the tool calls)
    seen = []

    def frugal(answer, reference, trajectory):
        seen.append(trajectory)
        return float(reference in answer) - 0.25 * trajectory.num_tool_calls

    fb = bpo_rollouts(llm, ["2 + 3 + 10?", "hello"], ["15", "x"], frugal, g=1, toolbox=box,
                      params=SamplingParams(temperature=1.0, max_tokens=200, seed=0))
    assert fb.rewards.tolist() == [0.5, 0.5, 0.0, 0.0] and seen == fb.trajectories
    # without a toolbox the batch is as before (one turn each, no trajectories kept)
    plain = bpo_rollouts(llm, ["hello"], ["x"], lambda ans, ref: 0.0, g=1,
                         params=SamplingParams(temperature=1.0, max_tokens=8, seed=0))
    assert plain.trajectories is None and "tool_errors" not in plain.stats
    with pytest.raises(ValueError, match="toolbox must be None or a Toolbox"):
        bpo_rollouts(llm, ["x"], [None], "exact", g=1, toolbox=[add])


def test_a_results_text_is_json_for_non_strings():
    def info(k: str) -> dict:
        return {"k": k, "n": [1, 2], "when": time}

    (r,) = Toolbox([info]).run([ToolCall("info", {"k": "ä"})])
    assert json.loads(r.content)["k"] == "ä" and "<module 'time'" in r.content  # default=str for the rest


@pytest.mark.gpu
def test_gpu_conversations_with_cuda_graphs_match_eager_and_the_forward(monkeypatch):
    """On a GPU (fp32, TF32 off): conversations whose later turns are sampled (turn 1 scripted: a call) come out
    the same with CUDA-graph decode steps as eager, and every turn's log-probs equal a forward of the whole
    conversation."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = tiny_model(3, max_position_embeddings=1024).cuda()
    params = SamplingParams(temperature=1.0, max_tokens=96, n=2, seed=5)

    def run(graphs: bool):
        llm = LLM(model, TOK, num_kv_blocks=256, block_size=8, cuda_graphs=graphs)
        script(llm, lambda text, seq: _opener(text) + CALL.format(a=1, b=2) if "tool_response" not in text else None)
        outs = run_tool_loop(llm, ["one", "two"], Toolbox([add]), params, thinking_mode=("long", "short"))
        no_leak(llm)
        return [t for o in outs for t in o.trajectories], llm.stats["graph_steps"]

    got, graph_steps = run(True)
    want, _ = run(False)
    assert graph_steps > 0 and all(len(t.turns) == 2 for t in got)
    assert [t.token_ids for t in got] == [t.token_ids for t in want]
    for t in got:
        assert_turns_are_the_forwards(model, t, atol=1e-4)


def test_tools_that_return_images_show_them_to_the_model():
    """A tool that returns an image (a zoom into the prompt's picture) and text: the next turn's prompt holds the
    image's <image> tokens and its pixels after the prompt's; the tokens render as the template renders the tool
    message of image and text parts; a forward of the whole conversation with both images gives every turn's
    log-probs, and so does the BPO batch's forward; a model that takes no images reads an error instead."""
    from PIL import Image

    from r4b.engine.model.image import num_image_tokens

    model, tok, msgs = tiny_r4b_chat()
    picture = msgs[0]["content"][0]["image"]  # uint8 (3, 40, 70)

    def zoom(x: int, y: int) -> list:
        """Zoom into the picture at (x, y)."""
        crop = picture[:, y : y + 20, x : x + 30].permute(1, 2, 0).contiguous().numpy()
        return [Image.fromarray(crop), f"the region at ({x}, {y})"]

    def policy(text, seq):
        return _opener(text) + (
            '<tool_call>\n{"name": "zoom", "arguments": {"x": 10, "y": 5}}\n</tool_call>'
            if "tool_response" not in text else "A red square.")

    llm = LLM(model, tok, num_kv_blocks=512, block_size=8)
    script(llm, policy)
    box = Toolbox([zoom])
    cached = []
    generate = llm.generate

    def watched(requests, *args, **kw):
        outs = generate(requests, *args, **kw)
        cached.extend(o.num_cached_tokens for r, o in zip(requests, outs, strict=True) if isinstance(r, dict))
        return outs

    llm.generate = watched
    (out,) = run_tool_loop(llm, [msgs], box, SamplingParams(temperature=1.0, max_tokens=200),
                           thinking_mode="short")
    del llm.generate
    (t,) = out.trajectories
    # the second turn's prompt adds an image: the blocks of the first turn (the prompt's image included) are reused
    first_end = t.turns[0].gen_start + len(t.turns[0].output.token_ids)  # its last token was never fed
    assert len(cached) == 1 and cached[0] == (first_end - 1) // 8 * 8, (cached, first_end)
    assert cached[0] > t.token_ids.index(tok.image_id)
    assert t.stop_reason == "answer" and t.answer == "A red square." and len(t.turns) == 2
    (r,) = t.turns[0].results
    assert r.error is None and r.content == "the region at (10, 5)" and r.image_sizes == [(20, 30)]
    assert len(t.pixel_values) == 2 and t.image_sizes == [*out.image_sizes, (20, 30)]
    n_prompt = sum(num_image_tokens(h, w, tok.model_config) for h, w in out.image_sizes)
    assert t.token_ids.count(tok.image_id) == n_prompt + num_image_tokens(20, 30, tok.model_config)
    text = tok.apply_chat_template(msgs + t.messages(), thinking_mode="short", add_generation_prompt=False,
                                   tools=box.schemas)
    got = tok.decode(t.token_ids) + "\n"
    empty = "<think>\n\n</think>\n\n"  # the template drops the first turn's empty thought (see above)
    assert got.replace(empty, "") == text.replace(empty, "")
    assert t.messages(images=False)[1]["content"][0] == {"type": "image", "size": [20, 30]}
    assert_turns_are_the_forwards(model, t, t.pixel_values, t.image_sizes)
    # BPO: each sequence carries its own images (the prompt's, then its tools')
    batch = bpo_rollouts(llm, [msgs], ["red"], lambda ans, ref: float(ref in ans.lower()), g=1, toolbox=box,
                         params=SamplingParams(temperature=1.0, max_tokens=200, seed=1))
    assert batch.images_per_seq == [2, 2] and len(batch.pixel_values) == 4 and batch.rewards.tolist() == [1.0, 1.0]
    with torch.no_grad():
        old = fused_linear_logprobs(model(**batch.model_inputs()), model.lm_head.weight, batch.targets)
    known = ~torch.isnan(batch.rollout_logprobs)
    assert torch.allclose(batch.rollout_logprobs[known], old[known], atol=2e-5, rtol=0)
    # r4b chat's session: the tool message holds the image, and the next turn reads it
    from r4b.engine.interactive import ChatSession

    session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=200), thinking_mode="short", toolbox=box)
    shown: list[str] = []
    assert session.send("look closer", shown.append).outputs[0].answer == "A red square."
    assert [m["role"] for m in session.history] == ["user", "assistant", "tool", "assistant"]
    assert session.history[2]["content"][0]["type"] == "image" and "<image 30x20> the region" in "".join(shown)
    # numpy images are images; float "images" (ToTensor's [0, 1]) are the call's error, not numbers for the model
    import numpy as np

    arr = picture.permute(1, 2, 0).numpy()

    def as_numpy() -> list:
        return [arr.copy(), "from numpy"]

    def as_floats() -> object:
        return picture.float() / 255

    def as_ints() -> object:
        return np.zeros((2, 4, 3), dtype=np.int64)

    r_np, r_f, r_i = Toolbox([as_numpy, as_floats, as_ints]).run(
        [ToolCall("as_numpy", {}), ToolCall("as_floats", {}), ToolCall("as_ints", {})])
    assert r_np.error is None and r_np.content == "from numpy" and torch.equal(r_np.images[0], picture.permute(1, 2, 0))
    assert r_f.error == "as_floats raised TypeError: an image must be uint8 (0-255), got a Tensor of torch.float32 " \
        "(3, 40, 70)"
    assert r_i.error is None and not r_i.images and "[[[0 0 0]" in r_i.content  # integers: numbers, as text
    # a text-only model cannot read the image: the model reads an error, the conversation goes on
    text_llm = LLM(tiny_model(3, max_position_embeddings=1024), TOK, num_kv_blocks=256, block_size=8)
    script(text_llm, policy)
    (t,) = run_tool_loop(text_llm, ["look"], box, SamplingParams(temperature=0, max_tokens=200),
                         thinking_mode="short")[0].trajectories
    assert t.tool_errors == 1 and t.turns[0].results[0].error == "zoom returned images, which this model cannot read"
    assert t.pixel_values == [] and "Error: zoom returned images" in TOK.decode(t.token_ids)
