"""The run folder every rank agrees on, and the predictions file written into it."""

from __future__ import annotations

import csv
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..core.config import save_json


def shared_output_dir(accelerator: Accelerator, cfg) -> Path:
    # The default name has a timestamp: take rank 0's so every rank writes to one folder.
    names = [str(cfg.resolve_output_dir())]
    broadcast_object_list(names, from_process=0)
    cfg.output_dir = names[0]
    return Path(names[0])


def write_predictions(path: Path, result) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "label", "prediction"])
        writer.writerows(zip(result.index.tolist(), result.labels.tolist(), result.preds.tolist()))


def start_run_folder(out: Path, config: dict) -> None:
    """Main process, once every input is good: the folder, no stale metrics.json (only a finished run has
    one), and config.json (every setting as given, plus what was resolved)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)
    save_json(out / "config.json", config)
