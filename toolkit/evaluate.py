"""Evaluate a saved model (a run's `model/` folder) with the same data options as training."""

from __future__ import annotations

from pathlib import Path

from .config import EvalConfig, save_json
from .data import Collator, make_loader
from .errors import ToolkitError
from .loop import validate
from .model import load_model, load_tokenizer
from .reporting import Reporter
from .train import _shared_output_dir, prepare_data, setup, write_predictions


def main(cfg: EvalConfig) -> int:
    if not Path(cfg.model).is_dir():
        raise ToolkitError(f"model folder not found: {cfg.model}", "pass a run's model/ folder (written by launch/train.py)")
    accelerator = setup(cfg.cpu, cfg.mixed_precision)
    reporter = Reporter(accelerator.is_main_process)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, cfg.data.num_labels)
    _, eval_ds, _ = prepare_data(accelerator, cfg.data, tokenizer, getattr(model.config, "max_position_embeddings", None),
                                 reporter, need_train=False)
    loader = make_loader(eval_ds, Collator(tokenizer, 8 if accelerator.device.type == "cuda" else None),
                         cfg.eval_batch_size, cfg.seed, train=False)
    model, loader = accelerator.prepare(model, loader)
    result = validate(accelerator, model, loader, cfg.data.num_labels, len(eval_ds))
    out = _shared_output_dir(accelerator, cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_predictions(out / "predictions.csv", result)
        metrics = {**result.metrics, "total_params": sum(p.numel() for p in model.parameters()),
                   "world_size": accelerator.num_processes, "model": cfg.model}
        save_json(out / "metrics.json", metrics)
        reporter.metrics_table(f"evaluation of {cfg.model} ({out})", metrics)
    accelerator.wait_for_everyone()
    return 0
