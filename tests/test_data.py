"""Users' own files as they have them: label names, N classes, integral floats, bad files, and the
prepare-once / train-warm cache path. Real files under tests/data/, a real (tiny) BERT classifier."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import python, read_json
from transformers import AutoTokenizer, BertConfig, BertModel, pipeline

from toolkit.cli import run
from toolkit.core.config import DataConfig, TrainConfig
from toolkit.data.dataset import EpochBatchSampler, build_splits, load_data_file
from toolkit.engine.metrics import classification_metrics
from toolkit.train import main as train_main

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny_model(minilm, tmp_path_factory) -> Path:
    """A 2-layer BERT encoder (no head, like a pretrained one) with MiniLM's tokenizer: the label plumbing does
    not need pretrained weights."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return folder


def train(argv: list[str], capsys) -> tuple[int, str]:
    code = run(train_main, TrainConfig, "train", argv)
    return code, capsys.readouterr().err


def tiny_run(model: Path, out: Path, *data: str) -> list[str]:
    return ["--model", str(model), "--output-dir", str(out), "--cpu", "--max-length", "32", "--batch-size", "8",
            "--max-steps", "2", "--lr", "1e-3", "--log-every", "1", *data]


def splits(**kw):
    cfg = DataConfig(**kw)
    train, evals = build_splits(cfg, log=lambda *a: None)
    return cfg, train, evals


# ---------------------------------------------------------------- label names and N classes


def test_string_labels_become_names_the_saved_pipeline_returns(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = train(tiny_run(tiny_model, out, "--train-file", str(DATA / "sentiment.csv"), "--text-column", "review",
                               "--label-column", "sentiment", "--eval-samples", "8"), capsys)
    assert code == 0, err
    config = read_json(out / "model" / "config.json")
    assert config["id2label"] == {"0": "negative", "1": "positive"}  # sorted names
    assert config["label2id"] == {"negative": 0, "positive": 1}
    run_cfg = read_json(out / "config.json")
    assert run_cfg["data"]["num_labels"] is None and run_cfg["data"]["label_names"] is None  # as given
    assert run_cfg["resolved"]["num_labels"] == 2 and run_cfg["resolved"]["label_names"] == ["negative", "positive"]
    metrics = read_json(out / "metrics.json")
    assert metrics["f1_average"] == "binary: class 1" and set(metrics) >= {"f1", "accuracy", "precision", "recall"}
    classify = pipeline("text-classification", model=str(out / "model"), device="cpu")
    answers = classify(["A wonderful film.", "A dreadful film."])
    assert {a["label"] for a in answers} <= {"negative", "positive"} and len(answers) == 2


def test_three_classes_are_inferred_and_scored_per_class(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = train(tiny_run(tiny_model, out, "--train-file", str(DATA / "three_class.jsonl"), "--eval-samples", "9",
                               "--label-names", "neg,neutral,pos"), capsys)
    assert code == 0, err
    config = read_json(out / "model" / "config.json")
    assert config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    metrics = read_json(out / "metrics.json")
    assert metrics["f1_average"].startswith("macro")
    for name in ("neg", "neutral", "pos"):
        assert {f"precision[{name}]", f"recall[{name}]", f"f1[{name}]"} <= set(metrics)
    assert "f1_weighted" in metrics
    # the headline f1 is the macro mean of the per-class F1s
    assert metrics["f1"] == pytest.approx(np.mean([metrics[f"f1[{n}]"] for n in ("neg", "neutral", "pos")]))


def test_n_class_metrics_values():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 2, 0, 2])
    m = classification_metrics(labels, preds, 3, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(6 / 8)
    f1 = {"a": 2 * 0.5 * 0.5 / 1.0, "b": 2 * (2 / 3) * 1 / (2 / 3 + 1), "c": 2 * 1 * 0.75 / 1.75}
    assert m["f1[a]"] == pytest.approx(f1["a"]) and m["f1[b]"] == pytest.approx(f1["b"])
    assert m["f1[c]"] == pytest.approx(f1["c"])
    assert m["f1"] == pytest.approx(np.mean(list(f1.values())))
    assert m["f1_weighted"] == pytest.approx((2 * f1["a"] + 2 * f1["b"] + 4 * f1["c"]) / 8)
    binary = classification_metrics(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]), 2)
    assert binary == {"f1": pytest.approx(2 / 3), "accuracy": 0.75, "precision": 1.0, "recall": 0.5}


def test_label_names_order_and_inference():
    cfg, train, evals = splits(train_file=str(DATA / "sentiment.csv"), text_column="review", label_column="sentiment",
                               eval_samples=4)
    assert cfg.label_names == ["negative", "positive"] and cfg.num_labels == 2
    texts = pd.read_csv(DATA / "sentiment.csv").set_index("review")["sentiment"]
    for ds in (train, evals):
        assert all(cfg.label_names[lab] == texts[t] for t, lab in zip(ds["text"], ds["labels"]))
    cfg2, train2, _ = splits(train_file=str(DATA / "sentiment.csv"), text_column="review", label_column="sentiment",
                             eval_samples=4, label_names=["positive", "negative"])
    assert cfg2.label_names == ["positive", "negative"]
    assert list(train2["labels"]) == [1 - lab for lab in train["labels"]]  # same rows, ids swapped
    cfg3, train3, _ = splits(train_file=str(DATA / "three_class.jsonl"), eval_samples=3)
    assert cfg3.num_labels == 3 and cfg3.label_names is None and sorted(set(train3["labels"])) == [0, 1, 2]


def test_integral_float_labels_are_accepted_and_others_refused(tmp_path):
    cfg, train, evals = splits(train_file=str(DATA / "float_labels.csv"), eval_samples=2)
    assert cfg.num_labels == 2 and train.features["labels"].dtype == "int64"
    assert sorted(set(train["labels"]) | set(evals["labels"])) == [0, 1]
    half = tmp_path / "half.csv"
    half.write_text("text,label\na,1.0\nb,0.5\nc,0.0\n")
    with pytest.raises(Exception, match=r"not whole numbers: \[0.5\]"):
        splits(train_file=str(half), eval_samples=1)


def test_eval_file_encoding_option(tmp_path):
    ds = load_data_file(DATA / "latin1.csv", encoding="latin-1", cache_dir=str(tmp_path))
    assert "réussi" in ds["review"][0]


# ---------------------------------------------------------------- bad files: one message, exit 2, nothing written


BAD = {
    "empty file": (["--train-file", str(DATA / "empty.csv")], "is empty", "header and at least one row"),
    "header only": (["--train-file", str(DATA / "header_only.csv")], "has no rows", "add rows"),
    "not UTF-8": (["--train-file", str(DATA / "latin1.csv"), "--text-column", "review", "--label-column", "sentiment"],
                  "is not valid utf-8 text", "--file-encoding"),
    "unknown encoding": (["--train-file", str(DATA / "sentiment.csv"), "--file-encoding", "klingon"],
                         "unknown --file-encoding 'klingon'", "latin-1"),
    "unreadable parquet": (["--train-file", str(DATA / "not_parquet.parquet")], "is not a readable Parquet file",
                           "re-export"),
    "broken JSON": (["--train-file", str(DATA / "broken.jsonl")], "could not read", "JSON Lines"),
    "label nulls": (["--train-file", str(DATA / "null_labels.csv"), "--text-column", "review", "--label-column",
                     "sentiment"],
                    "3 row(s) have no label in column 'sentiment', at row positions [1, 5, 7]", "fill in or remove"),
    "duplicate columns": (["--train-file", str(DATA / "duplicate_columns.csv")], "duplicate column names ['text']",
                          "distinct name"),
    "eval label unseen in train": (["--train-file", str(DATA / "sentiment.csv"), "--eval-file",
                                    str(DATA / "eval_unseen_label.csv"),
                                    "--text-column", "review", "--label-column", "sentiment"],
                                   "eval labels ['mixed'] in column 'sentiment' are not among the training labels",
                                   "same class names"),
    "num labels disagrees": (["--train-file", str(DATA / "sentiment.csv"), "--text-column", "review", "--label-column",
                              "sentiment",
                              "--num-labels", "3"], "--num-labels 3 but the labels name 2 classes", "--num-labels 2"),
    "label names miss a label": (["--train-file", str(DATA / "sentiment.csv"), "--text-column", "review",
                                  "--label-column",
                                  "sentiment", "--label-names", "neg,pos"], "are not in --label-names", "add them"),
    "non-integral labels": (["--train-file", str(DATA / "three_class.jsonl"), "--num-labels", "2"],
                            "labels outside 0..1", "--num-labels"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_is_one_clear_error(case, tiny_model, tmp_path, capsys):
    argv, problem, fix = BAD[case]
    out = tmp_path / "out"
    code, err = train(["--model", str(tiny_model), "--output-dir", str(out), "--cpu", "--max-length", "32", *argv],
                      capsys)
    assert code == 2, err
    err = " ".join(err.split())  # the console wraps long lines
    assert problem in err and "fix:" in err and fix in err, err
    assert "Traceback" not in err and "Failed to read" not in err
    assert not out.exists(), "nothing may be written for a run that never started"


def test_parquet_with_duplicate_column_names(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"]), pa.array([1])], names=["text", "text",
                                                                                                  "label"]), path)
    with pytest.raises(Exception, match=r"duplicate column names \['text'\]"):
        load_data_file(path, cache_dir=str(tmp_path / "c"))


# ---------------------------------------------------------------- columnar batching


def test_sampler_takes_a_numpy_column_and_covers_every_row_once():
    lengths = np.random.default_rng(0).integers(5, 200, size=1003).astype(np.int32)
    for kind in (dict(shuffle=True, group_by_length=True), dict(shuffle=True), dict(shuffle=False,
                                                                                    sort_by_length=True)):
        batches = list(EpochBatchSampler(lengths, 16, 1, **kind))
        rows = np.concatenate(batches)
        assert sorted(rows.tolist()) == list(range(1003)) and all(isinstance(i, int) for i in batches[0])
    grouped = list(EpochBatchSampler(lengths, 16, 1, shuffle=True, group_by_length=True))
    assert max(lengths[grouped[0]]) == lengths.max()  # the longest batch first


# ---------------------------------------------------------------- prepare once, train warm


def cache_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns)
            for f in folder.rglob("*") if f.is_file() and not f.name.endswith(".lock")}


def test_prepare_data_builds_the_cache_the_training_run_reuses(tiny_model, tmp_path, capsys):
    # The CPU node has the tokenizer and config only (no weights), at another path than the training job's.
    tokenizer_only = tmp_path / "tokenizer-only"
    shutil.copytree(tiny_model, tokenizer_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cache = tmp_path / "shared-cache"
    data = ["--train-file", str(DATA / "sentiment.csv"), "--text-column", "review", "--label-column", "sentiment",
            "--eval-samples", "8", "--max-length", "32", "--cache-dir", str(cache)]
    prepared = python("launch/prepare_data.py", "--model", str(tokenizer_only), *data, "--num-proc", "2")
    assert "prepared 16 train / 8 eval examples" in prepared.stdout, prepared.stdout
    before = cache_state(cache)
    tokenized = [f for f in before if "cache-" in f]
    assert len(tokenized) >= 4, before  # text/labels pass + 2 tokenize shards of train + eval ...
    code, err = train(tiny_run(tiny_model, tmp_path / "run", *data), capsys)  # --num-proc defaults to 1 here
    assert code == 0, err
    assert cache_state(cache) == before, "the training run wrote to the cache: it did not reuse the prepared data"
    assert read_json(tmp_path / "run" / "config.json")["resolved"]["train_examples"] == 16
