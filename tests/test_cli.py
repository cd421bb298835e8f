"""The r4b command line."""

from __future__ import annotations

import pytest

from r4b import cli


def test_info_lists_every_op(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for op in ("group_advantages", "pack", "varlen_attention"):
        assert op in out
    assert "r4b._C: cpu ops" in out


def test_unknown_arguments_are_refused():
    with pytest.raises(SystemExit):
        cli.main(["info", "--bogus"])


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """A tiny random Qwen3 saved in the HF layout with the demo tokenizer beside it."""
    import shutil

    import torch
    from tiny_models import randomize

    from r4b.engine.chat import DEMO_TOKENIZER, ChatTokenizer
    from r4b.engine.model import Qwen3Config, Qwen3ForCausalLM, save_pretrained

    monkeypatch.setenv("R4B_BACKEND", "torch")  # the Triton interpreter would be slow here
    cfg = Qwen3Config(vocab_size=ChatTokenizer.demo().vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(0)
    model = randomize(Qwen3ForCausalLM(cfg))
    save_pretrained(model, tmp_path)
    shutil.copy(DEMO_TOKENIZER, tmp_path / "tokenizer.json")
    return tmp_path


def test_generate_prints_what_the_engine_generates(checkpoint, capsys):
    import json

    from r4b.engine.chat import ChatTokenizer
    from r4b.engine.llm import LLM
    from r4b.engine.model import from_pretrained
    from r4b.engine.sampling import SamplingParams

    args = ["generate", str(checkpoint), "-p", "hi", "-p", "What is 2 + 2?", "--temperature", "0",
            "--max-tokens", "6", "--thinking-mode", "short", "--json"]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    llm = LLM(from_pretrained(checkpoint), ChatTokenizer.demo())
    ref = llm.generate(["hi", "What is 2 + 2?"], SamplingParams(temperature=0, max_tokens=6), thinking_mode="short",
                       use_tqdm=False)
    assert [r["outputs"][0]["token_ids"] for r in rows] == [o.outputs[0].token_ids for o in ref]
    assert [r["outputs"][0]["thinking_mode"] for r in rows] == ["short", "short"]
    assert all(len(r["outputs"][0]["token_ids"]) <= 6 for r in rows)


def test_generate_sampling_flags(checkpoint, capsys):
    """min-p and the penalties reach the engine (the same tokens as the API with them, not those without); a bad
    value stops before the model loads, naming the field."""
    import json

    from r4b.engine.chat import ChatTokenizer
    from r4b.engine.llm import LLM
    from r4b.engine.model import from_pretrained
    from r4b.engine.sampling import SamplingParams

    flags = ["--temperature", "0", "--max-tokens", "12", "--thinking-mode", "short", "--json"]
    pen = ["--repetition-penalty", "1.8", "--frequency-penalty", "1.0", "--presence-penalty", "0.5", "--min-p", "0.1"]
    assert cli.main(["generate", str(checkpoint), "-p", "hi", *flags, *pen]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[0])["outputs"][0]["token_ids"]
    llm = LLM(from_pretrained(checkpoint), ChatTokenizer.demo())
    kw = dict(temperature=0, max_tokens=12)
    want = llm.generate(["hi"], SamplingParams(**kw, repetition_penalty=1.8, frequency_penalty=1.0,
                                               presence_penalty=0.5, min_p=0.1), thinking_mode="short",
                        use_tqdm=False)[0].outputs[0].token_ids
    plain = llm.generate(["hi"], SamplingParams(**kw), thinking_mode="short", use_tqdm=False)[0].outputs[0].token_ids
    assert got == want and got != plain
    with pytest.raises(SystemExit, match="presence_penalty must be in"):
        cli.main(["generate", str(checkpoint / "missing"), "-p", "hi", "--presence-penalty", "3"])


def test_generate_reads_jsonl_and_streams(checkpoint, tmp_path, capsys):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n\n')
    assert cli.main(["generate", str(checkpoint), "--file", str(f), "--temperature", "0", "--max-tokens", "4",
                     "--stream"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(("[length]", "[stop]"))
    f.write_text('{"text": "hi"}\n')
    with pytest.raises(SystemExit, match="prompts.jsonl:1: expected"):
        cli.main(["generate", str(checkpoint), "--file", str(f)])
    with pytest.raises(SystemExit, match="give --prompt"):
        cli.main(["generate", str(checkpoint)])
    with pytest.raises(SystemExit, match="no tokenizer at"):
        cli.main(["generate", str(checkpoint), "-p", "x", "--tokenizer", str(tmp_path / "none.json")])


def test_generate_with_tools_and_an_answer_prefix(checkpoint, tmp_path, capsys):
    """--tools renders the schemas into the prompt (the engine's prompt with them), --answer-prefix starts every
    answer; a bad tools file stops before the model loads."""
    import json

    from r4b.engine.chat import ChatTokenizer
    from r4b.engine.llm import LLM
    from r4b.engine.model import from_pretrained
    from r4b.engine.sampling import SamplingParams

    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    f = tmp_path / "tools.json"
    f.write_text(json.dumps(tools))
    args = ["generate", str(checkpoint), "-p", "2+2?", "--temperature", "0", "--max-tokens", "12", "--thinking-mode",
            "short", "--tools", str(f), "--answer-prefix", "<tool_call>", "--json"]
    assert cli.main(args) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    tok = ChatTokenizer.demo()
    assert row["prompt_token_ids"] == tok.encode_chat([{"role": "user", "content": "2+2?"}], "short",
                                                      tools=tools).input_ids.tolist()[:-4]  # less the mode suffix
    c = row["outputs"][0]
    assert c["answer"].startswith("<tool_call>") and c["tool_calls"] == []  # a random model writes no call
    llm = LLM(from_pretrained(checkpoint), tok)
    want = llm.generate(["2+2?"], SamplingParams(temperature=0, max_tokens=12), thinking_mode="short", tools=tools,
                        answer_prefix="<tool_call>", use_tqdm=False)[0].outputs[0]
    assert c["token_ids"] == want.token_ids
    assert cli.main(["generate", str(checkpoint), "-p", "hi", "--temperature", "0", "--max-tokens", "30",
                     "--thinking-mode", "short", "--response-format", "json_object", "--json"]) == 0
    c = json.loads(capsys.readouterr().out.splitlines()[0])["outputs"][0]
    want = llm.generate(["hi"], SamplingParams(temperature=0, max_tokens=30, response_format="json_object"),
                        thinking_mode="short", use_tqdm=False)[0].outputs[0]
    assert c["token_ids"] == want.token_ids and c["answer"].lstrip()[:1] == "{"
    assert cli.main(["generate", str(checkpoint), "-p", "2+2?", "--temperature", "0", "--max-tokens", "60",
                     "--thinking-mode", "short", "--tools", str(f), "--tool-choice", "add", "--json"]) == 0
    c = json.loads(capsys.readouterr().out.splitlines()[0])["outputs"][0]
    assert c["finish_reason"] == "stop" and [t["name"] for t in c["tool_calls"]] == ["add"], c
    for stream in ([], ["--stream"]):  # a tool_choice the engine refuses: a clean exit, streamed or not
        with pytest.raises(SystemExit, match="tool_choice: no tool is named 'nope'"):
            cli.main(["generate", str(checkpoint), "-p", "x", "--tools", str(f), "--tool-choice", "nope", *stream])
    with pytest.raises(SystemExit, match="--tool-choice needs --tools"):
        cli.main(["generate", str(checkpoint), "-p", "x", "--tool-choice", "required"])
    f.write_text('{"type": "function"}')
    with pytest.raises(SystemExit, match="expected a JSON list of tool schemas"):
        cli.main(["generate", str(checkpoint / "missing"), "-p", "x", "--tools", str(f)])
    f.write_text('["get_weather"]')  # a list, of something else: refused before the model loads, streamed or not
    for stream in ([], ["--stream"]):
        with pytest.raises(SystemExit, match=r"tools\[0\] must be a JSON object"):
            cli.main(["generate", str(checkpoint / "missing"), "-p", "x", "--tools", str(f), *stream])
    with pytest.raises(SystemExit, match="--tools .*none.json"):
        cli.main(["generate", str(checkpoint / "missing"), "-p", "x", "--tools", str(tmp_path / "none.json")])


def test_chat_streams_multi_turn_replies(checkpoint, monkeypatch, capsys):
    """r4b chat: each reply streams the engine's own completion of the conversation so far (the history holds the
    earlier answers and thoughts); commands change the mode and the budget, /reset clears the history."""
    import io

    from r4b.engine.chat import ChatTokenizer
    from r4b.engine.llm import LLM
    from r4b.engine.model import from_pretrained
    from r4b.engine.sampling import SamplingParams

    lines = "hi\n/mode long\n/budget 3\nand then?\n/reset\n/mode short\nagain\n/bogus\n/exit\nnever sent\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert cli.main(["chat", str(checkpoint), "--temperature", "0", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    llm = LLM(from_pretrained(checkpoint), ChatTokenizer.demo())
    greedy = SamplingParams(temperature=0, max_tokens=8)
    first = llm.generate([[{"role": "user", "content": "hi"}]], greedy, thinking_mode="auto", use_tqdm=False)[0]
    c1 = first.outputs[0]
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": c1.answer, "reasoning_content": c1.thinking},
               {"role": "user", "content": "and then?"}]
    c2 = llm.generate([history], greedy, thinking_mode="long", max_thinking_tokens=3, use_tqdm=False)[0].outputs[0]
    c3 = llm.generate([[{"role": "user", "content": "again"}]], greedy, thinking_mode="short",
                      use_tqdm=False)[0].outputs[0]
    for c in (c1, c2, c3):
        shown = (f"<think>\n{c.thinking}\n</think>\n\n" if c.thinking else "") + c.answer
        assert shown in out
        assert f"[{c.thinking_mode} -> {c.mode}, {len(c.token_ids)} tokens ({c.num_thinking_tokens} thinking)" in out
    assert c2.num_thinking_tokens <= 4  # the budget reached the engine
    assert "[thinking mode: long]" in out and "[history cleared]" in out and "commands: /mode" in out
    assert out.count(" tokens (") == 3  # "never sent" came after /exit


def test_chat_runs_tools(checkpoint, monkeypatch, capsys, tmp_path):
    """r4b chat --tools: each call and its result are shown, the results go back into the history as tool
    messages and the model goes on (scripted: a tiny random model calls no tool by itself); the turn limit holds
    and a bad --tools spec is refused."""
    import io

    from test_agent import question_adder, script_every_llm

    from r4b.engine.chat import ChatTokenizer

    tools = tmp_path / "tools.py"
    tools.write_text("def add(a: int, b: int) -> int:\n    '''Add two integers.'''\n    return a + b\n")
    script_every_llm(monkeypatch, ChatTokenizer.demo(), question_adder)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 3?\n/mode long\nWhat is 40 + 2?\n"))
    assert cli.main(["chat", str(checkpoint), "--temperature", "0", "--max-tokens", "200", "--thinking-mode", "short",
                     "--tools", f"{tools}:add"]) == 0
    out = capsys.readouterr().out
    assert '[tool add({"a": 2, "b": 3}) -> 5]' in out and "\\boxed{5}" in out
    assert '[tool add({"a": 40, "b": 2}) -> 42]' in out and "\\boxed{42}" in out
    assert out.count(" tokens (") == 4  # two turns per message
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 1 + 1?\n"))
    assert cli.main(["chat", str(checkpoint), "--temperature", "0", "--max-tokens", "200", "--tools",
                     f"{tools}:add", "--max-tool-turns", "1"]) == 0
    out = capsys.readouterr().out
    assert "[1 tool call not run: the reply reached its turn limit]" in out and "[tool add" not in out
    with pytest.raises(SystemExit, match="r4b chat: tools: .*has no 'nope'"):
        cli.main(["chat", str(checkpoint), "--tools", f"{tools}:nope"])


def test_generate_runs_tools(checkpoint, monkeypatch, capsys, tmp_path):
    """r4b generate --run-tools: each completion is a conversation in which r4b runs the calls (scripted turns); the
    text and --json outputs show the turns, calls, results and the answer; clashing flags are refused."""
    import json

    from test_agent import question_adder, script_every_llm

    from r4b.engine.chat import ChatTokenizer

    tools = tmp_path / "tools.py"
    tools.write_text("def add(a: int, b: int) -> int:\n    '''Add two integers.'''\n    return a + b\n")
    script_every_llm(monkeypatch, ChatTokenizer.demo(), question_adder)
    base = ["generate", str(checkpoint), "-p", "What is 2 + 3?", "-p", "What is 10 + 1?", "--temperature", "0",
            "--max-tokens", "200", "--thinking-mode", "long", "--run-tools", f"{tools}:add"]
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "[request 0 #0 long: 2 turns, 1 tool calls (0 failed)" in out and "answer]" in out
    assert '[tool call] add({"a": 2, "b": 3})' in out and "[tool add -> 5]" in out and "\\boxed{5}" in out
    assert "[tool add -> 11]" in out and "\\boxed{11}" in out and "<think>\nLet me add.\n</think>" in out
    assert cli.main([*base, "--json", "-n", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["request_index"] for r in rows] == [0, 1] and all(len(r["conversations"]) == 2 for r in rows)
    c = rows[1]["conversations"][1]
    assert (c["answer"], c["stop_reason"], c["turns"], c["tool_calls"]) == ("\\boxed{11}", "answer", 2, 1)
    assert [m["role"] for m in c["messages"]] == ["assistant", "tool", "assistant"]
    for extra, flag in ((["--stream"], "--stream"), (["--answer-prefix", "x"], "--answer-prefix")):
        with pytest.raises(SystemExit, match=f"--run-tools does not go with {flag}"):
            cli.main([*base, *extra])
    with pytest.raises(SystemExit, match="--run-tools: tools: .*has no 'sub'"):
        cli.main([*base[:-1], f"{tools}:sub"])


def test_chat_session_history_with_tools(checkpoint, monkeypatch):
    from test_agent import question_adder, script_every_llm

    from r4b.engine.agent import Toolbox
    from r4b.engine.chat import ChatTokenizer
    from r4b.engine.interactive import ChatSession
    from r4b.engine.llm import LLM
    from r4b.engine.model import from_pretrained
    from r4b.engine.sampling import SamplingParams

    def add(a: int, b: int) -> int:
        return a + b

    script_every_llm(monkeypatch, ChatTokenizer.demo(), question_adder)
    llm = LLM(from_pretrained(checkpoint), ChatTokenizer.demo())
    s = ChatSession(llm, SamplingParams(temperature=0, max_tokens=200), thinking_mode="long",
                    toolbox=Toolbox([add]))
    shown: list[str] = []
    out = s.send("What is 7 + 8?", shown.append)
    assert out.outputs[0].answer == "\\boxed{15}"
    assert [m["role"] for m in s.history] == ["user", "assistant", "tool", "assistant"]
    assert s.history[1]["tool_calls"] == [{"type": "function", "function": {"name": "add",
                                                                             "arguments": '{"a": 7, "b": 8}'}}]
    assert s.history[1]["reasoning_content"] == "Let me add." and s.history[2]["content"] == "15"
    # the second turn is the engine's completion of the history with the tool message, rendered by the template
    want = llm.generate([s.history[:3]], SamplingParams(temperature=0, max_tokens=200), thinking_mode="long",
                        tools=s.toolbox.schemas, use_tqdm=False)[0].outputs[0]
    assert want.answer == s.history[3]["content"]
    # the turn limit: the call that did not run stays in the history as the model wrote it
    s = ChatSession(llm, SamplingParams(temperature=0, max_tokens=200), thinking_mode="short",
                    toolbox=Toolbox([add]), max_turns=1)
    s.send("What is 1 + 1?", shown.append)
    assert [m["role"] for m in s.history] == ["user", "assistant"] and "<tool_call>" in s.history[1]["content"]
    assert shown[-1] == "[1 tool call not run: the reply reached its turn limit]\n"


def test_chat_session_malformed_calls_and_a_refused_later_turn(checkpoint, monkeypatch):
    """A <tool_call> block that is no call gets the format as an error result (as in r4b.engine.agent's loop);
    a later turn the engine refuses keeps the turns and results before it (the tools ran), a refused first turn
    leaves the history as it was."""
    from test_agent import script_every_llm

    from r4b.engine.agent import MALFORMED, Toolbox
    from r4b.engine.chat import ChatTokenizer
    from r4b.engine.interactive import ChatSession
    from r4b.engine.llm import LLM
    from r4b.engine.model import from_pretrained
    from r4b.engine.sampling import SamplingParams

    def echo(text: str) -> str:
        return text * 40

    def policy(text, seq):
        if "tool_response" not in text[text.rindex("<|im_start|>user"):] and "Error" not in text:
            return "<tool_call>\n{not json}\n</tool_call>" if "broken" in text else \
                '<tool_call>\n{"name": "echo", "arguments": {"text": "long "}}\n</tool_call>'
        return "ok"

    script_every_llm(monkeypatch, ChatTokenizer.demo(), policy)
    model, tok = from_pretrained(checkpoint), ChatTokenizer.demo()
    greedy = SamplingParams(temperature=0, max_tokens=100)
    s = ChatSession(LLM(model, tok), greedy, thinking_mode="short", toolbox=Toolbox([echo]))
    shown: list[str] = []
    out = s.send("broken", shown.append)
    assert out.error is None, out.error
    assert [m["role"] for m in s.history] == ["user", "assistant", "tool", "assistant"]
    assert s.history[2]["content"] == f"Error: {MALFORMED}" and s.history[3]["content"] == "ok"
    # the first turn of "fine" fits in max_model_len, with its echo result (200 characters) the next turn does not
    one = ChatSession(LLM(model, tok), greedy, thinking_mode="short", toolbox=Toolbox([echo]), max_turns=1)
    one.send("fine", shown.append)
    first = len(tok.encode_chat(one.history, add_generation_prompt=False, tools=one.toolbox.schemas).input_ids)
    s = ChatSession(LLM(model, tok, max_model_len=first + 8), greedy, thinking_mode="short", toolbox=Toolbox([echo]))
    out = s.send("fine", shown.append)
    assert out.error is not None and "max_model_len" in out.error
    assert [m["role"] for m in s.history] == ["user", "assistant", "tool"] and s.history[2]["content"] == "long " * 40
    s.history.clear()
    out = s.send("x " * 400, shown.append)  # the first turn refused: nothing kept
    assert out.error is not None and s.history == []


def test_train_flags_cover_every_config_field_and_override_the_config_file(tmp_path):
    """Every SFTConfig / BPOConfig field has a flag (bools as --x / --no-x, optional bools take auto); flags
    override the --config file, which overrides the defaults."""
    import argparse
    import dataclasses
    import json

    from r4b.engine.train.bpo import BPOConfig
    from r4b.engine.train.sft import SFTConfig

    for cls in (SFTConfig, BPOConfig):
        p = argparse.ArgumentParser()
        cli.add_config_args(p, cls)
        flags = {a.dest for a in p._actions}
        assert {f.name for f in dataclasses.fields(cls)} <= flags
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"model": "m", "data": "d", "output_dir": "o", "lr": 0.5, "progress": True,
                             "cuda_graphs": True}))
    p = argparse.ArgumentParser()
    cli.add_config_args(p, BPOConfig)
    args = p.parse_args(["--config", str(f), "--lr", "0.25", "--no-progress", "--cuda-graphs", "auto",
                         "--max-thinking-tokens", "7", "--tokenizer", "t.json"])
    args.cmd = "bpo"
    cfg = cli.config_from_args(BPOConfig, args)
    assert (cfg.model, cfg.lr, cfg.progress, cfg.cuda_graphs, cfg.max_thinking_tokens, cfg.tokenizer) == \
        ("m", 0.25, False, None, 7, "t.json")
    assert cfg.g == BPOConfig.g  # untouched fields keep their defaults
    f.write_text(json.dumps({"model": "m", "learning_rate": 1}))
    with pytest.raises(SystemExit, match="learning_rate"):
        cli.config_from_args(BPOConfig, argparse.Namespace(config=str(f), cmd="bpo"))


def test_sft_command_trains_and_rejects_bad_values(checkpoint, tmp_path, capsys, monkeypatch):
    import json

    from r4b.engine.train.metrics import read_metrics

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}?", "response": str(i)}) + "\n" for i in range(8)))
    base = ["sft", "--model", str(checkpoint), "--data", str(data), "--output-dir", str(tmp_path / "run"),
            "--max-seq-len", "48", "--max-tokens", "64", "--device", "cpu", "--no-progress", "--no-tensorboard"]
    with pytest.raises(SystemExit, match="SFTConfig.max_seq_len"):
        cli.main(base + ["--max-seq-len", "100"])  # the last value of a flag wins: 100 > max_tokens 64
    assert cli.main(base + ["--steps", "2", "--save-every", "0"]) == 0
    assert "r4b sft: done" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert (tmp_path / "run" / "final" / "tokenizer.json").is_file()
