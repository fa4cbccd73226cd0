"""Process-group timeouts, and the data phase's wait on a CPU-side group of its own.

Every multi-process run gets an explicit timeout for its main group (`--dist-timeout`):
without one, NCCL and DeepSpeed each default to 10 minutes (torch's default_pg_nccl_timeout,
deepspeed/constants.py default_pg_timeout), gloo to 30.

The data phase is the one place where ranks wait for a long, uneven piece of work: rank 0
loads and tokenizes (the full Amazon preset took 13.5 minutes on 2 cores) while the others
wait, then they read its cache. That wait runs on a separate gloo group with its own generous
timeout (`--data-timeout`), so the main group keeps a timeout that catches a hung collective
in minutes. The gloo group also carries `gather_object` for the frozen-feature cache: over
NCCL, all_gather_object pickles every rank's share into GPU memory (about world x share).
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

import torch.distributed as dist
from accelerate.utils import InitProcessGroupKwargs

from ..core.config import DEFAULT_DATA_TIMEOUT_S
from ..core.test_delays import DATA_PHASE_DELAY_ENV, hold

_cpu_group: list[Any] = []  # created once per process, on first use


def process_group_kwargs(cpu: bool, world_size: int, timeout_s: float) -> list[InitProcessGroupKwargs]:
    """The Accelerator's kwargs_handlers for the main process group (none for a single process)."""
    if world_size <= 1:
        return []  # no group; and a backend given to a single process makes Accelerate expect one
    # gloo: the only backend torch.distributed has on CPU, where DeepSpeed would otherwise ask for NCCL.
    # On a GPU the backend stays Accelerate's choice (nccl, or cuda:nccl,cpu:gloo under FSDP).
    handler = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s), **({"backend": "gloo"} if cpu else {}))
    if "timeout" not in handler.to_kwargs():
        # to_kwargs() drops values equal to the class defaults (600 s): the backend's own default would apply
        # instead (gloo: 30 min, DeepSpeed: DEEPSPEED_TIMEOUT), so keep it distinct by a microsecond.
        handler.timeout += timedelta(microseconds=1)
    return [handler]


def cpu_group(timeout_s: float = DEFAULT_DATA_TIMEOUT_S):
    """A gloo group of all ranks with its own timeout (the first call's); every rank must make the first call."""
    if not _cpu_group:
        _cpu_group.append(dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)))
    return _cpu_group[0]


@contextmanager
def main_process_first(accelerator, timeout_s: float = DEFAULT_DATA_TIMEOUT_S) -> Iterator[None]:
    """Rank 0 runs the block first (filling the datasets cache), then the others; all leave it together.

    Like `accelerator.main_process_first()`, but the waits run on a gloo group with `timeout_s`
    instead of the main group's timeout; the last barrier keeps the others' cache reads off the
    main group's clock too (rank 0 would otherwise wait for them in its next collective).
    """
    if accelerator.num_processes <= 1 or not dist.is_initialized():
        yield
        return
    group = cpu_group(timeout_s)
    if not accelerator.is_main_process:
        dist.barrier(group=group)
    yield
    if accelerator.is_main_process:
        hold(DATA_PHASE_DELAY_ENV, "rank 0's data phase")
        dist.barrier(group=group)
    dist.barrier(group=group)


def gather_objects(accelerator, items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank; sent through host memory (gloo)."""
    if accelerator.num_processes <= 1:
        return list(items)
    gathered: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(gathered, items, group=cpu_group())
    return [x for part in gathered for x in part]

