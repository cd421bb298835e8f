"""BPO rollouts (r4b.engine.rollout): the packed batch's tokens, masks, advantages and log-probs against the
engine's outputs and the training ops; failing rewards and prompts; vanilla GRPO's auto mode; the GRPO loss on it."""

from __future__ import annotations

import pytest
import torch
from test_llm import TOK, chat_ids, tiny_model, tiny_r4b_chat
from tiny_models import torch_kernels_on_cpu  # noqa: F401  (fixture)

from r4b.engine.llm import LLM
from r4b.engine.rollout import bpo_rollouts
from r4b.engine.sampling import SamplingParams
from r4b.kernels import fused_linear_grpo_loss, fused_linear_logprobs, group_advantages

pytestmark = pytest.mark.usefixtures("torch_kernels_on_cpu")

PROMPTS = ["What is 3 + 4?", "Name a prime number.", "hi"]
PARAMS = SamplingParams(temperature=1.0, max_tokens=10, seed=0)


def digits(answer: str, reference) -> float:
    """A toy reward with spread: the share of digits in the answer."""
    return sum(ch.isdigit() for ch in answer) / max(1, len(answer))


@pytest.fixture(scope="module")
def model():
    return tiny_model(2)


def test_batch_packs_prompt_suffix_and_completion_with_the_bpo_masks(model):
    llm = LLM(model, TOK, num_kv_blocks=128, block_size=8)
    b = bpo_rollouts(llm, PROMPTS, [None] * 3, digits, g=2, params=PARAMS)
    assert b.modes == ["long", "long", "short", "short"] * 3 and b.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    cu = b.cu_seqlens.tolist()
    for i, o in enumerate(b.outputs):
        prompt = chat_ids(PROMPTS[i // 4], b.modes[i])  # prompt + its mode suffix, as the template renders it
        seq = b.input_ids[cu[i] : cu[i + 1]].tolist()
        assert seq == prompt + o.token_ids
        assert b.position_ids[cu[i] : cu[i + 1]].tolist() == list(range(len(seq)))
        assert b.targets[cu[i] : cu[i + 1] - 1].tolist() == seq[1:] and b.targets[cu[i + 1] - 1] == -100
        # trained: the targets after <think> (the mode tokens, then the completion)
        think_at = prompt.index(TOK.think_id)
        mask = b.loss_mask[cu[i] : cu[i + 1]].tolist()
        assert mask == [think_at + 1 <= p + 1 < len(seq) for p in range(len(seq))]
        assert (b.seq_ids[cu[i] : cu[i + 1]] == i).all()
    assert torch.equal(b.rewards, torch.tensor([digits(o.answer, None) for o in b.outputs]))
    adv = group_advantages(b.rewards, b.group_ids)
    assert torch.equal(b.advantages, adv[b.seq_ids.long()])
    assert b.stats["sequences"] == 12 and b.stats["tokens"] == cu[-1] and b.stats["reward_errors"] == 0
    assert b.stats["reward_long"] == pytest.approx(float(b.rewards[[0, 1, 4, 5, 8, 9]].mean()))
    assert b.stats["think_rate_long"] == sum(o.mode == "think" for o in b.outputs[0::4] + b.outputs[1::4]) / 6


def test_mode_tokens_can_be_left_untrained(model):
    llm = LLM(model, TOK, num_kv_blocks=128, block_size=8)
    b = bpo_rollouts(llm, PROMPTS[:1], [None], digits, g=1, params=PARAMS, train_mode_tokens=False)
    cu = b.cu_seqlens.tolist()
    for i, o in enumerate(b.outputs):
        n = cu[i + 1] - cu[i]
        first = n - len(o.token_ids)  # the completion's first token
        assert b.loss_mask[cu[i] : cu[i + 1]].tolist() == [first <= p + 1 < n for p in range(n)]


def test_rollout_logprobs_are_the_training_ops_old_logprobs(model):
    """The engine's log-probs sit at the positions that predict the generated tokens and equal
    fused_linear_logprobs over the batch's hidden states: the trainer's old log-probs."""
    llm = LLM(model, TOK, num_kv_blocks=128, block_size=8)
    b = bpo_rollouts(llm, PROMPTS, [None] * 3, digits, g=2, params=PARAMS)
    with torch.no_grad():
        hidden = model(**b.model_inputs())
    old = fused_linear_logprobs(hidden, model.lm_head.weight, b.targets)
    known = ~torch.isnan(b.rollout_logprobs)
    assert int(known.sum()) == sum(len(o.token_ids) for o in b.outputs)
    assert bool((known <= b.loss_mask).all())  # generated tokens are trained; mode tokens have no rollout log-prob
    assert torch.allclose(b.rollout_logprobs[known], old[known], atol=2e-5, rtol=0)
    loss, _, stats = fused_linear_grpo_loss(model(**b.model_inputs()), model.lm_head.weight, b.targets,
                                            b.advantages, old_logprobs=old, loss_mask=b.loss_mask, seq_ids=b.seq_ids)
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_failing_rewards_count_as_zero_and_bad_prompts_are_skipped(model, caplog):
    def flaky(answer, reference):
        if reference == "boom":
            raise RuntimeError("parser crashed")
        return float("nan") if reference == "nan" else 1.0

    llm = LLM(model, TOK, num_kv_blocks=128, block_size=8)
    b = bpo_rollouts(llm, ["a", [], "b", "c"], ["boom", "x", "nan", "ok"], flaky, g=1, params=PARAMS)
    assert b.group_ids.tolist() == [0, 0, 2, 2, 3, 3]  # the empty prompt (1) is skipped
    assert b.rewards.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert b.stats["reward_errors"] == 4 and b.stats["skipped_prompts"] == 1
    assert "parser crashed" in caplog.text
    assert torch.equal(b.advantages, torch.zeros_like(b.advantages))  # every group's rewards are equal


def test_auto_mode_is_vanilla_grpo_and_reward_names_resolve(model):
    llm = LLM(model, TOK, num_kv_blocks=128, block_size=8)
    b = bpo_rollouts(llm, PROMPTS[:2], ["7", "2"], "exact", g=2, params=PARAMS, rollout_mode="auto")
    assert b.modes == ["auto"] * 8 and "think_rate_auto" in b.stats
    cu = b.cu_seqlens.tolist()
    assert b.input_ids[cu[0] : cu[1]].tolist()[: len(chat_ids(PROMPTS[0], "auto"))] == chat_ids(PROMPTS[0], "auto")
    with pytest.raises(ValueError, match="rollout_mode must be 'bpo' or 'auto'"):
        bpo_rollouts(llm, PROMPTS[:1], [None], digits, g=1, rollout_mode="both")
    with pytest.raises(ValueError, match="g must be an int >= 1"):
        bpo_rollouts(llm, PROMPTS[:1], [None], digits, g=0)
    with pytest.raises(ValueError, match=r"references must hold one per prompt \(1\)"):
        bpo_rollouts(llm, PROMPTS[:1], [], digits, g=1)
    with pytest.raises(ValueError, match="no prompt could be rolled out"):
        bpo_rollouts(llm, [[]], [None], digits, g=1)


def test_image_prompts_carry_the_engines_preprocessed_images():
    """An R-4B image prompt: the batch holds the images the engine fed (once per completion, in order), and the
    model's forward of the batch with them gives the engine's log-probs."""
    model, tok, msgs = tiny_r4b_chat()
    llm = LLM(model, tok, num_kv_blocks=128, block_size=8)
    b = bpo_rollouts(llm, [msgs, "hi"], [None, None], digits, g=1, params=PARAMS)
    enc = tok.encode_chat(msgs)
    assert len(b.pixel_values) == 2 and b.image_sizes == enc.image_sizes * 2  # the image prompt's 2 completions
    assert all(torch.equal(p, enc.pixel_values[0]) for p in b.pixel_values)
    with torch.no_grad():
        hidden = model(**b.model_inputs())
    old = fused_linear_logprobs(hidden, model.lm_head.weight, b.targets)
    known = ~torch.isnan(b.rollout_logprobs)
    assert torch.allclose(b.rollout_logprobs[known], old[known], atol=2e-5, rtol=0)
