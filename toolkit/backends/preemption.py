"""Stop requests: SLURM's warning signal, SIGTERM, or a stop file.

The handler only sets a flag; the training loop checks it at step boundaries, all
ranks agree (any rank asking is enough), a checkpoint is saved, and the process exits
with exit_codes.PREEMPTED (75) so the batch script knows to requeue rather than give up.
The stop file exists because `sbatch --signal=B:USR1` reaches only the batch shell;
touching a file on the shared filesystem reaches every rank on every node.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


class StopRequest:
    def __init__(self, stop_file: str | None = None):
        self.stop_file = Path(stop_file) if stop_file else (
            Path(os.environ["TOOLKIT_STOP_FILE"]) if os.environ.get("TOOLKIT_STOP_FILE") else None)
        self.signalled: str | None = None

    def install(self) -> "StopRequest":
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signalled = signal.Signals(signum).name

    def requested(self) -> bool:
        return self.signalled is not None or (self.stop_file is not None and self.stop_file.exists())

    def reason(self) -> str:
        return self.signalled or f"stop file {self.stop_file}"
