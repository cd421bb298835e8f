"""BPO rollouts: prompts -> the engine's completions in both forced modes -> rewards -> mixed-group advantages ->
one packed training batch for ``fused_linear_grpo_loss`` (docs/DESIGN.md, "BPO, as r4b implements it").

Per prompt, g completions in forced thinking mode ("long": ``<think>\\n``) and g in forced non-thinking mode
("short": ``<think>\\n\\n</think>\\n\\n``) come from ONE prefill of the prompt (LLM.generate with thinking_mode=
("long", "short")). Their rewards are normalised together, over the mixed group of 2g (group_advantages,
scale="group"): all-equal rewards give zero advantages. ``rollout_mode="auto"`` samples all 2g in auto mode
instead (vanilla GRPO, the paper's baseline).

The batch packs prompt + mode suffix + completion per completion. Its loss mask covers the completion's tokens and,
with ``train_mode_tokens`` (the default), the mode tokens after ``<think>``: training them is what teaches the
auto-mode decision (the first token after ``<think>``). A reward function that raises, or returns something that is
not a finite number, gives 0 for that completion and is counted (``stats["reward_errors"]``); a prompt the engine
cannot run is skipped and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from r4b.kernels import group_advantages, pack_sequences

from .agent import Toolbox, Trajectory, converse, score
from .llm import LLM, CompletionOutput
from .rewards import get_reward
from .sampling import SamplingParams

log = logging.getLogger(__name__)

RewardFn = Callable[[str, Any], float]


def model_inputs(batch: Any) -> dict:
    """The model's forward keyword arguments of a packed batch (DESIGN.md's fields; the images only when there are
    any): ``input_ids``, ``position_ids``, ``cu_seqlens``, ``max_seqlen``, ``pixel_values``, ``image_sizes``."""
    out = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens,
               max_seqlen=batch.max_seqlen)
    if batch.pixel_values:
        out.update(pixel_values=batch.pixel_values, image_sizes=batch.image_sizes)
    return out


@dataclass
class RolloutBatch:
    """A packed batch of 2g completions per prompt (prompt-major, then "long" before "short", as generated)."""

    input_ids: Tensor  # (T,) int64: prompt + mode suffix + completion, per completion
    position_ids: Tensor  # (T,) int64
    cu_seqlens: Tensor  # (n + 1,) int32
    max_seqlen: int
    targets: Tensor  # (T,) int64: the next token (-100 at a sequence's last position)
    loss_mask: Tensor  # (T,) bool: positions whose target is trained (mode tokens after <think>, completion)
    seq_ids: Tensor  # (T,) int32
    advantages: Tensor  # (T,) f32: each token's sequence's advantage
    rollout_logprobs: Tensor  # (T,) f32: the engine's log-prob of each generated target (NaN elsewhere)
    rewards: Tensor  # (n,) f32
    group_ids: Tensor  # (n,) int64: the prompt each completion came from
    modes: list[str]  # (n,) the forced mode of each completion ("long" / "short"; "auto" for vanilla GRPO)
    outputs: list[CompletionOutput]
    pixel_values: list[Tensor] = field(default_factory=list)  # the images of all sequences, in order
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    images_per_seq: list[int] = field(default_factory=list)  # (n,) how many of the images each sequence holds
    # with tools (bpo_rollouts(toolbox=...)): each sequence's conversation (outputs then holds their last turns)
    trajectories: list[Trajectory] | None = None

    def model_inputs(self) -> dict:
        """Keyword arguments of the model's forward (images only when there are any)."""
        return model_inputs(self)

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    def select(self, start: int, end: int) -> RolloutBatch:
        """Sequences ``start:end`` as a batch of their own (tokens, images, rewards and outputs; advantages and
        log-probs as they are: they were computed over the whole batch)."""
        n = self.num_sequences
        if not 0 <= start < end <= n:
            raise ValueError(f"select needs 0 <= start < end <= {n}, got start={start}, end={end}")
        cu = self.cu_seqlens.tolist()
        a, b = cu[start], cu[end]
        tok = slice(a, b)
        lens = [cu[i + 1] - cu[i] for i in range(start, end)]
        counts = self.images_per_seq or [0] * n
        first, last = sum(counts[:start]), sum(counts[:end])
        return replace(
            self, input_ids=self.input_ids[tok], position_ids=self.position_ids[tok],
            cu_seqlens=self.cu_seqlens[start : end + 1] - a, max_seqlen=max(lens), targets=self.targets[tok],
            loss_mask=self.loss_mask[tok], seq_ids=self.seq_ids[tok] - start, advantages=self.advantages[tok],
            rollout_logprobs=self.rollout_logprobs[tok], rewards=self.rewards[start:end],
            group_ids=self.group_ids[start:end], modes=self.modes[start:end], outputs=self.outputs[start:end],
            pixel_values=self.pixel_values[first:last], image_sizes=self.image_sizes[first:last],
            images_per_seq=counts[start:end], stats={},
            trajectories=self.trajectories[start:end] if self.trajectories is not None else None)

    def split(self, max_tokens: int, parts: int = 1) -> list[list[tuple[int, int]]]:
        """Sequence ranges for training: the sequences cut into ``parts`` consecutive mini-batches of (nearly)
        equal sequence counts (one optimizer step each), each cut into micro-batches of at most ``max_tokens``
        tokens (a longer sequence is a micro-batch alone). Returns, per mini-batch, its (start, end) ranges."""
        n = self.num_sequences
        if not isinstance(parts, int) or not 1 <= parts <= n:
            raise ValueError(f"parts must be an int in [1, {n}] (the batch's sequences), got {parts!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        cu = self.cu_seqlens.tolist()
        out = []
        for p in range(parts):
            lo, hi = p * n // parts, (p + 1) * n // parts
            ranges, s = [], lo
            for i in range(lo, hi):
                if i > s and cu[i + 1] - cu[s] > max_tokens:
                    ranges.append((s, i))
                    s = i
            ranges.append((s, hi))
            out.append(ranges)
        return out


def bpo_rollouts(
    llm: LLM,
    prompts: Sequence[Any],
    references: Sequence[Any],
    reward: str | RewardFn,
    *,
    g: int,
    params: SamplingParams | None = None,
    rollout_mode: str = "bpo",
    train_mode_tokens: bool = True,
    max_thinking_tokens: int | None = None,
    device: str | torch.device | None = None,
    toolbox: Toolbox | None = None,
    max_turns: int = 4,
) -> RolloutBatch:
    """Roll out every prompt (a str or a chat) 2g times and pack the training batch.

    references: one per prompt, given to the reward with each completion's answer (the text after ``</think>``);
    reward: "math" / "exact" / "choice" (r4b.engine.rewards) or a function (answer, reference) -> float;
    params: sampling of every completion (its ``n`` is replaced by g; seed: completion j of a prompt draws from its
    own generator); rollout_mode: "bpo" (g long + g short) or "auto" (2g in auto mode); device: where the batch's
    tensors go (the engine's by default).
    toolbox: tools the model may call (r4b.engine.agent): each completion is then a conversation of at most
    ``max_turns`` assistant turns, every turn in the completion's mode; a sequence packs the whole conversation,
    every turn's generated tokens (and mode tokens) are trained and the tool turns between them are not; the
    reward reads the last turn's answer (a reward with a ``trajectory`` parameter also gets the conversation,
    r4b.engine.agent.Trajectory). ``trajectories`` holds the conversations.
    """
    if not isinstance(g, int) or g < 1:
        raise ValueError(f"g must be an int >= 1, got {g!r}")
    if rollout_mode not in ("bpo", "auto"):
        raise ValueError(f"rollout_mode must be 'bpo' or 'auto', got {rollout_mode!r}")
    if len(references) != len(prompts):
        raise ValueError(f"references must hold one per prompt ({len(prompts)}), got {len(references)}")
    if llm.tokenizer is None:
        raise ValueError("bpo_rollouts needs the LLM's tokenizer (chat template, mode suffixes, answers)")
    if toolbox is not None and not isinstance(toolbox, Toolbox):
        raise ValueError(f"toolbox must be None or a Toolbox, got {type(toolbox).__name__}")
    fn = get_reward(reward) if isinstance(reward, str) else reward
    if not callable(fn):
        raise ValueError(f"reward must be a reward name or a callable, got {reward!r}")
    params = params or SamplingParams()
    modes = ("long", "short") if rollout_mode == "bpo" else ("auto",)
    n = g if rollout_mode == "bpo" else 2 * g
    results = converse(llm, prompts, replace(params, n=n), toolbox=toolbox, thinking_mode=modes, max_turns=max_turns,
                       max_thinking_tokens=max_thinking_tokens)
    seqs, rewards, groups, mode_of, trajs = [], [], [], [], []
    pixel_values, image_sizes, images_per_seq = [], [], []
    errors, skipped = 0, 0
    for q, res in enumerate(results):
        if res.error is not None:
            skipped += 1
            log.warning("rollout prompt %d skipped: %s", q, res.error)
            continue
        for t in res.trajectories:
            value, err = score(fn, t, references[q])
            if err is not None:
                errors += 1
                log.warning("reward of prompt %d completion %d failed, counted as 0: %s", q, t.index, err)
            seqs.append(t.token_ids)
            rewards.append(value)
            groups.append(q)
            mode_of.append(t.mode)
            trajs.append(t)
            pixel_values += t.pixel_values  # the prompt's images as the engine preprocessed them (and the tools')
            image_sizes += t.image_sizes
            images_per_seq.append(len(t.pixel_values))
    if not seqs:
        raise ValueError(f"no prompt could be rolled out ({skipped} skipped): see the warnings")
    dev = torch.device(device) if device is not None else llm.device
    batch = pack_sequences([torch.tensor(s, dtype=torch.int64) for s in seqs])
    T = batch.flat.shape[0]
    targets = torch.full((T,), -100, dtype=torch.int64)
    mask = torch.zeros(T, dtype=torch.bool)
    rollout_lp = torch.full((T,), float("nan"))
    cu = batch.cu_seqlens.tolist()
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        targets[s : e - 1] = batch.flat[s + 1 : e]
        for turn in trajs[i].turns:  # position p predicts token p + 1
            # trained targets start after <think> (the mode tokens) or after the whole suffix
            first = turn.start + 1 if train_mode_tokens else turn.gen_start
            lp = turn.output.logprobs
            mask[s + first - 1 : s + turn.gen_start - 1 + len(lp)] = True
            rollout_lp[s + turn.gen_start - 1 : s + turn.gen_start - 1 + len(lp)] = torch.tensor(lp,
                                                                                               dtype=torch.float32)
    r = torch.tensor(rewards, dtype=torch.float32)
    gid = torch.tensor(groups, dtype=torch.int64)
    adv = group_advantages(r, gid, scale="group")
    seq_ids = batch.seq_ids
    stats = _stats(r, mode_of, trajs, errors, skipped, T, toolbox is not None)
    return RolloutBatch(
        input_ids=batch.flat.to(dev), position_ids=batch.position_ids.to(dev), cu_seqlens=batch.cu_seqlens.to(dev),
        max_seqlen=batch.max_seqlen, targets=targets.to(dev), loss_mask=mask.to(dev), seq_ids=seq_ids.to(dev),
        advantages=adv[seq_ids.long()].to(dev), rollout_logprobs=rollout_lp.to(dev), rewards=r, group_ids=gid,
        modes=mode_of, outputs=[t.final for t in trajs], pixel_values=[p.to(dev) for p in pixel_values],
        image_sizes=image_sizes, stats=stats, images_per_seq=images_per_seq,
        trajectories=trajs if toolbox is not None else None)


def _stats(r: Tensor, modes: list[str], trajs: list[Trajectory], errors: int, skipped: int,
           tokens: int, tools: bool) -> dict[str, float]:
    """Per forced mode: mean reward, share solved (reward >= 1), mean generated tokens, share that thought at
    the first turn (for auto mode: its think-rate); with tools also the mean turns and tool calls; and the counts
    (with tools: failed tool calls, conversations cut by max_turns, and conversations whose next turn the engine
    refused)."""
    out: dict[str, float] = {"sequences": float(len(modes)), "tokens": float(tokens),
                             "reward_errors": float(errors), "skipped_prompts": float(skipped),
                             "reward_mean": float(r.mean())}
    if tools:
        out["tool_errors"] = float(sum(t.tool_errors for t in trajs))
        out["max_turns_hit"] = float(sum(t.stop_reason == "max_turns" for t in trajs))
        out["conversation_errors"] = float(sum(t.stop_reason == "error" for t in trajs))
    for m in dict.fromkeys(modes):
        idx = [i for i, x in enumerate(modes) if x == m]
        out[f"reward_{m}"] = float(r[idx].mean())
        out[f"solved_{m}"] = float((r[idx] >= 1).float().mean())
        out[f"tokens_{m}"] = sum(trajs[i].generated_tokens for i in idx) / len(idx)
        out[f"think_rate_{m}"] = sum(trajs[i].turns[0].output.mode == "think" for i in idx) / len(idx)
        if tools:
            out[f"turns_{m}"] = sum(len(trajs[i].turns) for i in idx) / len(idx)
            out[f"tool_calls_{m}"] = sum(trajs[i].num_tool_calls for i in idx) / len(idx)
    return out
