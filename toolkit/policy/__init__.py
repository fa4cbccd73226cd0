"""The training policy: what trains and when, the model's block structure, LoRA."""
