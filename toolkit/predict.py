"""Classify texts with a trained model: label and probability per text, in batches.

Input: .txt (one text per line), .csv, .jsonl/.json (JSON Lines), .parquet, or '-' for lines on
stdin. Output: .csv or .jsonl by its suffix, JSON Lines on stdout without --output. Every row
keeps `index`, its line / row number in the input, so results join back to the source; blank
texts are skipped (and counted) rather than classified as something.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from transformers.utils import logging as hf_logging

from .core.config import PredictConfig
from .core.errors import ToolkitError
from .data.dataset import resolve_max_length
from .engine.load import load_saved
from .output.console import plain

TABLE_FORMATS = {".csv": pd.read_csv, ".jsonl": lambda p: pd.read_json(p, lines=True),
                 ".json": lambda p: pd.read_json(p, lines=True), ".parquet": pd.read_parquet}
OUTPUT_FORMATS = (".csv", ".jsonl")


def read_texts(source: str, column: str) -> list[tuple[int, str]]:
    """(index in the input, text) for every non-blank text."""
    if source == "-":
        return _nonblank(enumerate(line.rstrip("\n") for line in sys.stdin))
    path = Path(source)
    if not path.is_file():
        raise ToolkitError(f"input file not found: {source}", "check the path given to --input (or '-' for stdin)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _nonblank(enumerate(path.read_text(encoding="utf-8").splitlines()), path)
    if suffix not in TABLE_FORMATS:
        raise ToolkitError(f"unsupported input type '{path.suffix}' for {path}",
                           f"use .txt, {', '.join(TABLE_FORMATS)}")
    try:
        table = TABLE_FORMATS[suffix](path)
    except (ValueError, pd.errors.EmptyDataError) as exc:
        raise ToolkitError(f"could not read {path}: {str(exc).splitlines()[0][:200] or 'it is empty'}",
                           f"give a valid {suffix} file with a '{column}' column") from exc
    if column not in table.columns:
        raise ToolkitError(f"{path} has no column '{column}'; it has {list(table.columns)}",
                           "name it with --text-column")
    return _nonblank(((i, "" if pd.isna(t) else str(t)) for i, t in enumerate(table[column])), path)


def _nonblank(rows, path: Path | None = None) -> list[tuple[int, str]]:
    rows = list(rows)
    kept = [(i, t) for i, t in rows if t.strip()]
    where = path or "stdin"
    if not kept:
        raise ToolkitError(f"no texts to classify in {where} ({len(rows)} rows, all blank)" if rows
                           else f"{where} is empty",
                           "give one text per line (.txt / stdin) or a text column (.csv / .jsonl / .parquet)")
    if len(kept) < len(rows):
        Console(stderr=True).print(f"[yellow]skipped {len(rows) - len(kept)} blank text(s) in {plain(where)}[/yellow]")
    return kept


@torch.inference_mode()
def classify(model, tokenizer, texts: list[str], batch_size: int, max_length: int, device: torch.device) -> np.ndarray:
    """Class probabilities, one row per text, in input order."""
    model.to(device).eval()
    # longest first: each batch holds similar lengths, so little compute goes to padding
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    probs = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(device)
        probs[idx] = torch.softmax(model(**enc).logits.float(), dim=-1).cpu().numpy()
    return probs


def write_results(rows: list[dict], output: str | None) -> None:
    if output is None:
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        if path.suffix.lower() == ".csv":
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        else:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(cfg: PredictConfig) -> int:
    if cfg.output and Path(cfg.output).suffix.lower() not in OUTPUT_FORMATS:
        raise ToolkitError(f"unsupported output type '{Path(cfg.output).suffix}' for {cfg.output}",
                           "name the --output file *.csv or *.jsonl")
    hf_logging.disable_progress_bar()  # stderr is for our messages; stdout may carry the results
    rows = read_texts(cfg.input, cfg.text_column) if cfg.input != "-" else None
    saved = load_saved(cfg.model)  # before waiting on stdin, so a bad --model fails at once
    max_length = resolve_max_length(cfg.max_length or saved.train_max_length, saved.tokenizer,
                                     getattr(saved.model.config, "max_position_embeddings", None))
    rows = rows or read_texts(cfg.input, cfg.text_column)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    probs = classify(saved.model, saved.tokenizer, [t for _, t in rows], cfg.batch_size, max_length, device)
    names = saved.model.config.id2label
    preds = probs.argmax(axis=1)
    write_results([{"index": i, "label": names[int(p)], "label_id": int(p), "probability": round(float(pr[p]), 6),
                    "text": text} for (i, text), p, pr in zip(rows, preds, probs)], cfg.output)
    if cfg.output:
        Console(stderr=True).print(f"{len(rows)} predictions written to {plain(cfg.output)}")
    return 0
