"""Evaluation in the thinking modes (r4b.engine.evaluate, ``r4b eval``): the summary's statistics against a hand
computation, the samples against direct engine calls, failing rewards / rows / requests, the files, resuming an
interrupted run to the same samples, and the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest
import torch
from test_llm import TOK, tiny_model
from test_train_sft import make_model_dir, write_jsonl
from tiny_models import torch_kernels_on_cpu  # noqa: F401  (fixture)

from r4b.cli import main as cli_main
from r4b.engine import evaluate as evaluate_module
from r4b.engine.evaluate import (
    EvalConfig,
    evaluate,
    format_summary,
    parse_modes,
    prompt_seed,
    read_samples,
    run_eval,
    score_prompts,
    summarize,
)
from r4b.engine.llm import LLM
from r4b.engine.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("torch_kernels_on_cpu")

PROMPTS = ["What is 3 + 4?", "Name a prime number.", "hi", "Repeat 7."]


def digits(answer: str, reference) -> float:
    """A toy reward with spread: the share of digits in the answer."""
    return sum(ch.isdigit() for ch in answer) / max(1, len(answer))


@pytest.fixture(scope="module")
def model():
    return tiny_model(3)


def _row(pid, mode, reward, think, tokens, thinking=0, finish="stop", sample=0, err=None):
    return {"id": pid, "mode": mode, "sample": sample, "reward": reward, "reward_error": err, "think": think,
            "tokens": tokens, "thinking_tokens": thinking, "finish_reason": finish}


# ------------------------------------------------------------------------------------------------------ summarize


def test_summary_statistics_by_hand():
    """Three prompts, n=2: thinking helps prompt 0, hurts prompt 1, changes nothing on prompt 2."""
    rows = [
        _row(0, "short", 0.0, False, 4), _row(0, "short", 0.0, False, 6, sample=1),
        _row(0, "long", 1.0, True, 20, 15), _row(0, "long", 0.0, True, 30, 25, finish="length", sample=1),
        _row(0, "auto", 1.0, True, 22, 18), _row(0, "auto", 0.0, False, 5, sample=1),
        _row(1, "short", 1.0, False, 3), _row(1, "short", 1.0, False, 3, sample=1),
        _row(1, "long", 0.0, True, 40, 35), _row(1, "long", 1.0, True, 10, 6, sample=1),
        _row(1, "auto", 1.0, False, 3), _row(1, "auto", 1.0, False, 3, sample=1),
        _row(2, "short", 1.0, False, 2), _row(2, "short", 1.0, False, 2, sample=1),
        _row(2, "long", 1.0, True, 8, 5), _row(2, "long", 1.0, True, 8, 5, sample=1),
        _row(2, "auto", 0.0, True, 9, 6, err="ValueError: x"), _row(2, "auto", 1.0, True, 9, 6, sample=1),
        {"id": 3, "prompt": "too long", "error": "prompt longer than the cache"},
        {"id": 4, "where": "d.jsonl:5", "skipped": "no reference"},
        _row(5, "short", 1.0, False, 2),  # an incomplete prompt (no long / auto samples): left out
    ]
    s = summarize(rows)
    assert (s["prompts"], s["failed_prompts"], s["skipped_rows"], s["incomplete_prompts"]) == (3, 1, 1, 1)
    short, long_, auto = s["modes"]["short"], s["modes"]["long"], s["modes"]["auto"]
    assert short["completions"] == long_["completions"] == auto["completions"] == 6
    assert short["accuracy"] == pytest.approx(4 / 6) and long_["accuracy"] == pytest.approx(4 / 6)
    assert auto["accuracy"] == pytest.approx(4 / 6)
    # stderr over the per-prompt accuracies (0, 1, 1) of short: sample std sqrt(1/3), over sqrt(3)
    assert short["accuracy_stderr"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
    assert long_["accuracy_stderr"] == pytest.approx(math.sqrt(((0.5 - 2 / 3) ** 2 * 2 + (1 / 3) ** 2) / 2 / 3))
    assert auto["think_rate"] == pytest.approx(3 / 6) and long_["think_rate"] == 1.0 and short["think_rate"] == 0
    assert long_["tokens_mean"] == pytest.approx((20 + 30 + 40 + 10 + 8 + 8) / 6)
    assert long_["thinking_tokens_mean"] == pytest.approx((15 + 25 + 35 + 6 + 5 + 5) / 6)
    assert long_["answer_tokens_mean"] == pytest.approx((5 + 5 + 5 + 4 + 3 + 3) / 6)
    assert long_["truncated_rate"] == pytest.approx(1 / 6) and auto["reward_errors"] == 1
    assert s["thinking_gain"] == {"helps": 1, "hurts": 1, "no_change": 1, "mean": pytest.approx((0.5 - 0.5 + 0) / 3)}
    # oracle: long for prompt 0 (0.5, 25 tokens), short for 1 (1.0, 3) and 2 (a tie goes short: 1.0, 2)
    assert s["oracle"]["accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert s["oracle"]["tokens_mean"] == pytest.approx((25 + 3 + 2) / 3)
    d = s["auto_decision"]
    assert d["think_rate_when_thinking_helps"] == 0.5 and d["think_rate_when_thinking_hurts"] == 0.0
    assert d["think_rate_when_no_change"] == 1.0
    assert d["decision_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert d["auto_minus_oracle_accuracy"] == pytest.approx(4 / 6 - 2.5 / 3)
    table = format_summary(s)
    assert "| auto | 66.7 |" in table and "oracle" in table and "1 completions scored 0" in table


def test_partial_credit_rounding_is_no_change():
    """Per-prompt means of the same rewards summed in another order must not split the prompt into helps / hurts."""
    rows = [_row(0, "short", r, False, 1, sample=i) for i, r in enumerate((0.1, 0.2, 0.3))]
    rows += [_row(0, "long", r, True, 1, sample=i) for i, r in enumerate((0.3, 0.2, 0.1))]
    assert summarize(rows, ["short", "long"])["thinking_gain"]["no_change"] == 1


def test_summary_with_one_mode_and_nothing():
    s = summarize([_row(0, "auto", 1.0, True, 5)], ["auto"])
    assert s["modes"]["auto"]["accuracy"] == 1.0 and s["modes"]["auto"]["accuracy_stderr"] is None
    assert "oracle" not in s and "auto_decision" not in s
    empty = summarize([], ["short", "long"])
    assert empty["prompts"] == 0 and empty["modes"]["short"]["accuracy"] is None
    assert empty["oracle"]["accuracy"] is None
    format_summary(empty, ["short", "long"])  # renders "-" for the empty means


def test_modes_and_config_errors(tmp_path):
    assert parse_modes("short, long") == ("short", "long") and parse_modes(["auto"]) == ("auto",)
    for bad in ("", "short,bogus", "short,short", ["long", 3]):
        with pytest.raises(ValueError, match="mode"):
            parse_modes(bad)
    ok = dict(model="m", data="d.jsonl", output_dir=str(tmp_path))
    for field, value in (("n", 0), ("batch_size", 0), ("limit", -1), ("dtype", "int8"), ("temperature", -1.0),
                         ("modes", "auto,think"), ("max_thinking_tokens", -2), ("resume", "yes"), ("model", "")):
        with pytest.raises(ValueError, match=rf"(EvalConfig|SamplingParams)\.{field} "):
            EvalConfig(**{**ok, field: value}).validate()
    with pytest.raises(ValueError, match="unknown EvalConfig keys"):
        EvalConfig.from_dict({**ok, "modez": "auto"})
    assert prompt_seed(0, 1) != prompt_seed(0, 2) and prompt_seed(5, 1) == prompt_seed(5, 1)


# ------------------------------------------------------------------------------------------------------ the engine


def test_samples_are_the_engines_completions_scored(model):
    """Each row is one completion of a direct LLM.generate call in that mode with the prompt's own seed; the
    reward is the reward of its answer."""
    llm = LLM(model, TOK, num_kv_blocks=256, block_size=8)
    params = SamplingParams(temperature=1.0, max_tokens=8, n=2, seed=11)
    rows = score_prompts(llm, PROMPTS[:3], ["7", "2", None], [10, 11, 12], digits, modes="short,auto,long",
                         params=params)
    assert len(rows) == 3 * 3 * 2
    for pid, prompt in zip((10, 11, 12), PROMPTS, strict=False):
        outs = llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=8, n=2, seed=prompt_seed(11, pid)),
                            thinking_mode=["short", "auto", "long"], use_tqdm=False)[0].outputs
        for mode in ("short", "auto", "long"):
            want = [c for c in outs if c.thinking_mode == mode]
            got = sorted((r for r in rows if r["id"] == pid and r["mode"] == mode), key=lambda r: r["sample"])
            assert [r["sample"] for r in got] == [0, 1]
            for r, c in zip(got, want, strict=True):
                assert r["tokens"] == len(c.token_ids) and r["answer"] == c.answer and r["thinking"] == c.thinking
                assert r["think"] == (c.mode == "think") and r["thinking_tokens"] == c.num_thinking_tokens
                assert r["finish_reason"] == c.finish_reason and r["reward"] == digits(c.answer, None)
                assert r["prompt"] == prompt
    # a prompt's samples do not depend on its batch: alone, id 11 draws the same completions
    alone = score_prompts(llm, [PROMPTS[1]], ["2"], [11], digits, modes="short,auto,long", params=params)
    assert alone == [r for r in rows if r["id"] == 11]


def test_failing_reward_and_refused_request_are_recorded_not_fatal(model):
    llm = LLM(model, TOK, num_kv_blocks=16, block_size=4)  # 64 cache slots: a 200-token prompt cannot run

    def flaky(answer, reference):
        if reference == "boom":
            raise RuntimeError("reward crashed")
        return 1.0

    items = [(PROMPTS[0], "boom"), ("word " * 60, "x"), (PROMPTS[2], "ok")]
    s, rows = evaluate(llm, items, flaky, modes=["short", "long"], params=SamplingParams(temperature=0, max_tokens=3))
    assert s["prompts"] == 2 and s["failed_prompts"] == 1
    err = [r for r in rows if "error" in r]
    assert [r["id"] for r in err] == [1] and err[0]["error"]
    assert s["modes"]["short"]["reward_errors"] == 1 and s["modes"]["short"]["accuracy"] == 0.5
    bad = [r for r in rows if r.get("reward_error")]
    assert {r["id"] for r in bad} == {0} and all("RuntimeError: reward crashed" in r["reward_error"] for r in bad)
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks  # the engine is clean afterwards


def test_evaluate_in_memory_matches_score_prompts_and_batches_do_not_matter(model):
    llm = LLM(model, TOK, num_kv_blocks=256, block_size=8)
    items = [(p, "7") for p in PROMPTS]
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=3)
    s1, rows1 = evaluate(llm, items, "exact", params=params, batch_size=1)
    s3, rows3 = evaluate(llm, items, "exact", params=params, batch_size=3)
    assert rows1 == rows3 and s1 == s3 and s1["prompts"] == 4
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(llm, items, "exact", batch_size=0)
    with pytest.raises(ValueError, match="unknown reward"):
        evaluate(llm, items, "nope")


# ------------------------------------------------------------------------------------------------------ files, CLI


def eval_rows() -> list:
    return [{"prompt": "What is 3 + 4?", "answer": "7"}, {"prompt": "Repeat 5.", "answer": "5"},
            {"prompt": "Name a prime.", "answer": "2"},
            {"messages": [{"role": "user", "content": "Say 9."}], "reference": "9"},
            {"prompt": "no reference here"},  # skipped: nothing to score against
            {"prompt": ""},  # skipped: empty
            {"prompt": "Add 1 and 1.", "answer": "2"},
            {"prompt": "Odd text \ud800.", "answer": "3"},  # a lone surrogate: the tokenizer refuses it (a failed
            # request, recorded with its text escaped in samples.jsonl), and the run goes on
            {"prompt": "A list?", "answer": ["7"]},  # skipped: the exact reward needs a string or number
            {"prompt": "Null answer.", "answer": None, "reference": "4"}]  # the reference is taken


@pytest.fixture
def setup(tmp_path):
    model = make_model_dir(tmp_path / "model", seed=2)
    data = write_jsonl(tmp_path / "eval.jsonl", eval_rows())
    with open(data, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    return tmp_path, model, data


def cfg_for(tmp, model, data, out="out", **kw) -> EvalConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(tmp / out), reward="exact", temperature=1.0,
                max_tokens=6, n=2, seed=4, batch_size=2, device="cpu", progress=False)
    return EvalConfig(**{**base, **kw})


def test_run_eval_files_and_resume_after_a_crash(setup):
    tmp, model, data = setup
    full = run_eval(cfg_for(tmp, model, data, "full"))
    out = tmp / "full"
    assert {"samples.jsonl", "summary.json", "summary.md", "eval.png", "config.json", "eval_config.json"} <= \
        {p.name for p in out.iterdir()}
    assert (full["prompts"], full["failed_prompts"], full["skipped_rows"], full["rows"]) == (6, 1, 3, 10)
    assert full["unreadable_lines"] == 1  # the "{not json" line
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(full))
    samples = read_samples(out / "samples.jsonl")
    assert len([r for r in samples if "mode" in r]) == 6 * 3 * 2
    assert [r["prompt"] for r in samples if "error" in r] == ["Odd text \ud800."]
    assert sorted(r["where"].rsplit(":", 1)[1] for r in samples if "skipped" in r) == ["5", "6", "9"]
    assert {r["reference"] for r in samples if r["id"] == 9 and "mode" in r} == {"4"}

    # an interrupted run: the same evaluation killed mid-chunk (a prompt half written, a line cut short)
    part = tmp / "part"
    part.mkdir()
    for name in ("eval_config.json", "config.json"):
        (part / name).write_bytes((out / name).read_bytes())
    lines = (out / "samples.jsonl").read_bytes().splitlines(keepends=True)
    cut = 9  # the first prompt whole (6 rows), the second half (3) ...
    (part / "samples.jsonl").write_bytes(b"".join(lines[:cut]) + lines[cut][:17])  # ... and a torn line
    resumed = run_eval(cfg_for(tmp, model, data, "part"))
    key = lambda r: (r["id"], r.get("mode", ""), r.get("sample", -1))  # noqa: E731
    got = sorted(read_samples(part / "samples.jsonl"), key=key)
    assert got == sorted(samples, key=key)  # no duplicate of the half-written prompt, the same draws
    assert resumed == full

    # resuming with other sampling refuses, naming the field; resume=False starts over
    with pytest.raises(ValueError, match="temperature"):
        run_eval(cfg_for(tmp, model, data, "part", temperature=0.5))
    again = run_eval(cfg_for(tmp, model, data, "part", temperature=0.5, resume=False, limit=2, plot=False))
    assert again["prompts"] == 2 and len(read_samples(part / "samples.jsonl")) == 2 * 3 * 2
    assert not (part / "eval.png").exists()  # the earlier run's plot went with its samples

    # the same paths over a model retrained in place: its samples are not taken for the new model's
    make_model_dir(model, seed=7)
    with pytest.raises(ValueError, match="model_files"):
        run_eval(cfg_for(tmp, model, data, "full"))


def test_a_run_that_failed_before_its_first_chunk_binds_nothing(setup):
    tmp, model, data = setup
    with pytest.raises(ValueError, match="model: no checkpoint"):
        run_eval(cfg_for(tmp, tmp / "no-model", data, "o"))
    assert run_eval(cfg_for(tmp, model, data, "o", limit=1, plot=False))["prompts"] == 1


def test_cli_eval(setup, capsys):
    tmp, model, data = setup
    rc = cli_main(["eval", "--model", str(model), "--data", str(data), "--output-dir", str(tmp / "cli"),
                   "--reward", "exact", "--modes", "short,long", "--max-tokens", "4", "--limit", "3", "--no-progress",
                   "--no-plot", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| non-thinking (short) |" in printed and "| thinking (long) |" in printed and "| auto |" not in printed
    s = json.loads((tmp / "cli" / "summary.json").read_text())
    assert s["prompts"] == 3 and set(s["modes"]) == {"short", "long"} and "auto_decision" not in s
    assert not (tmp / "cli" / "eval.png").exists()
    for flags, say in ((["--modes", "sideways"], "modes"), (["--reward", ".x:f"], "reward '.x:f' cannot be imported"),
                       (["--reward", ":f"], "reward ':f' cannot be imported")):
        with pytest.raises(SystemExit, match=say):
            cli_main(["eval", "--model", str(model), "--data", str(data), "--output-dir", str(tmp / "cli2"), *flags])
    (tmp / "half").mkdir()
    (tmp / "half" / "tokenizer.json").write_text("{}")
    with pytest.raises(SystemExit, match="no checkpoint"):
        cli_main(["eval", "--model", str(tmp / "half"), "--data", str(data), "--output-dir", str(tmp / "cli3")])


def test_r4b_image_prompts_are_evaluated():
    """An R-4B chat with an image runs in every mode (the prompt text shows the image as <image>)."""
    from test_llm import tiny_r4b_chat

    model, tok, msgs = tiny_r4b_chat()
    llm = LLM(model, tok, num_kv_blocks=256, block_size=16)
    s, rows = evaluate(llm, [(msgs, "x")], "exact", params=SamplingParams(temperature=0, max_tokens=3))
    assert s["prompts"] == 1 and len(rows) == 3 and rows[0]["prompt"] == "user: <image>What?"
    assert torch.is_tensor(msgs[0]["content"][0]["image"])  # the caller's chat is left as it was


def test_two_ranks_deal_out_the_prompts_and_a_run_resumes_in_any_world(setup):
    """torchrun with 2 processes: the prompts are dealt out, each rank writes its own samples.rank<r>.jsonl, rank 0
    folds them into samples.jsonl and writes the summary (printed once): the same samples and summary as one
    process. An interrupted two-rank run (whole prompts, a half-written one, a torn line in the ranks' files)
    resumes in a world of one to the same samples."""
    from test_train_sft import _torchrun

    tmp, model, data = setup
    full = run_eval(cfg_for(tmp, model, data, "full", plot=False))
    samples = read_samples(tmp / "full" / "samples.jsonl")
    key = lambda r: (r["id"], r.get("mode", ""), r.get("sample", -1))  # noqa: E731
    cfg_file = tmp / "two.json"  # (a file: torchrun would take "--n" for an abbreviation of its own flags)
    cfg_file.write_text(json.dumps(dataclasses.asdict(cfg_for(tmp, model, data, "two", plot=False))))
    r = _torchrun(["eval", "--config", str(cfg_file)], 2)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert r.stdout.count("| non-thinking (short) |") == 1  # rank 0 reports
    two = tmp / "two"
    assert sorted(read_samples(two / "samples.jsonl"), key=key) == sorted(samples, key=key)
    assert json.loads((two / "summary.json").read_text()) == json.loads(json.dumps(full))
    assert not list(two.glob("samples.rank*"))

    # a two-rank run killed mid-way: rank 0 had finished prompt 0 and half of prompt 2, rank 1 prompt 1 and a torn
    # line; the world of one resumes from there
    by_id = {}
    for row in samples:  # each finished prompt's rows carry a mark: kept rows keep it, recomputed ones do not
        by_id.setdefault(row["id"], []).append(json.dumps({**row, "kept": True}).encode() + b"\n")
    for name, rank0, rank1 in (("torn", b"".join(by_id[0] + by_id[2][:3]), b"".join(by_id[1]) + by_id[3][0][:11]),
                               ("whole", b"".join(by_id[0]), b"".join(by_id[1]))):
        part = tmp / f"part-{name}"
        part.mkdir()
        for f in ("eval_config.json", "config.json"):
            (part / f).write_bytes((two / f).read_bytes())
        (part / "samples.jsonl").write_bytes(b"")
        (part / "samples.rank0.jsonl").write_bytes(rank0)
        (part / "samples.rank1.jsonl").write_bytes(rank1)
        resumed = run_eval(cfg_for(tmp, model, data, part.name, plot=False))
        got = read_samples(part / "samples.jsonl")
        assert {r["id"] for r in got if r.pop("kept", False)} == {0, 1}, name  # not recomputed
        assert sorted(got, key=key) == sorted(samples, key=key), name
        assert resumed == full and not list(part.glob("samples.rank*")), name


FAILING_RANK = """
import json, os, sys
from r4b.engine import evaluate as ev
cfg = ev.EvalConfig(**json.load(open(sys.argv[1])))
rank, where = int(os.environ["RANK"]), sys.argv[2]
if where == "sampling" and rank == 1:
    real = ev._sample
    def failing(cfg, llm, todo, *args, **kw):
        real(cfg, llm, todo[:1], *args, **kw)  # one prompt written, then this rank fails
        raise RuntimeError("injected on rank 1")
    ev._sample = failing
if where == "summary" and rank == 0:
    def failing(*args, **kw):
        raise RuntimeError("injected in the summary")
    ev._write_summary = failing
try:
    ev.run_eval(cfg)
except Exception as e:
    print(f"rank {rank} raised {type(e).__name__}: {e}", flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize("where", ["sampling", "summary"])
def test_a_failing_rank_stops_every_rank_and_the_run_resumes(setup, where):
    """One rank fails (rank 1 while sampling, or rank 0 writing the summary): every rank raises within seconds (none
    is left waiting at a collective the failed one never reaches), no summary is written from partial samples, and
    the run resumes alone to the samples and summary of a run that never failed."""
    from test_train_sft import _torchrun

    tmp, model, data = setup
    full = run_eval(cfg_for(tmp, model, data, "full", plot=False))
    key = lambda r: (r["id"], r.get("mode", ""), r.get("sample", -1))  # noqa: E731
    script = tmp / "failing_rank.py"
    script.write_text(FAILING_RANK)
    cfg_file = tmp / "two.json"
    cfg_file.write_text(json.dumps(dataclasses.asdict(cfg_for(tmp, model, data, "two", plot=False))))
    r = _torchrun([str(cfg_file), where], 2, script=str(script), timeout=240)
    printed = r.stdout + r.stderr
    assert r.returncode != 0, printed[-4000:]
    two = tmp / "two"
    assert not (two / "summary.json").exists()
    if where == "sampling":
        assert "rank 1 raised RuntimeError: injected on rank 1" in printed
        assert "rank 0 raised RuntimeError: sampling failed on rank(s) 1 (RuntimeError: injected on rank 1)" \
            in printed, printed[-4000:]
        assert read_samples(two / "samples.rank1.jsonl")  # its first prompt, kept for the resume
    else:
        assert "rank 0 raised RuntimeError: injected in the summary" in printed
        assert "rank 1 raised RuntimeError: rank 0 failed writing the summary: RuntimeError: injected in the " \
            "summary" in printed, printed[-4000:]
    resumed = run_eval(cfg_for(tmp, model, data, "two", plot=False))
    assert sorted(read_samples(two / "samples.jsonl"), key=key) == \
        sorted(read_samples(tmp / "full" / "samples.jsonl"), key=key)
    assert resumed == full


def test_a_fold_cut_off_before_the_ranks_files_were_deleted_keeps_each_row_once(setup, monkeypatch):
    """Rank 0 appended the ranks' files to samples.jsonl and died before deleting them: the resume takes each row
    once, and recomputes nothing (it never loads the model)."""
    tmp, model, data = setup
    full = run_eval(cfg_for(tmp, model, data, "full", plot=False))
    samples = read_samples(tmp / "full" / "samples.jsonl")
    part = tmp / "part"
    part.mkdir()
    for f in ("eval_config.json", "config.json", "samples.jsonl"):
        (part / f).write_bytes((tmp / "full" / f).read_bytes())
    rows = [json.dumps(r) + "\n" for r in samples if r["id"] in (1, 2)]
    (part / "samples.rank1.jsonl").write_text("".join(rows))  # already in samples.jsonl too

    def no_model(*args, **kw):
        raise AssertionError("every prompt was done: nothing to compute")

    monkeypatch.setattr(evaluate_module, "_load_llm", no_model)
    resumed = run_eval(cfg_for(tmp, model, data, "part", plot=False))
    key = lambda r: (r["id"], r.get("mode", ""), r.get("sample", -1))  # noqa: E731
    assert sorted(read_samples(part / "samples.jsonl"), key=key) == sorted(samples, key=key)
    assert resumed == full and not list(part.glob("samples.rank*"))


def test_penalties_are_sampling_fields_of_the_resume_key(setup):
    """presence_penalty (and min_p, frequency / repetition penalties) reach the sampler and bind a resume when set;
    a run that leaves them at their defaults writes no such field, so runs from before they existed resume."""
    tmp, model, data = setup
    plain = run_eval(cfg_for(tmp, model, data, "plain", limit=2, plot=False))
    assert not {"presence_penalty", "min_p"} & set(json.loads((tmp / "plain" / "eval_config.json").read_text()))
    cfg = cfg_for(tmp, model, data, "pen", limit=2, plot=False, presence_penalty=1.5, repetition_penalty=1.3)
    assert cfg.sampling_params().presence_penalty == 1.5 and cfg.sampling_params().repetition_penalty == 1.3
    pen = run_eval(cfg)
    key = json.loads((tmp / "pen" / "eval_config.json").read_text())
    assert (key["presence_penalty"], key["repetition_penalty"]) == (1.5, 1.3) and "min_p" not in key
    assert pen["prompts"] == plain["prompts"] == 2
    with pytest.raises(ValueError, match="presence_penalty"):
        run_eval(cfg_for(tmp, model, data, "pen", limit=2, plot=False, repetition_penalty=1.3))
    with pytest.raises(ValueError, match="EvalConfig: SamplingParams.presence_penalty"):
        run_eval(cfg_for(tmp, model, data, "bad", presence_penalty=3.0))
    assert run_eval(cfg_for(tmp, model, data, "plain", limit=2, plot=False)) == plain  # resumes: nothing to redo


def test_tools_make_each_sample_a_conversation(setup, monkeypatch):
    """--tools: every completion is a conversation (scripted: call add(a, b), then answer with its result); the
    sample holds its turns, calls and messages, the summary its tool table, and the tools bind a resume."""
    from test_agent import question_adder, script_every_llm

    from r4b.engine.chat import ChatTokenizer

    tmp, model, _ = setup
    data = write_jsonl(tmp / "sums.jsonl", [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
                                           for a, b in ((1, 2), (30, 4), (5, 5))])
    tools = tmp / "tools.py"
    tools.write_text("def add(a: int, b: int) -> int:\n    return a + b\n")
    script_every_llm(monkeypatch, ChatTokenizer(model / "tokenizer.json"), question_adder)
    cfg = cfg_for(tmp, model, data, "tools", reward="math", max_tokens=80, n=1, tools=f"{tools}:add",
                  max_tool_turns=3, plot=False)
    s = run_eval(cfg)
    assert s["prompts"] == 3
    for m in ("short", "auto", "long"):
        r = s["modes"][m]
        assert r["accuracy"] == 1.0 and r["turns_mean"] == 2.0 and r["tool_calls_mean"] == 1.0
        assert r["tool_errors"] == 0 and r["max_turns_rate"] == 0.0
    assert s["modes"]["long"]["think_rate"] == 1.0 and s["modes"]["short"]["think_rate"] == 0.0
    rows = [r for r in read_samples(tmp / "tools" / "samples.jsonl") if "mode" in r]
    assert len(rows) == 9 and all(r["turns"] == 2 and r["stop_reason"] == "answer" for r in rows)
    r = next(r for r in rows if r["id"] == 1 and r["mode"] == "long")
    assert r["answer"] == "\\boxed{34}" and [m["role"] for m in r["messages"]] == ["assistant", "tool", "assistant"]
    assert r["messages"][1]["content"] == "34" and r["thinking"] == "Let me add."
    assert "| turns | tool calls |" in (tmp / "tools" / "summary.md").read_text()
    key = json.loads((tmp / "tools" / "eval_config.json").read_text())
    assert key["tools"] == f"{tools}:add" and key["max_tool_turns"] == 3 and key["tool_timeout"] == 30.0
    assert key["tools_sha256"] == hashlib.sha256(tools.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="max_tool_turns"):
        run_eval(dataclasses.replace(cfg, max_tool_turns=2))
    tools.write_text("def add(a: int, b: int) -> int:\n    return a + b + 1\n")  # edited tools: not the same run
    with pytest.raises(ValueError, match="tools_sha256"):
        run_eval(cfg)
    plain = evaluate_module._sample_key(dataclasses.replace(cfg, tools=None), "digest")
    assert not {"tools", "max_tool_turns", "tool_timeout", "tools_sha256"} & set(plain)  # older runs still resume
    for kw, name in ((dict(tools="add"), "tools"), (dict(tool_timeout=-1), "tool_timeout")):
        with pytest.raises(ValueError, match=f"EvalConfig.{name}"):
            cfg_for(tmp, model, data, "x", **kw).validate()
