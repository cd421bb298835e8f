"""The first-milestone demo (``make demo`` / ``r4b demo``): today's pieces working together on the CPU.

1. a tiny Qwen3 with random weights is written as an HF checkpoint and loaded back (r4b.engine.model);
2. the chat template renders the three thinking modes (r4b.engine.chat);
3. a few BPO steps on a toy task: for each prompt, g rollouts in forced thinking mode and g in forced
   non-thinking mode (naive sampling: the inference engine comes with the next milestone), a rule reward,
   mixed-group advantages (group_advantages), a packed batch (pack_sequences), hidden states from the model and
   the GRPO loss straight from them (fused_linear_grpo_loss), an optimizer step;
4. the backends every op ran on.
The reward is a toy rule (the share of digits in the completion): the point is the plumbing, not the task.
"""

from __future__ import annotations

import re
import tempfile
import time

import torch

from r4b.engine.chat import ChatTokenizer, parse_response
from r4b.engine.model import Qwen3Config, Qwen3ForCausalLM, from_pretrained, last_rows, save_pretrained
from r4b.kernels import (
    available_backends,
    fused_linear_grpo_loss,
    fused_linear_logprobs,
    group_advantages,
    pack_sequences,
)

PROMPTS = ["What is 3 + 4?", "Name a prime number.", "How many legs has a spider?", "Write the year 1999."]


def reward_fn(completion: str) -> float:
    """Toy rule reward: the share of digit characters in the completion (thought and answer)."""
    text = re.sub(r"<[^>]+>", "", completion)
    return sum(c.isdigit() for c in text) / max(1, len(text))


@torch.no_grad()
def sample(model: Qwen3ForCausalLM, prompts: list[list[int]], stop_ids: list[int], max_new: int,
           gen: torch.Generator) -> list[list[int]]:
    """Temperature-1 sampling of every prompt at once: each step runs the packed batch and reads the last rows."""
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new):
        seqs = [torch.tensor(p + o, dtype=torch.int64) for p, o in zip(prompts, outs, strict=True)]
        batch = pack_sequences(seqs)
        hidden = model(batch.flat, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)  # (T, H)
        probs = torch.softmax(model.compute_logits(hidden, last_rows(batch.cu_seqlens)).float(), -1)  # (n, V)
        nxt = torch.multinomial(probs, 1, generator=gen)[:, 0].tolist()
        for i, t in enumerate(nxt):
            if not done[i]:
                outs[i].append(t)
                done[i] = t in stop_ids
        if all(done):
            break
    return outs


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
    print(f"3. BPO on a toy task: {len(PROMPTS)} prompts x (g={g} thinking + g={g} non-thinking) per step")
    for step in range(steps):
        t0 = time.perf_counter()
        prompts, modes, groups, suffix_start = [], [], [], []
        for q, text in enumerate(PROMPTS):
            for mode in ["long"] * g + ["short"] * g:
                ids = tok.encode_chat([{"role": "user", "content": text}], thinking_mode=mode).input_ids.tolist()
                prompts.append(ids)
                modes.append(mode)
                groups.append(q)
                suffix_start.append(ids.index(tok.think_id) + 1)  # mode tokens after <think> are trained
        model.eval()
        outs = sample(model, prompts, tok.eos_ids, max_new=24, gen=gen)
        model.train()
        parsed = [parse_response(tok.decode(o), thinking_mode=m) for o, m in zip(outs, modes, strict=True)]
        rewards = torch.tensor([reward_fn(p.thinking + p.answer) for p in parsed])
        adv = group_advantages(rewards, torch.tensor(groups))  # mixed group of 2g per prompt
        seqs = [torch.tensor(p + o, dtype=torch.int64) for p, o in zip(prompts, outs, strict=True)]
        batch = pack_sequences(seqs)
        targets = torch.full_like(batch.flat, -100)
        mask = torch.zeros_like(batch.flat, dtype=torch.bool)
        for i, (s, e) in enumerate(zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist(), strict=True)):
            targets[s : e - 1] = batch.flat[s + 1 : e]
            mask[s + suffix_start[i] - 1 : e - 1] = True  # positions whose target is a mode or completion token
        hidden = model(batch.flat, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)  # (T, H)
        weight = model.lm_head.weight
        old = fused_linear_logprobs(hidden.detach(), weight.detach(), targets)
        loss, _, stats = fused_linear_grpo_loss(hidden, weight, targets, adv[batch.seq_ids.long()],
                                                old_logprobs=old, loss_mask=mask, seq_ids=batch.seq_ids)
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        think = torch.tensor([m == "long" for m in modes])
        print(f"   step {step}: reward think {rewards[think].mean():.3f} "
              f"no-think {rewards[~think].mean():.3f}  "
              f"loss {loss.item():+.1e}  grad norm {grad_norm:.3f}  clip {stats['clip_frac'].item():.2f}  "
              f"tokens {batch.flat.numel()}  "
              f"{time.perf_counter() - t0:.2f}s")

    print("4. backends that ran here (auto dispatch):")
    for op in ("group_advantages", "pack", "varlen_attention", "rms_norm", "fused_linear_grpo_loss"):
        print(f"   {op:<24} {available_backends(op)[0]}  (available: {', '.join(available_backends(op))})")
    print("Benchmarks: python -m bench all  (tiny shapes on a CPU; bash bench/gpu_check.sh on a GPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
