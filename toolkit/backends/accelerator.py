"""The Accelerator and what each back-end needs from the run, in one place.

setup() builds the Accelerator for the world the launcher (or SLURM, or nothing) started: the
torch distributed environment, the GPU kernels of this torch build, the mixed-precision choice,
TF32 and the process-group timeout. Before the wrap, prepare_backend() gives each distributed
type what it needs: DDP find_unused_parameters when some trainable parameter gets no gradient
(gradual unfreezing, or found by a probe), DeepSpeed the micro batch and clipping its JSON leaves
"auto", FSDP one unit per encoder block. clip_parameters() says what to clip under each; the
policies a back-end refuses are refused by Policy.check_backend (called from setup's caller).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.commands.config.config_args import default_config_file as accelerate_default_config_file
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType
from torch import nn

from ..core.config import DEFAULT_DIST_TIMEOUT_S
from ..core.errors import ToolkitError
from ..policy.blocks import find_blocks
from .cluster import detect, export_torch_distributed_env
from .distributed import process_group_kwargs
from .precision import (
    device_capability,
    enable_tf32,
    has_kernels,
    launcher_command_line,
    resolve_mixed_precision,
    tf32_applies,
)


def setup(cpu: bool, mixed_precision: str | None, grad_accum: int = 1, dist_timeout_s: float = DEFAULT_DIST_TIMEOUT_S,
          tf32: bool = True) -> Accelerator:
    """The Accelerator for this process; the launcher (or SLURM, or nothing) decides the world."""
    export_torch_distributed_env(detect())
    cpu = cpu or not torch.cuda.is_available()
    # Accelerate builds a DeepSpeed engine only with cpu=False (accelerate/state.py: `USE_DEEPSPEED ... and not
    # cpu`); with cpu=True a DeepSpeed config silently becomes plain DDP. Without a GPU DeepSpeed runs on its
    # CPU accelerator by itself, over the gloo group below.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    capability = None if cpu else device_capability()
    if capability is not None and not has_kernels(capability, torch.cuda.get_arch_list()):
        raise ToolkitError(
            f"this torch build (CUDA {torch.version.cuda}) has no kernels for {torch.cuda.get_device_name()} "
            f"(sm_{capability[0]}{capability[1]}); it has {' '.join(torch.cuda.get_arch_list())}",
            "install a torch build that lists this GPU's architecture in torch.cuda.get_arch_list() "
            "(V100, sm_70: the CUDA 12.6 wheels; see docs/backends.md)")
    # `accelerate launch` exports ACCELERATE_MIXED_PRECISION=no also when nobody asked for it: its own
    # command line says whether "no" was a choice (resolve_mixed_precision).
    launcher = launcher_command_line() if "ACCELERATE_MIXED_PRECISION" in os.environ else None
    mixed_precision, why = resolve_mixed_precision(mixed_precision, os.environ, launcher, capability,
                                                   Path(accelerate_default_config_file))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        cpu=cpu and not deepspeed,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        # The loop steps the scheduler once per optimizer step, so its length is simply the
        # number of optimizer steps (Accelerate's default would step it once per process).
        step_scheduler_with_optimizer=False,
        # Host-to-device copies of batches from pinned memory without blocking the host (Accelerate's
        # default is a blocking copy, which makes the loaders' pin_memory buy nothing). No-op on CPU.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        kwargs_handlers=process_group_kwargs(cpu, launched, dist_timeout_s),
    )
    if launched != accelerator.num_processes:
        raise ToolkitError(
            f"the launcher started {launched} processes but they formed a group of {accelerator.num_processes}",
            "on CPU-only machines pass --cpu (or set ACCELERATE_USE_CPU=true) so the processes join one gloo group",
        )
    tf32 = tf32_applies(tf32, capability)
    if tf32:
        enable_tf32()
    accelerator.print(f"mixed precision {mixed_precision} ({why}); TF32 matmuls {'on' if tf32 else 'off'}"
                      + (f"; process-group timeout {dist_timeout_s:g} s" if launched > 1 else ""))
    return accelerator


def unused_trainable_parameters(model, example: dict) -> list[str]:
    """Trainable parameters that get no gradient from one real forward/backward.

    DDP must be told `find_unused_parameters=True` when some trainable parameter takes no
    part in the forward (it would otherwise wait forever for that gradient), and that
    search costs an extra graph traversal on every step. Frozen parameters never count:
    DDP only tracks parameters with requires_grad. The policies here train a suffix of the
    network (last blocks, pooler, head), which normally all run; this probe checks instead
    of assuming, e.g. for a model whose pooler exists but is unused.
    """
    model.zero_grad(set_to_none=True)
    model(**example).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return unused


def prepare_backend(accelerator: Accelerator, model, policy, batch_size: int, max_grad_norm: float,
                    example: Callable[[], dict] | None, log: Callable[[str], None]) -> None:
    """What DDP, DeepSpeed and FSDP need set before accelerator.prepare wraps `model`.

    `example()` gives one collated training batch for DDP's unused-parameter probe (None: no probe,
    e.g. when --cache-frozen feeds the model cached features instead of token ids).
    """
    ddp = accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    if ddp and policy.gradual:
        # Not-yet-thawed parameters are in the wrap but get no gradient until their thaw (Policy.set_stage).
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    elif ddp and example is not None:
        unused = unused_trainable_parameters(model, example())
        if unused:
            log(f"[yellow]DDP: {len(unused)} trainable parameters are unused in the forward "
                f"({unused[:3]}...): find_unused_parameters=True[/yellow]")
            accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # The DeepSpeed JSONs leave these "auto". Our loaders use a batch_sampler (DataLoader.batch_size is
        # None, so Accelerate cannot infer the micro batch), and DeepSpeed clips inside its engine
        # (accelerator.clip_grad_norm_ only reports the norm there): both come from our own arguments.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        for key, value in (("train_micro_batch_size_per_gpu", batch_size), ("gradient_clipping", max_grad_norm)):
            if ds_config.get(key, "auto") == "auto":
                ds_config[key] = value
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap is None:
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = fsdp_wrap_classes(model)  # one unit per block


def fsdp_wrap_classes(model: nn.Module) -> list[str]:
    """The classes FSDP makes one unit each: the model's _no_split_modules, else the class of its blocks.

    Accelerate falls back to _no_split_modules when the config names no class, but DistilBERT and
    DeBERTa-v2 list none (transformers 5): the whole model would be a single unit, gathered at once.
    """
    listed = sorted(getattr(model, "_no_split_modules", None) or [])
    return listed or sorted({type(block).__name__ for block in find_blocks(model)[1]})


def clip_parameters(accelerator: Accelerator, model, optimizer=None) -> list:
    """What to hand accelerator.clip_grad_norm_: what the optimizer holds, or under FSDP all parameters.

    Accelerate uses FSDP's own clip (norm over all shards, one unscale) only when given exactly
    model.parameters(); any other list falls through to a per-shard clip after a second unscale
    (accelerate/accelerator.py, clip_grad_norm_). Frozen parameters have no grad, so they add nothing.
    Elsewhere the optimizer's parameters, not today's requires_grad set: gradual unfreezing turns
    requires_grad on for some of them later (it is refused under FSDP).
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        return list(model.parameters())
    if optimizer is not None:
        return [p for group in optimizer.param_groups for p in group["params"]]
    return [p for p in model.parameters() if p.requires_grad]
