"""r4b: a custom-kernel training and inference engine for auto-thinking multimodal LLMs (R-4B)."""

__version__ = "0.1.0"
