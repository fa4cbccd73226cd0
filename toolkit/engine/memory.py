"""Peak memory of a run and the bytes its optimizer state holds, for the comparison report."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def reset_peak(device: torch.device) -> None:
    """Start counting the peak at this run, not at the process: compare trains several runs in one process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak RSS (VmHWM, which ru_maxrss reads); proc(5), clear_refs
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then counts from the start of the process, which peak_kind() says


def peak_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "GPU max allocated (torch.cuda.max_memory_allocated)"
    return "CPU peak RSS of the process (getrusage ru_maxrss)"


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the tensors in optimizer.state on this process (AdamW: two moments per trained parameter;
    under ZeRO only this rank's partition)."""
    return sum(v.numel() * v.element_size() for state in getattr(optimizer, "state", {}).values()
               for v in state.values() if torch.is_tensor(v))


def run_memory(accelerator, optimizer) -> dict:
    """The largest figures over all ranks (collective: every rank must call it)."""
    mine = torch.tensor([[peak_bytes(accelerator.device), optimizer_state_bytes(optimizer)]], dtype=torch.int64,
                        device=accelerator.device)
    peak, opt = accelerator.gather(mine).max(dim=0).values.tolist()
    return {"peak_memory_bytes": int(peak), "peak_memory_kind": peak_kind(accelerator.device),
            "optimizer_state_bytes": int(opt)}
