"""Entry-point glue: parse the dataclass arguments, run, turn ToolkitError into exit 2 (core/exit_codes.py)."""

from __future__ import annotations

import faulthandler
import importlib
import logging
import os
import sys
from typing import Callable, NoReturn

from rich.console import Console

from .core import exit_codes
from .core.config import parse_args
from .core.errors import RunFailed, ToolkitError
from .output.console import plain


def run(main: Callable[[object], int], config_cls: type, description: str, argv: list[str] | None = None) -> int:
    try:
        return main(parse_args(config_cls, argv, description))  # parsing checks every option's range
    except (ToolkitError, RunFailed) as err:
        # Input errors are deterministic, and a RunFailed is agreed by all ranks first: print it once.
        report_error(err.problem, err.fix)
        return err.exit_code if isinstance(err, RunFailed) else exit_codes.BAD_INPUT
    except KeyboardInterrupt:
        # Ctrl-C before training (while loading) or a second one during it: the first one in training is a
        # stop request (preemption.StopRequest) and never gets here. A start's folder is already removed.
        report_error("interrupted (Ctrl-C): stopped at once, nothing saved since the last checkpoint",
                "--resume-from auto (with the same --output-dir) continues from the last checkpoint, if there is one")
        return exit_codes.INTERRUPTED


def report_error(problem: str, fix: str | None) -> None:
    """The one error: / fix: pair a command prints for a ToolkitError (rank 0 only)."""
    if os.environ.get("RANK", "0") == "0":
        console = Console(stderr=True, highlight=False)
        # plain(): OS and library messages carry brackets ("[Errno 28]", "[enforce fail ...]") that rich would eat
        console.print(f"[bold red]error:[/bold red] {plain(problem)}", markup=True)
        if fix:
            console.print(f"[bold]fix:[/bold] {plain(fix)}")


def launch(command: str, config_cls: type, description: str) -> None:
    """Run `main(cfg)` of the module `command` (e.g. "toolkit.train") as a program.

    The module is imported only once the arguments parse: --help and a bad option answer in about a second,
    not after torch and transformers have loaded (10-20 s on a small CPU).
    """
    show_native_crashes()
    finish(run(lambda cfg: importlib.import_module(command).main(cfg), config_cls, description))


def show_native_crashes() -> None:
    """A native crash (a library's abort, a segfault) then prints every thread's Python stack, not only a signal."""
    if not faulthandler.is_enabled():
        faulthandler.enable()


def finish(code: int) -> NoReturn:
    """Exit a command's process, ending its process group if it has one.

    Here, not in main(): a script may run several trainings in one process group (compare.py).
    """
    torch = sys.modules.get("torch")  # not imported: no process group either
    if torch is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        sys.exit(code)
    torch.distributed.destroy_process_group()
    # Every output is written and closed by now. The interpreter's teardown of what DeepSpeed ZeRO-3 keeps
    # of its gloo groups can still abort on CPU ("terminate called without an active exception", SIGABRT;
    # about one CI suite in twenty), which would turn a finished run into a failed one: skip that teardown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
