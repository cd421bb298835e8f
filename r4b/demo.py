"""The first-milestone demo (``make demo`` / ``r4b demo``): today's pieces working together on the CPU.

1. a tiny Qwen3 with random weights is written as an HF checkpoint and loaded back (r4b.engine.model);
2. the chat template renders the three thinking modes (r4b.engine.chat);
3. a few BPO steps on a toy task: r4b.engine.rollout.bpo_rollouts rolls each prompt out g times in forced
   thinking mode and g times in forced non-thinking mode through the inference engine (r4b.engine.llm: one
   prefill of each prompt shared by its 2g completions through the paged KV cache, then batched decode), scores
   the answers with a rule reward, normalises the rewards over each mixed group of 2g (group_advantages) and packs
   the batch; then hidden states from the model, the GRPO loss straight from them (fused_linear_grpo_loss) and an
   optimizer step;
4. the backends every op ran on.
The reward is a toy rule (the share of digits in the answer): the point is the plumbing, not the task.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import replace

import torch

from r4b.engine.chat import ChatTokenizer
from r4b.engine.llm import LLM
from r4b.engine.model import Qwen3Config, Qwen3ForCausalLM, from_pretrained, save_pretrained
from r4b.engine.rollout import bpo_rollouts
from r4b.engine.sampling import SamplingParams
from r4b.kernels import available_backends, fused_linear_grpo_loss, fused_linear_logprobs

PROMPTS = ["What is 3 + 4?", "Name a prime number.", "How many legs has a spider?", "Write the year 1999."]


def reward_fn(completion: str, reference: object = None) -> float:
    """Toy rule reward: the share of digit characters in the answer (the reference is unused)."""
    text = re.sub(r"<[^>]+>", "", completion)
    return sum(c.isdigit() for c in text) / max(1, len(text))


def main(steps: int = 12) -> int:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    tok = ChatTokenizer.demo()
    cfg = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    fresh = Qwen3ForCausalLM(cfg)
    for p in fresh.parameters():
        if p.dim() == 2:  # HF-style init (std 0.02); norms keep their ones
            torch.nn.init.normal_(p, std=0.02, generator=gen)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(fresh, d)
        model = from_pretrained(d)
    print(f"1. tiny Qwen3 ({sum(p.numel() for p in model.parameters()) / 1e3:.0f}k params) saved as an HF "
          "checkpoint and loaded back")

    msgs = [{"role": "user", "content": PROMPTS[0]}]
    print("2. chat template, the three thinking modes:")
    for mode in ("auto", "long", "short"):
        print(f"   {mode:>5}: {tok.apply_chat_template(msgs, thinking_mode=mode)!r}")

    g = 4
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    llm = LLM(model, tok, num_kv_blocks=256, block_size=16)  # generates with the trained weights, in place
    rollout = SamplingParams(temperature=1.0, max_tokens=24, n=g, seed=0)
    print(f"3. BPO on a toy task: {len(PROMPTS)} prompts x (g={g} thinking + g={g} non-thinking) per step")
    for step in range(steps):
        t0 = time.perf_counter()
        b = bpo_rollouts(llm, PROMPTS, [None] * len(PROMPTS), reward_fn, g=g, params=replace(rollout, seed=step))
        rewards, think = b.rewards, torch.tensor([m == "long" for m in b.modes])
        hidden = model(**b.model_inputs())  # (T, H)
        weight = model.lm_head.weight
        old = fused_linear_logprobs(hidden.detach(), weight.detach(), b.targets)
        loss, _, stats = fused_linear_grpo_loss(hidden, weight, b.targets, b.advantages, old_logprobs=old,
                                                loss_mask=b.loss_mask, seq_ids=b.seq_ids)
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        print(f"   step {step}: reward think {rewards[think].mean():.3f} "
              f"no-think {rewards[~think].mean():.3f}  "
              f"loss {loss.item():+.1e}  grad norm {grad_norm:.3f}  clip {stats['clip_frac'].item():.2f}  "
              f"tokens {b.input_ids.numel()}  "
              f"{time.perf_counter() - t0:.2f}s")

    print("4. backends that ran here (auto dispatch):")
    for op in ("group_advantages", "pack", "varlen_attention", "rms_norm", "fused_linear_grpo_loss", "store_kv",
               "paged_decode_attention"):
        print(f"   {op:<24} {available_backends(op)[0]}  (available: {', '.join(available_backends(op))})")
    print("Benchmarks: python -m bench all  (tiny shapes on a CPU; bash bench/gpu_check.sh on a GPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
