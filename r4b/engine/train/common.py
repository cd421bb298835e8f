"""What both trainers share: the config every run has (model, output, optimiser, schedule, precision,
checkpointing, logging), and the ``Trainer`` loop around a subclass's ``train_step``.

One code path for one GPU, many GPUs (torchrun) and the CPU tests: the model always runs under FSDP2
(``fully_shard``, r4b/engine/train/parallel.py; a world of one without torchrun), with fp32 master weights and
optimiser state and ``compute_dtype`` parameters in the forward and backward (FSDP2's mixed precision; gradients
are reduced in fp32). Checkpoints are torch.distributed.checkpoint directories (checkpoint.py) written atomically
every ``save_every`` steps and at the end; a run started again with the same output_dir resumes from the latest one,
to the same loss curve. The final model is also exported as an HF checkpoint (output_dir/final, with the
tokenizer), which ``from_pretrained``, ``r4b generate`` and transformers read.

Output folder: checkpoints/step-XXXXXXXX/ (training state), final/ (HF model), metrics.jsonl, tb/ (TensorBoard),
metrics.png, config.json (the run's config).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .._config import config_from_dict
from ..chat import ChatTokenizer
from ..model import R4BConfig, R4BForConditionalGeneration, from_pretrained
from . import checkpoint as ckpt
from . import parallel
from .metrics import MetricsLogger, plot_metrics

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainConfig:
    """Fields every run has. model: a checkpoint directory (HF layout: config.json + *.safetensors; R-4B or
    Qwen3); tokenizer: a tokenizer.json (default: the model directory's); output_dir: where everything goes.

    steps: optimizer steps in all; lr: the peak learning rate, reached after ``warmup_steps`` (linear) and decayed
    by a cosine to ``min_lr_ratio * lr`` at ``steps``; AdamW (betas adam_beta1/2, weight_decay on matrices only);
    max_grad_norm: clip of the global gradient norm (0: none). compute_dtype: "auto" (bf16 on a GPU, fp32 on a CPU),
    "bf16", "fp16" or "fp32": the parameters' dtype in the forward and backward (masters stay fp32).
    save_every: a checkpoint every that many steps (0: only at the end); keep_last: checkpoints kept; resume:
    continue from output_dir's latest checkpoint when there is one.
    """

    model: str = ""
    output_dir: str = ""
    tokenizer: str | None = None
    steps: int = 100
    lr: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    seed: int = 0
    compute_dtype: str = "auto"
    gradient_checkpointing: bool = False
    device: str | None = None
    log_every: int = 1
    save_every: int = 100
    keep_last: int = 3
    resume: bool = True
    export_final: bool = True
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"{type(self).__name__}.{name} must be {want}, got {getattr(self, name)!r}")

        for name in ("model", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "a non-empty path")
        for name in ("steps", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "an int >= 1")
        for name in ("warmup_steps", "save_every", "keep_last", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "an int >= 0")
        for name in ("lr", "weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, "a finite number >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "in [0, 1]")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "in [0, 1)")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if str(f.type).replace(" ", "") == "bool" and not isinstance(v, bool):
                raise bad(f.name, "true or false")
            if str(f.type).replace(" ", "") == "bool|None" and v is not None and not isinstance(v, bool):
                raise bad(f.name, "true, false or null")
        if self.compute_dtype not in ("auto", *DTYPES):
            raise bad("compute_dtype", f"one of {('auto', *DTYPES)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a JSON config file), refusing unknown keys by name."""
        return config_from_dict(cls, d)


def lr_factor(step: int, *, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based): linear warm-up from 1/(warmup+1) to 1
    over the first ``warmup_steps`` steps, then a cosine from 1 down to ``min_lr_ratio`` at the last step."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: matrices decay, vectors (norms, biases) and the image newline do not."""
    decay, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class Trainer:
    """The loop: set-up (distributed, model, FSDP2, optimizer, schedule), resume, ``train_step`` per optimizer
    step, logs, checkpoints, the final export and plot. Subclasses implement ``train_step() -> dict`` (forward,
    backward; the optimizer step is :meth:`optimizer_step`) and ``data_state`` / ``load_data_state``."""

    name = "train"
    plot_keys: list[str] | None = None

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.dist = parallel.init_distributed(cfg.device)
        self.device = self.dist.device
        self.out = Path(cfg.output_dir)
        torch.manual_seed(cfg.seed)  # the same on every rank: the ranks' data differ by their loaders
        tok_file = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.model) / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"tokenizer {tok_file} not found (set tokenizer= to a tokenizer.json)")
        self.tokenizer_file = tok_file
        # fp32 masters: the optimizer updates them, FSDP2 casts to compute_dtype for the forward and backward
        self.model = from_pretrained(cfg.model, dtype=torch.float32, device=self.device)
        mcfg = self.model.config
        self.tokenizer = ChatTokenizer(tok_file, model_config=mcfg if isinstance(mcfg, R4BConfig) else None)
        # several ranks: batches without images still run the vision tower (every rank joins its collectives)
        self.vision_keepalive = self.dist.world_size > 1 and isinstance(self.model, R4BForConditionalGeneration)
        self.model.gradient_checkpointing_enable(cfg.gradient_checkpointing)
        self.model.train()
        self.compute_dtype = self._compute_dtype()
        parallel.apply_fsdp(self.model, param_dtype=None if self.compute_dtype == torch.float32 else
                            self.compute_dtype)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(weight_decay_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                                                min_lr_ratio=cfg.min_lr_ratio))
        self.step = 0

    def _compute_dtype(self) -> torch.dtype:
        if self.cfg.compute_dtype == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return DTYPES[self.cfg.compute_dtype]

    def forward(self, inputs: dict) -> torch.Tensor:
        """The training forward of a packed batch's ``model_inputs()``: hidden states (T, H)."""
        if self.vision_keepalive and "pixel_values" not in inputs:
            inputs = {**inputs, "vision_keepalive": True}
        return self.model(**inputs)

    # -- subclass hooks ----------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def data_state(self) -> dict:
        return {}

    def load_data_state(self, state: dict) -> None:
        pass

    # -- the loop ----------------------------------------------------------------------------------------------
    def optimizer_step(self) -> dict[str, float]:
        """Clip, step, schedule, zero the gradients; returns the gradient norm (before clipping) and the lr used."""
        lr = self.optimizer.param_groups[0]["lr"]
        clip = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = parallel.clip_grad_norm_(self.model, clip)
        if math.isfinite(norm):
            self.optimizer.step()
        else:  # a non-finite gradient would poison the weights: the step is skipped and reported
            log.warning("step %d: gradient norm is %s, optimizer step skipped", self.step, norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm, "lr": lr, "skipped_step": float(not math.isfinite(norm))}

    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def save(self) -> Path:
        state = {"step": self.step, "trainer": self.name, "data": self.data_state(), "config": asdict(self.cfg)}
        return ckpt.save_checkpoint(self.checkpoint_root, self.step, model=self.model, optimizer=self.optimizer,
                                    scheduler=self.scheduler, trainer_state=state, keep_last=self.cfg.keep_last)

    def resume(self) -> bool:
        """Load output_dir's latest checkpoint when there is one (and ``resume``); True when it did."""
        path = ckpt.latest_checkpoint(self.checkpoint_root) if self.cfg.resume else None
        if path is None:
            return False
        state = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        if state.get("trainer") != self.name:
            raise ValueError(f"checkpoint {path} was written by the {state.get('trainer')!r} trainer, not "
                             f"{self.name!r}")
        self.step = int(state["step"])
        self.load_data_state(state.get("data", {}))
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)
        return True

    def train(self) -> dict[str, float]:
        """Run to ``cfg.steps`` (resuming when a checkpoint exists); returns the last step's metrics."""
        cfg = self.cfg
        resumed = self.resume()  # first: a run pointed at another trainer's folder stops before writing into it
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / "config.json.tmp"
            tmp.write_text(json.dumps({"trainer": self.name, **asdict(cfg)}, indent=2) + "\n", encoding="utf-8")
            tmp.replace(self.out / "config.json")
        logger = MetricsLogger(self.out, enabled=self.dist.is_main, tensorboard=cfg.tensorboard,
                               resume_step=self.step if resumed else None)
        bar = None
        if cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=self.name, dynamic_ncols=True)
        last: dict[str, float] = {}
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                metrics = self.train_step()
                metrics.update(self.optimizer_step())
                metrics["step_time_s"] = time.perf_counter() - t0
                if "tokens" in metrics:
                    metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_time_s"]
                self.step += 1
                last = metrics
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    logger.log(self.step, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{metrics[k]:.4g}" for k in self.postfix_keys() if k in metrics})
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
            latest = ckpt.latest_checkpoint(self.checkpoint_root)
            if latest is None or latest.name != f"step-{self.step:08d}":  # a finished run resumed saves nothing
                self.save()
            if cfg.export_final:
                self.export(self.out / "final")
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        if self.dist.is_main:
            plot_metrics(self.out / "metrics.jsonl", self.out / "metrics.png", self.plot_keys,
                         title=f"r4b {self.name}: {self.out.name}")
        return last

    def postfix_keys(self) -> tuple[str, ...]:
        return ("loss", "grad_norm")

    def export(self, path: Path) -> None:
        """The model as an HF checkpoint (fp32 masters cast to the compute dtype when that is bf16/fp16), with the
        tokenizer, so ``from_pretrained`` and ``r4b generate`` take the folder as is."""
        dtype = None if self.compute_dtype == torch.float32 else self.compute_dtype
        ckpt.export_hf(self.model, path, dtype=dtype)
        if self.dist.is_main:
            shutil.copyfile(self.tokenizer_file, path / "tokenizer.json")
        parallel.barrier()

    def close(self) -> None:
        parallel.shutdown_distributed()
