"""Model configs: dataclasses built from (and written back to) Hugging Face ``config.json`` dicts.

Three shapes are read: a Qwen3 text-only config (``model_type: qwen3``), a SigLIP vision config, and an
R-4B / LLaVA-OneVision config that nests ``text_config`` and ``vision_config``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def _pick(d: dict[str, Any], key: str, default: Any) -> Any:
    v = d.get(key, default)
    return default if v is None else v


# What a field left out of a config.json means: transformers' class defaults (Qwen3Config, SiglipVisionConfig).
# Composite configs (LLaVA-style, R-4B) written by transformers 4.x keep only the nested text_config /
# vision_config fields that differ from these, so a Qwen3-4B text_config may lack num_attention_heads (32),
# vocab_size (151936) and head_dim (128). tests/test_weights.py checks these against transformers itself.
HF_QWEN3_DEFAULTS: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
    head_dim=128, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768, attention_bias=False,
    tie_word_embeddings=False,
)  # num_key_value_heads defaults to num_attention_heads
HF_SIGLIP_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
)


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(slots=True)
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            _positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Qwen3Config:
        """From a Qwen3 ``config.json`` dict (transformers 4.x ``rope_theta`` or 5.x ``rope_parameters``); a field
        left out means transformers' default (:data:`HF_QWEN3_DEFAULTS`), as it does for transformers."""
        mt = d.get("model_type", "qwen3")
        if mt not in ("qwen3",):
            raise ValueError(f"text config model_type must be 'qwen3', got {mt!r}")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"rope_type={rope_type!r} is not supported (plain RoPE only): {rope}")
        if d.get("use_sliding_window"):
            raise NotImplementedError("use_sliding_window=True is not supported (Qwen3 / R-4B use full attention)")
        hf = HF_QWEN3_DEFAULTS
        heads = _pick(d, "num_attention_heads", hf["num_attention_heads"])
        return cls(
            vocab_size=_pick(d, "vocab_size", hf["vocab_size"]),
            hidden_size=_pick(d, "hidden_size", hf["hidden_size"]),
            intermediate_size=_pick(d, "intermediate_size", hf["intermediate_size"]),
            num_hidden_layers=_pick(d, "num_hidden_layers", hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=_pick(d, "num_key_value_heads", heads),
            head_dim=_pick(d, "head_dim", hf["head_dim"]),
            rms_norm_eps=float(_pick(d, "rms_norm_eps", hf["rms_norm_eps"])),
            rope_theta=float(rope.get("rope_theta", _pick(d, "rope_theta", hf["rope_theta"]))),
            max_position_embeddings=_pick(d, "max_position_embeddings", hf["max_position_embeddings"]),
            attention_bias=bool(_pick(d, "attention_bias", hf["attention_bias"])),
            tie_word_embeddings=bool(_pick(d, "tie_word_embeddings", hf["tie_word_embeddings"])),
        )

    def to_hf(self) -> dict[str, Any]:
        d = asdict(self)
        theta = d.pop("rope_theta")
        d.update(model_type="qwen3", hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": theta},
                 rope_theta=theta, use_sliding_window=False, sliding_window=None)
        return d


@dataclass(slots=True)
class SiglipConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                     "image_size", "patch_size"):
            _positive(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be >= patch_size ({self.patch_size})")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"hidden_act must be 'gelu_pytorch_tanh' or 'gelu', got {self.hidden_act!r}")

    @property
    def grid(self) -> int:
        """Patches per side of one tile: 384 // 14 = 27 (the patch conv drops the last 6 pixels)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> SiglipConfig:
        mt = d.get("model_type", "siglip_vision_model")
        if mt not in ("siglip_vision_model", "siglip2_vision_model", "siglip"):
            raise ValueError(f"vision config model_type must be a SigLIP vision model, got {mt!r}")
        # a field left out means transformers' SiglipVisionConfig default, as it does for transformers
        return cls(**{k: _pick(d, k, HF_SIGLIP_VISION_DEFAULTS[k]) for k in cls.__slots__})

    def to_hf(self) -> dict[str, Any]:
        return {**asdict(self), "model_type": "siglip_vision_model", "vision_use_head": False}


@dataclass(slots=True)
class R4BConfig:
    text_config: Qwen3Config = field(default_factory=Qwen3Config)
    vision_config: SiglipConfig = field(default_factory=SiglipConfig)
    image_token_index: int = 151665
    image_grid_pinpoints: list[list[int]] = field(default_factory=lambda: [[384, 384]])
    vision_feature_layer: int | list[int] = -1
    vision_feature_select_strategy: str = "full"
    vision_aspect_ratio: str = "anyres_max_9"
    projector_pre_norm: bool = True
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.vision_feature_select_strategy != "full":
            # "default" drops the first token (a CLS token in CLIP); SigLIP has none, and AnyRes needs all g*g.
            raise ValueError(f"vision_feature_select_strategy must be 'full' (SigLIP has no CLS token), "
                             f"got {self.vision_feature_select_strategy!r}")
        if self.projector_hidden_act != "gelu":
            raise ValueError(f"projector_hidden_act must be 'gelu', got {self.projector_hidden_act!r}")
        if not self.vision_aspect_ratio.startswith("anyres_max_"):
            raise ValueError(f"vision_aspect_ratio must look like 'anyres_max_9', got {self.vision_aspect_ratio!r}")
        layers = self.feature_layers
        n = self.vision_config.num_hidden_layers
        bad = [x for x in layers if not -(n + 1) <= x <= n]
        if bad:
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer} is out of range for {n} vision layers")
        if not self.image_grid_pinpoints or any(len(p) != 2 for p in self.image_grid_pinpoints):
            raise ValueError(f"image_grid_pinpoints must be a non-empty list of [height, width], "
                             f"got {self.image_grid_pinpoints!r}")
        self.tie_word_embeddings = self.tie_word_embeddings or self.text_config.tie_word_embeddings
        self.text_config.tie_word_embeddings = self.tie_word_embeddings

    @property
    def feature_layers(self) -> list[int]:
        v = self.vision_feature_layer
        return list(v) if isinstance(v, (list, tuple)) else [v]

    @property
    def max_num_patches(self) -> int:
        """The N of ``anyres_max_N``: features beyond N tiles' worth are downsampled."""
        return int(self.vision_aspect_ratio.removeprefix("anyres_max_"))

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> R4BConfig:
        """From an R-4B (``RConfig``) or LLaVA-OneVision ``config.json`` dict.

        The projector's ``pre_norm`` is on unless the config is a plain LLaVA-OneVision one; the weights
        loader turns it off when a checkpoint has no ``pre_norm`` tensors.
        """
        if "text_config" not in d or "vision_config" not in d:
            raise ValueError("an R-4B config needs text_config and vision_config; got keys " + str(sorted(d)))
        image_token = d.get("image_token_index", d.get("image_token_id"))
        if image_token is None:
            raise ValueError("config has no image_token_index / image_token_id")
        return cls(
            text_config=Qwen3Config.from_hf(d["text_config"]),
            vision_config=SiglipConfig.from_hf(d["vision_config"]),
            image_token_index=int(image_token),
            image_grid_pinpoints=[list(p) for p in _pick(d, "image_grid_pinpoints", [[384, 384]])],
            vision_feature_layer=_pick(d, "vision_feature_layer", -1),
            vision_feature_select_strategy=_pick(d, "vision_feature_select_strategy", "full"),
            vision_aspect_ratio=_pick(d, "vision_aspect_ratio", "anyres_max_9"),
            projector_pre_norm=bool(d.get("projector_pre_norm", d.get("model_type") != "llava_onevision")),
            projector_hidden_act=_pick(d, "projector_hidden_act", "gelu"),
            tie_word_embeddings=bool(_pick(d, "tie_word_embeddings", False)),
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            # model_type llava_onevision: stock transformers reads the layout (its projector lacks pre_norm).
            "architectures": ["LlavaOnevisionForConditionalGeneration"],
            "model_type": "llava_onevision",
            "projector_pre_norm": self.projector_pre_norm,
            "text_config": self.text_config.to_hf(),
            "vision_config": self.vision_config.to_hf(),
            "image_token_index": self.image_token_index,
            "image_grid_pinpoints": self.image_grid_pinpoints,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "vision_aspect_ratio": self.vision_aspect_ratio,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": True,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


ModelConfig = Qwen3Config | R4BConfig


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """An R4BConfig when ``d`` nests text_config / vision_config, else a Qwen3Config."""
    if "text_config" in d or "vision_config" in d:
        return R4BConfig.from_hf(d)
    return Qwen3Config.from_hf(d)


def load_config(path: str | Path) -> ModelConfig:
    """Read ``path/config.json`` (or the file ``path``) into a config dataclass."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no config.json at {p}")
    with open(p) as f:
        return config_from_hf(json.load(f))
