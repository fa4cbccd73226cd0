"""Fine-tune a sequence classifier: setup() -> main() -> fit()/validate() -> outputs.

Order matters and is visible here: data and model are validated and the freeze
policy applied *before* `accelerator.prepare` wraps the model (DDP / DeepSpeed / FSDP
read `requires_grad` at wrap time), and nothing is written until all inputs are known
to be good.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.commands.config.config_args import default_config_file as accelerate_default_config_file
from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, broadcast_object_list,
                               set_seed)
from transformers import get_linear_schedule_with_warmup

from . import checkpoint as ckpt
from . import curves, library_metrics, logs, lora, tracking
from .cluster import detect, export_torch_distributed_env
from .config import TrainConfig, save_json
from .distributed import DEFAULT_DIST_TIMEOUT_S, main_process_first, process_group_kwargs
from .data import Collator, build_splits, make_loader, resolve_max_length, tokenize
from .errors import ToolkitError
from .freeze import summarize
from .frozen_cache import FrozenCache
from .loop import EvalResult, TrainState, fit, validate
from .memory import reset_peak, run_memory
from .metrics import f1_average
from .model import build_optimizer, fsdp_wrap_classes, load_model, load_tokenizer, max_positions
from .policy import Policy
from .precision import (device_capability, enable_tf32, has_kernels, launcher_command_line, resolve_mixed_precision,
                        tf32_applies)
from .preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, StopRequest
from .run_log import RunLog, plain
from .throughput import CurrentFlops, FlopModel, device_peak_flops, disable_frozen_dropout


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
            "(V100, sm_70: the CUDA 12.6 wheels; see README, Back-ends)")
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


def shared_output_dir(accelerator: Accelerator, cfg) -> Path:
    # The default name has a timestamp: take rank 0's so every rank writes to one folder.
    names = [str(cfg.resolve_output_dir())]
    broadcast_object_list(names, from_process=0)
    cfg.output_dir = names[0]
    return Path(names[0])


def prepare_data(accelerator, cfg_data, tokenizer, model_max_positions, run_log, need_train=True):
    """Splits, validated and tokenized; rank 0 first so the others read its cache."""
    # on a gloo group of its own, with a timeout for the data phase (--data-timeout), not the main group's
    with main_process_first(accelerator, cfg_data.data_timeout):
        train_ds, eval_ds = build_splits(cfg_data, log=run_log.print)
        max_length = resolve_max_length(cfg_data.max_length, tokenizer, model_max_positions)
        train_tok = tokenize(train_ds, tokenizer, max_length, cfg_data.num_proc) if need_train else None
        eval_tok = tokenize(eval_ds, tokenizer, max_length, cfg_data.num_proc)
    return train_tok, eval_tok, max_length


def default_num_workers(device_type: str, local_processes: int, cpus: int | None = None) -> int:
    """DataLoader workers when --num-workers is not given: 0 on CPU, where the cores train; on a GPU,
    up to 4 per process from this node's cores, so collation overlaps the device's work."""
    if device_type != "cuda":
        return 0
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    return max(0, min(4, cpus // max(1, local_processes) - 1))


def open_output_dir(accelerator: Accelerator, out: Path, resume_from: str | None, log) -> Path | None:
    """Rank 0 makes sure the run folder can be written and picks (and verifies) the checkpoint to resume
    from; every rank gets its answer, so a problem stops all of them before training, with exit 2."""
    answer: list = [None, None]  # checkpoint to resume from, (problem, fix)
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("")
            probe.unlink()
            answer[0] = ckpt.resolve_resume(resume_from, out, log)
        except OSError as err:
            answer[1] = (f"cannot write to the output folder {out}: {err}",
                         "pass an --output-dir that can be created and written (check the path, permissions and free space)")
        except ToolkitError as err:
            answer[1] = (err.problem, err.fix)
    broadcast_object_list(answer, from_process=0)
    if answer[1] is not None:
        raise ToolkitError(*answer[1])
    return answer[0]


class StartGuard:
    """Undoes a failed start. Armed from the moment a run opens its output folder (watch) until its first
    optimizer step (disarm): any error, or a Ctrl-C, in between leaves the disk as it was. A folder this run
    created goes, with every parent folder it created; a folder that was there before (a resume, a reused
    --output-dir) loses what is new at its top level and gets back the files the start rewrote."""

    REWRITTEN = ("config.json", "metrics.json")  # a start writes the one and removes the other

    def __init__(self) -> None:
        self.out: Path | None = None
        self.created: Path | None = None
        self.before: set[str] | None = None
        self.saved: dict[str, bytes] = {}

    def watch(self, out: Path, is_main: bool) -> None:
        if not is_main:  # rank 0 alone writes the folder
            return
        self.out = out
        missing = [p for p in (out, *out.parents) if not p.exists()]
        self.created = missing[-1] if missing else None
        if self.created is None and out.is_dir():
            self.before = {p.name for p in out.iterdir()}
            self.saved = {n: (out / n).read_bytes() for n in self.REWRITTEN if (out / n).is_file()}

    def disarm(self) -> None:
        self.out = None

    def __enter__(self) -> "StartGuard":
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is not None and self.out is not None:
            self.undo()

    def undo(self) -> None:
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
        elif self.before is not None:
            for path in self.out.iterdir():
                if path.name in self.before:
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            for name, data in self.saved.items():
                (self.out / name).write_bytes(data)
        self.out = None


def write_predictions(path: Path, result: EvalResult) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "label", "prediction"])
        writer.writerows(zip(result.index.tolist(), result.labels.tolist(), result.preds.tolist()))


def main(cfg: TrainConfig) -> int:
    with StartGuard() as guard:
        return train(cfg, guard)


def train(cfg: TrainConfig, guard: StartGuard) -> int:
    policy = Policy.from_config(cfg)  # the one parse of --freeze & co; a typo fails before anything loads
    if cfg.cache_frozen and cfg.frozen_dropout:
        raise ToolkitError("--cache-frozen computes the frozen part once, without dropout, so --frozen-dropout cannot apply",
                           "drop one of the two flags")
    trackers = tracking.check(cfg.report_to)
    extra_metrics = library_metrics.load(cfg.metrics)  # loaded now: a bad name must fail before any output
    accelerator = setup(cfg.cpu, cfg.mixed_precision, cfg.grad_accum, cfg.dist_timeout, cfg.tf32)
    policy.check_backend(accelerator.distributed_type)
    verbosity = 0 if cfg.quiet else 2 if cfg.verbose else 1
    logs.configure(verbosity, accelerator.is_main_process, accelerator.distributed_type == DistributedType.DEEPSPEED)
    run_log = RunLog(accelerator.is_main_process, verbosity=verbosity)
    env = detect()
    run_log.print(f"[bold]world[/bold] {accelerator.num_processes} process(es) on {accelerator.device}, "
                   f"{accelerator.distributed_type}, mixed precision {accelerator.mixed_precision}; {env.describe()}")
    set_seed(cfg.seed)
    reset_peak(accelerator.device)  # metrics.json reports this run's peak memory

    # ---- inputs: everything that can be wrong is checked here, before any output
    tokenizer = load_tokenizer(cfg.model)
    requested = cfg.to_dict()  # config.json keeps the options as given (compare.py matches runs on them)
    # The data decide the classes (num_labels, label names), so the model is built after them.
    train_ds, eval_ds, max_length = prepare_data(accelerator, cfg.data, tokenizer, max_positions(cfg.model), run_log)
    model = load_model(cfg.model, cfg.data.num_labels, cfg.data.label_names, log=run_log.print)
    # Everything the run will ever train requires grad from here to the wrap (gradual runs mask it right after).
    model = policy.apply(model)
    summary = summarize(model, policy.spec)
    schedule = policy.schedule(model)  # also checks a gradual target against the model's depth
    run_log.print(f"data: {len(train_ds)} train / {len(eval_ds)} eval examples, max length {max_length}")
    run_log.freeze_table(summary)
    if policy.gradual:
        run_log.print("gradual unfreezing: " + plain(", ".join(f"{stage.spec} from step {step}" for step, stage in schedule)))
    if cfg.cache_frozen:
        FrozenCache.preflight(accelerator, model, policy, train_ds, eval_ds)
    # A frozen feature extractor runs as at inference (Keras' transfer-learning convention): its dropout
    # only adds noise below the trained layers, and on CPU it keeps attention off the fused kernel.
    if not cfg.frozen_dropout and (changed := disable_frozen_dropout(model, policy)):
        run_log.detail(f"frozen part without dropout ({changed} dropout modules; --frozen-dropout keeps it)")

    out = shared_output_dir(accelerator, cfg)
    guard.watch(out, accelerator.is_main_process)
    resume = open_output_dir(accelerator, out, cfg.resume_from, run_log.print)
    recorded = ckpt.read_progress(resume).get("policy") if resume is not None else None
    wanted = policy.record()
    # a checkpoint from before the LoRA settings were recorded is checked on its spelling alone
    if recorded is not None and (recorded["spec"], recorded.get("lora", wanted["lora"])) != (wanted["spec"], wanted["lora"]):
        raise ToolkitError(f"checkpoint {resume} was trained with policy {Policy.describe_record(recorded)}, this run "
                           f"asks for {Policy.describe_record(wanted)}",
                           "resume with the same --freeze / --layer-lr-decay / --unfreeze-* / --lora-* options")
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, policy)
    param_groups = [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                     "params": sum(p.numel() for p in g["params"])} for g in optimizer.param_groups]
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").unlink(missing_ok=True)  # only a finished run has one
        save_json(out / "config.json", {**requested, "output_dir": cfg.output_dir, "resolved": {
            "num_labels": cfg.data.num_labels, "label_names": cfg.data.label_names,
            "max_length": max_length, "world_size": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision, "train_examples": len(train_ds),
            "eval_examples": len(eval_ds), "distributed_type": str(accelerator.distributed_type),
            "policy": policy.spec, "param_groups": param_groups,
            "unfreeze_schedule": [[step, stage.spec] for step, stage in schedule] if policy.gradual else None,
            **({"lora_targets": lora.adapted_modules(model)} if policy.kind == "lora" else {})}})
    run_log.log_path = out / "metrics.jsonl"

    # ---- model, optimizer, data, schedule, all wrapped by Accelerate
    pad_to = 8 if accelerator.device.type == "cuda" else None  # tensor cores like multiples of 8
    collator = Collator(tokenizer, pad_to)
    eval_batch_size = cfg.eval_batch_size or 2 * cfg.batch_size
    workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(
        accelerator.device.type, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    cache = None
    if cfg.cache_frozen:  # the frozen part runs once here; the loaders then carry its outputs
        cache = FrozenCache.build(accelerator, model, policy, train_ds, eval_ds, collator, eval_batch_size, run_log.print)
        train_loader = cache.loader("train", cfg.batch_size, cfg.seed, cfg.group_by_length, workers)
        eval_loader = cache.loader("eval", eval_batch_size, cfg.seed, num_workers=workers)
    else:
        train_loader = make_loader(train_ds, collator, cfg.batch_size, cfg.seed, train=True, num_workers=workers,
                                   group_by_length=cfg.group_by_length)
        eval_loader = make_loader(eval_ds, collator, eval_batch_size, cfg.seed, train=False, num_workers=workers)
    flop_model = CurrentFlops(FlopModel.from_model(model, policy.stage(model, 0), cached_prefix=cache is not None))
    peak_flops = device_peak_flops(accelerator.device, accelerator.mixed_precision)
    sampler = train_loader.batch_sampler
    per_rank_batches = math.ceil(len(train_loader) / accelerator.num_processes)
    total_steps = math.ceil(per_rank_batches / cfg.grad_accum) * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    # Counted in optimizer steps: we step the scheduler once per optimizer step ourselves.
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    ddp = accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    if ddp and policy.gradual:
        # Not-yet-thawed parameters are in the wrap but get no gradient until their thaw (Policy.set_stage).
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    elif ddp and cache is None:
        example = collator([{k: train_ds[0][k] for k in train_ds.column_names}])
        example.pop("idx")
        unused = unused_trainable_parameters(model, example)
        if unused:
            run_log.print(f"[yellow]DDP: {len(unused)} trainable parameters are unused in the forward "
                           f"({unused[:3]}...): find_unused_parameters=True[/yellow]")
            accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # The DeepSpeed JSONs leave these "auto". Our loaders use a batch_sampler (DataLoader.batch_size is
        # None, so Accelerate cannot infer the micro batch), and DeepSpeed clips inside its engine
        # (accelerator.clip_grad_norm_ only reports the norm there): both come from our own arguments.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        for key, value in (("train_micro_batch_size_per_gpu", cfg.batch_size), ("gradient_clipping", cfg.max_grad_norm)):
            if ds_config.get(key, "auto") == "auto":
                ds_config[key] = value
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap is None:
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = fsdp_wrap_classes(model)  # one unit per block
    if cfg.compile:  # after the probe above, which runs on the host: compiling there would compile for the CPU first
        model.compile(dynamic=True)  # in place: parameter names, checkpoints and saving are unchanged
    raw_model = model
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)

    state = TrainState(world_size=accelerator.num_processes)
    if resume is not None:
        progress = ckpt.read_progress(resume)
        if progress["state"]["world_size"] != accelerator.num_processes:
            raise ToolkitError(f"checkpoint {resume} was written by {progress['state']['world_size']} processes, "
                               f"this run has {accelerator.num_processes}", "resume with the same number of processes")
        accelerator.load_state(str(resume))
        state = TrainState(**progress["state"])
        run_log.print(f"[green]resumed from {plain(resume)}: epoch {state.epoch}, step {state.global_step}, "
                       f"{state.batches_done} batches into the epoch[/green]")
    if policy.gradual:
        policy.set_stage(raw_model, state.global_step)  # where the schedule stands (also after a resume)
        flop_model.model = FlopModel.from_model(raw_model, policy.stage(raw_model, state.global_step))

    def after_step(steps_done: int) -> None:  # after every optimizer step, before the next forward
        guard.disarm()  # training has begun: from here a failure keeps the folder (and its checkpoints)
        stage = policy.set_stage(raw_model, steps_done) if policy.gradual else None
        if stage is not None:  # the next step trains the new stage
            flop_model.model = FlopModel.from_model(raw_model, stage)
            run_log.print(f"step {steps_done}: unfrozen to {plain(stage.spec)}")
            run_log.record({"step": steps_done, "unfrozen_to": stage.spec})

    if cache is not None:
        state.train_runtime_s += cache.train_seconds  # it replaced the frozen part's forward passes
    tracking.start(accelerator, run_log, trackers, out, cfg.run_name or tracking.default_run_name(out), cfg.to_dict(),
                   resume_step=state.global_step if resume is not None else None, verbosity=verbosity)

    last_eval: dict[int, EvalResult] = {}  # global step -> result, so the end-of-run eval is not repeated

    def evaluate(epoch: int) -> EvalResult:
        if state.global_step in last_eval:
            return last_eval[state.global_step]
        result = last_eval[state.global_step] = validate(accelerator, model, eval_loader, cfg.data.num_labels, len(eval_ds),
                                                        cfg.data.label_names)
        if extra_metrics and accelerator.is_main_process:  # on the gathered, de-duplicated rows, main process only
            result.metrics.update(library_metrics.compute(extra_metrics, result.labels, result.preds, cfg.data.num_labels))
        run_log.record({"epoch": epoch, "step": state.global_step, **{f"eval_{k}" if not k.startswith("eval") else k: v
                                                                       for k, v in result.metrics.items()}})
        run_log.print(f"epoch {epoch}: f1 {result.metrics['f1']:.4f} accuracy {result.metrics['accuracy']:.4f} "
                       f"eval loss {result.metrics['eval_loss']:.4f}")
        return result

    with StopRequest(cfg.stop_file) as stop:  # SIGTERM, SIGUSR1, the stop file and Ctrl-C: checkpoint, then exit
        status = fit(accelerator, model, optimizer, scheduler, train_loader, sampler, state=state, epochs=cfg.epochs,
                     max_steps=cfg.max_steps, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, log_every=cfg.log_every,
                     checkpoint_every=cfg.checkpoint_every, run_log=run_log, stop=stop, evaluate=evaluate,
                     checkpoint=lambda s: ckpt.save_checkpoint(
                         accelerator, out, {"state": s.to_dict(), "config": cfg.to_dict(),
                                            "policy": {**policy.record(), "stage": policy.stage(raw_model, s.global_step).spec}},
                         cfg.keep_checkpoints),
                     flop_model=flop_model, peak_flops=peak_flops, max_skipped_steps=cfg.max_skipped_steps,
                     on_step=after_step)
    if status == "preempted":
        tracking.finish(accelerator, run_log)
        run_log.print(f"[yellow]checkpoint saved; exiting with {PREEMPTED_EXIT_CODE} so the job can be requeued[/yellow]")
        return PREEMPTED_EXIT_CODE
    if status == "interrupted":
        tracking.finish(accelerator, run_log)
        run_log.notice(f"[yellow]interrupted: checkpoint saved at step {state.global_step}; to continue, run the same "
                       f"command with --output-dir {plain(out)} --resume-from auto[/yellow]")
        return INTERRUPTED_EXIT_CODE

    # ---- final outputs (the eval is cheap next to training and makes the files self-consistent)
    result = evaluate(state.epoch)
    if cache is not None:
        cache.restore()  # the saved model runs its frozen part again
    ckpt.save_model(accelerator, policy.export(model), tokenizer, out / "model")
    memory = run_memory(accelerator, optimizer)  # max over ranks; every rank takes part
    if accelerator.is_main_process:
        write_predictions(out / "predictions.csv", result)
        metrics = {
            **result.metrics,
            "f1_average": f1_average(cfg.data.num_labels),
            "train_runtime_s": state.train_runtime_s,
            "train_samples_per_s": state.samples_seen / state.train_runtime_s if state.train_runtime_s else 0.0,
            "train_samples": state.samples_seen,
            "train_tokens_per_s": state.tokens_seen / state.train_runtime_s if state.train_runtime_s else 0.0,
            "train_padding_fraction": 1 - state.tokens_seen / state.padded_tokens_seen if state.padded_tokens_seen else 0.0,
            "train_model_tflops": state.model_flops / 1e12,
            "mfu": (state.model_flops / state.train_runtime_s / (peak_flops * accelerator.num_processes)
                    if peak_flops and state.train_runtime_s else None),
            "group_by_length": cfg.group_by_length,
            **({"cache_train_s": cache.train_seconds, "cache_eval_s": cache.eval_seconds,
                "cache_mib": cache.nbytes / 2**20} if cache is not None else {}),
            "global_step": state.global_step,
            "trainable_params": summary.trainable,
            "total_params": summary.total,
            **memory,
            "world_size": accelerator.num_processes,
            "freeze": policy.spec,
        }
        save_json(out / "metrics.json", metrics)
        curves.plot_run(out)
        run_log.metrics_table(f"final metrics ({out})", metrics)
    tracking.finish(accelerator, run_log)
    accelerator.wait_for_everyone()
    return 0
