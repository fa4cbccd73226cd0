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

from toolkit.cli import run
from toolkit.core.config import DataConfig, TrainConfig
from toolkit.core.errors import RunFailed, ToolkitError
from toolkit.core.exit_codes import DIVERGED as NON_FINITE_EXIT_CODE
from toolkit.core.test_delays import STEP_DELAY_ENV
from toolkit.data.dataset import default_num_workers
from toolkit.engine import checkpoint as ckpt
from toolkit.engine.loop import StepGuard, TrainState, fit, validate
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
        intermediate_size=64, max_position_embeddings=64, num_labels=2,
        initializer_range=1.0))  # random, but varied enough to predict both classes (0.02: one class for every review)
    torch.nn.init.normal_(model.classifier.weight, std=3.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def train_args(model: str, data_dir: str, out: Path | None, *extra: str) -> list[str]:
    return ["--model", model, "--data-dir", data_dir, "--task", "imdb-subset", "--train-samples", "48",
            "--eval-samples", "16", "--max-length", "32", "--batch-size", "4", "--seed", "1", "--log-every", "1",
            "--cpu", *(["--output-dir", str(out)] if out else []), *extra]


def squash(text: str) -> str:
    """Without whitespace: rich wraps long lines (and paths) to the terminal width."""
    return "".join(text.split())


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
    err = squash(capsys.readouterr().err)
    assert code == NON_FINITE_EXIT_CODE == 3
    assert squash("the training loss is not finite (NaN or inf) at optimizer step 2 (learning rate") in err, err
    assert "lower--lr" in err and "--max-grad-norm" in err and "Traceback" not in err
    assert not any((out / name).exists() for name in ("metrics.json", "model", "predictions.csv"))
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
    outputs = [squash(o) for o in outputs]
    assert outputs[0].count(squash("not finite (NaN or inf) at optimizer step 2")) == 1  # printed once, by rank 0
    assert "notfinite" not in outputs[1]
    assert not (out / "metrics.json").exists() and not (out / "model").exists() and not (out / "checkpoints").exists()


@pytest.fixture(scope="module")
def reviews(tiny_bert, data_dir):
    from toolkit.data.dataset import build_splits, tokenize
    from toolkit.engine.model import load_tokenizer

    tokenizer = load_tokenizer(tiny_bert)
    train, evals = build_splits(DataConfig(task="imdb-subset", data_dir=data_dir, train_samples=48, eval_samples=16),
                                log=lambda *a: None)
    return tokenizer, tokenize(train, tokenizer, 32), tokenize(evals, tokenizer, 32)


def in_process_fit(tiny_bert, reviews, *, lr=1e-3, grad_accum=1, epochs=1, log_every=1000, scaler=None,
                   before_fit=lambda: None, **fit_kwargs):
    """The real fit() on one process, as train.main wires it; returns what it needs to inspect."""
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification

    from toolkit.backends.preemption import StopRequest
    from toolkit.data.dataset import Collator, make_loader
    from toolkit.engine.model import build_optimizer, linear_schedule
    from toolkit.output.console import RunLog

    tokenizer, train_tok, _ = reviews
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False)
    accelerator.scaler = scaler  # the fp16 loss scaler Accelerate creates on a GPU (real torch GradScaler, on CPU)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    optimizer = build_optimizer(model, lr, 0.01)
    loader = make_loader(train_tok, Collator(tokenizer, None), 4, 0, train=True)
    total = len(loader) // grad_accum * epochs
    scheduler = linear_schedule(optimizer, 0, total)
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

    from toolkit.data.dataset import Collator, make_loader

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

    from toolkit.engine import loop

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
    assert model_side == ["__bool__"] * (2 * total)  # one per forward, inside transformers (see docs/reliability.md)


def test_dataloader_workers_default_to_none_on_cpu_and_a_few_per_gpu():
    assert default_num_workers("cpu", 1, cpus=64) == 0
    assert default_num_workers("cuda", 1, cpus=16) == 4
    assert default_num_workers("cuda", 8, cpus=16) == 1
    assert default_num_workers("cuda", 8, cpus=8) == 0


# ---------------------------------------------------------------- 2. verified checkpoints, 4. failed saves


@pytest.fixture(scope="module")
def run_with_checkpoints(tiny_bert, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    code = run(train_main, TrainConfig, "train", train_args(tiny_bert, data_dir, out, "--lr", "1e-3", "--max-steps",
                                                            "6",
                                                            "--checkpoint-every", "2", "--keep-checkpoints", "3"))
    assert code == 0
    return out


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_resume_skips_a_checkpoint_that_fails_verification(run_with_checkpoints, tmp_path, damage):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run_with_checkpoints, out)
    names = [c.name for c in ckpt.list_checkpoints(out)]
    assert names == ["step-00000002", "step-00000004", "step-00000006"]
    progress = ckpt.read_progress(out / "checkpoints" / names[-1])
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= set(progress["files"])
    assert all(len(f["sha256"]) == 64 for f in progress["files"].values())
    assert all(ckpt.verify_checkpoint(out / "checkpoints" / n) is None for n in names)

    weights = out / "checkpoints" / names[-1] / "model.safetensors"
    if damage == "truncate":
        with weights.open("r+b") as fh:
            fh.truncate(weights.stat().st_size - 1000)
        why = "model.safetensors has"
    else:
        _flip_a_byte(weights)
        why = "model.safetensors does not match its sha256"
    messages = []
    assert ckpt.resolve_resume("auto", out, messages.append) == out / "checkpoints" / names[1]
    assert len(messages) == 1 and f"skipping checkpoint {out / 'checkpoints' / names[-1]}" in messages[0]
    assert why in messages[0], messages
    # named explicitly (the checkpoint or its run folder), a bad checkpoint is an error, not a silent fallback
    for explicit in (out / "checkpoints" / names[-1], out):
        with pytest.raises(ToolkitError, match="failed verification") as err:
            ckpt.resolve_resume(str(explicit), out)
        assert why in err.value.problem
    assert ckpt.resolve_resume(str(out / "checkpoints" / names[1]), out) == out / "checkpoints" / names[1]


def test_a_checkpoint_that_cannot_be_written_stops_every_rank_and_keeps_the_previous_one(tiny_bert, data_dir, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-00000004").write_text("in the way")  # where step 4's folder must be made
    codes, outputs, seconds = launch_ranks(train_args(tiny_bert, data_dir, out, "--lr", "1e-3", "--max-steps", "8",
                                                      "--checkpoint-every", "2"), 2)
    assert codes == [4, 4], outputs
    text = squash(outputs[0])
    assert squash(f"could not write checkpoint {out / 'checkpoints' / 'step-00000004'} (") in text, text[-3000:]
    assert "MiBfreethere):rank0:FileExistsError:" in text
    assert "Fileexists" in text and "freediskspace" in text and "Traceback" not in text
    assert [c.name for c in ckpt.list_checkpoints(out)] == ["step-00000002"]
    assert ckpt.verify_checkpoint(out / "checkpoints" / "step-00000002") is None
    assert not (out / "metrics.json").exists() and not (out / "model").exists()


def test_an_output_folder_that_cannot_be_created_is_reported_before_training(tiny_bert, data_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = run(train_main, TrainConfig, "train", train_args(tiny_bert, data_dir, blocker / "run"))
    err = squash(capsys.readouterr().err)
    assert code == 2 and squash(f"cannot write to the output folder {blocker / 'run'}") in err and "fix:" in err, err
    assert "Traceback" not in err and blocker.read_text() == ""


# ---------------------------------------------------------------- 3. a rank killed mid-epoch


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = (Path("/proc") / str(pid) / "environ").read_text()
        env = dict(kv.split("=", 1) for kv in environ.split("\0") if "=" in kv)
    except OSError:
        return None
    return int(env["RANK"]) if "RANK" in env else None


def test_a_killed_rank_ends_the_run_and_auto_resume_finishes_it_exactly(tiny_bert, data_dir, tmp_path):
    """kill -9 of one worker mid-epoch: the launcher ends the run within seconds (no wait for a
    collective timeout), exit != 0; `--resume-from auto` then finishes with the uninterrupted run's
    predictions. The newest checkpoint is also damaged first, so the resume has to fall back."""
    args = ["launch/train.py", *train_args(tiny_bert, data_dir, None, "--lr", "1e-3", "--train-samples", "160",
                                           "--epochs", "2", "--checkpoint-every", "2"), "--output-dir"]
    accelerate_launch(*args, str(tmp_path / "straight"))

    out = tmp_path / "killed"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    # 0.2 s more per step: the kill lands within a step of step 4 on any CPU, not at an epoch's end or past step 40
    proc = subprocess.Popen([*launcher, *args, str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                            STEP_DELAY_ENV: "0.2"})
    try:
        deadline = time.time() + 600
        while not (out / "checkpoints" / "step-00000004" / "progress.json").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.02)
        victim = next(pid for pid in _children(proc.pid) if _rank_of(pid) == 1)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.perf_counter()
        log = proc.communicate(timeout=120)[0]
        time_to_stop = time.perf_counter() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "exitcode  : -9" in log, log[-3000:]
    # seconds, not the 1800 s collective timeout the survivor would otherwise wait out; 120 s leaves a slow,
    # loaded CPU room (a few seconds here)
    assert time_to_stop < 120, time_to_stop
    assert not (out / "metrics.json").exists()
    checkpoints = ckpt.list_checkpoints(out)
    newest = ckpt.read_progress(checkpoints[-1])["state"]
    assert len(checkpoints) == 2 and 4 <= newest["global_step"] < 40 and newest["batches_done"] > 0  # mid-epoch
    print(f"time to stop after kill -9 of rank 1: {time_to_stop:.2f} s (newest checkpoint: step "
          f"{newest['global_step']})")

    _flip_a_byte(checkpoints[-1] / "model.safetensors")
    resumed = accelerate_launch(*args, str(out), "--resume-from", "auto")
    text = squash(resumed.stdout)
    assert squash(f"skipping checkpoint {checkpoints[-1]}: model.safetensors does not match its sha256") in text, text
    assert squash(f"resumed from {checkpoints[-2]}") in text
    assert read_predictions(out / "predictions.csv") == read_predictions(tmp_path / "straight" / "predictions.csv")
    a, b = read_json(tmp_path / "straight" / "metrics.json"), read_json(out / "metrics.json")
    assert a["eval_loss"] == b["eval_loss"] and a["global_step"] == b["global_step"] == 40


# ---------------------------------------------------------------- 5. exact evaluation, world sizes x eval sizes


@pytest.fixture(scope="module")
def eval_matrix(tiny_bert, data_dir, tmp_path_factory):
    """One process group per world size, each evaluating every size (eval_matrix_driver.SIZES)."""
    from accelerate import Accelerator

    results = {1: {int(n): r for n, r in eval_matrix_driver.evaluate_sizes(Accelerator(cpu=True), tiny_bert,
                                                                           data_dir).items()}}
    folder = tmp_path_factory.mktemp("matrix")
    for world in (2, 3):
        accelerate_launch("tests/eval_matrix_driver.py", tiny_bert, data_dir, str(folder / f"{world}.json"),
                          num_processes=world, env={"ACCELERATE_USE_CPU": "true"})
        results[world] = {int(n): r for n, r in read_json(folder / f"{world}.json").items()}
    return results


@pytest.fixture(scope="module")
def row_by_row(tiny_bert, data_dir):
    """Each eval row scored alone, without padding: the reference the batched results must equal."""
    from transformers import AutoModelForSequenceClassification

    from toolkit.data.dataset import build_splits, tokenize
    from toolkit.engine.model import load_tokenizer

    tokenizer = load_tokenizer(tiny_bert)
    _, eval_ds = build_splits(DataConfig(task="imdb-subset", data_dir=data_dir, train_samples=8,
                                         eval_samples=max(eval_matrix_driver.SIZES)), log=lambda *a: None)
    rows = tokenize(eval_ds, tokenizer, 48)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    with torch.no_grad():
        preds = [int(model(input_ids=torch.tensor([r["input_ids"]])).logits.argmax()) for r in rows]
    return preds, list(rows["labels"])


@pytest.mark.parametrize("size", eval_matrix_driver.SIZES)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_is_exact_for_every_world_size_and_eval_size(eval_matrix, row_by_row, world, size):
    got = eval_matrix[world][size]
    preds, labels = row_by_row
    assert got["world_size"] == world
    assert got["index"] == list(range(size))  # every row exactly once
    assert got["labels"] == labels[:size]
    assert got["preds"] == eval_matrix[1][size]["preds"] == preds[:size]
    assert got["accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds[:size], labels[:size])) / size)
    assert got["eval_loss"] == pytest.approx(eval_matrix[1][size]["eval_loss"], rel=1e-5)
    if size == max(eval_matrix_driver.SIZES):
        assert len(set(preds[:size])) == 2  # the model predicts both classes: a wrong order would show


# ---------------------------------------------------------------- issue 19. Ctrl-C: a stop request, exit 130


def test_ctrl_c_is_a_stop_request_and_a_second_one_quits_at_once(monkeypatch):
    """os.kill runs this process's handler before it returns, so these checks are sequential."""
    from toolkit.backends import preemption

    now = [1000.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: now[0])
    before = signal.getsignal(signal.SIGINT)
    with preemption.StopRequest() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() and stop.interrupted() and stop.reason() == "Ctrl-C"
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. a launcher's, after the Ctrl-C: still an interrupt
        now[0] += preemption.SAME_CTRL_C_S / 2
        os.kill(os.getpid(), signal.SIGINT)  # the same keypress, passed on by a launcher
        assert stop.reason() == "Ctrl-C"
        now[0] += preemption.SAME_CTRL_C_S
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # outside training, Ctrl-C interrupts at once again


def _launcher(world: int) -> list[str]:
    if world == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(world),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port())]


@pytest.mark.parametrize("world", [1, 2])
def test_ctrl_c_checkpoints_every_rank_at_one_step_exits_130_and_resumes_exactly(world, tiny_bert, data_dir, tmp_path):
    """A real SIGINT to the process group a terminal signals (under accelerate launch: the launcher's, whose
    agent passes it on), pressed by tests/sigint_driver.py during step 3, so it lands mid-training on any
    machine. The resumed run must give the uninterrupted run's predictions."""
    args = train_args(tiny_bert, data_dir, None, "--lr", "1e-3", "--epochs", "2", "--log-every", "100")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def train(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
        # a session of its own: the driver's Ctrl-C reaches this run's processes only
        return subprocess.run([*_launcher(world), script, *extra, *args, "--output-dir", str(out)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600, start_new_session=True)

    straight = train("launch/train.py", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "interrupted"
    stopped = train("tests/sigint_driver.py", out, "3")
    text = squash(stopped.stdout + stopped.stderr)
    assert stopped.returncode == 130, (stopped.stdout + stopped.stderr)[-3000:]
    assert "Traceback" not in text
    checkpoints = ckpt.list_checkpoints(out)
    assert len(checkpoints) == 1  # one save, by all ranks together: they stopped at the same step
    state = ckpt.read_progress(checkpoints[0])["state"]
    # the driver's own rank asks from step 4 on; under the launcher another rank may see the Ctrl-C first
    assert state["global_step"] in ((4,) if world == 1 else (3, 4)) and state["world_size"] == world
    assert text.count(squash(f"stop requested (Ctrl-C): checkpointing at step {state['global_step']}")) == 1
    assert squash(f"interrupted: checkpoint saved at step {state['global_step']}; to continue, run the same command "
                  f"with --output-dir {out} --resume-from auto") in text
    assert not (out / "metrics.json").exists() and not (out / "model").exists()

    resumed = train("launch/train.py", out, "--resume-from", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert squash(f"resumed from {checkpoints[0]}") in squash(resumed.stdout)
    assert read_predictions(out / "predictions.csv") == read_predictions(tmp_path / "straight" / "predictions.csv")
    a, b = read_json(tmp_path / "straight" / "metrics.json"), read_json(out / "metrics.json")
    assert a["eval_loss"] == b["eval_loss"] and a["global_step"] == b["global_step"] == 24 // world
