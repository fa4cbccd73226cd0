"""End-to-end: a real 2-process gloo run of MiniLM on real IMDb reviews, then checks of
what it learned, what it left frozen, and that its predictions are exact."""

from __future__ import annotations

import pytest
import torch
from conftest import MODULES_AT_EXIT, accelerate_launch, python, read_json, read_predictions
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, pipeline

from toolkit.core.config import DataConfig
from toolkit.data.dataset import build_splits

EVAL_ROWS = 101  # odd, and not a multiple of 2 x eval batch: the last batch is uneven on 2 ranks
TRAIN_ARGS = ["--task", "imdb-subset", "--train-samples", "640", "--eval-samples", str(EVAL_ROWS),
              "--max-length", "128", "--batch-size", "8", "--eval-batch-size", "16", "--lr", "3e-4",
              "--seed", "0", "--log-every", "5", "--freeze", "last2", "--cpu"]


@pytest.fixture(scope="module")
def run_2proc(tmp_path_factory, minilm, data_dir):
    out = tmp_path_factory.mktemp("run2") / "run"
    proc = accelerate_launch("launch/train.py", "--model", minilm, "--data-dir", data_dir, *TRAIN_ARGS,
                             "--output-dir", str(out))
    return out, proc


def test_two_processes_form_one_group_and_write_every_output(run_2proc):
    out, proc = run_2proc
    metrics = read_json(out / "metrics.json")
    assert metrics["world_size"] == 2
    for key in ("f1", "accuracy", "precision", "recall", "eval_loss", "train_runtime_s", "train_samples_per_s",
                "eval_runtime_s", "eval_samples_per_s", "trainable_params", "total_params", "world_size", "freeze"):
        assert key in metrics, key
    assert metrics["freeze"] == "last2" and metrics["train_samples"] == 640
    assert metrics["trainable_params"] == 3_697_538 and metrics["total_params"] == 22_713_986
    config = read_json(out / "config.json")
    assert config["lr"] == 3e-4 and config["data"]["eval_samples"] == EVAL_ROWS
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["max_length"] == 128
    rows = read_predictions(out / "predictions.csv")
    assert [r[0] for r in rows] == list(range(EVAL_ROWS))
    log = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(log) == 8  # 640 rows / (8 x 2 ranks) = 40 steps, logged every 5
    assert (out / "model" / "model.safetensors").exists()
    assert list((out / "checkpoints").glob("step-*/progress.json"))
    # the freeze table was printed once (rank 0 only)
    assert proc.stdout.count("freeze policy: last2") == 1


def untrained_predictions(minilm: str, texts: list[str]) -> list[int]:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm)
    with torch.no_grad():
        enc = tok(texts, truncation=True, max_length=128, padding=True, return_tensors="pt")
        return model(**enc).logits.argmax(-1).tolist()


@pytest.fixture(scope="module")
def eval_texts(data_dir):
    _, eval_ds = build_splits(DataConfig(task="imdb-subset", data_dir=data_dir, train_samples=640,
                                         eval_samples=EVAL_ROWS), log=lambda *a: None)
    return list(eval_ds["text"]), list(eval_ds["labels"])


def test_training_learns_sentiment(run_2proc, minilm, eval_texts):
    from sklearn.metrics import f1_score

    out, _ = run_2proc
    metrics = read_json(out / "metrics.json")
    texts, labels = eval_texts
    untrained_f1 = f1_score(labels, untrained_predictions(minilm, texts))
    assert metrics["f1"] >= untrained_f1 + 0.1, (metrics["f1"], untrained_f1)
    assert metrics["accuracy"] >= 0.65
    # F1 in metrics.json is recomputable from predictions.csv
    rows = read_predictions(out / "predictions.csv")
    assert [r[1] for r in rows] == labels
    assert f1_score([r[1] for r in rows], [r[2] for r in rows]) == pytest.approx(metrics["f1"], abs=1e-12)


def test_frozen_parameters_bit_identical_trainable_changed(run_2proc, minilm):
    out, _ = run_2proc
    trained = load_file(out / "model" / "model.safetensors")
    pretrained = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2).state_dict()
    trainable_markers = ("encoder.layer.4.", "encoder.layer.5.", "pooler", "classifier")
    checked_frozen = 0
    for name, before in pretrained.items():
        if name.startswith("classifier"):
            continue  # freshly initialised head: nothing to compare against
        after = trained[name]
        if any(m in name for m in trainable_markers):
            assert not torch.equal(before, after), f"{name} should have been trained"
        else:
            assert torch.equal(before, after), f"{name} is frozen but changed"
            checked_frozen += 1
    assert checked_frozen > 60


def test_one_process_evaluation_reproduces_predictions(run_2proc, minilm, data_dir, tmp_path):
    out, _ = run_2proc
    ev = tmp_path / "eval"
    python("launch/evaluate.py", "--model", str(out / "model"), "--task", "imdb-subset", "--data-dir", data_dir,
           "--train-samples", "640", "--eval-samples", str(EVAL_ROWS), "--max-length", "128",
           "--eval-batch-size", "16", "--output-dir", str(ev), "--cpu")
    assert read_predictions(ev / "predictions.csv") == read_predictions(out / "predictions.csv")
    assert read_json(ev / "metrics.json")["f1"] == read_json(out / "metrics.json")["f1"]
    assert read_json(ev / "metrics.json")["world_size"] == 1


def test_saved_model_loads_in_pipeline(run_2proc, eval_texts):
    out, _ = run_2proc
    clf = pipeline("text-classification", model=str(out / "model"), device=-1)
    texts, _ = eval_texts
    rows = read_predictions(out / "predictions.csv")
    got = clf(texts[:12], truncation=True, max_length=128)
    names = {"negative": 0, "positive": 1}
    assert [names[g["label"]] for g in got] == [r[2] for r in rows[:12]]


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path, minilm, data_dir):
    args = ["launch/train.py", "--model", minilm, "--data-dir", data_dir, "--task", "imdb-subset",
            "--train-samples", "96", "--eval-samples", "40", "--max-length", "48", "--batch-size", "8",
            "--lr", "3e-4", "--seed", "3", "--freeze", "last2", "--epochs", "2", "--log-every", "100", "--cpu"]
    straight = python("-c", MODULES_AT_EXIT, *args, "--output-dir", str(tmp_path / "straight"))
    # a run without LoRA never loads peft (transformers' schedule module would: a second of every start-up)
    assert "exit 0 loaded ['datasets', 'torch', 'transformers']" in straight.stdout, straight.stdout[-500:]

    stop = tmp_path / "STOP"
    stop.touch()  # present from the start: the run checkpoints after its first step and exits 75
    first = python(*args, "--output-dir", str(tmp_path / "resumed"), "--stop-file", str(stop), check=False)
    assert first.returncode == 75, first.stderr[-3000:]
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    progress = read_json(next((tmp_path / "resumed" / "checkpoints").glob("step-*")) / "progress.json")
    assert progress["state"]["global_step"] == 1 and progress["state"]["batches_done"] == 1
    stop.unlink()
    second = python(*args, "--output-dir", str(tmp_path / "resumed"), "--resume-from", "auto")
    assert "resumed from" in second.stdout
    resumed = read_predictions(tmp_path / "resumed" / "predictions.csv")
    assert resumed == read_predictions(tmp_path / "straight" / "predictions.csv")
    a, b = read_json(tmp_path / "straight" / "metrics.json"), read_json(tmp_path / "resumed" / "metrics.json")
    assert a["eval_loss"] == b["eval_loss"] and a["f1"] == b["f1"] and a["global_step"] == b["global_step"] == 24


def test_saved_tokenizer_does_not_depend_on_what_the_run_tokenized(minilm, tmp_path):
    """A run that reused cached tokenization must save the same tokenizer.json as one that tokenized.

    MiniLM's tokenizer.json carries "Fixed 128" padding and transformers leaves each call's
    truncation on the Rust tokenizer; the saved file must record neither.
    """
    from accelerate import Accelerator

    from toolkit.engine.checkpoint import save_model
    from toolkit.engine.model import load_model, load_tokenizer

    accelerator, model = Accelerator(cpu=True), load_model(minilm, 2)
    fresh = load_tokenizer(minilm)
    save_model(accelerator, model, fresh, tmp_path / "fresh")
    used = load_tokenizer(minilm)
    used(["a review, truncated"], truncation=True, max_length=5)
    save_model(accelerator, model, used, tmp_path / "used")
    saved = (tmp_path / "used" / "tokenizer.json").read_text()
    assert saved == (tmp_path / "fresh" / "tokenizer.json").read_text()
    reloaded = load_tokenizer(str(tmp_path / "used"))
    assert reloaded(["one two three four five six"], truncation=True, max_length=4)["input_ids"][0][-1] == 102  # [SEP]
    assert len(reloaded(["one two three four five six"])["input_ids"][0]) == 8  # neither padded nor truncated
