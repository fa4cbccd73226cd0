"""The train command: main() is the recipe, read top to bottom; its steps live in the modules that own them.

inputs checked -> model and policy -> run folder -> back-end and wrap -> fit -> outputs.

Order matters and is visible here: data and model are validated and the freeze policy applied
*before* `accelerator.prepare` wraps the model (DDP / DeepSpeed / FSDP read `requires_grad` at wrap
time), and nothing is written until all inputs are known to be good.
"""

from __future__ import annotations

import os

import numpy as np
from accelerate.utils import set_seed

from .backends.accelerator import prepare_backend, setup
from .backends.cluster import detect
from .backends.distributed import main_process_first
from .backends.preemption import StopRequest, stopped
from .core import exit_codes
from .core.config import TrainConfig, save_json
from .core.errors import ToolkitError
from .data.dataset import Collator, default_num_workers, first_example, make_loader, prepare_splits
from .engine import checkpoint as ckpt
from .engine import extra_metrics
from .engine.flops import CurrentFlops, FlopModel, device_peak_flops
from .engine.frozen_cache import FrozenCache, run_loaders
from .engine.loop import EvalResult, Evaluations, GradualThaw, TrainState, fit, optimizer_steps, validate
from .engine.memory import reset_peak, run_memory
from .engine.metrics import f1_average, training_metrics
from .engine.model import build_optimizer, linear_schedule, load_model, load_tokenizer, max_positions
from .output import curves, library_logs, trackers
from .output.console import RunLog, plain
from .output.run_dir import StartGuard, shared_output_dir, start_run_folder, write_predictions
from .policy import lora
from .policy.blocks import summarize
from .policy.policy import Policy, disable_frozen_dropout


def main(cfg: TrainConfig) -> int:
    with StartGuard() as guard:  # from the run folder to the first optimizer step: a failed start leaves no trace
        # ---- inputs: everything that can be wrong is checked here, before any output
        policy = Policy.from_config(cfg)  # the one parse of --freeze & co; a typo fails before anything loads
        FrozenCache.check_options(cfg.cache_frozen, cfg.frozen_dropout)
        tracker_names = trackers.check(cfg.report_to)
        metrics_extra = extra_metrics.load(cfg.metrics)  # loaded now: a bad name must fail before any output
        accelerator = setup(cfg.cpu, cfg.mixed_precision, cfg.grad_accum, cfg.dist_timeout, cfg.tf32)
        policy.check_backend(accelerator.distributed_type)
        verbosity = 0 if cfg.quiet else 2 if cfg.verbose else 1
        library_logs.configure(verbosity, accelerator.is_main_process, accelerator.distributed_type == "DEEPSPEED")
        run_log = RunLog(accelerator.is_main_process, verbosity=verbosity)
        run_log.print(f"[bold]world[/bold] {accelerator.num_processes} process(es) on {accelerator.device}, "
                      f"{accelerator.distributed_type}, mixed precision {accelerator.mixed_precision}; "
                      f"{detect().describe()}")
        set_seed(cfg.seed)
        reset_peak(accelerator.device)  # metrics.json reports this run's peak memory
        tokenizer = load_tokenizer(cfg.model)
        requested = cfg.to_dict()  # config.json keeps the options as given (compare.py matches runs on them)
        # The data decide the classes (num_labels, label names), so the model is built after them. Rank 0 first,
        # on a gloo group of its own with the data phase's timeout (--data-timeout): the others read its cache.
        with main_process_first(accelerator, cfg.data.data_timeout):
            train_ds, valid_ds, test_ds, max_length = prepare_splits(cfg.data, tokenizer, max_positions(cfg.model),
                                                                     run_log.print, need_eval=cfg.score_test)
        eval_ds, eval_split = (test_ds, "eval") if cfg.score_test else (valid_ds, "validation")  # trials: no test

        # ---- model and policy: everything the run will ever train requires grad from here to the wrap
        model = policy.apply(load_model(cfg.model, cfg.data.num_labels, cfg.data.label_names, log=run_log.print))
        summary = summarize(model, policy.spec)
        schedule = policy.schedule(model)  # also checks a gradual target against the model's depth
        run_log.print(describe_data(train_ds, valid_ds, test_ds, max_length))
        run_log.freeze_table(summary)
        if policy.gradual:
            run_log.print("gradual unfreezing: "
                          + plain(", ".join(f"{stage.spec} from step {step}" for step, stage in schedule)))
        if cfg.cache_frozen:
            FrozenCache.preflight(accelerator, model, policy, train_ds, eval_ds)
        # A frozen feature extractor runs as at inference (Keras' transfer-learning convention): its dropout
        # only adds noise below the trained layers, and on CPU it keeps attention off the fused kernel.
        if not cfg.frozen_dropout and (changed := disable_frozen_dropout(model, policy)):
            run_log.detail(f"frozen part without dropout ({changed} dropout modules; --frozen-dropout keeps it)")

        # ---- the run folder: checked, resume point chosen; config.json once every input is good
        out = shared_output_dir(accelerator, cfg)
        guard.watch(out, accelerator.is_main_process)
        resume = ckpt.open_output_dir(accelerator, out, cfg.resume_from, run_log.print)
        ckpt.check_resume_policy(resume, policy.record(), Policy.describe_record)
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, policy)
        if accelerator.is_main_process:
            start_run_folder(out, {**requested, "output_dir": cfg.output_dir, "resolved": resolved_settings(
                cfg, accelerator, model, policy, schedule, optimizer, max_length, train_ds, valid_ds, test_ds)})
        run_log.log_path = out / "metrics.jsonl"

        # ---- loaders and schedule, the back-end's settings, the wrap
        collator = Collator(tokenizer, 8 if accelerator.device.type == "cuda" else None)  # tensor cores like 8s
        eval_batch_size = cfg.eval_batch_size or 2 * cfg.batch_size
        workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(
            accelerator.device.type, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
        cache, train_loader, eval_loader = run_loaders(accelerator, model, policy, train_ds, eval_ds, collator, cfg,
                                                       eval_batch_size, workers, run_log.print)
        flop_model = CurrentFlops(FlopModel.from_model(model, policy.stage(model, 0), cached_prefix=cache is not None))
        peak_flops = device_peak_flops(accelerator.device, accelerator.mixed_precision)
        sampler = train_loader.batch_sampler
        total_steps = optimizer_steps(len(train_loader), accelerator.num_processes, cfg.grad_accum, cfg.epochs,
                                      cfg.max_steps)
        # Counted in optimizer steps: the loop steps the scheduler once per optimizer step itself.
        scheduler = linear_schedule(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
        prepare_backend(accelerator, model, policy, cfg.batch_size, cfg.max_grad_norm, log=run_log.print,
                        example=None if cache is not None else lambda: first_example(train_ds, collator))
        # after the probe above, which runs on the host: compiling there would compile for the CPU first
        if cfg.compile:
            model.compile(dynamic=True)  # in place: parameter names, checkpoints and saving are unchanged
        raw_model = model
        model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler)
        state = (TrainState(**ckpt.load_resume_state(accelerator, resume, run_log.print)) if resume is not None
                 else TrainState(world_size=accelerator.num_processes))
        thaw = GradualThaw(policy, raw_model, flop_model, run_log, state.global_step) if policy.gradual else None

        def after_step(steps_done: int) -> None:  # after every optimizer step, before the next forward
            guard.disarm()  # training has begun: from here a failure keeps the folder (and its checkpoints)
            if thaw is not None:
                thaw(steps_done)

        if cache is not None:
            state.train_runtime_s += cache.train_seconds  # it replaced the frozen part's forward passes
        trackers.start(accelerator, run_log, tracker_names, out, cfg.run_name or trackers.default_run_name(out),
                       cfg.to_dict(), resume_step=state.global_step if resume else None, verbosity=verbosity)

        # ---- fit: evaluate after every epoch (once per step count), checkpoint, stop on request
        evaluate = Evaluations(accelerator, model, eval_loader, state, cfg.data.num_labels, len(eval_ds),
                               cfg.data.label_names, metrics_extra, run_log, split=eval_split)

        with StopRequest(cfg.stop_file) as stop:  # SIGTERM, SIGUSR1, the stop file and Ctrl-C: checkpoint, exit
            status = fit(accelerator, model, optimizer, scheduler, train_loader, sampler, state=state,
                         epochs=cfg.epochs, max_steps=cfg.max_steps, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
                         log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, run_log=run_log, stop=stop,
                         evaluate=evaluate, checkpoint=ckpt.saver(accelerator, out, cfg, policy, raw_model),
                         flop_model=flop_model, peak_flops=peak_flops,
                         max_skipped_steps=cfg.max_skipped_steps, on_step=after_step, pause_at=cfg.pause_at_step)
        if status != "done":  # paused at a rung, preempted or interrupted: with a checkpoint
            trackers.finish(accelerator, run_log)
            return (pause(cfg, state, evaluate, out, run_log, accelerator) if status == "paused"
                    else stopped(status, state.global_step, out, run_log))

        # ---- outputs (the final eval is cheap next to training and makes the files self-consistent)
        result, scores = final_scores(cfg, evaluate, state.epoch, cache, accelerator, model, valid_ds, collator,
                                      eval_batch_size, workers)
        ckpt.save_model(accelerator, policy.export(model), tokenizer, out / "model")
        memory = run_memory(accelerator, optimizer)  # max over ranks; every rank takes part
        if accelerator.is_main_process:
            write_predictions(out / "predictions.csv", result)
            metrics = final_metrics(scores, cfg, state, peak_flops, cache, summary, memory, policy.spec,
                                    accelerator.num_processes)
            save_json(out / "metrics.json", metrics)
            curves.plot_run(out)
            run_log.metrics_table(f"final metrics ({out})", metrics)
        trackers.finish(accelerator, run_log)
        accelerator.wait_for_everyone()
        return exit_codes.OK


def split_metrics(result: EvalResult, split: str) -> dict:
    """One split's metrics under its own names (validation_f1, validation_loss, ...), with the number of classes
    predicted: 1 is a degenerate model whatever its F1 says."""
    named = {f"{split}_{key.removeprefix('eval_')}": value for key, value in result.metrics.items()}
    return {**named, f"{split}_classes_predicted": int(len(np.unique(result.preds)))}


def describe_data(train_ds, valid_ds, test_ds, max_length: int) -> str:
    return (f"data: {len(train_ds)} train / " + (f"{len(valid_ds)} validation / " if valid_ds is not None else "")
            + (f"{len(test_ds)} eval" if test_ds is not None else "no eval (--no-score-test)")
            + f" examples, max length {max_length}")


def final_scores(cfg: TrainConfig, evaluate: Evaluations, epoch: int, cache, accelerator, model, valid_ds, collator,
                 batch_size: int, workers: int) -> tuple[EvalResult, dict]:
    """The final evaluation (cheap next to training, and it makes the files self-consistent) and the metrics for
    metrics.json. A run that scored the test split also scores its validation split, once, on the whole model."""
    result = evaluate(epoch)
    if cache is not None:
        cache.restore()  # the saved model runs its frozen part again
    if not cfg.score_test:
        return result, split_metrics(result, "validation")
    if valid_ds is None:
        return result, result.metrics
    loader = accelerator.prepare_data_loader(make_loader(valid_ds, collator, batch_size, cfg.seed, train=False,
                                                         num_workers=workers))
    valid = validate(accelerator, model, loader, cfg.data.num_labels, len(valid_ds), cfg.data.label_names)
    return result, {**result.metrics, **split_metrics(valid, "validation")}


def pause(cfg: TrainConfig, state: TrainState, evaluate: Evaluations, out, run_log: RunLog, accelerator) -> int:
    """A rung of successive halving: the validation score at this step, in rungs/step-N.json; the checkpoint at this
    step (written by fit) is where --resume-from auto goes on."""
    if state.global_step != cfg.pause_at_step:
        raise ToolkitError(f"{out} has trained to step {state.global_step}, past --pause-at-step {cfg.pause_at_step}",
                           "pause at a later step, or use a new --output-dir")
    scores = split_metrics(evaluate(state.epoch), "validation")
    if accelerator.is_main_process:
        (out / "rungs").mkdir(exist_ok=True)
        save_json(out / "rungs" / f"step-{state.global_step}.json",
                  {"step": state.global_step, **scores, "train_runtime_s": state.train_runtime_s})
        run_log.print(f"paused at step {state.global_step}: validation f1 {scores['validation_f1']:.4f}")
    accelerator.wait_for_everyone()
    return exit_codes.OK


def resolved_settings(cfg: TrainConfig, accelerator, model, policy: Policy, schedule, optimizer, max_length: int,
                      train_ds, valid_ds, test_ds) -> dict:
    """config.json's "resolved": what the run settled that the options did not say."""
    param_groups = [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                     "params": sum(p.numel() for p in g["params"])} for g in optimizer.param_groups]
    return {"num_labels": cfg.data.num_labels, "label_names": cfg.data.label_names,
            "max_length": max_length, "world_size": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision, "train_examples": len(train_ds),
            "validation_examples": len(valid_ds) if valid_ds is not None else 0,
            "eval_examples": len(test_ds) if test_ds is not None else 0,
            "distributed_type": str(accelerator.distributed_type),
            "policy": policy.spec, "param_groups": param_groups,
            "unfreeze_schedule": [[step, stage.spec] for step, stage in schedule] if policy.gradual else None,
            **({"lora_targets": lora.adapted_modules(model)} if policy.kind == "lora" else {})}


def final_metrics(eval_metrics: dict, cfg: TrainConfig, state: TrainState, peak_flops, cache, summary, memory: dict,
                  spec: str, world_size: int) -> dict:
    """metrics.json: the final evaluation, the training's throughput, sizes, memory and the policy."""
    return {**eval_metrics, "f1_average": f1_average(cfg.data.num_labels),
            **training_metrics(state, peak_flops, world_size),
            "group_by_length": cfg.group_by_length,
            **({"cache_train_s": cache.train_seconds, "cache_eval_s": cache.eval_seconds,
                "cache_mib": cache.nbytes / 2**20} if cache is not None else {}),
            "global_step": state.global_step, "trainable_params": summary.trainable,
            "total_params": summary.total, **memory, "world_size": world_size, "freeze": spec}
