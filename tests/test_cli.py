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
