"""Pick the mixed-precision mode ('no' | 'fp16' | 'bf16') from what the hardware can do.

The result is passed to `Accelerator(mixed_precision=...)`; with DeepSpeed it also
resolves the `"enabled": "auto"` entries of the bf16/fp16 sections in the JSON configs.
"""

from __future__ import annotations

import torch

from toolkit.errors import ToolkitError

MODES = ("no", "fp16", "bf16")

# Ampere (8.0) is the first generation with bf16 tensor cores. Deliberately not
# torch.cuda.is_bf16_supported(): it also returns True on a T4 (7.5) / V100 (7.0),
# where bf16 is emulated and runs far slower than fp16.
NATIVE_BF16_CAPABILITY = (8, 0)


def device_capability() -> tuple[int, int] | None:
    """CUDA compute capability of the current GPU, or None when there is no GPU."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return (major, minor)


def choose_mixed_precision(requested: str | None, capability: tuple[int, int] | None) -> str:
    """Resolve a user request (None/'auto'/'no'/'fp16'/'bf16') for a device (`capability`, None = CPU)."""
    mode = "auto" if requested is None else str(requested).strip().lower()
    on_cpu = capability is None
    native_bf16 = not on_cpu and tuple(capability) >= NATIVE_BF16_CAPABILITY

    if mode == "auto":
        if on_cpu:
            # Explicit opt-in only: bf16 speeds up CPUs with AMX/AVX512-BF16 but
            # slows down the rest, and fp32 is the safe default for laptops and CI.
            return "no"
        # fp16 on T4/V100 relies on dynamic loss scaling (Accelerate's GradScaler,
        # or the fp16 section of the DeepSpeed JSON) to avoid underflowing gradients.
        return "bf16" if native_bf16 else "fp16"

    if mode not in MODES:
        raise ToolkitError(
            f"unknown mixed precision {requested!r}",
            "use one of: auto, no, fp16, bf16",
        )
    if mode == "bf16" and not on_cpu and not native_bf16:
        raise ToolkitError(
            f"bf16 needs a GPU with compute capability >= 8.0 (A100, L4, H100, RTX 30xx+); "
            f"this GPU has {capability[0]}.{capability[1]} and would only emulate it, very slowly",
            "use --mixed-precision fp16 (or auto) on this GPU",
        )
    if mode == "fp16" and on_cpu:
        # CPUs have no fast fp16 arithmetic, and fp16 needs loss scaling that skips
        # steps (DeepSpeed's fp16 engine, Accelerate's GradScaler); bf16 is the CPU
        # half-precision type, with fp32's exponent range and no scaling.
        raise ToolkitError(
            "fp16 mixed precision is not supported on CPU",
            "use --mixed-precision bf16 or --mixed-precision no on CPU",
        )
    return mode
