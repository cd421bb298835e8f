"""Hugging Face checkpoints in and out: config.json + safetensors (one file, or shards with
``model.safetensors.index.json``). Only safetensors are read; nothing is unpickled.

Key layouts read (mapped to r4b's names, which are R-4B's hub names):
  * R-4B hub:      model.language_model.*, model.vision_tower[.vision_model].*, model.multi_modal_projector.*,
                   model.image_newline, lm_head.*
  * legacy LLaVA:  language_model.model.*, language_model.lm_head.*, vision_tower[.vision_model].*,
                   multi_modal_projector.*, image_newline
  * Qwen3 text:    model.*, lm_head.* (lm_head tied to the embeddings when absent and the config says so)
SigLIP weights the model never uses (pooling ``head.*``, ``post_layernorm.*``) are skipped by name; anything
else that does not match raises :class:`CheckpointError` listing every offending name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import Qwen3Config, R4BConfig, load_config
from .qwen3 import Qwen3ForCausalLM
from .r4b import R4BForConditionalGeneration

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_VISION = "model.vision_tower."
_SKIPPED_VISION = (_VISION + "head.", _VISION + "post_layernorm.")
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: every problem is listed, by tensor name."""


def _listing(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}): " + ", ".join(items[:_MAX_LISTED]) + more


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (from the index when there is one)."""
    if (path / INDEX).is_file():
        with open(path / INDEX) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{path / INDEX} is not a valid index (needs a 'weight_map'): {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (path / name).is_file()]
        if missing:
            raise CheckpointError(f"{path / INDEX} names shard files that do not exist: {missing}")
        return [path / name for name in files]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    found = sorted(p.name for p in path.glob("*"))
    raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {path} (found: {found}); only safetensors are read")


def read_safetensors(files: list[Path], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """All tensors of the files; a truncated or corrupt file raises CheckpointError naming it."""
    out: dict[str, Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as st:
                for k in st.keys():
                    if k in out:
                        raise CheckpointError(f"tensor {k!r} appears in more than one file (again in {f.name})")
                    out[k] = st.get_tensor(k)
        except SafetensorError as e:
            raise CheckpointError(f"cannot read {f} (truncated or not a safetensors file): {e}") from e
    return out


def _hf_to_r4b(key: str) -> str:
    """One checkpoint key (any supported layout) -> the r4b parameter name of an R-4B model."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", _VISION), ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("image_newline", "model.image_newline")):
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key.startswith(_VISION + "vision_model."):
        key = _VISION + key[len(_VISION + "vision_model."):]
    return key


def _r4b_to_hf(key: str) -> str:
    """r4b parameter name -> R-4B hub key (the vision tower keeps transformers 4.x's ``vision_model`` level)."""
    if key.startswith(_VISION):
        return _VISION + "vision_model." + key[len(_VISION):]
    return key


def _match(model: nn.Module, state: dict[str, Tensor], dtype: torch.dtype | None, path: Path) -> dict[str, Tensor]:
    """Check ``state`` against the model's parameters; return it cast to ``dtype``, or raise listing all problems."""
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        expected.pop("lm_head.weight")
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and not (tied and k == "lm_head.weight"))
    shapes, dtypes = [], []
    for k, t in state.items():
        p = expected.get(k)
        if p is None:
            continue
        if tuple(t.shape) != tuple(p.shape):
            shapes.append(f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(p.shape)}")
        if not t.is_floating_point():
            dtypes.append(f"{k}: {t.dtype} (a float tensor is required)")
    float_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if dtype is None and len(float_dtypes) > 1:
        by = {d: sorted(k for k, t in state.items() if t.dtype == d) for d in float_dtypes}
        dtypes += [f"{d}: {names[:3]}{' ...' if len(names) > 3 else ''}" for d, names in by.items()]
        dtypes.insert(0, "mixed float dtypes in the checkpoint and no dtype= given")
    if missing or unexpected or shapes or dtypes:
        parts = [f"checkpoint {path} does not match the model built from its config.json:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes), ("dtype mismatches", dtypes)):
            if items:
                parts.append(_listing(title, items))
        raise CheckpointError("\n".join(parts))
    if tied and "lm_head.weight" in state:
        emb = state[next(k for k in expected if k.endswith("embed_tokens.weight"))]
        if not torch.equal(state.pop("lm_head.weight"), emb):
            raise CheckpointError(f"checkpoint {path}: tie_word_embeddings=True but lm_head.weight differs from "
                                  "the token embeddings")
    return {k: (t.to(dtype) if dtype is not None else t) for k, t in state.items()}


def from_pretrained(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Qwen3ForCausalLM | R4BForConditionalGeneration:
    """Load an R-4B / LLaVA-OneVision or Qwen3 checkpoint directory.

    The model is built on the meta device and the checkpoint tensors are assigned (no second copy).
    ``dtype=None`` keeps the checkpoint's (single) float dtype. Raises CheckpointError on any mismatch.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint path {path} is not a directory")
    cfg = load_config(path)
    state = read_safetensors(checkpoint_files(path), device)
    # RoPE tables that old exports saved as buffers: recomputed, never loaded.
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if isinstance(cfg, R4BConfig):
        state = {_hf_to_r4b(k): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(_SKIPPED_VISION)}
        cfg.projector_pre_norm = any(k.startswith("model.multi_modal_projector.pre_norm.") for k in state)
        cls = R4BForConditionalGeneration
    else:
        cls = Qwen3ForCausalLM
    with torch.device("meta"):
        model = cls(cfg)
    state = _match(model, state, dtype, path)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state[next(k for k in state if k.endswith("embed_tokens.weight"))]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.to(device).eval()


def _hf_config(model: nn.Module) -> dict:
    cfg = model.config
    d = cfg.to_hf()
    if isinstance(cfg, Qwen3Config):
        d["architectures"] = ["Qwen3ForCausalLM"]
    dt = next(model.parameters()).dtype
    d["dtype"] = str(dt).removeprefix("torch.")
    return d


def _shards(state: dict[str, Tensor], max_shard_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def save_pretrained(model: Qwen3ForCausalLM | R4BForConditionalGeneration, path: str | Path, *,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and the weights in R-4B's layout (Qwen3 layout for a text model), sharded with an
    index above ``max_shard_bytes``. Written to a temporary directory next to ``path`` and renamed into place,
    so a crash never leaves a half-written checkpoint at ``path``."""
    if not isinstance(model, (Qwen3ForCausalLM, R4BForConditionalGeneration)):
        raise TypeError(f"model must be a Qwen3ForCausalLM or R4BForConditionalGeneration, got {type(model).__name__}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    path = Path(path)
    state = {}
    for k, t in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[_r4b_to_hf(k) if isinstance(model, R4BForConditionalGeneration) else k] = t.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old: Path | None = None
    try:
        shards = _shards(state, max_shard_bytes)
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=meta)
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            with open(tmp / INDEX, "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(tmp / "config.json", "w") as f:
            json.dump(_hf_config(model), f, indent=2)
        os.chmod(tmp, 0o755)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not path.exists():  # put the previous checkpoint back
            os.rename(old, path)
        raise
