"""Evaluate one model on several eval-set sizes in one process group (run by test_reliability.py).

    accelerate launch --cpu --num_processes N tests/eval_matrix_driver.py MODEL DATA_DIR OUT.json

One launch per world size covers every size: a process group costs seconds to start, an
evaluation of a few rows with a tiny model costs milliseconds.
"""

from __future__ import annotations

import json
import sys

SIZES = (1, 2, 7, 24, 25)  # 24: a multiple of the global eval batch (4 per rank) for 1, 2 and 3 ranks; 25: one more
EVAL_BATCH = 4


def evaluate_sizes(accelerator, model_dir: str, data_dir: str) -> dict:
    from transformers import AutoModelForSequenceClassification

    from toolkit.core.config import DataConfig
    from toolkit.data.dataset import Collator, build_splits, make_loader, tokenize
    from toolkit.engine.loop import validate
    from toolkit.engine.model import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    with accelerator.main_process_first():
        _, eval_ds = build_splits(DataConfig(task="imdb-subset", data_dir=data_dir, train_samples=8,
                                             eval_samples=max(SIZES)), log=lambda *a: None)
        eval_tok = tokenize(eval_ds, tokenizer, 48)
    model = accelerator.prepare(AutoModelForSequenceClassification.from_pretrained(model_dir))
    results = {}
    for n in SIZES:
        loader = accelerator.prepare(make_loader(eval_tok.select(range(n)), Collator(tokenizer, None), EVAL_BATCH, 0,
                                                 train=False))
        result = validate(accelerator, model, loader, 2, n)
        results[n] = {"index": result.index.tolist(), "labels": result.labels.tolist(), "preds": result.preds.tolist(),
                      "accuracy": result.metrics["accuracy"], "eval_loss": result.metrics["eval_loss"],
                      "world_size": accelerator.num_processes}
    return results


if __name__ == "__main__":
    from toolkit.backends.accelerator import setup

    model_dir, data_dir, out = sys.argv[1:4]
    accelerator = setup(cpu=True, mixed_precision="no")
    results = evaluate_sizes(accelerator, model_dir, data_dir)
    if accelerator.is_main_process:
        with open(out, "w") as fh:
            json.dump(results, fh)
    accelerator.wait_for_everyone()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
