"""Stage 2, BPO (bi-mode policy optimisation): GRPO in which every prompt is rolled out g times in forced thinking
mode and g times in forced non-thinking mode from one shared prefill, with one advantage over the mixed group of 2g
(docs/DESIGN.md, "BPO, as r4b implements it").

One rollout per ``mini_batches`` optimizer steps:
1. the policy generates its own rollouts in place (``parallel.gathered``: the FSDP2 shards are gathered once, the
   inference engine runs on the trainer's parameters, no weight copy): ``bpo_rollouts`` -> rewards -> mixed-group
   advantages -> one packed batch per rank;
2. with ``mini_batches > 1`` the old policy's log-probs are recomputed first (``fused_linear_logprobs``), and with
   ``beta > 0`` the frozen reference's;
3. per mini-batch: micro-batches of at most ``micro_batch_tokens`` tokens, the clipped-surrogate loss straight from
   the hidden states of the trained rows (``fused_linear_grpo_loss``, at the sampling temperature), weighted so the
   step's loss is the aggregation over every rank's whole mini-batch; one optimizer step.
``rollout_mode="auto"`` samples all 2g in auto mode instead: vanilla GRPO, the ablation baseline.

Logged: reward, share solved, completion tokens and think-rate per mode; the loss, clip fractions, ratio, KL, an
entropy proxy (the mean negative log-prob of the trained tokens), the gap between the engine's and the trainer's
log-probs of the same tokens; rollout and train time; and every ``probe_every`` steps the auto-mode think-rate and
reward on a held-out probe set (what BPO is meant to move: think on hard prompts, answer easy ones directly).

    r4b bpo --model runs/sft/final --data prompts.jsonl --output-dir runs/bpo --g 4 --prompts-per-step 8
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from r4b.kernels import fused_linear_grpo_loss, fused_linear_logprobs

from ..agent import Toolbox, converse, score, tool_config_error
from ..llm import LLM
from ..model import from_pretrained
from ..rewards import REWARDS, resolve_reward
from ..rollout import RolloutBatch, bpo_rollouts
from ..sampling import SamplingParams
from . import parallel
from .common import TrainConfig, Trainer
from .data import PromptDataset, PromptLoader

log = logging.getLogger(__name__)

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum")


@dataclass
class BPOConfig(TrainConfig):
    """data: a JSONL of prompts ({"prompt": str} or {"messages": [...]}, with the reference under "answer");
    reward: "math" / "exact" / "choice" or "package.module:function" (answer, reference) -> float;
    g: rollouts per forced mode and prompt (2g per prompt); prompts_per_step: prompts per rollout and rank;
    rollout_mode: "bpo" or "auto" (vanilla GRPO); train_mode_tokens: train the mode tokens after ``<think>``;
    temperature / top_p / top_k / max_new_tokens / max_thinking_tokens: the rollouts' sampling; eps_low / eps_high /
    beta / aggregation: the loss (fused_linear_grpo_loss); ref_model: the KL reference (the starting model by
    default; only loaded when beta > 0); mini_batches: optimizer steps per rollout; micro_batch_tokens: tokens per
    forward; kv_cache_fraction / max_num_seqs / max_num_batched_tokens / cuda_graphs: the inference engine;
    probe_data / probe_every / probe_max_tokens: the held-out auto-mode probe (greedy);
    tools: Python functions the model may call, "package.module:fn1,fn2" or "path/tools.py:fn" (or a module's list
    of them, "module:TOOLS"; r4b.engine.agent.Toolbox): each rollout (and the probe) is then a conversation of at
    most max_tool_turns assistant turns, trained over every turn and not over the tool results; tool_timeout:
    seconds a call may take (over it, the model reads an error)."""

    data: str = ""
    reward: str = "math"
    g: int = 4
    prompts_per_step: int = 8
    rollout_mode: str = "bpo"
    train_mode_tokens: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    max_thinking_tokens: int | None = None
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    aggregation: str = "seq_mean_token_mean"
    ref_model: str | None = None
    mini_batches: int = 1
    micro_batch_tokens: int = 16384
    kv_cache_fraction: float = 0.3
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    cuda_graphs: bool | None = None
    image_root: str | None = None
    probe_data: str | None = None
    probe_every: int = 0
    probe_max_tokens: int = 1024
    tools: str | None = None
    max_tool_turns: int = 4
    tool_timeout: float = 30.0

    def validate(self) -> None:
        super().validate()

        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"BPOConfig.{name} must be {want}, got {getattr(self, name)!r}")

        if not self.data:
            raise bad("data", "a JSONL path")
        for name in ("g", "prompts_per_step", "max_new_tokens", "mini_batches", "micro_batch_tokens",
                     "max_num_seqs", "max_num_batched_tokens", "probe_max_tokens", "max_tool_turns"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "an int >= 1")
        if not isinstance(self.probe_every, int) or self.probe_every < 0:
            raise bad("probe_every", "an int >= 0 (0: no probe)")
        if self.probe_every and not self.probe_data:
            raise bad("probe_data", "a JSONL path when probe_every > 0")
        if self.rollout_mode not in ("bpo", "auto"):
            raise bad("rollout_mode", "'bpo' or 'auto'")
        if self.aggregation not in AGGREGATIONS:
            raise bad("aggregation", f"one of {AGGREGATIONS}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise bad("temperature", "> 0 (the loss is taken at the sampling temperature)")
        for name in ("eps_low", "eps_high", "beta"):
            if not isinstance(getattr(self, name), (int, float)) or not getattr(self, name) >= 0:
                raise bad(name, "a number >= 0")
        if not 0 < self.kv_cache_fraction <= 1:
            raise bad("kv_cache_fraction", "in (0, 1]")
        # checkpoints land between rollouts (a rollout's unfinished mini-batches are not saved)
        if self.steps % self.mini_batches:
            raise bad("steps", f"a multiple of mini_batches ({self.mini_batches})")
        if self.save_every % self.mini_batches:
            raise bad("save_every", f"a multiple of mini_batches ({self.mini_batches})")
        if (wrong := tool_config_error(self.tools, self.tool_timeout)) is not None:
            raise bad(*wrong)
        if ":" not in self.reward and self.reward not in REWARDS:
            raise bad("reward", f"one of {tuple(REWARDS)} or 'package.module:function'")


def _rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().squeeze(1)


class BPOTrainer(Trainer):
    name = "bpo"
    plot_keys = ["reward_long", "reward_short", "reward_auto", "think_rate_auto", "probe_think_rate",
                 "probe_reward", "tokens_long", "tokens_short", "tool_calls_long", "tool_calls_short", "loss",
                 "clip_frac", "kl_mean", "grad_norm"]

    def __init__(self, cfg: BPOConfig) -> None:
        super().__init__(cfg)
        kw = dict(tok=self.tokenizer, image_root=cfg.image_root)
        self.prompts = PromptDataset(cfg.data, **kw)
        self.loader = PromptLoader(self.prompts, prompts_per_step=cfg.prompts_per_step, seed=cfg.seed,
                                   rank=self.dist.rank, world_size=self.dist.world_size)
        self.probe = PromptDataset(cfg.probe_data, **kw) if cfg.probe_every else None
        self.reward = resolve_reward(cfg.reward)
        self.toolbox = Toolbox.load(cfg.tools, timeout=cfg.tool_timeout) if cfg.tools else None
        self.ref = None
        if cfg.beta > 0:  # the frozen reference: compute dtype only, no masters, no optimizer
            self.ref = from_pretrained(cfg.ref_model or cfg.model, dtype=self.compute_dtype, device=self.device)
            self.ref.requires_grad_(False)
            parallel.apply_fsdp(self.ref)
        self.llm: LLM | None = None
        self.rollouts = 0  # rollouts done: seeds each rollout's sampling
        self.next_probe = 0  # the step of the next probe
        self.pending: list[list[tuple[int, int]]] = []  # the current rollout's mini-batches still to train
        self.batch: RolloutBatch | None = None
        self.old: torch.Tensor | None = None  # (T,) old-policy log-probs of self.batch (mini_batches > 1)
        self.ref_lp: torch.Tensor | None = None  # (T,) reference log-probs (beta > 0)
        self.rollout_metrics: dict[str, float] = {}

    def data_state(self) -> dict:
        return {"loader": self.loader.state_dict(), "rollouts": self.rollouts, "next_probe": self.next_probe}

    def load_data_state(self, state: dict) -> None:
        if state:
            self.loader.load_state_dict(state["loader"])
            self.rollouts, self.next_probe = int(state["rollouts"]), int(state["next_probe"])

    def postfix_keys(self) -> tuple[str, ...]:
        return ("reward_mean", "loss", "grad_norm")

    # -- rollout -----------------------------------------------------------------------------------------------
    def _engine(self) -> LLM:
        cfg = self.cfg
        if self.llm is None:  # built inside gathered(): the parameters it sees are the full compute-dtype ones
            self.llm = LLM(self.model, self.tokenizer, device=self.device, dtype=self.compute_dtype,
                           max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                           kv_cache_fraction=cfg.kv_cache_fraction, cuda_graphs=cfg.cuda_graphs)
        return self.llm

    def _seed(self) -> int:
        return (self.cfg.seed * 1_000_003 + self.rollouts * 7919 + self.dist.rank) % 2**31

    def rollout(self) -> None:
        """Generate, score and pack this rank's rollout batch; old / reference log-probs when needed."""
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts, refs = self.loader.next_prompts()
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                max_tokens=cfg.max_new_tokens, seed=self._seed())
        metrics: dict[str, float] = {}
        failed = 0.0  # prompts of a rollout that gave no batch at all (bpo_rollouts raised)
        with parallel.gathered(self.model), torch.no_grad():
            llm = self._engine()
            llm.reset_prefix_cache()  # the policy changed since the last rollout (the gather may reuse storage)
            try:
                batch = bpo_rollouts(llm, prompts, refs, self.reward, g=cfg.g, params=params,
                                     rollout_mode=cfg.rollout_mode, train_mode_tokens=cfg.train_mode_tokens,
                                     max_thinking_tokens=cfg.max_thinking_tokens, toolbox=self.toolbox,
                                     max_turns=cfg.max_tool_turns)
            except ValueError as e:  # every prompt of this rank failed: reported, this rank trains nothing
                log.warning("rank %d: rollout %d gave no batch: %s", self.dist.rank, self.rollouts, e)
                batch = None
                failed = float(len(prompts))
            if self.probe is not None and self.step >= self.next_probe:
                metrics.update(self.run_probe(llm))
                self.next_probe = self.step + cfg.probe_every
            rollout_time = time.perf_counter() - t0
            self.rollouts += 1
            self.batch = batch
            self.pending = batch.split(cfg.micro_batch_tokens, min(cfg.mini_batches, batch.num_sequences)) \
                if batch is not None else []
            self.old = self._logprobs(self.model, batch) if batch is not None and cfg.mini_batches > 1 else None
        self.ref_lp = None
        if self.ref is not None:  # every rank gathers (collective), also one without a batch
            with parallel.gathered(self.ref), torch.no_grad():
                self.ref_lp = self._logprobs(self.ref, batch) if batch is not None else None
        # every rank trains mini_batches steps per rollout (a rank with fewer sequences pads with empty ones)
        self.pending += [[] for _ in range(cfg.mini_batches - len(self.pending))]
        metrics.update(self._rollout_stats(batch, failed))
        metrics["rollout_time_s"] = rollout_time
        metrics["logprob_time_s"] = time.perf_counter() - t0 - rollout_time
        self.rollout_metrics = metrics

    def _logprobs(self, model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
        """(T,) f32 log-probs of every trained target under ``model`` (NaN elsewhere), over the same micro-batches
        as the training steps (the same packing: in bf16 the first update's ratio then starts at 1)."""
        out = torch.full((batch.input_ids.numel(),), float("nan"), device=self.device)
        cu = batch.cu_seqlens.tolist()
        for mini in self.pending:
            for s, e in mini:
                sub = batch.select(s, e)
                rows = _rows(sub.loss_mask)
                hidden = model(**sub.model_inputs())
                lp = fused_linear_logprobs(hidden[rows], model.lm_head.weight, sub.targets[rows],
                                           temperature=self.cfg.temperature)
                out[cu[s] + rows] = lp
        return out

    def _rollout_stats(self, batch: RolloutBatch | None, failed: float = 0.0) -> dict[str, float]:
        """The rollout's per-mode stats as means over the ranks (each rank's value weighted by its sequences);
        ``failed``: this rank's prompts that gave no batch (counted as skipped)."""
        modes = ("long", "short") if self.cfg.rollout_mode == "bpo" else ("auto",)
        per_mode = ("reward", "solved", "tokens", "think_rate") + (("turns", "tool_calls") if self.toolbox else ())
        keys = ["reward_mean"] + [f"{k}_{m}" for m in modes for k in per_mode]
        counts = ["sequences", "tokens", "reward_errors", "skipped_prompts"]
        if self.toolbox:
            counts += ["tool_errors", "max_turns_hit", "conversation_errors"]
        st = batch.stats if batch is not None else {"skipped_prompts": failed}
        n = st.get("sequences", 0.0)
        local = torch.tensor([n] + [st.get(k, 0.0) * n for k in keys] + [st.get(k, 0.0) for k in counts[1:]],
                             dtype=torch.float64)
        total = parallel.all_reduce_sum(local).tolist()
        n_all = total[0]
        out = {k: (v / n_all if n_all else float("nan")) for k, v in zip(keys, total[1 : 1 + len(keys)], strict=True)}
        out.update({f"rollout_{k}": v for k, v in zip(counts, [n_all] + total[1 + len(keys):], strict=True)})
        return out

    def run_probe(self, llm: LLM) -> dict[str, float]:
        """Greedy auto-mode answers to this rank's share of the probe set: think-rate, reward, tokens."""
        items = [self.probe[i] for i in range(self.dist.rank, len(self.probe), self.dist.world_size)]
        sums = torch.zeros(4, dtype=torch.float64)  # prompts, thought, reward, tokens
        if items:
            greedy = SamplingParams(temperature=0.0, max_tokens=self.cfg.probe_max_tokens)
            prompts = [p for p, _ in items]
            # (with tools, conversations: the first turn's choice, the last turn's answer)
            outs = converse(llm, prompts, greedy, toolbox=self.toolbox, max_turns=self.cfg.max_tool_turns)
            for (_, ref), out in zip(items, outs, strict=True):
                if out.error is not None or not out.trajectories:
                    continue
                t = out.trajectories[0]
                r, _ = score(self.reward, t, ref)
                sums += torch.tensor([1.0, float(t.turns[0].output.mode == "think"), r, float(t.generated_tokens)],
                                     dtype=torch.float64)
        n, think, reward, tokens = parallel.all_reduce_sum(sums).tolist()
        nan = float("nan")
        return {"probe_think_rate": think / n if n else nan, "probe_reward": reward / n if n else nan,
                "probe_tokens": tokens / n if n else nan}

    def _all_max(self, x: float) -> float:
        t = torch.tensor([float(x)], device=self.device if self.dist.device.type == "cuda" else "cpu")
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    # -- training ----------------------------------------------------------------------------------------------
    def _micro_weight(self, sub: RolloutBatch, rows: torch.Tensor) -> float:
        """This micro-batch's share of its mini-batch's aggregation (sequences or tokens)."""
        if self.cfg.aggregation == "token_mean":
            return float(rows.numel())
        return float(torch.unique(sub.seq_ids[rows]).numel())

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        metrics: dict[str, float] = {}
        if not self.pending:
            self.rollout()
            metrics.update(self.rollout_metrics)
        t0 = time.perf_counter()
        ranges = self.pending.pop(0)
        batch = self.batch
        subs = [batch.select(s, e) for s, e in ranges] if ranges else []
        rows = [_rows(sub.loss_mask) for sub in subs]
        weights = [self._micro_weight(sub, r) for sub, r in zip(subs, rows, strict=True)]
        total = float(parallel.all_reduce_sum(torch.tensor([sum(weights)], dtype=torch.float64)).item())
        n_micro = int(self._all_max(len(subs)))
        acc = torch.zeros(9, dtype=torch.float64)  # tokens, loss*w, clip, clip_lo, clip_hi, ratio, kl, -logp, gap n
        gap = torch.zeros(1, dtype=torch.float64)
        ratio_max = 0.0
        weight = None
        for i in range(n_micro):
            if i >= len(subs) or rows[i].numel() == 0:  # nothing to train here: a zero loss keeps the collectives
                self._zero_backward()
                continue
            sub, r = subs[i], rows[i]
            s, e = ranges[i]
            tok = slice(int(batch.cu_seqlens[s]), int(batch.cu_seqlens[e]))
            hidden = self.forward(sub.model_inputs())
            weight = self.model.lm_head.weight
            old = self.old[tok][r] if self.old is not None else None
            ref = self.ref_lp[tok][r] if self.ref_lp is not None else None
            loss, logp, st = fused_linear_grpo_loss(
                hidden[r], weight, sub.targets[r], sub.advantages[r], old_logprobs=old, ref_logprobs=ref,
                seq_ids=sub.seq_ids[r], eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
                temperature=cfg.temperature, aggregation=cfg.aggregation)
            # FSDP2 averages over ranks: world * w / total makes the step's loss the global aggregation
            (loss * (self.dist.world_size * weights[i] / max(total, 1.0))).backward()
            n = float(r.numel())
            acc += torch.tensor([n, float(loss.detach()) * weights[i], float(st["clip_frac"]) * n,
                                 float(st["clip_frac_low"]) * n, float(st["clip_frac_high"]) * n,
                                 float(st["ratio_mean"]) * n, float(st["kl_mean"]) * n,
                                 float(-logp.sum()), 0.0], dtype=torch.float64)
            ratio_max = max(ratio_max, float(st["ratio_max"]))
            roll = sub.rollout_logprobs[r]
            gen = torch.isfinite(roll)
            if bool(gen.any()):
                gap += float((roll[gen] - logp[gen]).abs().sum())
                acc[8] += float(gen.sum())
        acc = parallel.all_reduce_sum(torch.cat([acc, gap]))
        ratio_max = self._all_max(ratio_max)
        n = float(acc[0])
        nan = float("nan")
        metrics.update({
            "loss": float(acc[1]) / total if total else nan,
            "clip_frac": float(acc[2]) / n if n else nan,
            "clip_frac_low": float(acc[3]) / n if n else nan,
            "clip_frac_high": float(acc[4]) / n if n else nan,
            "ratio_mean": float(acc[5]) / n if n else nan,
            "ratio_max": ratio_max,
            "kl_mean": float(acc[6]) / n if n else nan,
            "entropy_proxy": float(acc[7]) / n if n else nan,
            "logprob_gap": float(acc[9]) / float(acc[8]) if float(acc[8]) else nan,
            "trained_tokens": n,
            "train_time_s": time.perf_counter() - t0,
        })
        if not self.pending:
            self.batch = self.old = self.ref_lp = None
        return metrics

    def _zero_backward(self) -> None:
        """A one-token forward with a zero loss: a rank with less to train still joins FSDP2's collectives."""
        ids = torch.zeros(1, dtype=torch.int64, device=self.device)
        cu = torch.tensor([0, 1], dtype=torch.int32, device=self.device)
        hidden = self.forward(dict(input_ids=ids, position_ids=ids, cu_seqlens=cu, max_seqlen=1))
        (hidden.sum() * 0.0 + self.model.lm_head.weight.sum() * 0.0).backward()


def train_bpo(cfg: BPOConfig) -> dict[str, float]:
    """Run (or resume) a BPO run to ``cfg.steps``; returns the last step's metrics."""
    trainer = BPOTrainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()

