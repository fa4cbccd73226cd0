"""What the back-ends need: DDP, DeepSpeed, FSDP, SLURM, precision, timeouts, stop requests."""
