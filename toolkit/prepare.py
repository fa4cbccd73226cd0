"""Build the data cache a training run will reuse: load, validate, sample, tokenize; no weights, no GPU.

A cluster user runs this once on a CPU node, with the training run's data options, --model and
--cache-dir on a shared filesystem; every GPU job then finds each step in the cache (the fingerprints
depend on the data, the options and the tokenizer's content, not on paths, process counts or machines).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from .core.config import PrepareConfig
from .data.dataset import build_splits, resolve_max_length, tokenize
from .engine.model import load_tokenizer, max_positions
from .output.console import plain


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(cfg: PrepareConfig) -> int:
    console = Console(highlight=False)
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    train_ds, eval_ds = build_splits(cfg.data, log=console.print)
    max_length = resolve_max_length(cfg.data.max_length, tokenizer, max_positions(cfg.model))
    train_tok = tokenize(train_ds, tokenizer, max_length, cfg.data.num_proc)
    eval_tok = tokenize(eval_ds, tokenizer, max_length, cfg.data.num_proc)
    console.print(f"prepared {len(train_tok)} train / {len(eval_tok)} eval examples, max length {max_length}, "
                  f"{cfg.data.num_labels} classes {plain(cfg.data.label_names or '')} "
                  f"in {time.perf_counter() - start:.1f} s")
    files = sorted({f["filename"] for ds in (train_tok, eval_tok) for f in ds.cache_files})
    console.print("tokenized cache: " + plain(", ".join(files)))
    if cfg.data.cache_dir:
        console.print(f"cache folder {plain(cfg.data.cache_dir)}: {folder_bytes(Path(cfg.data.cache_dir)) / 2**20:.1f} "
                      f"MiB")
    return 0
