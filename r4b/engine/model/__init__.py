"""r4b.engine.model: Qwen3 decoder, SigLIP vision tower, the R-4B multimodal model, HF checkpoint I/O."""
