"""Training: data (packing, loaders), SFT and BPO trainers, checkpoints, parallelism."""
