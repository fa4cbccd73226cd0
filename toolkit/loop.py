"""The training loop (`fit`) and exact distributed evaluation (`validate`)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from .metrics import classification_metrics
from .preemption import StopRequest
from .run_log import RunLog
from .throughput import FlopModel, batch_stats


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
    model_flops: float = 0.0  # training FLOPs as counted in throughput.py, all ranks

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalResult:
    metrics: dict
    index: np.ndarray  # eval row positions, sorted
    labels: np.ndarray
    preds: np.ndarray


@torch.no_grad()
def validate(accelerator: Accelerator, model, loader, num_labels: int, num_examples: int) -> EvalResult:
    """Every rank scores its share; row ids, labels, predictions and losses are gathered once.

    Ranks can end with batches of different sizes (uneven last batch) and Accelerate
    repeats a few batches so every rank runs the same number of forward passes (ZeRO-3
    needs that). So results are padded to one length, gathered, and de-duplicated by
    row id: each eval row is counted exactly once, whatever the number of processes.
    """
    model.eval()
    start = time.perf_counter()
    rows, losses = [], []
    stats = torch.zeros(4, dtype=torch.long, device=accelerator.device)  # tokens, padded tokens, sum len^2, rows
    for batch in loader:
        if "attention_mask" in batch:
            stats += batch_stats(batch["attention_mask"])
        idx = batch.pop("idx")
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        losses.append(F.cross_entropy(logits, labels, reduction="none"))
        rows.append(torch.stack([idx, labels, logits.argmax(dim=-1)], dim=1))
    local_rows = torch.cat(rows) if rows else torch.empty(0, 3, dtype=torch.long, device=accelerator.device)
    local_loss = torch.cat(losses) if losses else torch.empty(0, device=accelerator.device)
    all_rows = accelerator.gather(accelerator.pad_across_processes(local_rows, dim=0, pad_index=-1)).cpu().numpy()
    all_loss = accelerator.gather(accelerator.pad_across_processes(local_loss, dim=0, pad_index=-1)).cpu().numpy()
    tokens, padded = accelerator.reduce(stats, reduction="sum").tolist()[:2]
    keep = all_rows[:, 0] >= 0
    all_rows, all_loss = all_rows[keep], all_loss[keep]
    index, first = np.unique(all_rows[:, 0], return_index=True)
    if len(index) != num_examples:
        raise RuntimeError(f"evaluation gathered {len(index)} distinct rows, expected {num_examples}")
    runtime = time.perf_counter() - start
    labels, preds = all_rows[first, 1], all_rows[first, 2]
    metrics = classification_metrics(labels, preds, num_labels)
    metrics.update(eval_loss=float(all_loss[first].mean()), eval_runtime_s=runtime,
                   eval_samples_per_s=num_examples / runtime, eval_tokens_per_s=tokens / runtime,
                   eval_padding_fraction=1 - tokens / padded if padded else 0.0)
    model.train()
    return EvalResult(metrics, index, labels, preds)


def _seed_for_step(seed: int, step: int, rank: int) -> None:
    # Dropout masks become a function of (seed, step, rank), not of how many random
    # numbers were drawn before: a run resumed mid-epoch replays exactly the same steps.
    torch.manual_seed((seed * 1_000_003 + step * 7919 + rank) % (2**63))


def _step_totals(accelerator: Accelerator, stop_flag: bool, pending: torch.Tensor) -> tuple[bool, list[int]]:
    """One all-reduce per optimizer step: does any rank want to stop, and the throughput counters of all ranks."""
    flag = torch.tensor([1 if stop_flag else 0], dtype=torch.long, device=pending.device)
    totals = accelerator.reduce(torch.cat([flag, pending]), reduction="sum").tolist()
    return totals[0] > 0, totals[1:]


def fit(accelerator: Accelerator, model, optimizer, scheduler, train_loader, sampler, *, state: TrainState,
        epochs: int, max_steps: int | None, max_grad_norm: float, seed: int, log_every: int,
        checkpoint_every: int, run_log: RunLog, stop: StopRequest, evaluate, checkpoint,
        flop_model: FlopModel | None = None, peak_flops: float | None = None, on_step=None) -> str:
    """Train until the epochs or max_steps are done ("done") or a stop is requested ("preempted").

    `evaluate(epoch)` runs after every epoch; `checkpoint(state)` saves a resumable
    checkpoint. `sampler` is the EpochBatchSampler behind `train_loader`. Throughput
    (samples/s, non-padding tokens/s, padding fraction, and MFU when `peak_flops` of one
    device is known) goes to the progress bar and metrics.jsonl at every log step.
    `on_step(global_step)` runs after every optimizer step, before the next forward (gradual unfreezing).
    """
    accum = accelerator.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    # Clip over what the optimizer holds: gradual unfreezing turns requires_grad on for some of it later.
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    window_loss, window_n, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
    window_tokens, window_padded, window_flops = 0, 0, 0.0
    pending = torch.zeros(4, dtype=torch.long, device=accelerator.device)  # this rank's batch_stats since the last step

    clock = time.perf_counter()

    def bank_time() -> None:  # training time only: evaluation and checkpoint saving are excluded
        nonlocal clock
        state.train_runtime_s += time.perf_counter() - clock

    with run_log.progress(total_steps, completed=state.global_step) as bar:
        while state.epoch < epochs and state.global_step < total_steps:
            sampler.epoch = state.epoch
            loader = accelerator.skip_first_batches(train_loader, state.batches_done) if state.batches_done else train_loader
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
                window_loss += loss.detach().float().item()
                window_n += 1
                window_samples += samples
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                state.global_step += 1
                stop_now, (tokens, padded, len_sq, seqs) = _step_totals(accelerator, stop.requested(), pending)
                pending.zero_()
                flops = flop_model.flops(tokens, len_sq, seqs) if flop_model else 0.0
                state.tokens_seen += tokens
                state.padded_tokens_seen += padded
                state.model_flops += flops
                window_tokens, window_padded, window_flops = window_tokens + tokens, window_padded + padded, window_flops + flops
                bar.update(1)
                if on_step is not None:
                    on_step(state.global_step)
                if state.global_step % log_every == 0 or state.global_step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    mean_loss = accelerator.reduce(torch.tensor([window_loss / window_n], device=accelerator.device),
                                                   reduction="mean").item()
                    entry = {"step": state.global_step, "epoch": round(state.epoch + state.batches_done / len(train_loader), 4),
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
                    window_loss, window_n, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
                    window_tokens, window_padded, window_flops = 0, 0, 0.0
                if stop_now:
                    bank_time()
                    run_log.print(f"[yellow]stop requested ({stop.reason()}): checkpointing at step {state.global_step}[/yellow]")
                    checkpoint(state)
                    return "preempted"
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
