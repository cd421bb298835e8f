"""Stage 1, bi-mode annealing: supervised fine-tuning on a mix of thinking answers (``<think>\\n...\\n</think>``)
and non-thinking ones (the empty thought ``<think>\\n\\n</think>``), packed into variable-length rows.

Each optimizer step takes ``grad_accum`` packed rows of at most ``max_tokens`` tokens per rank
(data.PackedLoader); the loss is the cross-entropy of the trained tokens (assistant answers), straight from the
hidden states (``fused_linear_cross_entropy`` on the trained rows only: untrained rows cost no lm_head work),
averaged over every trained token of the step on every rank. Logged: the loss, split into thinking and non-thinking
sequences, tokens, throughput, gradient norm, learning rate.

    r4b sft --model Qwen3-4B/ --data sft.jsonl --output-dir runs/sft --steps 1000 --lr 1e-5
    torchrun --nproc_per_node 8 -m r4b.cli sft --config sft.json
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r4b.kernels import fused_linear_cross_entropy

from . import parallel
from .common import TrainConfig, Trainer
from .data import PackedBatch, PackedLoader, SFTDataset


@dataclass
class SFTConfig(TrainConfig):
    """data: a JSONL of chats ({"messages": [...]}, or {"prompt", "response"}; an assistant answer may hold a
    ``<think>`` block or ``reasoning_content``); max_seq_len: longer examples are skipped (reported);
    max_tokens: tokens per packed row (micro-batch); grad_accum: rows per optimizer step and rank; train_on: "all"
    assistant turns or the "last"; image_root: where relative image paths are (the JSONL's folder by default)."""

    data: str = ""
    max_seq_len: int = 4096
    max_tokens: int = 16384
    grad_accum: int = 1
    train_on: str = "all"
    image_root: str | None = None
    shuffle: bool = True

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise ValueError(f"SFTConfig.data must be a JSONL path, got {self.data!r}")
        for name in ("max_seq_len", "max_tokens", "grad_accum"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SFTConfig.{name} must be an int >= 1, got {v!r}")
        if self.max_seq_len > self.max_tokens:
            raise ValueError(f"SFTConfig.max_seq_len ({self.max_seq_len}) must be <= max_tokens "
                             f"({self.max_tokens}): a row holds at least one example")
        if self.train_on not in ("all", "last"):
            raise ValueError(f"SFTConfig.train_on must be 'all' or 'last', got {self.train_on!r}")


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    return model.lm_head.weight


def sft_loss_sums(model: torch.nn.Module, batch: PackedBatch, *, vision_keepalive: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward one packed row: (sum of the trained tokens' cross-entropy (differentiable), the sums over thinking /
    non-thinking sequences (detached, (2,) f32), their token counts ((2,) f32)). vision_keepalive: an R-4B batch
    without images still runs the vision tower (see R4BForConditionalGeneration.embed; several ranks)."""
    inputs = batch.model_inputs()
    if vision_keepalive and "pixel_values" not in inputs:
        inputs["vision_keepalive"] = True
    hidden = model(**inputs)  # (T, H)
    weight = lm_head_weight(model)
    rows = batch.loss_mask.nonzero().squeeze(1)
    if rows.numel() == 0:  # nothing trained here: a zero loss that still runs the backward (FSDP's collectives)
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        return zero, torch.zeros(2, device=hidden.device), torch.zeros(2, device=hidden.device)
    per_token = fused_linear_cross_entropy(hidden[rows], weight, batch.targets[rows], reduction="none")  # (R,)
    think = batch.thinking.to(hidden.device)[batch.seq_ids[rows].long()]  # (R,) bool
    with torch.no_grad():
        d = per_token.detach()
        sums = torch.stack([d[think].sum(), d[~think].sum()])
        counts = torch.stack([think.sum(), (~think).sum()]).float()
    return per_token.sum(), sums, counts


class SFTTrainer(Trainer):
    name = "sft"
    plot_keys = ["loss", "loss_think", "loss_no_think", "grad_norm", "lr", "tokens_per_s"]

    def __init__(self, cfg: SFTConfig) -> None:
        super().__init__(cfg)
        self.dataset = SFTDataset(cfg.data, self.tokenizer, max_seq_len=cfg.max_seq_len, train_on=cfg.train_on,
                                  image_root=cfg.image_root, progress=cfg.progress and self.dist.is_main)
        self.loader = PackedLoader(self.dataset, max_tokens=cfg.max_tokens, seed=cfg.seed, shuffle=cfg.shuffle,
                                   rank=self.dist.rank, world_size=self.dist.world_size)

    def data_state(self) -> dict:
        return self.loader.state_dict()

    def load_data_state(self, state: dict) -> None:
        if state:
            self.loader.load_state_dict(state)

    def train_step(self) -> dict[str, float]:
        batches = self.loader.next_step(self.cfg.grad_accum)
        local = torch.tensor([float(sum(b.num_loss_tokens for b in batches)),
                              float(sum(b.input_ids.numel() for b in batches))])
        trained, tokens = parallel.all_reduce_sum(local).tolist()
        # FSDP2 averages the gradients over the ranks: world / (all trained tokens) gives the global token mean
        scale = self.dist.world_size / max(trained, 1.0)
        sums = torch.zeros(2, device=self.device)
        counts = torch.zeros(2, device=self.device)
        for b in batches:
            loss_sum, s, c = sft_loss_sums(self.model, b.to(self.device), vision_keepalive=self.vision_keepalive)
            (loss_sum * scale).backward()
            sums += s
            counts += c
        sums, counts = parallel.all_reduce_sum(torch.cat([sums, counts]).cpu()).split(2)
        nan = float("nan")
        return {
            "loss": float(sums.sum() / counts.sum()) if counts.sum() > 0 else nan,
            "loss_think": float(sums[0] / counts[0]) if counts[0] > 0 else nan,
            "loss_no_think": float(sums[1] / counts[1]) if counts[1] > 0 else nan,
            "tokens": tokens,
            "trained_tokens": trained,
            "epoch": float(self.loader.epoch),
            **({"image_failures": float(len(self.dataset.load_failures))} if self.dataset.has_images else {}),
        }

    def close(self) -> None:
        self.loader.close()
        super().close()


def train_sft(cfg: SFTConfig) -> dict[str, float]:
    """Run (or resume) an SFT run to ``cfg.steps``; returns the last step's metrics."""
    trainer = SFTTrainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()
