"""The training loop (`fit`) and exact distributed evaluation (`validate`)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from ..backends.accelerator import clip_parameters
from ..backends.preemption import StopRequest
from ..core import exit_codes
from ..core.errors import RunFailed
from ..core.test_delays import STEP_DELAY_ENV, seconds
from ..output.console import RunLog, plain
from .extra_metrics import compute as compute_extra_metrics
from .flops import CurrentFlops, FlopModel, batch_stats
from .metrics import classification_metrics


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint's progress.json."""

    epoch: int = 0  # current epoch (0-based)
    batches_done: int = 0  # batches this rank has consumed in the current epoch
    global_step: int = 0  # optimizer steps taken
    train_runtime_s: float = 0.0  # summed over restarts
    samples_seen: int = 0  # training examples, all ranks
    world_size: int = 1
    tokens_seen: int = 0  # non-padding training tokens, all ranks
    padded_tokens_seen: int = 0  # training tokens including padding, all ranks
    model_flops: float = 0.0  # training FLOPs as counted in engine/flops.py, all ranks

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalResult:
    metrics: dict
    index: np.ndarray  # eval row positions, sorted
    labels: np.ndarray
    preds: np.ndarray


@torch.no_grad()
def validate(accelerator: Accelerator, model, loader, num_labels: int, num_examples: int,
             label_names: list[str] | None = None, extra_metrics: list | None = None) -> EvalResult:
    """Every rank scores its share; row ids, labels, predictions and losses are gathered once.

    Ranks can end with batches of different sizes (uneven last batch) and Accelerate
    repeats a few batches so every rank runs the same number of forward passes (ZeRO-3
    needs that). So results are padded to one length, gathered, and de-duplicated by
    row id: each eval row is counted exactly once, whatever the number of processes.
    `extra_metrics` (extra_metrics.load) are computed on the main process from the gathered rows.
    """
    model.eval()
    start = time.perf_counter()
    rows, losses = [], []
    stats = torch.zeros(4, dtype=torch.long, device=accelerator.device)  # tokens, padded tokens, sum len^2, rows
    bad_rows = torch.zeros(1, dtype=torch.long, device=accelerator.device)  # rows with a non-finite logit
    for batch in loader:
        if "attention_mask" in batch:
            stats += batch_stats(batch["attention_mask"])
        idx = batch.pop("idx")
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        bad_rows += (~torch.isfinite(logits)).any(dim=-1).sum()
        losses.append(F.cross_entropy(logits, labels, reduction="none"))
        rows.append(torch.stack([idx, labels, logits.argmax(dim=-1)], dim=1))
    local_rows = torch.cat(rows) if rows else torch.empty(0, 3, dtype=torch.long, device=accelerator.device)
    local_loss = torch.cat(losses) if losses else torch.empty(0, device=accelerator.device)
    all_rows = accelerator.gather(accelerator.pad_across_processes(local_rows, dim=0, pad_index=-1)).cpu().numpy()
    all_loss = accelerator.gather(accelerator.pad_across_processes(local_loss, dim=0, pad_index=-1)).cpu().numpy()
    tokens, padded, _, _, non_finite = accelerator.reduce(torch.cat([stats, bad_rows]), reduction="sum").tolist()
    keep = all_rows[:, 0] >= 0
    all_rows, all_loss = all_rows[keep], all_loss[keep]
    index, first = np.unique(all_rows[:, 0], return_index=True)
    if len(index) != num_examples:
        raise RuntimeError(f"evaluation gathered {len(index)} distinct rows, expected {num_examples}")
    if non_finite or not np.isfinite(all_loss[first]).all():
        # Every rank holds the same reduced count and gathered losses, so all raise together,
        # before the caller saves a checkpoint, predictions or metrics from these weights.
        raise RunFailed(f"evaluation gave non-finite logits or loss ({non_finite} of {num_examples} rows have "
                        "NaN/inf logits): the weights have diverged; nothing was saved from them",
                        "lower --lr or keep --max-grad-norm; use bf16 rather than fp16; "
                        "--resume-from auto restarts from the last good checkpoint",
                        exit_code=exit_codes.DIVERGED)
    runtime = time.perf_counter() - start
    labels, preds = all_rows[first, 1], all_rows[first, 2]
    metrics = classification_metrics(labels, preds, num_labels, label_names)
    metrics.update(eval_loss=float(all_loss[first].mean()), eval_runtime_s=runtime,
                   eval_samples_per_s=num_examples / runtime, eval_tokens_per_s=tokens / runtime,
                   eval_padding_fraction=1 - tokens / padded if padded else 0.0)
    if extra_metrics and accelerator.is_main_process:  # on the gathered, de-duplicated rows, main process only
        metrics.update(compute_extra_metrics(extra_metrics, labels, preds, num_labels))
    model.train()
    return EvalResult(metrics, index, labels, preds)


def optimizer_steps(batches: int, world_size: int, grad_accum: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of a run: `batches` (the whole loader) split over the ranks, accumulated, times the epochs."""
    total = math.ceil(math.ceil(batches / world_size) / grad_accum) * epochs
    return min(total, max_steps) if max_steps else total


class Evaluations:
    """validate() once per step count (the end-of-run eval repeats none), recorded and shown by the run log."""

    def __init__(self, accelerator: Accelerator, model, loader, state: "TrainState", num_labels: int, num_examples: int,
                 label_names: list[str] | None, extra_metrics: list | None, run_log: RunLog, split: str = "eval"):
        self.args = (accelerator, model, loader, num_labels, num_examples, label_names, extra_metrics)
        self.state, self.run_log, self.done, self.split = state, run_log, {}, split

    def __call__(self, epoch: int) -> EvalResult:
        step = self.state.global_step
        if step not in self.done:
            self.done[step] = validate(*self.args)
            self.run_log.eval_result(epoch, step, self.done[step].metrics, self.split)
        return self.done[step]


class GradualThaw:
    """Gradual unfreezing during fit(): requires_grad and the FLOP count follow the policy's stage."""

    def __init__(self, policy, model, flop_model: CurrentFlops, run_log: RunLog, steps_done: int):
        self.policy, self.model, self.flop_model, self.run_log = policy, model, flop_model, run_log
        policy.set_stage(model, steps_done)  # where the schedule stands (also after a resume)
        flop_model.model = FlopModel.from_model(model, policy.stage(model, steps_done))

    def __call__(self, steps_done: int) -> None:  # after every optimizer step: the next step trains the new stage
        if (stage := self.policy.set_stage(self.model, steps_done)) is not None:
            self.flop_model.model = FlopModel.from_model(self.model, stage)
            self.run_log.print(f"step {steps_done}: unfrozen to {plain(stage.spec)}")
            self.run_log.record({"step": steps_done, "unfrozen_to": stage.spec})


def _seed_for_step(seed: int, step: int, rank: int) -> None:
    # Dropout masks become a function of (seed, step, rank), not of how many random
    # numbers were drawn before: a run resumed mid-epoch replays exactly the same steps.
    torch.manual_seed((seed * 1_000_003 + step * 7919 + rank) % (2**63))


def _step_totals(accelerator: Accelerator, stop_flag: bool, skipped: bool, step_loss: torch.Tensor,
                 pending: torch.Tensor, interrupt_flag: bool = False) -> tuple[bool, bool, bool, bool, list[int]]:
    """The one all-reduce (and the one host sync) per optimizer step.

    Summed over ranks: does any rank want to stop, was any stop a Ctrl-C, did any rank see a non-finite
    loss, was the optimizer step skipped (fp16 loss scaler), and the throughput counters. Every rank gets the
    same answers, so every rank stops (or not) at the same step without a second collective.
    The flags are built on the device (`full`, not `torch.tensor(...)`, which would copy from
    pageable host memory and block on CUDA); `.tolist()` is the single read of the step.
    """
    flags = torch.stack([torch.full((), int(stop_flag), dtype=torch.long, device=pending.device),
                         torch.full((), int(interrupt_flag), dtype=torch.long, device=pending.device),
                         (~torch.isfinite(step_loss)).long(),
                         torch.full((), int(skipped), dtype=torch.long, device=pending.device)])
    totals = accelerator.reduce(torch.cat([flags, pending]), reduction="sum").tolist()
    return totals[0] > 0, totals[1] > 0, totals[2] > 0, totals[3] > 0, totals[4:]


@dataclass
class StepGuard:
    """Decides, once per optimizer step, whether training has diverged.

    A non-finite loss stops the run unless the fp16 loss scaler skipped that step: skipped
    steps are how the scaler finds its scale, and an inf/NaN gradient is exactly what makes
    it skip. But a scaler that keeps skipping is a run whose loss no longer trains: more
    than `max_skipped` consecutive skipped steps stop it too.
    """

    max_skipped: int
    skipped_in_a_row: int = 0

    def check(self, non_finite: bool, skipped: bool) -> str | None:
        """None while training is healthy, else what went wrong."""
        if skipped:
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row > self.max_skipped:
                return (f"the fp16 loss scaler skipped {self.skipped_in_a_row} optimizer steps in a row "
                        f"(limit --max-skipped-steps {self.max_skipped}): the gradients stay inf/NaN")
            return None
        self.skipped_in_a_row = 0
        if non_finite:
            return "the training loss is not finite (NaN or inf)"
        return None


def diverged(problem: str, step: int, lr: float, mixed_precision: str) -> RunFailed:
    advice = "lower --lr (e.g. by 10x), keep or lower --max-grad-norm (1.0 clips), add --warmup-ratio 0.1"
    if mixed_precision == "fp16":
        advice += ", or use --mixed-precision bf16 (no loss scaling) on GPUs that have it"
    return RunFailed(f"{problem} at optimizer step {step} (learning rate {lr:.3g}). Stopped before saving anything "
                     "from these weights: earlier checkpoints are untouched; no metrics.json, predictions.csv or "
                     "model/",
                     f"{advice}; then --resume-from auto continues from that checkpoint",
                     exit_code=exit_codes.DIVERGED)


def fit(accelerator: Accelerator, model, optimizer, scheduler, train_loader, sampler, *, state: TrainState,
        epochs: int, max_steps: int | None, max_grad_norm: float, seed: int, log_every: int,
        checkpoint_every: int, run_log: RunLog, stop: StopRequest, evaluate, checkpoint,
        flop_model: FlopModel | None = None, peak_flops: float | None = None, max_skipped_steps: int = 100,
        on_step=None, pause_at: int | None = None) -> str:
    """Train until the epochs or max_steps are done ("done") or a stop is requested: "interrupted" when
    a rank got a Ctrl-C, else "preempted". Either way every rank stops after the same step, checkpointed.

    `evaluate(epoch)` runs after every epoch; `checkpoint(state)` saves a resumable
    checkpoint. `sampler` is the EpochBatchSampler behind `train_loader`. Throughput
    (samples/s, non-padding tokens/s, padding fraction, and MFU when `peak_flops` of one
    device is known) goes to the progress bar and metrics.jsonl at every log step.

    A non-finite loss raises RunFailed (see StepGuard) before anything more is saved. The
    host reads device values once per optimizer step (the reduction in `_step_totals`), plus
    the loss at log steps: no `.item()` per micro-batch, so the host does not stall on the GPU
    mid-step. (transformers' SDPA mask helper still reads `padding_mask.all()` once per forward.)
    `on_step(global_step)` runs after every optimizer step, before the next forward (gradual unfreezing).
    At step `pause_at` (before the last step) it checkpoints and returns "paused": a rung of successive halving.
    The schedule still spans every step, so a run resumed from there ends where an uninterrupted one ends.
    """
    accum = accelerator.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    trainable = clip_parameters(accelerator, model, optimizer)
    model.train()
    device = accelerator.device
    window_loss = torch.zeros((), device=device)  # summed on the device, read at log steps
    step_delay_s = seconds(STEP_DELAY_ENV)
    step_loss = torch.zeros((), device=device)  # this optimizer step's micro-batch losses, checked by the guard
    window_n, window_samples, window_start = 0, 0, time.perf_counter()
    window_tokens, window_padded, window_flops = 0, 0, 0.0
    pending = torch.zeros(4, dtype=torch.long, device=device)  # this rank's batch_stats since the last step
    guard = StepGuard(max_skipped_steps)

    clock = time.perf_counter()

    def bank_time() -> None:  # training time only: evaluation and checkpoint saving are excluded
        nonlocal clock
        state.train_runtime_s += time.perf_counter() - clock

    if pause_at is not None and pause_at <= state.global_step < total_steps:
        return "paused"  # resumed at (or past) its rung: that checkpoint holds the weights to score
    with run_log.progress(total_steps, completed=state.global_step) as bar:
        while state.epoch < epochs and state.global_step < total_steps:
            sampler.epoch = state.epoch
            loader = (accelerator.skip_first_batches(train_loader, state.batches_done) if state.batches_done
                      else train_loader)
            for batch in loader:
                _seed_for_step(seed, state.global_step * accum + state.batches_done % accum, accelerator.process_index)
                batch.pop("idx")
                pending += batch_stats(batch["attention_mask"])
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.batches_done += 1
                samples = batch["labels"].shape[0] * accelerator.num_processes
                state.samples_seen += samples
                step_loss += loss.detach().float()
                window_n += 1
                window_samples += samples
                if not accelerator.sync_gradients:
                    continue
                lr = scheduler.get_last_lr()[0]  # the rate this step used
                skipped = accelerator.optimizer_step_was_skipped  # fp16 overflow: the weights did not change
                if not skipped:  # a skipped step must not advance the schedule (PyTorch's GradScaler recipe)
                    scheduler.step()
                state.global_step += 1
                if step_delay_s:
                    time.sleep(step_delay_s)  # tests: a signal sent after step k lands before the epoch ends
                stop_now, interrupted, non_finite, skipped, (tokens, padded, len_sq, seqs) = _step_totals(
                    accelerator, stop.requested(), skipped, step_loss, pending, stop.interrupted())
                if (problem := guard.check(non_finite, skipped)) is not None:
                    run_log.record({"step": state.global_step, "error": problem, "lr": lr})
                    raise diverged(problem, state.global_step, lr, str(accelerator.mixed_precision))
                window_loss += step_loss
                step_loss.zero_()
                pending.zero_()
                flops = flop_model.flops(tokens, len_sq, seqs) if flop_model else 0.0
                state.tokens_seen += tokens
                state.padded_tokens_seen += padded
                state.model_flops += flops
                window_tokens, window_padded = window_tokens + tokens, window_padded + padded
                window_flops += flops
                bar.update(1)
                if on_step is not None:
                    on_step(state.global_step)
                if state.global_step % log_every == 0 or state.global_step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    mean_loss = accelerator.reduce(window_loss / window_n, reduction="mean").item()
                    entry = {"step": state.global_step,
                             "epoch": round(state.epoch + state.batches_done / len(train_loader), 4),
                             "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                             "samples_per_s": window_samples / elapsed, "tokens_per_s": window_tokens / elapsed,
                             "padding_fraction": 1 - window_tokens / window_padded if window_padded else 0.0}
                    shown = {"samples/s": entry["samples_per_s"], "tok/s": f"{entry['tokens_per_s']:.0f}",
                             "pad": f"{entry['padding_fraction']:.0%}"}
                    if peak_flops:
                        entry["mfu"] = window_flops / elapsed / (peak_flops * accelerator.num_processes)
                        shown["mfu"] = f"{entry['mfu']:.1%}"
                    run_log.record(entry)
                    bar.update(0, loss=mean_loss, lr=entry["lr"], **shown)
                    window_loss.zero_()
                    window_n, window_samples, window_start = 0, 0, time.perf_counter()
                    window_tokens, window_padded, window_flops = 0, 0, 0.0
                if stop_now:
                    bank_time()
                    run_log.print(f"[yellow]stop requested ({plain(stop.reason())}): checkpointing at step "
                                  f"{state.global_step}[/yellow]")
                    checkpoint(state)
                    return "interrupted" if interrupted else "preempted"
                if state.global_step == pause_at and state.global_step < total_steps:
                    bank_time()
                    checkpoint(state)
                    return "paused"
                if checkpoint_every and state.global_step % checkpoint_every == 0:
                    bank_time()
                    paused = time.perf_counter()
                    checkpoint(state)
                    clock = time.perf_counter()
                    window_start += clock - paused  # the logged rates measure training only
                if state.global_step >= total_steps:
                    break
            bank_time()
            paused = time.perf_counter()
            if state.batches_done >= len(train_loader):
                state.epoch += 1
                state.batches_done = 0
                evaluate(state.epoch)
                checkpoint(state)
            clock = time.perf_counter()
            window_start += clock - paused
    return "done"
