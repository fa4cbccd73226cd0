"""What a run shows and records: rich tables and progress on rank 0, a JSONL log."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

PROGRESS_FILE_ENV = "TOOLKIT_PROGRESS_FILE"  # where _Bar writes {step, total, time}, when set


def plain(text: object) -> str:
    """Text the user controls (class names, paths, column names, policy spellings, error messages), made safe
    to put in a rich string or table: rich reads `[...]` as markup and drops it (`f1[books]` showed as `f1`)."""
    return escape(str(text))


class RunLog:
    """What a run shows (rank 0 only, so N ranks do not print N copies) and records in metrics.jsonl."""

    def __init__(self, is_main: bool, log_path: Path | None = None, verbosity: int = 1):
        self.is_main = is_main
        self.console = Console(stderr=False, highlight=False, soft_wrap=True)  # long lines are not cut into two
        if not self.console.is_terminal and "COLUMNS" not in os.environ:
            # A log file (SLURM, CI, a pipe) has no width: rich's 80 columns would squeeze the progress line.
            self.console.width = 120
        self.log_path = log_path
        self.verbosity = verbosity  # 0 --quiet (final table only), 1 default, 2 --verbose
        self.trackers = None  # an Accelerator with started trackers (tracking.start), or None

    def print(self, *objects) -> None:
        if self.is_main and self.verbosity >= 1:
            self.console.print(*objects)

    def notice(self, *objects) -> None:
        """Shown even with --quiet: what the user must know to go on (how to resume an interrupted run)."""
        if self.is_main:
            self.console.print(*objects)

    def detail(self, *objects) -> None:
        """Shown with --verbose only."""
        if self.is_main and self.verbosity >= 2:
            self.console.print(*objects)

    def record(self, entry: dict) -> None:
        """The one sink for metrics: a JSON line in metrics.jsonl (append mode: a resumed run keeps its
        history) and the same numbers to the experiment trackers at the same step."""
        if not self.is_main:
            return
        if self.log_path is not None:
            with self.log_path.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")
        if self.trackers is not None:
            values = {k: v for k, v in entry.items()
                      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.trackers.log(values, step=entry.get("step"))

    def eval_result(self, epoch: int, step: int, metrics: dict, split: str = "eval") -> None:
        """One evaluation: recorded in metrics.jsonl (names prefixed eval_, the split named when it is the
        validation split) and shown as one line."""
        self.record({"epoch": epoch, "step": step, **({"split": split} if split != "eval" else {}),
                     **{k if k.startswith("eval") else f"eval_{k}": v for k, v in metrics.items()}})
        self.print(f"epoch {epoch}: {'' if split == 'eval' else split + ' '}f1 {metrics['f1']:.4f} "
                   f"accuracy {metrics['accuracy']:.4f} {split} loss {metrics['eval_loss']:.4f}")

    def freeze_table(self, summary) -> None:
        """The per-group trainable table of a policy.blocks.FreezeSummary."""
        table = Table(title=f"freeze policy: {plain(summary.policy)}")
        table.add_column("parameter group")
        table.add_column("trainable", justify="right")
        table.add_column("total", justify="right")
        table.add_column("share", justify="right")
        for name, trainable, total in summary.groups:
            style = "green" if trainable else "dim"
            table.add_row(plain(name), f"{trainable:,}", f"{total:,}", f"{trainable / total:.0%}" if total else "-",
                          style=style)
        table.add_row("all", f"{summary.trainable:,}", f"{summary.total:,}", f"{summary.share:.2%}", style="bold")
        self.print(table)

    def metrics_table(self, title: str, metrics: dict) -> None:
        """Shown even with --quiet: it is the run's result."""
        if not self.is_main:
            return
        # The title goes on its own unwrapped line: as a table title, a long one (a run folder path)
        # would wrap over the narrow table.
        self.console.print(f"[bold]{plain(title)}[/bold]", soft_wrap=True)
        table = Table()
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in metrics.items():  # per-class keys carry the class name: f1[books]
            table.add_row(plain(key), f"{value:.4f}" if isinstance(value, float) else plain(value))
        self.console.print(table)

    @contextmanager
    def progress(self, total: int, completed: int = 0) -> Iterator["_Bar"]:
        # A comparison's worker names a file here to follow its run (step, total) without reading its output.
        follow = os.environ.get(PROGRESS_FILE_ENV) if self.is_main else None
        if not self.is_main or self.verbosity < 1:
            yield _Bar(None, None, follow, total, completed)
            return
        columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task("train", total=total, completed=completed, info="")
            yield _Bar(bar, task, follow, total, completed)


class _Bar:
    def __init__(self, bar: Progress | None, task, follow: str | None = None, total: int = 0, completed: int = 0):
        self.bar, self.task = bar, task
        self.follow, self.total, self.completed, self._written = follow, total, completed, 0.0
        self._write()

    def _write(self) -> None:
        if self.follow is None:
            return
        now = time.time()
        if now - self._written < 1.0 and self.completed < self.total:
            return  # at most once a second
        self._written = now
        tmp = f"{self.follow}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"step": self.completed, "total": self.total, "time": now}, fh)
        os.replace(tmp, self.follow)

    def update(self, advance: int, **info: float) -> None:
        self.completed += advance
        self._write()
        if self.bar is None:
            return
        text = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        self.bar.update(self.task, advance=advance, info=text)
