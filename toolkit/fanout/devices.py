"""How one machine's devices are shared out among its workers.

On GPUs each worker owns its own devices (CUDA_VISIBLE_DEVICES), processes_per_run of them, and runs each of
its runs with one process per device. On CPU each worker's runs get cores / (workers x processes) threads, so
that N workers never ask for more cores than the machine has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..core.errors import ToolkitError


@dataclass(frozen=True)
class Slot:
    """What one worker owns: its GPUs (CUDA ids as the launcher sees them; none on CPU) and its threads per
    process."""

    index: int
    gpus: tuple[str, ...]
    threads: int

    def env(self) -> dict[str, str]:
        threads = str(self.threads)
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return env


def visible_gpus(count: int) -> list[str]:
    """The ids to put in CUDA_VISIBLE_DEVICES for the `count` GPUs torch sees (the launcher's own list when it
    has one: a SLURM job's GPUs are not 0..n-1 on the node)."""
    given = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return given[:count] if len(given) >= count else [str(i) for i in range(count)]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def share(workers: int | None, processes_per_run: int, threads_per_run: int | None, gpus: list[str],
          cpu_cores: int) -> list[Slot]:
    """One Slot per worker. Default: one worker per processes_per_run GPUs, one worker on CPU."""
    if gpus:
        fit = len(gpus) // processes_per_run
        if fit == 0:
            raise ToolkitError(f"--processes-per-run {processes_per_run} needs {processes_per_run} GPUs, "
                               f"{len(gpus)} visible", f"pass --processes-per-run {len(gpus)} or fewer")
        workers = workers or fit
        if workers * processes_per_run > len(gpus):
            raise ToolkitError(f"--workers {workers} x --processes-per-run {processes_per_run} needs "
                               f"{workers * processes_per_run} GPUs, {len(gpus)} visible",
                               f"pass --workers {fit} or fewer (each worker owns its GPUs)")
        threads = threads_per_run or max(1, cpu_cores // (workers * processes_per_run))
        return [Slot(i, tuple(gpus[i * processes_per_run:(i + 1) * processes_per_run]), threads)
                for i in range(workers)]
    workers = workers or 1
    threads = threads_per_run or max(1, cpu_cores // (workers * processes_per_run))
    return [Slot(i, (), threads) for i in range(workers)]
