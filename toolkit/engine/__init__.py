"""Training and evaluation machinery: the loop, the model, checkpoints, the frozen cache, FLOPs, metrics.

`loop` (fit, validate), `model` (loading the encoder and tokenizer, the optimizer), `checkpoint`
(atomic checkpoints, resume, the final model export), `load` (a trained run, model or checkpoint
read back for scoring), `frozen_cache` (--cache-frozen), `flops` (FLOP count, GPU peak table,
MFU), `metrics` (scikit-learn metrics), `extra_metrics` (--metrics from the `evaluate` library),
`memory` (peak memory, optimizer-state bytes). May import core, output, policy, data and
backends; only the commands import it.
"""
