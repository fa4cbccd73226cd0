"""Entry-point glue: parse the dataclass arguments, run, turn ToolkitError into exit 2."""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch
from rich.console import Console

from .config import parse_args
from .errors import RunFailed, ToolkitError
from .run_log import plain


def run(main: Callable[[object], int], config_cls: type, description: str, argv: list[str] | None = None) -> int:
    try:
        return main(parse_args(config_cls, argv, description))  # parsing checks every option's range
    except (ToolkitError, RunFailed) as err:
        # Input errors are deterministic, and a RunFailed is agreed by all ranks first: print it once.
        if os.environ.get("RANK", "0") == "0":
            console = Console(stderr=True, highlight=False)
            # plain(): OS and library messages carry brackets ("[Errno 28]", "[enforce fail ...]") that rich would eat
            console.print(f"[bold red]error:[/bold red] {plain(err.problem)}", markup=True)
            if err.fix:
                console.print(f"[bold]fix:[/bold] {plain(err.fix)}")
        return err.exit_code if isinstance(err, RunFailed) else 2


def launch(main: Callable[[object], int], config_cls: type, description: str) -> None:
    code = run(main, config_cls, description)
    # Here, not in main(): a script may run several trainings in one process group (compare.py).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)
