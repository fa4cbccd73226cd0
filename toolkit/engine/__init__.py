"""Training and evaluation machinery: loop, model, checkpoints, frozen cache, FLOPs, metrics."""
