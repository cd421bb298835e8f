"""r4b.engine.model: Qwen3 decoder, SigLIP vision tower, the R-4B multimodal model, HF checkpoint I/O."""

from .config import ModelConfig, Qwen3Config, R4BConfig, SiglipConfig, config_from_hf, load_config
from .image import ImageProcessor, num_image_tokens
from .qwen3 import PagedKV, Qwen3ForCausalLM, Qwen3Model, last_rows
from .r4b import R4BForConditionalGeneration, R4BProjector
from .siglip import SiglipVisionModel
from .weights import CheckpointError, from_pretrained, save_pretrained

__all__ = [
    "CheckpointError",
    "ImageProcessor",
    "ModelConfig",
    "PagedKV",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "Qwen3Model",
    "R4BConfig",
    "R4BForConditionalGeneration",
    "R4BProjector",
    "SiglipConfig",
    "SiglipVisionModel",
    "config_from_hf",
    "from_pretrained",
    "last_rows",
    "load_config",
    "num_image_tokens",
    "save_pretrained",
]
