"""Pick the mixed-precision mode ('no' | 'fp16' | 'bf16') from what the hardware can do.

The result is passed to `Accelerator(mixed_precision=...)`; with DeepSpeed it also
resolves the `"enabled": "auto"` entries of the bf16/fp16 sections in the JSON configs.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Mapping

import torch

from ..core.errors import ToolkitError

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


# ---------------------------------------------------------------- what the launcher asked for

def _launch_args(argv: list[str]) -> list[str] | None:
    """The arguments of an `accelerate launch` command line (after `launch`), or None if it is not one."""
    for i, token in enumerate(argv[:-1]):
        if token == "-m" and argv[i + 1] == "accelerate.commands.launch":
            return argv[i + 2:]
        launcher = Path(token).name in ("accelerate", "accelerate_cli.py")
        if launcher or (token == "-m" and argv[i + 1].startswith("accelerate.")):
            rest = argv[i + 1:] if token != "-m" else argv[i + 2:]
            return rest[1:] if rest and rest[0] == "launch" else None
    return None


def launcher_choice(argv: list[str], default_config_file: Path | None) -> tuple[str | None, str]:
    """What a user told `accelerate launch` about mixed precision: (mode, where), mode None for none.

    `accelerate launch` exports ACCELERATE_MIXED_PRECISION=no both when it was asked for "no"
    and when nothing was said (accelerate/commands/launch.py, _validate_launch_command), so the
    child reads its launcher's own command line: `--mixed_precision`, else the config file it
    loaded (--config_file, or the default one), through accelerate's own parser and loader.
    """
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    launch_args = _launch_args(argv)
    try:
        if launch_args is None:
            raise ValueError(argv)
        with contextlib.redirect_stderr(io.StringIO()):  # argparse prints its usage before raising
            args = launch_command_parser().parse_args(launch_args)
    except (SystemExit, Exception):  # not a launch command line we can read: nothing was chosen
        return None, "accelerate launch (command line not readable)"
    if args.mixed_precision:
        return args.mixed_precision, "accelerate launch --mixed_precision"
    config = args.config_file or (str(default_config_file) if default_config_file and default_config_file.is_file()
                                  and not args.cpu else None)
    if config:
        mode = load_config_from_file(config).mixed_precision  # None when the file has no mixed_precision
        if mode is not None:
            return str(mode), f"mixed_precision in {config}"
    return None, "accelerate launch's default"


def launcher_command_line(levels: int = 4) -> list[str] | None:
    """The command line of the nearest `accelerate launch` among this process's ancestors (Linux /proc)."""
    pid = os.getppid()
    for _ in range(levels):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            if _launch_args(argv) is not None:
                return argv
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        if pid <= 1:
            return None
    return None


def resolve_mixed_precision(flag: str | None, environ: Mapping[str, str], launcher_argv: list[str] | None,
                            capability: tuple[int, int] | None,
                            default_config_file: Path | None = None) -> tuple[str, str]:
    """(mode, why) from the script's --mixed-precision, the launcher's environment and command line, the device.

    Order: --mixed-precision of the script; a mode the user gave the launcher (its flag or config
    file); otherwise the device's choice (`auto`), also when the launcher only passed its default "no".
    A bare ACCELERATE_MIXED_PRECISION with no accelerate launcher above us was set by the user.
    """
    device = "CPU" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
    if flag is not None:
        requested, why = flag, "--mixed-precision"
    elif environ.get("ACCELERATE_MIXED_PRECISION") is None:
        requested, why = "auto", "nothing asked"
    elif launcher_argv is None:
        requested, why = environ["ACCELERATE_MIXED_PRECISION"], "ACCELERATE_MIXED_PRECISION"
    else:
        chosen, where = launcher_choice(launcher_argv, default_config_file)
        requested, why = (chosen, where) if chosen is not None else ("auto", f"{where} 'no' is not a choice")
    mode = choose_mixed_precision(requested, capability)
    if str(requested).strip().lower() == "auto":
        return mode, f"auto for {device} ({why})"
    return mode, f"{why} on {device}"


# ---------------------------------------------------------------- TF32 and the build's GPU kernels

def tf32_applies(enabled: bool, capability: tuple[int, int] | None) -> bool:
    """TF32 tensor cores for fp32 matmuls: Ampere (8.0) and newer, unless --no-tf32."""
    return enabled and capability is not None and tuple(capability) >= NATIVE_BF16_CAPABILITY


def enable_tf32() -> None:
    # The fp32 matmuls outside autocast (and all of them with --mixed-precision no) run on TF32
    # tensor cores: 10-bit mantissa products, fp32 accumulation; what HF Trainer's --tf32 does.
    # Not `matmul.fp32_precision = "tf32"`: after the new API, reading the legacy allow_tf32 (engine/flops.py,
    # accelerate/state.py) raises "mix of the legacy and new APIs"; this one keeps both readable.
    torch.set_float32_matmul_precision("high")


def has_kernels(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build with `arch_list` (torch.cuda.get_arch_list()) runs on a GPU of `capability`.

    A cubin sm_XY runs on devices X.Y and newer of the same major version; PTX compute_XY is
    compiled at load time for any device of X.Y or newer (the rule of torch.cuda._check_cubins).
    An empty list (a CPU build, or a build that does not say) is taken as yes.
    """
    if not arch_list:
        return True
    device = 10 * capability[0] + capability[1]
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        digits = "".join(ch for ch in number if ch.isdigit())
        if not digits:
            continue
        code = int(digits)
        if kind == "sm" and code // 10 == capability[0] and code <= device:
            return True
        if kind == "compute" and code <= device:
            return True
    return False
