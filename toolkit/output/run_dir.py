"""The run folder every rank agrees on, what a failed start must undo in it, and the predictions file."""

from __future__ import annotations

import csv
import shutil
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


class StartGuard:
    """Undoes a failed start. Armed from the moment a run opens its output folder (watch) until its first
    optimizer step (disarm): any error, or a Ctrl-C, in between leaves the disk as it was. A folder this run
    created goes, with every parent folder it created; a folder that was there before (a resume, a reused
    --output-dir) loses what is new at its top level and gets back the files the start rewrote."""

    REWRITTEN = ("config.json", "metrics.json")  # a start writes the one and removes the other

    def __init__(self) -> None:
        self.out: Path | None = None
        self.created: Path | None = None
        self.before: set[str] | None = None
        self.saved: dict[str, bytes] = {}

    def watch(self, out: Path, is_main: bool) -> None:
        if not is_main:  # rank 0 alone writes the folder
            return
        self.out = out
        missing = [p for p in (out, *out.parents) if not p.exists()]
        self.created = missing[-1] if missing else None
        if self.created is None and out.is_dir():
            self.before = {p.name for p in out.iterdir()}
            self.saved = {n: (out / n).read_bytes() for n in self.REWRITTEN if (out / n).is_file()}

    def disarm(self) -> None:
        self.out = None

    def __enter__(self) -> "StartGuard":
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is not None and self.out is not None:
            self.undo()

    def undo(self) -> None:
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
        elif self.before is not None:
            for path in self.out.iterdir():
                if path.name in self.before:
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            for name, data in self.saved.items():
                (self.out / name).write_bytes(data)
        self.out = None
