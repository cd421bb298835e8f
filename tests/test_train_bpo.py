"""The BPO trainer (stage 2) end to end on a tiny Qwen3 on the CPU: rollouts in both forced modes through the
engine on the trainer's own (FSDP2-gathered) parameters, the loss weighted over micro-batches to the loss of the
whole batch, the probe, the reference KL, resuming to the same curve, and two torchrun ranks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_train_sft import _torchrun, make_model_dir, params_of, write_jsonl  # noqa: I001

from r4b.engine.rollout import bpo_rollouts
from r4b.engine.train.bpo import BPOConfig, BPOTrainer, resolve_reward, train_bpo
from r4b.engine.train.metrics import read_metrics
from r4b.kernels import fused_linear_grpo_loss

PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in
           [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3), (4, 4), (7, 1), (2, 5)]]


def varied_reward(answer: str, reference: object = None) -> float:
    """A reward that differs between a tiny random model's answers (so advantages and updates are not zero)."""
    return (len(answer) % 4) / 3


@pytest.fixture(autouse=True)
def _cpu_backends(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def run(tmp_path):
    model = make_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    probe = write_jsonl(tmp_path / "probe.jsonl", PROMPTS[:3])
    return tmp_path, model, data, probe


def config(tmp: Path, model: Path, data: Path, name: str, **kw) -> BPOConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(tmp / name), steps=2, lr=1e-3,
                reward="r4b.demo:reward_fn", g=2, prompts_per_step=2, max_new_tokens=12, save_every=0,
                progress=False, tensorboard=False, device="cpu", seed=3, max_num_seqs=16)
    base.update(kw)
    return BPOConfig(**base)


def test_bpo_steps_log_both_modes_and_the_probe(run):
    tmp, model, data, probe = run
    cfg = config(tmp, model, data, "bpo", steps=3, probe_data=str(probe), probe_every=2)
    train_bpo(cfg)
    rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["rollout_sequences"] == 2 * 2 * 2  # prompts x modes x g
        for k in ("reward_long", "reward_short", "tokens_long", "tokens_short", "loss", "clip_frac", "grad_norm"):
            assert r[k] is not None, (r["step"], k)
        assert r["think_rate_long"] == 1.0  # a forced thought always counts as thinking
        assert r["trained_tokens"] > 0
        # on-policy (mini_batches=1): the ratio is exactly 1; the engine's log-probs match the trainer's
        assert r["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and r["clip_frac"] == 0.0
        assert r["logprob_gap"] < 1e-4
    assert rows[0]["probe_think_rate"] is not None and rows[2]["probe_think_rate"] is not None  # steps 0 and 2
    assert "probe_think_rate" not in rows[1]
    assert (Path(cfg.output_dir) / "final" / "config.json").is_file()


def test_bpo_rollouts_never_reuse_the_old_policys_cached_prompts(run, monkeypatch):
    """The same long prompt at every step: its blocks are in the engine's prefix cache after the first rollout, but
    the update changed the policy, so the next rollout must compute them again (the engine's log-probs then still
    match the trainer's). Checked to fail when neither the trainer's reset at each rollout nor the engine's own
    check of the parameters drops the cache (then the third rollout takes the first one's blocks)."""
    tmp, model, _, _ = run
    long_q = {"prompt": "Please add the numbers one and two, then think about the sum very carefully: " * 3,
              "answer": "3"}
    data = write_jsonl(tmp / "same.jsonl", [long_q] * 4)
    seen = []
    real = BPOTrainer._engine

    def engine(self):
        llm = real(self)
        seen.append(llm.stats["prefix_cache_hit_tokens"])
        return llm

    monkeypatch.setattr(BPOTrainer, "_engine", engine)
    cfg = config(tmp, model, data, "same", steps=3, lr=1e-2, prompts_per_step=1, reward="test_train_bpo:varied_reward")
    train_bpo(cfg)
    rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert len(seen) == 3 and seen[0] == 0
    assert max(r["grad_norm"] for r in rows) > 0
    for r in rows:
        assert r["logprob_gap"] < 1e-4, r


def test_bpo_micro_batches_give_the_whole_batch_gradient(run):
    """The trainer's micro-batch weighting: split into micro-batches of one sequence or all in one, the same
    gradient (the aggregation over every sequence), for each aggregation."""
    tmp, model, data, _ = run
    for agg in ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum"):
        grads = []
        for micro in (10_000, 1):
            t = BPOTrainer(config(tmp, model, data, f"g-{agg}-{micro}", aggregation=agg, micro_batch_tokens=micro,
                                  reward="test_train_bpo:varied_reward"))
            try:
                t.train_step()
                grads.append([p.grad.full_tensor().clone() for p in t.model.parameters()])
                batch_size = t.rollout_metrics["rollout_sequences"]
                t.optimizer.zero_grad()
            finally:
                t.close()
        assert batch_size == 8
        assert max(float(g.abs().max()) for g in grads[0]) > 1e-6  # a real gradient, not zeros on both sides
        for a, b in zip(*grads, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), agg


def test_bpo_reference_kl_and_old_logprobs(run):
    """beta > 0 loads the frozen reference; two mini-batches per rollout recompute the old log-probs, so the second
    step's ratio moves away from 1 (the first update changed the policy) while the first's is exactly 1."""
    tmp, model, data, _ = run
    cfg = config(tmp, model, data, "kl", steps=4, beta=0.1, mini_batches=2, lr=1e-2, g=2, prompts_per_step=2,
                 reward="test_train_bpo:varied_reward")
    train_bpo(cfg)
    rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert rows[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert rows[0]["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # the policy is still the reference
    assert abs(rows[1]["ratio_mean"] - 1.0) > 1e-5 and rows[1]["kl_mean"] > 0
    assert "rollout_time_s" in rows[0] and "rollout_time_s" not in rows[1] and "rollout_time_s" in rows[2]


class Crash(RuntimeError):
    pass


def test_bpo_resumes_to_the_same_curve(run, monkeypatch):
    tmp, model, data, probe = run
    kw = dict(steps=4, save_every=2, probe_data=str(probe), probe_every=3)
    straight = config(tmp, model, data, "straight", **kw)
    train_bpo(straight)
    crashed = config(tmp, model, data, "crashed", **kw)
    step = BPOTrainer.train_step

    def dies_at_step_4(self):
        if self.step == 3:
            raise Crash("killed")
        return step(self)

    monkeypatch.setattr(BPOTrainer, "train_step", dies_at_step_4)
    with pytest.raises(Crash):
        train_bpo(crashed)
    monkeypatch.setattr(BPOTrainer, "train_step", step)
    train_bpo(crashed)
    a = read_metrics(Path(straight.output_dir) / "metrics.jsonl")
    b = read_metrics(Path(crashed.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        for k in x:
            if not k.endswith("_time_s") and k not in ("tokens_per_s",):
                assert x[k] == y[k], (x["step"], k, x[k], y[k])
    pa, pb = params_of(Path(straight.output_dir) / "final"), params_of(Path(crashed.output_dir) / "final")
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def test_bpo_two_ranks(run, tmp_path):
    """Two torchrun ranks (gloo): each rolls out its own prompts on the gathered shards; the run finishes, logs the
    both ranks' sequences, and its checkpoint resumes in one process."""
    tmp, model, data, probe = run
    cfg = config(tmp, model, data, "two", steps=2, save_every=2, mini_batches=2, beta=0.05, probe_data=str(probe),
                 probe_every=2, micro_batch_tokens=48)
    f = tmp_path / "two.json"
    f.write_text(json.dumps(cfg.__dict__), encoding="utf-8")
    r = _torchrun(["bpo", "--config", str(f)], 2)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert [x["step"] for x in rows] == [1, 2]
    assert rows[0]["rollout_sequences"] == 2 * 2 * 2 * 2  # ranks x prompts x modes x g
    assert rows[0]["probe_think_rate"] is not None
    # the world-2 checkpoint, resumed by one process asked for 2 more steps
    more = config(tmp, model, data, "two", steps=4, save_every=2, mini_batches=2, beta=0.05)
    train_bpo(more)
    assert [x["step"] for x in read_metrics(Path(cfg.output_dir) / "metrics.jsonl")] == [1, 2, 3, 4]


TOOLS_PY = '''
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b
'''


def test_bpo_with_tools_trains_whole_conversations(run, monkeypatch):
    """--tools: every rollout (and the probe) is a conversation. A tiny random model calls no tool by itself, so
    the engine is scripted (forced tokens, the model's log-probs): call add(a, b), then answer with its result.
    The trainer's log-probs of the packed conversations match the engine's (the gap: the trained targets are the
    sampled turns), and the tool metrics are logged (the rollout batch's masks: test_agent.py)."""
    from test_agent import question_adder, script_every_llm

    from r4b.engine.chat import ChatTokenizer

    tmp, model, data, probe = run
    tools = tmp / "tools.py"
    tools.write_text(TOOLS_PY)
    script_every_llm(monkeypatch, ChatTokenizer(model / "tokenizer.json"), question_adder)
    cfg = config(tmp, model, data, "bpo_tools", steps=1, reward="math", max_new_tokens=80, tools=f"{tools}:add",
                 max_tool_turns=3, probe_data=str(probe), probe_every=1)
    cfg.validate()
    train_bpo(cfg)
    (r,) = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert r["reward_long"] == r["reward_short"] == 1.0 and r["probe_reward"] == 1.0
    assert r["turns_long"] == r["turns_short"] == 2.0 and r["tool_calls_long"] == r["tool_calls_short"] == 1.0
    assert r["rollout_tool_errors"] == 0 and r["rollout_max_turns_hit"] == 0
    assert r["logprob_gap"] < 1e-4 and r["trained_tokens"] > 0
    for kw, name in ((dict(tools="add"), "tools"), (dict(tool_timeout=0), "tool_timeout"),
                     (dict(max_tool_turns=0), "max_tool_turns")):
        with pytest.raises(ValueError, match=f"BPOConfig.{name}"):
            config(tmp, model, data, "x", **kw).validate()


def test_resolve_reward_and_config_errors(run):
    tmp, model, data, _ = run
    assert resolve_reward("math")("\\boxed{3}", "3") == 1.0
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_reward("r4b.nowhere:fn")
    for kw, name in ((dict(steps=3, mini_batches=2), "steps"), (dict(temperature=0.0), "temperature"),
                     (dict(reward="nope"), "reward"), (dict(probe_every=2), "probe_data"),
                     (dict(aggregation="mean"), "aggregation"), (dict(g=0), "g")):
        with pytest.raises(ValueError, match=f"BPOConfig.{name}"):
            config(tmp, model, data, "x", **kw).validate()


def test_rollout_batch_select_and_split(run):
    """RolloutBatch.select re-packs a range of sequences; split cuts mini-batches by sequence count and
    micro-batches by tokens; the GRPO loss of the selected sequences equals the loss of those rows in place."""
    tmp, model, data, _ = run
    t = BPOTrainer(config(tmp, model, data, "sel"))
    try:
        from r4b.engine.sampling import SamplingParams
        from r4b.engine.train import parallel

        with parallel.gathered(t.model), torch.no_grad():
            b = bpo_rollouts(t._engine(), ["1+1?", "2+2?"], [None, None], "exact", g=2,
                             params=SamplingParams(max_tokens=6, seed=0))
            n = b.num_sequences
            assert n == 8
            cu = b.cu_seqlens.tolist()
            sub = b.select(2, 5)
            assert sub.cu_seqlens.tolist() == [c - cu[2] for c in cu[2:6]]
            assert torch.equal(sub.input_ids, b.input_ids[cu[2]:cu[5]])
            assert sub.seq_ids.tolist() == (b.seq_ids[cu[2]:cu[5]] - 2).tolist()
            assert sub.modes == b.modes[2:5] and sub.max_seqlen == max(cu[i + 1] - cu[i] for i in range(2, 5))
            parts = b.split(10**6, 3)
            assert [r for p in parts for r in p] == [(0, 2), (2, 5), (5, 8)]
            tight = b.split(1)
            assert tight == [[(i, i + 1) for i in range(8)]]
            with pytest.raises(ValueError, match="parts"):
                b.split(100, 9)
            w = t.model.lm_head.weight
            h = t.model(**b.model_inputs())
            full, _, _ = fused_linear_grpo_loss(h, w, b.targets, b.advantages, loss_mask=b.loss_mask,
                                                seq_ids=b.seq_ids)
            h2 = t.model(**sub.model_inputs())
            part, _, _ = fused_linear_grpo_loss(h2, w, sub.targets, sub.advantages, loss_mask=sub.loss_mask,
                                                seq_ids=sub.seq_ids)
            mask = b.loss_mask.clone()
            mask[: cu[2]] = False
            mask[cu[5]:] = False
            ref, _, _ = fused_linear_grpo_loss(h, w, b.targets, b.advantages, loss_mask=mask, seq_ids=b.seq_ids)
            assert torch.allclose(part, ref, rtol=1e-5, atol=1e-7) and full.isfinite()
    finally:
        t.close()


def test_engine_refuses_to_move_a_sharded_model(run):
    """LLM would cast a model to its dtype in place, which breaks FSDP2's shards: it says to gather it instead."""
    from r4b.engine.llm import LLM

    tmp, model, data, _ = run
    t = BPOTrainer(config(tmp, model, data, "guard"))
    try:
        with pytest.raises(ValueError, match="gathered"):
            LLM(t.model, t.tokenizer, dtype=torch.bfloat16)
    finally:
        t.close()


@pytest.mark.parametrize("beta,mini_batches", [(0.0, 1), (0.05, 2)])
def test_bpo_two_ranks_when_one_rank_gets_no_batch(run, tmp_path, beta, mini_batches):
    """Rank 1's rollouts give no batch, rank 0's do; the run neither hangs nor desynchronises, and the failed prompts
    are counted. Before the fixes (2026-11-28): plain, a hang from FSDP2's backward prefetch order recorded during
    the rollout's forwards (rank 1 ran none); with a reference (beta > 0) and old log-probs, a hang in the
    reference's all-gather, which rank 1 skipped."""
    import os
    import socket
    import subprocess
    import sys

    tmp, model, data, _ = run
    cfg = config(tmp, model, data, "fail", steps=4, mini_batches=mini_batches, beta=beta, save_every=2,
                 reward="exact", g=2, prompts_per_step=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "_train_bpo_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), worker, json.dumps(cfg.__dict__)],
                       capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    done = sorted(re.findall(r"rank (\d) done: steps (\d+)", r.stdout))
    assert done == [("0", "4"), ("1", "4")], r.stdout[-2000:]
    rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
    assert rows[0]["rollout_skipped_prompts"] == 2 and rows[0]["rollout_sequences"] == 2 * 2 * 2
