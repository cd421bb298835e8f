"""The SFT trainer (stage 1, bi-mode annealing) end to end on a tiny Qwen3 with the demo tokenizer, on the CPU:
it learns, it resumes to the same curve after a crash, its export loads, and two torchrun ranks compute the same
step as one rank accumulating both rows. The kernels run on their CPU backends (C++ / torch), as in the demo test:
the Triton interpreter would take minutes and the kernels have their own tests."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r4b.engine.chat import DEMO_TOKENIZER, ChatTokenizer
from r4b.engine.model import Qwen3Config, Qwen3ForCausalLM, from_pretrained, save_pretrained
from r4b.engine.train.metrics import read_metrics
from r4b.engine.train.sft import SFTConfig, SFTTrainer, train_sft

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cpu_backends(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def make_model_dir(path: Path, seed: int = 0, layers: int = 2) -> Path:
    """A tiny random Qwen3 with the demo tokenizer, saved as an HF checkpoint folder with its tokenizer.json."""
    tok = ChatTokenizer.demo()
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05, generator=g)
    save_pretrained(model, path)
    shutil.copyfile(DEMO_TOKENIZER, path / "tokenizer.json")
    return path


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Additions, half answered with a thought and half directly (the bi-mode mix)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        msgs = [{"role": "user", "content": f"{a}+{b}?"}]
        if i % 2:
            msgs.append({"role": "assistant", "content": f"<think>\n{a} plus {b}\n</think>\n\n{a + b}"})
        else:
            msgs.append({"role": "assistant", "content": f"{a + b}"})
        rows.append({"messages": msgs})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def run(tmp_path):
    model = make_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(48))
    return tmp_path, model, data


def config(tmp_path: Path, model: Path, data: Path, name: str, **kw) -> SFTConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(tmp_path / name), steps=6, lr=3e-3,
                warmup_steps=1, max_seq_len=64, max_tokens=96, grad_accum=1, save_every=0, progress=False,
                tensorboard=False, device="cpu", seed=1)
    base.update(kw)
    return SFTConfig(**base)


def params_of(path: Path) -> dict[str, torch.Tensor]:
    return dict(from_pretrained(path).state_dict())


def test_sft_learns_and_exports(run):
    tmp, model, data = run
    cfg = config(tmp, model, data, "learn", steps=30, tensorboard=True)
    last = train_sft(cfg)
    rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    first = sum(r["loss"] for r in rows[:3]) / 3
    end = sum(r["loss"] for r in rows[-3:]) / 3
    assert end < 0.6 * first, (first, end)  # measured 2026-11-28: about 6.9 -> 1.9
    assert all(r["loss_think"] is not None and r["loss_no_think"] is not None for r in rows[:5])
    assert last["trained_tokens"] > 0 and last["tokens"] > last["trained_tokens"]
    out = Path(cfg.output_dir)
    assert (out / "metrics.png").is_file() and any((out / "tb").iterdir())
    # the export is an HF folder with the tokenizer, and it holds the trained weights (not the start's)
    final = from_pretrained(out / "final")
    start = params_of(model)
    assert (out / "final" / "tokenizer.json").is_file()
    moved = [k for k, v in final.state_dict().items() if not torch.equal(v, start[k])]
    assert len(moved) == len(start)
    # and equal to the last checkpoint's weights: a resume with steps reached trains nothing and re-exports
    again = train_sft(config(tmp, model, data, "learn", steps=30, tensorboard=True))
    assert again == {}
    for k, v in from_pretrained(out / "final").state_dict().items():
        assert torch.equal(v, final.state_dict()[k]), k


class Crash(RuntimeError):
    pass


def test_sft_resumes_to_the_same_curve(run, monkeypatch):
    tmp, model, data = run
    straight = config(tmp, model, data, "straight", steps=7, save_every=3)
    train_sft(straight)
    crashed = config(tmp, model, data, "crashed", steps=7, save_every=3)
    step = SFTTrainer.train_step

    def dies_at_step_5(self):  # after the step-3 checkpoint and one more logged step
        if self.step == 4:
            raise Crash("killed")
        return step(self)

    monkeypatch.setattr(SFTTrainer, "train_step", dies_at_step_5)
    with pytest.raises(Crash):
        train_sft(crashed)
    assert [r["step"] for r in read_metrics(Path(crashed.output_dir) / "metrics.jsonl")] == [1, 2, 3, 4]
    monkeypatch.setattr(SFTTrainer, "train_step", step)
    train_sft(crashed)
    a = read_metrics(Path(straight.output_dir) / "metrics.jsonl")
    b = read_metrics(Path(crashed.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 8))
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "loss_think", "loss_no_think", "grad_norm", "lr", "tokens", "epoch"):
            assert x[k] == y[k], (x["step"], k, x[k], y[k])
    pa, pb = params_of(Path(straight.output_dir) / "final"), params_of(Path(crashed.output_dir) / "final")
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def _torchrun(args: list[str], nproc: int, *, script: str | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun -m r4b.cli *args`` (or a script's path with its args) on nproc CPU processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), *(["-m", "r4b.cli"] if script is None else [script]), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_sft_two_ranks_equal_one_rank_accumulating(run):
    """World 2 with one row per rank and step == world 1 with two rows per step: the loader deals the same rows,
    and the loss is normalised by the trained tokens of the whole step, so the updates agree."""
    tmp, model, data = run
    one = config(tmp, model, data, "one", steps=4, grad_accum=2)
    train_sft(one)
    two = config(tmp, model, data, "two", steps=4, grad_accum=1)
    cfg_file = tmp / "two.json"
    cfg_file.write_text(json.dumps({k: v for k, v in two.__dict__.items()}), encoding="utf-8")
    r = _torchrun(["sft", "--config", str(cfg_file)], 2)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    a = read_metrics(Path(one.output_dir) / "metrics.jsonl")
    b = read_metrics(Path(two.output_dir) / "metrics.jsonl")
    assert [x["tokens"] for x in a] == [x["tokens"] for x in b]
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "grad_norm"):  # (Adam would hide a gradient off by a constant factor; the norm not)
            assert abs(x[k] - y[k]) <= 1e-5 * abs(x[k]), (k, x, y)
    pa, pb = params_of(Path(one.output_dir) / "final"), params_of(Path(two.output_dir) / "final")
    worst = max(float((pa[k] - pb[k]).abs().max() / pa[k].abs().max()) for k in pa)
    assert worst <= 1e-4, worst


def test_sft_config_errors(run):
    tmp, model, data = run
    with pytest.raises(ValueError, match="max_seq_len"):
        config(tmp, model, data, "x", max_seq_len=200, max_tokens=96).validate()
    with pytest.raises(ValueError, match="train_on"):
        config(tmp, model, data, "x", train_on="first").validate()
    with pytest.raises(ValueError, match="steps"):
        config(tmp, model, data, "x", steps=0).validate()
    with pytest.raises(ValueError, match="unknown SFTConfig keys"):
        SFTConfig.from_dict({"model": "m", "learning_rate": 1.0})
