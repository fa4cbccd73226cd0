"""Every bad input ends in one clear message (problem + fix), exit status 2, before
training starts and without leaving anything that looks like a run or a checkpoint."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import python

from toolkit.cli import run
from toolkit.core.config import DataConfig, EvalConfig, TrainConfig
from toolkit.data.dataset import build_splits
from toolkit.evaluate import main as evaluate_main
from toolkit.train import main as train_main


def write(path, **columns):
    pd.DataFrame(columns).to_parquet(path)
    return str(path)


def train(argv, capsys):
    code = run(train_main, TrainConfig, "train", argv)
    return code, capsys.readouterr().err


@pytest.fixture
def good(tmp_path):
    texts = ["a fine film", "a dreadful film", "loved every minute", "boring and long"] * 4
    return write(tmp_path / "good.parquet", text=texts, label=[1, 0, 1, 0] * 4)


def base(minilm, tmp_path, *extra):
    return ["--model", minilm, "--output-dir", str(tmp_path / "out"), "--cpu", "--max-length", "32", *extra]


CASES = {
    "missing file": (lambda d, g: ["--train-file", str(d / "nope.parquet")], "data file not found", "--train-file"),
    "missing folder": (lambda d, g: ["--data-dir", str(d / "nowhere")], "data folder not found", "--data-dir"),
    "folder without the split": (lambda d, g: ["--data-dir", str(d)], "no 'train' file", "--train-file"),
    "unknown freeze": (lambda d, g: ["--train-file", g, "--freeze", "bottom3"], "unknown freeze policy 'bottom3'",
                       "last2"),
    "lastN too large": (lambda d, g: ["--train-file", g, "--freeze", "last7"], "asks for 7 blocks but this model has 6",
                        "last1..last6"),
    "unknown task": (lambda d, g: ["--task", "yelp"], "unknown task 'yelp'", "imdb-subset"),
    "missing text column": (lambda d, g: ["--train-file", g, "--text-column", "review"], "no column(s) ['review']",
                            "--text-column"),
    "missing label column": (lambda d, g: ["--train-file", g, "--label-column", "sentiment"],
                             "no column(s) ['sentiment']", "--label-column"),
    "labels out of range": (lambda d, g: ["--train-file", write(d / "l.parquet", text=["x", "y", "z"], label=[0, 1, 2]),
                                          "--num-labels", "2"],
                            "labels outside 0..1", "--num-labels"),
    "all texts empty": (lambda d, g: ["--train-file", write(d / "e.parquet", text=["", "  ", None, ""],
                                                            label=[0, 1, 0, 1])],
                        "all 4 train texts are empty or null", "text column"),
    "bad max length": (lambda d, g: ["--train-file", g, "--max-length", "4096"], "outside 8..512", "up to 512"),
    "cache with frozen dropout": (lambda d, g: ["--train-file", g, "--freeze", "head", "--cache-frozen",
                                                "--frozen-dropout"],
                                  "--frozen-dropout cannot apply", "drop one of the two flags"),
    "unsupported file": (lambda d, g: ["--train-file", str((d / "x.txt").write_text("hi") and d / "x.txt")],
                         "unsupported file type", ".parquet"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(case, tmp_path, minilm, good, capsys):
    make, problem, fix = CASES[case]
    code, err = train(base(minilm, tmp_path) + make(tmp_path, good), capsys)
    assert code == 2
    assert problem in err and "fix:" in err and fix in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), "nothing may be written for a run that never started"


def test_model_not_on_disk_and_no_hub(tmp_path, good, capsys):
    code, err = train(["--model", "bert-base-cased", "--train-file", good, "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "could not load model 'bert-base-cased'" in err and "--model /path/to/folder" in err
    code, err = train(["--model", str(tmp_path / "no-such-model"), "--train-file", good], capsys)
    assert code == 2 and "model folder not found" in err


def test_dataset_from_hub_without_access_names_data_dir(minilm, tmp_path, capsys):
    code, err = train(base(minilm, tmp_path, "--task", "imdb-subset"), capsys)
    assert code == 2 and "could not load 'stanfordnlp/imdb'" in err and "--data-dir" in err


def test_evaluate_missing_model(tmp_path, capsys):
    code = run(evaluate_main, EvalConfig, "eval", ["--model", str(tmp_path / "none")])
    assert code == 2 and "model folder not found" in capsys.readouterr().err


def test_empty_texts_are_dropped_with_a_count(tmp_path):
    path = write(tmp_path / "some-empty.parquet", text=["good", "", None, "bad", "  ", "fine"] * 2, label=[1, 0, 1, 0,
                                                                                                           1, 1] * 2)
    messages = []
    train, evals = build_splits(DataConfig(train_file=path, eval_samples=2), log=messages.append)
    assert len(train) + len(evals) == 6
    assert any("dropped 6 of 12 rows" in m for m in messages)
    assert "" not in list(train["text"]) + list(evals["text"])


def test_real_exit_status_from_the_command_line(tmp_path, minilm):
    proc = python("launch/train.py", "--model", minilm, "--freeze", "lastx", "--output-dir", str(tmp_path / "o"),
                  check=False)
    assert proc.returncode == 2
    assert "unknown freeze policy 'lastx'" in proc.stderr and "fix:" in proc.stderr
