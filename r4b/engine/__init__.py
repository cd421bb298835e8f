"""r4b.engine: the model, the inference runtime and the trainers (no kernel code here)."""
