"""The training policy: what trains and when, found from the model's block structure; LoRA.

`policy` is the Policy value (--freeze, LLRD, gradual unfreezing, LoRA settings: parsed once,
then asked what trains, the optimizer groups, the frozen prefix), plus apply_freeze and the
frozen-part dropout switch; `blocks` finds a model's encoder blocks and head by structure and
builds the per-group trainable table; `lora` wraps the model with peft and exports it. May import
core only; data, back-ends, engine and the commands import it.
"""
