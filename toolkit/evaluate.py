"""Score a trained model (run folder, model/ folder or checkpoint; see engine/load.py) on an eval set.

The eval set is given with the training data options (a preset, --data-dir, or any local file
with --eval-file, alone or with --train-file), or taken from the run itself with --same-data.
Truncation length and batch size default to the run's, because changing either changes scores.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from datasets import Dataset

from .backends.accelerator import setup
from .backends.distributed import main_process_first
from .core.config import DataConfig, EvalConfig, save_json
from .core.errors import ToolkitError
from .data.dataset import (
    Collator,
    build_splits,
    clean,
    load_data_file,
    make_loader,
    resolve_max_length,
    take_sample,
    tokenize,
)
from .engine import extra_metrics as library_metrics
from .engine.load import Saved, load_saved
from .engine.loop import validate
from .engine.metrics import f1_average
from .output import library_logs as logs
from .output.console import RunLog, plain
from .output.run_dir import shared_output_dir, write_predictions


def eval_split(cfg: DataConfig, log=print) -> Dataset:
    """The eval rows exactly as training selects them; --eval-file alone needs no train file."""
    if cfg.eval_file and not cfg.train_file:
        # build_splits would insist on a train file; this is its sampling of a custom eval file.
        eval_raw = load_data_file(Path(cfg.eval_file), cfg.file_encoding, cfg.cache_dir)
        return take_sample(clean(eval_raw, cfg, "eval", log), cfg.eval_samples, cfg.data_seed)
    return build_splits(cfg, log, training=False)[1]


def data_config(cfg: EvalConfig, saved: Saved) -> DataConfig:
    if cfg.same_data:
        if not saved.run_config:
            raise ToolkitError("--same-data needs the run's settings, but no training config.json belongs to "
                               f"{cfg.model}",
                               "pass the data options instead (--task, --data-dir, --eval-file, --eval-samples, ...)")
        known = {f.name for f in dataclasses.fields(DataConfig)}
        data = DataConfig(**{k: v for k, v in saved.run_config["data"].items() if k in known})
        data.data_dir = cfg.data.data_dir or data.data_dir  # the files may have moved since training
    else:
        data = dataclasses.replace(cfg.data)
    data.num_labels = saved.model.config.num_labels  # the model decides how many classes there are, and their names
    data.label_names = [saved.model.config.id2label[i] for i in range(data.num_labels)]
    data.max_length = data.max_length or saved.train_max_length
    return data


def main(cfg: EvalConfig) -> int:
    extra_metrics = library_metrics.load(cfg.metrics)
    saved = load_saved(cfg.model)
    data = data_config(cfg, saved)
    accelerator = setup(cfg.cpu, cfg.mixed_precision, dist_timeout_s=cfg.dist_timeout, tf32=cfg.tf32)
    logs.configure(1, accelerator.is_main_process, accelerator.distributed_type == "DEEPSPEED")
    run_log = RunLog(accelerator.is_main_process)
    run_log.print(f"scoring the {saved.kind} at {plain(saved.path)}")
    model, tokenizer = saved.model, saved.tokenizer
    with main_process_first(accelerator, cfg.data.data_timeout):  # rank 0 fills the datasets cache, the others read it
        eval_ds = eval_split(data, run_log.print)
        max_length = resolve_max_length(data.max_length, tokenizer,
                                        getattr(model.config, "max_position_embeddings", None))
        eval_tok = tokenize(eval_ds, tokenizer, max_length, data.num_proc)
    batch_size = cfg.eval_batch_size or saved.train_eval_batch_size or 32
    loader = make_loader(eval_tok, Collator(tokenizer, 8 if accelerator.device.type == "cuda" else None),
                         batch_size, cfg.seed, train=False)
    model, loader = accelerator.prepare(model, loader)
    result = validate(accelerator, model, loader, data.num_labels, len(eval_tok), data.label_names)
    out = shared_output_dir(accelerator, cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_json(out / "config.json", {**cfg.to_dict(), "data": dataclasses.asdict(data), "resolved": {
            "source": saved.kind, "weights": str(saved.path), "max_length": max_length, "eval_batch_size": batch_size,
            "eval_examples": len(eval_tok), "world_size": accelerator.num_processes}})
        write_predictions(out / "predictions.csv", result)
        result.metrics.update(library_metrics.compute(extra_metrics, result.labels, result.preds, data.num_labels))
        metrics = {**result.metrics, "f1_average": f1_average(data.num_labels),
                   "total_params": sum(p.numel() for p in model.parameters()),
                   "world_size": accelerator.num_processes, "model": cfg.model, "source": saved.kind}
        save_json(out / "metrics.json", metrics)
        run_log.metrics_table(f"evaluation of {cfg.model} ({out})", metrics)
    accelerator.wait_for_everyone()
    return 0
