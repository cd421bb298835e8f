"""Both trainers on a tiny R-4B (SigLIP tower + projector + Qwen3) with image rows read from files: the images go
through the packed batch into the vision tower, whose weights (sharded per encoder layer) are trained, and the
export loads back as an R-4B."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_chat import _tiny_r4b_config
from test_train_sft import write_jsonl
from tiny_models import randomize

from r4b.engine.chat import DEMO_TOKENIZER
from r4b.engine.model import R4BForConditionalGeneration, from_pretrained, save_pretrained
from r4b.engine.train.bpo import BPOConfig, train_bpo
from r4b.engine.train.metrics import read_metrics
from r4b.engine.train.sft import SFTConfig, train_sft


@pytest.fixture(autouse=True)
def _cpu_backends(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def r4b_run(tmp_path):
    cfg = _tiny_r4b_config()
    torch.manual_seed(0)
    model = randomize(R4BForConditionalGeneration(cfg), 3)
    save_pretrained(model, tmp_path / "model")
    shutil.copyfile(DEMO_TOKENIZER, tmp_path / "model" / "tokenizer.json")
    g = torch.Generator().manual_seed(5)
    for i, (h, w) in enumerate([(40, 70), (30, 30), (56, 28)]):
        pix = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
        Image.fromarray(pix).save(tmp_path / f"img{i}.png")
    return tmp_path


def image_chat(i: int, answer: str | None) -> list[dict]:
    msgs = [{"role": "user", "content": [{"type": "image", "image": f"img{i}.png"}, {"type": "text", "text": "Hue?"}]}]
    return msgs + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def vision_params(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in from_pretrained(path).state_dict().items()
            if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}


def test_sft_and_bpo_train_the_vision_tower(r4b_run):
    tmp = r4b_run
    rows = [{"messages": image_chat(i % 3, "<think>\nlook\n</think>\n\nred" if i % 2 else "blue")} for i in range(6)]
    rows.append({"messages": image_chat(7, "green")})  # a missing image file: reported and skipped
    data = write_jsonl(tmp / "sft.jsonl", rows)
    sft = SFTConfig(model=str(tmp / "model"), data=str(data), output_dir=str(tmp / "sft"), steps=3, lr=1e-2,
                    max_seq_len=256, max_tokens=400, progress=False, tensorboard=False, device="cpu", save_every=0)
    train_sft(sft)
    losses = [r["loss"] for r in read_metrics(tmp / "sft" / "metrics.jsonl")]
    assert len(losses) == 3 and all(x is not None and x > 0 for x in losses)
    start, after_sft = vision_params(tmp / "model"), vision_params(tmp / "sft" / "final")
    assert start and all(not torch.equal(start[k], after_sft[k]) for k in start)  # every tower weight moved
    assert isinstance(from_pretrained(tmp / "sft" / "final"), R4BForConditionalGeneration)

    prompts = write_jsonl(tmp / "prompts.jsonl", [{"messages": image_chat(i, None), "answer": "red"} for i in range(3)])
    bpo = BPOConfig(model=str(tmp / "sft" / "final"), data=str(prompts), output_dir=str(tmp / "bpo"), steps=2,
                    lr=1e-2, reward="test_train_bpo:varied_reward", g=2, prompts_per_step=2, max_new_tokens=6,
                    image_root=str(tmp), progress=False, tensorboard=False, device="cpu", save_every=0,
                    micro_batch_tokens=300)
    train_bpo(bpo)
    log = read_metrics(tmp / "bpo" / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2] and all(r["rollout_sequences"] == 8 for r in log)
    assert all(r["logprob_gap"] < 1e-4 for r in log)  # the trainer's forward saw the engine's images
    after_bpo = vision_params(tmp / "bpo" / "final")
    assert any(not torch.equal(after_sft[k], after_bpo[k]) for k in after_sft)


@pytest.mark.parametrize("keepalive", [True, False], ids=["keepalive", "without"])
def test_two_ranks_one_without_images(r4b_run, keepalive):
    """Rank 0 trains an image chat, rank 1 a text chat: with the keepalive the step runs and its gradient norm is
    one process's; without it the ranks' collectives differ (the failure the keepalive exists for)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "_train_vision_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), worker, str(r4b_run)]
                       + ([] if keepalive else ["--no-keepalive"]),
                       capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if not keepalive:
        assert r.returncode != 0
        return
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("grad norm")]
    got, want = float(line[0].split()[2]), float(line[0].split()[-1])
    assert abs(got - want) <= 1e-5 * want, line
