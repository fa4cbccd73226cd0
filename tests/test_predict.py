"""predict.py with a model trained here (real MiniLM, real IMDb rows): one label per text, the
same labels the run's own evaluation gave, and one clear error for every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from conftest import ROOT, read_json, read_predictions

from toolkit.cli import run
from toolkit.core.config import DataConfig, TrainConfig, parse_args
from toolkit.data.dataset import build_splits
from toolkit.predict import PredictConfig
from toolkit.predict import main as predict_main
from toolkit.train import main as train_main

DATA = dict(task="imdb-subset", train_samples=32, eval_samples=24, max_length=48)
TEXTS = ["A wonderful, moving film with a superb cast.", "", "Dull, predictable and far too long.", "I loved it."]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, minilm, data_dir):
    out = tmp_path_factory.mktemp("predict") / "run"
    cfg = parse_args(TrainConfig, ["--model", minilm, "--data-dir", data_dir, "--freeze", "last1", "--lr", "3e-4",
                                   "--batch-size", "16", "--cpu", "--output-dir", str(out),
                                   *[f"--{k.replace('_', '-')}={v}" for k, v in DATA.items()]])
    assert train_main(cfg) == 0
    return out


def predict(argv, capsys):
    code = run(predict_main, PredictConfig, "predict", argv)
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())


def test_one_label_per_text_from_a_text_file(trained, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    code, out, err = predict(["--model", str(trained), "--input", str(tmp_path / "in.txt"), "--cpu"], capsys)
    assert code == 0 and "skipped 1 blank text" in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 2, 3]  # line numbers, so results join back to the input
    assert [r["text"] for r in rows] == [TEXTS[0], TEXTS[2], TEXTS[3]]
    for r in rows:
        assert r["label"] == ("negative", "positive")[r["label_id"]] and 0.5 <= r["probability"] <= 1.0


def test_labels_match_the_runs_own_evaluation(trained, data_dir, tmp_path, capsys):
    _, eval_ds = build_splits(DataConfig(data_dir=data_dir, **DATA), log=lambda *a: None)
    pd.DataFrame({"review": eval_ds["text"]}).to_json(tmp_path / "eval.jsonl", orient="records", lines=True)
    code, _, _ = predict(["--model", str(trained / "model"), "--input", str(tmp_path / "eval.jsonl"), "--text-column",
                          "review", "--batch-size", "5", "--output", str(tmp_path / "out.csv"), "--cpu"], capsys)
    assert code == 0
    got = pd.read_csv(tmp_path / "out.csv")
    want = [pred for _, _, pred in read_predictions(trained / "predictions.csv")]
    assert list(got["index"]) == list(range(len(want)))
    # Other batch shapes change logits by float rounding only: a label may differ only at a coin toss.
    differ = got[got["label_id"] != want]
    assert (differ["probability"] < 0.5 + 1e-4).all(), differ
    assert read_json(trained / "config.json")["resolved"]["max_length"] == 48  # predict truncated the same way


def test_stdin_to_stdout_through_the_command_line(trained):
    proc = subprocess.run([sys.executable, "launch/predict.py", "--model", str(trained), "--cpu"], cwd=ROOT,
                          input="great fun\nawful\n", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["great fun", "awful"] and all(r["label"] for r in rows)


def _unfinished_run(trained, tmp_path):
    run_dir = tmp_path / "unfinished"
    run_dir.mkdir()
    shutil.copy(trained / "config.json", run_dir / "config.json")
    return str(run_dir)


BAD = {
    "missing model": (lambda t, d: ["--model", str(d / "none"), "--input", d / "ok.txt"], "model folder not found",
                      "run folder"),
    "unfinished run": (lambda t, d: ["--model", _unfinished_run(t, d), "--input", d / "ok.txt"],
                       "neither model/ nor a checkpoint", "train it again"),
    "empty file": (lambda t, d: ["--model", t, "--input", d / "empty.txt"], "empty.txt is empty", "one text per line"),
    "only blank lines": (lambda t, d: ["--model", t, "--input", d / "blank.txt"], "all blank", "one text per line"),
    "missing input": (lambda t, d: ["--model", t, "--input", d / "nope.txt"], "input file not found", "--input"),
    "wrong column": (lambda t, d: ["--model", t, "--input", d / "t.csv"], "has no column 'text'", "--text-column"),
    "unknown input type": (lambda t, d: ["--model", t, "--input", d / "x.docx"], "unsupported input type", ".csv"),
    "unknown output type": (lambda t, d: ["--model", t, "--input", d / "ok.txt", "--output", d / "o.xlsx"],
                            "unsupported output type", ".jsonl"),
    "zero batch": (lambda t, d: ["--model", t, "--input", d / "ok.txt", "--batch-size", "0"],
                   "--batch-size 0 is out of range", "--batch-size >= 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_error(case, trained, tmp_path, capsys):
    (tmp_path / "ok.txt").write_text("fine\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "x.docx").write_text("hi")
    pd.DataFrame({"review": ["good"]}).to_csv(tmp_path / "t.csv", index=False)
    make, problem, fix = BAD[case]
    code, out, err = predict([str(a) for a in make(trained, tmp_path)], capsys)
    assert code == 2 and problem in err and "fix:" in err and fix in err.split("fix:")[1], err
    assert out == "" and "Traceback" not in err and not (tmp_path / "o.xlsx").exists()
