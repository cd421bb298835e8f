"""The demo (``make demo`` / ``r4b demo``): R-4B's two training stages end to end on a CPU, on a tiny model.

1. a tiny Qwen3 with random weights is saved as an HF checkpoint (with the tokenizer) and the chat template shows
   the three thinking modes;
2. stage 1, bi-mode annealing (r4b.engine.train.sft): SFT on a mix where the "hard" questions (sums of two
   two-digit numbers) are answered with a thought and the "easy" ones (repeat a number) directly, through the real
   trainer: packed rows, the fused cross-entropy on the answer tokens, FSDP2 (a world of one), checkpoints,
   metrics.jsonl, the HF export;
3. the exported model in auto mode on held-out prompts: does it think on the hard ones only?
4. stage 2, BPO (r4b.engine.train.bpo): per prompt g rollouts in forced thinking mode and g in forced
   non-thinking mode from one shared prefill (the inference engine on the trainer's own weights), rewards, one
   advantage over each mixed group, the GRPO loss straight from the hidden states, the auto-mode probe;
5. the BPO model evaluated in the three thinking modes (r4b.engine.evaluate, what ``r4b eval`` runs): accuracy,
   tokens and think-rate per mode, and where auto mode chose to think;
6. the backends every op ran on.
The reward is a toy rule (the share of digits in the answer): the point is the plumbing, not the task.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from r4b.engine.chat import DEMO_TOKENIZER, ChatTokenizer
from r4b.engine.evaluate import evaluate, format_summary
from r4b.engine.llm import LLM
from r4b.engine.model import Qwen3Config, Qwen3ForCausalLM, from_pretrained, save_pretrained
from r4b.engine.sampling import SamplingParams
from r4b.engine.train.bpo import BPOConfig, train_bpo
from r4b.engine.train.metrics import read_metrics
from r4b.engine.train.sft import SFTConfig, train_sft
from r4b.kernels import available_backends


def reward_fn(completion: str, reference: object = None) -> float:
    """Toy rule reward: the share of digit characters in the answer (the reference is unused)."""
    text = re.sub(r"<[^>]+>", "", completion)
    return sum(c.isdigit() for c in text) / max(1, len(text))


def hard(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Add {a} and {b}.", f"<think>\n{a} + {b}: tens then units.\n</think>\n\n{a + b}"


def easy(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(0, 9)
    return f"Repeat {a}.", f"{a}"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def main(sft_steps: int = 60, bpo_steps: int = 4, out_dir: str | None = None) -> int:
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory() if out_dir is None else None
    root = Path(out_dir or tmp.name)
    try:
        return _run(root, sft_steps, bpo_steps)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(root: Path, sft_steps: int, bpo_steps: int) -> int:
    t_start = time.perf_counter()
    tok = ChatTokenizer.demo()
    cfg = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.dim() == 2:  # HF-style init (std 0.02); norms keep their ones
            torch.nn.init.normal_(p, std=0.02, generator=gen)
    base = root / "base"
    save_pretrained(model, base)
    shutil.copyfile(DEMO_TOKENIZER, base / "tokenizer.json")
    print(f"1. tiny Qwen3 ({sum(p.numel() for p in model.parameters()) / 1e3:.0f}k params) saved as an HF "
          f"checkpoint ({base}); the chat template's three thinking modes:")
    msgs = [{"role": "user", "content": "Add 12 and 30."}]
    for mode in ("auto", "long", "short"):
        print(f"   {mode:>5}: {tok.apply_chat_template(msgs, thinking_mode=mode)!r}")

    rng = random.Random(0)
    rows = []
    for i in range(256):
        q, a = (hard if i % 2 else easy)(rng)
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    data = write_jsonl(root / "sft.jsonl", rows)
    sft = SFTConfig(model=str(base), data=str(data), output_dir=str(root / "sft"), steps=sft_steps, lr=3e-3,
                    warmup_steps=5, max_seq_len=64, max_tokens=512, save_every=max(1, sft_steps // 2),
                    progress=False, tensorboard=False, device="cpu", seed=0)
    t0 = time.perf_counter()
    train_sft(sft)
    log = read_metrics(root / "sft" / "metrics.jsonl")
    print(f"2. stage 1, bi-mode annealing (SFT, {sft_steps} steps of ~512 packed tokens, {time.perf_counter() - t0:.1f}"
          f" s): loss think / no-think")
    for r in log[:: max(1, len(log) // 6)] + log[-1:]:
        print(f"   step {r['step']:>3}: loss {r['loss']:.3f}  think {r['loss_think']:.3f}  "
              f"no-think {r['loss_no_think']:.3f}  grad norm {r['grad_norm']:.2f}  lr {r['lr']:.1e}")

    trained = from_pretrained(root / "sft" / "final")
    llm = LLM(trained, tok, num_kv_blocks=128)
    probe_rng = random.Random(123)
    probes = [(kind, f(probe_rng)[0]) for kind, f in (("hard", hard), ("easy", easy)) for _ in range(8)]
    outs = llm.generate([q for _, q in probes], SamplingParams(temperature=0.0, max_tokens=24), thinking_mode="auto",
                        use_tqdm=False)
    rate = {k: sum(o.outputs[0].mode == "think" for (kk, _), o in zip(probes, outs, strict=True) if kk == k) / 8
            for k in ("hard", "easy")}
    print(f"3. the SFT model in auto mode on held-out prompts (greedy): think-rate hard {rate['hard']:.2f}, "
          f"easy {rate['easy']:.2f}")
    for (_, q), o in list(zip(probes, outs, strict=True))[::8]:
        print(f"   {q!r:>18} -> {o.outputs[0].text!r}")

    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f(rng)[0]} for f in (hard, easy) * 8])
    probe_file = write_jsonl(root / "probe.jsonl", [{"prompt": q} for _, q in probes])
    bpo = BPOConfig(model=str(root / "sft" / "final"), data=str(prompts), output_dir=str(root / "bpo"),
                    steps=bpo_steps, lr=1e-4, reward="r4b.demo:reward_fn", g=4, prompts_per_step=4,
                    max_new_tokens=24, probe_data=str(probe_file), probe_every=max(1, bpo_steps - 1),
                    probe_max_tokens=24, progress=False, tensorboard=False, device="cpu", seed=0)
    t0 = time.perf_counter()
    train_bpo(bpo)
    print(f"4. stage 2, BPO ({bpo_steps} steps; 4 prompts x (g=4 thinking + g=4 non-thinking) each, one shared "
          f"prefill per prompt; {time.perf_counter() - t0:.1f} s)")
    for r in read_metrics(root / "bpo" / "metrics.jsonl"):
        probe = f"  probe think-rate {r['probe_think_rate']:.2f}" if r.get("probe_think_rate") is not None else ""
        print(f"   step {r['step']}: reward think {r['reward_long']:.3f} no-think {r['reward_short']:.3f}  "
              f"tokens {r['tokens_long']:.1f} / {r['tokens_short']:.1f}  loss {r['loss']:+.1e}  "
              f"grad norm {r['grad_norm']:.3f}  clip {r['clip_frac']:.2f}{probe}")

    t0 = time.perf_counter()
    final = LLM(from_pretrained(root / "bpo" / "final"), tok, num_kv_blocks=256)
    eval_rng = random.Random(7)
    items = [(f(eval_rng)[0], None) for f in (hard, easy) for _ in range(12)]  # ids 0-11 hard, 12-23 easy
    summary, rows = evaluate(final, items, reward_fn, params=SamplingParams(temperature=0.0, max_tokens=24))
    auto = {k: [r["think"] for r in rows if r.get("mode") == "auto" and (r["id"] < 12) == (k == "hard")]
            for k in ("hard", "easy")}
    print(f"5. the BPO model evaluated in the three thinking modes (r4b eval's engine; 24 held-out prompts, greedy; "
          f"accuracy = the toy reward's mean; {time.perf_counter() - t0:.1f} s); auto-mode think-rate hard "
          f"{sum(auto['hard']) / len(auto['hard']):.2f}, easy {sum(auto['easy']) / len(auto['easy']):.2f}")
    print("   " + format_summary(summary).replace("\n", "\n   "))

    print("6. backends that ran here (auto dispatch):")
    for op in ("group_advantages", "pack", "varlen_attention", "rms_norm", "fused_linear_cross_entropy",
               "fused_linear_grpo_loss", "store_kv", "paged_decode_attention"):
        print(f"   {op:<26} {available_backends(op)[0]}  (available: {', '.join(available_backends(op))})")
    print(f"Done in {time.perf_counter() - t_start:.0f} s. The same trainers from the command line: r4b sft / "
          "r4b bpo --help; benchmarks: python -m bench all (bash bench/gpu_check.sh on a GPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
