"""Stop requests: SLURM's warning signal, SIGTERM, a stop file, or Ctrl-C (SIGINT).

The handler only sets a flag; the training loop checks it at step boundaries, all
ranks agree (any rank asking is enough), a checkpoint is saved, and the process exits
with exit_codes.PREEMPTED (75) so the batch script knows to requeue rather than give up, or
with exit_codes.INTERRUPTED (130) after a Ctrl-C, as a shell reports one.
The stop file exists because `sbatch --signal=B:USR1` reaches only the batch shell;
touching a file on the shared filesystem reaches every rank on every node.

A second Ctrl-C raises KeyboardInterrupt at once (no checkpoint). "Second" means a SIGINT more than
SAME_CTRL_C_S after the first: one keypress can reach a process twice within milliseconds, from the
terminal (to the whole foreground process group) and again from a launcher in that group that passes
it on to its workers. Under `accelerate launch` with several processes the terminal's Ctrl-C reaches
only torchrun's agent (each worker runs in a session of its own); the agent passes SIGINT on once to
every worker, which is this stop request, and waits for them to exit (it exits 130 too).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from ..core import exit_codes
from ..output.console import RunLog, plain

SAME_CTRL_C_S = 1.0  # SIGINTs closer than this are one keypress


class StopRequest:
    def __init__(self, stop_file: str | None = None):
        self.stop_file = Path(stop_file) if stop_file else (
            Path(os.environ["TOOLKIT_STOP_FILE"]) if os.environ.get("TOOLKIT_STOP_FILE") else None)
        self.signalled: str | None = None
        self.interrupted_at: float | None = None  # monotonic time of the first Ctrl-C
        self._previous: dict = {}

    def install(self) -> "StopRequest":
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Back to the handlers from before install(): outside training, Ctrl-C interrupts at once again."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self.interrupted_at is None:
                self.interrupted_at = now
            elif now - self.interrupted_at > SAME_CTRL_C_S:
                raise KeyboardInterrupt
            self.signalled = "SIGINT"
        elif self.signalled != "SIGINT":  # a launcher's SIGTERM after a Ctrl-C: still an interrupt (exit 130)
            self.signalled = signal.Signals(signum).name

    def requested(self) -> bool:
        return self.signalled is not None or (self.stop_file is not None and self.stop_file.exists())

    def interrupted(self) -> bool:
        return self.interrupted_at is not None

    def reason(self) -> str:
        if self.signalled == "SIGINT":
            return "Ctrl-C"
        if self.signalled:
            return self.signalled
        if self.stop_file is not None and self.stop_file.exists():
            return f"stop file {self.stop_file}"
        return "by another process"


def stopped(status: str, step: int, out: Path, run_log: RunLog) -> int:
    """The last line and exit status of a run that fit() stopped on request, after its checkpoint."""
    if status == "preempted":
        run_log.print(f"[yellow]checkpoint saved; exiting with {exit_codes.PREEMPTED} so the job can be "
                      "requeued[/yellow]")
        return exit_codes.PREEMPTED
    run_log.notice(f"[yellow]interrupted: checkpoint saved at step {step}; to continue, run the same command with "
                   f"--output-dir {plain(out)} --resume-from auto[/yellow]")
    return exit_codes.INTERRUPTED
