"""Runs that fail loudly and recover: a diverging loss, fp16 skipped steps, corrupted checkpoints,
a killed rank, a checkpoint that cannot be written, exact evaluation on 1-3 processes, and
no host-device sync per micro-batch.

A tiny random BERT (BertConfig, MiniLM's tokenizer) on real IMDb reviews wherever the weights
do not matter. Several checks share one run or one process group, because starting a group
costs seconds and these runs cost milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, _free_port, accelerate_launch, read_json, read_predictions
from toolkit import checkpoint as ckpt
from toolkit.cli import run
from toolkit.config import DataConfig, TrainConfig
from toolkit.errors import RunFailed, ToolkitError
from toolkit.loop import NON_FINITE_EXIT_CODE, StepGuard, TrainState, fit, validate
from toolkit.train import default_num_workers
from toolkit.train import main as train_main

sys.path.insert(0, str(Path(__file__).parent))
import eval_matrix_driver  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm) -> str:
    """A 2-layer, hidden-32 BERT with random weights and a head that predicts both classes."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2))
    torch.nn.init.normal_(model.classifier.weight, std=3.0)  # random, but not one class for every review
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def train_args(model: str, data_dir: str, out: Path, *extra: str) -> list[str]:
    return ["--model", model, "--data-dir", data_dir, "--task", "imdb-subset", "--train-samples", "48",
            "--eval-samples", "16", "--max-length", "32", "--batch-size", "4", "--seed", "1", "--log-every", "1",
            "--cpu", "--output-dir", str(out), *extra]


def launch_ranks(args: list[str], world: int, timeout: float = 300) -> tuple[list[int], list[str], float]:
    """`world` plain `python launch/train.py` processes forming one gloo group, as `srun` starts them:
    no launcher watches them, so a rank that stops alone leaves the others waiting in a collective.
    Returns each rank's exit status and stderr, and the seconds until the last one ended."""
    port = str(_free_port())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
           "ACCELERATE_USE_CPU": "true"}
    procs = [subprocess.Popen([sys.executable, "launch/train.py", *args], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    start = time.perf_counter()
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], [o[0] + o[1] for o in outputs], time.perf_counter() - start


# ---------------------------------------------------------------- 1. non-finite guard


def test_step_guard_tolerates_skipped_steps_up_to_the_limit():
    guard = StepGuard(max_skipped=3)
    assert [guard.check(non_finite=False, skipped=s) for s in (True, True, False, True, True, True)] == [None] * 6
    assert guard.check(non_finite=True, skipped=True) is not None  # 4th in a row: over the limit
    assert "skipped 4 optimizer steps in a row" in StepGuard(3, skipped_in_a_row=3).check(False, True)
    assert guard.check(non_finite=True, skipped=False) == "the training loss is not finite (NaN or inf)"
    assert StepGuard(100).check(non_finite=True, skipped=True) is None  # fp16: the scaler skips such a step


def test_diverging_loss_stops_the_run_with_exit_3_and_saves_nothing(tiny_bert, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    start = time.perf_counter()
    code = run(train_main, TrainConfig, "train", train_args(tiny_bert, data_dir, out, "--lr", "1e6",
                                                            "--checkpoint-every", "1", "--epochs", "3"))
    elapsed = time.perf_counter() - start
    err = " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert code == NON_FINITE_EXIT_CODE == 3
    assert "the training loss is not finite (NaN or inf) at optimizer step 2 (learning rate" in err, err
    assert "lower --lr" in err and "--max-grad-norm" in err and "Traceback" not in err
    assert not (out / "metrics.json").exists() and not (out / "model").exists() and not (out / "predictions.csv").exists()
    # the checkpoint of the last good step is there, unchanged (its digests still match), and nothing after it
    checkpoints = ckpt.list_checkpoints(out)
    assert [c.name for c in checkpoints] == ["step-00000001"]
    assert ckpt.verify_checkpoint(checkpoints[0]) is None
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and log[0]["loss"] == log[0]["loss"]  # finite before
    assert log[-1]["step"] == 2 and "not finite" in log[-1]["error"]
    print(f"NaN run: stopped at step 2 of 36, {elapsed:.1f} s in all")


def test_diverging_loss_stops_every_rank_at_the_same_step(tiny_bert, data_dir, tmp_path):
    """No launcher kills the other rank here: each must stop by itself, at the same step."""
    out = tmp_path / "run"
    codes, outputs, seconds = launch_ranks(train_args(tiny_bert, data_dir, out, "--lr", "1e6", "--epochs", "3"), 2)
    assert codes == [3, 3], outputs
    outputs = [" ".join(o.split()) for o in outputs]
    assert outputs[0].count("not finite (NaN or inf) at optimizer step 2") == 1  # printed once, by rank 0
    assert "not finite" not in outputs[1]
    assert not (out / "metrics.json").exists() and not (out / "model").exists() and not (out / "checkpoints").exists()


@pytest.fixture(scope="module")
def reviews(tiny_bert, data_dir):
    from toolkit.data import build_splits, tokenize
    from toolkit.model import load_tokenizer

    tokenizer = load_tokenizer(tiny_bert)
    train, evals = build_splits(DataConfig(task="imdb-subset", data_dir=data_dir, train_samples=48, eval_samples=16),
                                log=lambda *a: None)
    return tokenizer, tokenize(train, tokenizer, 32), tokenize(evals, tokenizer, 32)


def in_process_fit(tiny_bert, reviews, *, lr=1e-3, grad_accum=1, epochs=1, log_every=1000, scaler=None,
                   before_fit=lambda: None, **fit_kwargs):
    """The real fit() on one process, as train.main wires it; returns what it needs to inspect."""
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    from toolkit.data import Collator, make_loader
    from toolkit.model import build_optimizer
    from toolkit.preemption import StopRequest
    from toolkit.run_log import RunLog

    tokenizer, train_tok, _ = reviews
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False)
    accelerator.scaler = scaler  # the fp16 loss scaler Accelerate creates on a GPU (real torch GradScaler, on CPU)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    optimizer = build_optimizer(model, lr, 0.01)
    loader = make_loader(train_tok, Collator(tokenizer, None), 4, 0, train=True)
    total = len(loader) // grad_accum * epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    state = TrainState()
    before_fit()
    status = fit(accelerator, model, optimizer, scheduler, loader, loader.batch_sampler, state=state, epochs=epochs,
                 max_steps=None, max_grad_norm=1.0, seed=0, log_every=log_every, checkpoint_every=0,
                 run_log=RunLog(False), stop=StopRequest(), evaluate=lambda epoch: None, checkpoint=lambda s: None,
                 **fit_kwargs)
    return status, state, scheduler, total


def test_loss_scaler_skipped_steps_do_not_stop_the_run_or_move_the_schedule(tiny_bert, reviews):
    """fp16 does not run on CPU, so the fp16 part is tested where it separates: fit() with a real
    torch GradScaler, whose initial scale is so large that the first steps' gradients overflow to inf
    and it skips them, halving its scale each time, exactly as under fp16 on a GPU."""
    init = 2.0**127
    scaler = torch.amp.GradScaler("cpu", init_scale=init)
    status, state, scheduler, total = in_process_fit(tiny_bert, reviews, scaler=scaler, max_skipped_steps=100)
    skipped = round(torch.log2(torch.tensor(init / scaler.get_scale())).item())
    assert status == "done" and state.global_step == total == 12
    assert 0 < skipped < total
    assert scheduler.scheduler.last_epoch == total - skipped  # the schedule moved on taken steps only


def test_a_long_run_of_skipped_steps_stops_the_run(tiny_bert, reviews):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    with pytest.raises(RunFailed, match="skipped 3 optimizer steps in a row") as err:
        in_process_fit(tiny_bert, reviews, scaler=scaler, max_skipped_steps=2)
    assert err.value.exit_code == 3


def test_non_finite_eval_logits_stop_before_anything_is_saved(tiny_bert, reviews):
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification

    from toolkit.data import Collator, make_loader

    tokenizer, _, eval_tok = reviews
    accelerator = Accelerator(cpu=True)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    loader = make_loader(eval_tok, Collator(tokenizer, None), 4, 0, train=False)
    assert validate(accelerator, model, loader, 2, len(eval_tok)).metrics["eval_loss"] > 0  # finite: no error
    with torch.no_grad():
        model.classifier.bias[1] = float("inf")  # logits inf (loss NaN) for every row
    with pytest.raises(RunFailed, match="16 of 16 rows have NaN/inf logits") as err:
        validate(accelerator, model, loader, 2, len(eval_tok))
    assert err.value.exit_code == 3


# ---------------------------------------------------------------- 7 (issue 14). host syncs per step


def test_at_most_one_host_sync_per_optimizer_step(tiny_bert, reviews, monkeypatch):
    """Every way a tensor's value reaches the host is counted, per optimizer step, in a real fit()
    with gradient accumulation: on a GPU each is a sync that stalls the host until the device is done.
    Not counted: tensors that live on the CPU on a GPU too (AdamW's step counter; the batch sampler
    and DataLoader seeds, before the batch is copied to the device). The model's own reads are
    counted apart: transformers' SDPA mask helper checks `padding_mask.all()` once per forward."""
    import traceback

    from toolkit import loop

    ours, model_side = [], []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            stack = [f.filename for f in traceback.extract_stack(limit=16)[:-1]]
            if not any(f"torch{os.sep}optim" in f or f"torch{os.sep}utils{os.sep}data" in f for f in stack):
                innermost = next(f for f in reversed(stack) if f"site-packages{os.sep}torch{os.sep}" not in f)
                (model_side if f"{os.sep}transformers{os.sep}" in innermost else ours).append(name)
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__bool__", "cpu", "numpy", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    marks = []  # (reads when a step's reduction starts, reads when it ends)
    original_totals = loop._step_totals

    def marking(*args, **kwargs):
        start = len(ours)
        result = original_totals(*args, **kwargs)
        marks.append((start, len(ours)))
        return result

    monkeypatch.setattr(loop, "_step_totals", marking)
    fit_start = []
    status, state, _, total = in_process_fit(tiny_bert, reviews, grad_accum=2, log_every=4,
                                             before_fit=lambda: (fit_start.append(len(ours)), model_side.clear()))
    monkeypatch.undo()
    assert status == "done" and state.global_step == total == 6
    in_reduction = [end - start for start, end in marks]
    ends = fit_start + [end for _, end in marks]
    in_micro_batches = [start - previous_end for (start, _), previous_end in zip(marks, ends)]
    assert in_reduction == [1] * total, ours  # the reduction's one .tolist()
    # micro-batches read nothing; the log step 4 reads its mean loss once, after its reduction (counted before step 5)
    assert in_micro_batches == [0, 0, 0, 0, 1, 0], ours
    assert model_side == ["__bool__"] * (2 * total)  # one per forward, inside transformers (see README)


def test_dataloader_workers_default_to_none_on_cpu_and_a_few_per_gpu():
    assert default_num_workers("cpu", 1, cpus=64) == 0
    assert default_num_workers("cuda", 1, cpus=16) == 4
    assert default_num_workers("cuda", 8, cpus=16) == 1
    assert default_num_workers("cuda", 8, cpus=8) == 0
