"""Every bad input ends in one clear message (problem + fix), exit status 2, before
training starts and without leaving anything that looks like a run or a checkpoint."""

from __future__ import annotations

import dataclasses
import math
from typing import get_type_hints

import pandas as pd
import pytest
import torch
from conftest import MODULES_AT_EXIT, python

from toolkit.cli import run
from toolkit.compare import CompareConfig
from toolkit.compare import main as compare_main
from toolkit.core.config import DataConfig, EvalConfig, PrepareConfig, TrainConfig
from toolkit.core.errors import ToolkitError
from toolkit.data.dataset import build_splits
from toolkit.evaluate import main as evaluate_main
from toolkit.predict import PredictConfig
from toolkit.predict import main as predict_main
from toolkit.prepare import main as prepare_main
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
    # issue 19: these ended in a traceback, an empty folder, or a run that "finished" without training
    "zero batch size": (lambda d, g: ["--train-file", g, "--batch-size", "0"], "--batch-size 0 is out of "
                                                                               "range", ">= 1"),
    "negative lr": (lambda d, g: ["--train-file", g, "--lr", "-1"], "--lr -1.0 is out of range", "> 0"),
    "zero epochs": (lambda d, g: ["--train-file", g, "--epochs", "0"], "--epochs 0 is out of range", ">= 1"),
    "resume from nowhere": (lambda d, g: ["--train-file", g, "--resume-from", str(d / "no" / "such")],
                            "no complete checkpoint", "'auto'"),
    "one class": (lambda d, g: ["--train-file", write(d / "one.parquet", text=["good", "fine", "nice", "great"] * 4,
                                                      label=[1] * 16)],
                  "are all one class, 1", "--allow-one-class"),
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


def squash(text: str) -> str:
    """Without whitespace: rich wraps long lines to the console width."""
    return "".join(text.split())


# ---------------------------------------------------------------- issue 19: every option's range, at parse time

COMMANDS = {"train": (train_main, TrainConfig, []), "evaluate": (evaluate_main, EvalConfig, ["--model", "nowhere"]),
            "predict": (predict_main, PredictConfig, ["--model", "nowhere"]),
            "compare": (compare_main, CompareConfig, []),
            "prepare_data": (prepare_main, PrepareConfig, [])}


def numeric_options(cls: type):
    """(field name, int or float, its Range) for every numeric field, nested configs (--data options) included."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from numeric_options(kind)
            continue
        base = next(t for t in getattr(kind, "__args__", (kind,)) if t is not type(None))
        if base in (int, float):
            yield f.name, base, f.metadata.get("range")


def outside(kind: type, allowed) -> list:
    """Values just outside the range at each end it has, and for a float NaN and infinity."""
    values = []
    if allowed.low is not None:
        values.append(allowed.low if allowed.low_open else allowed.low - (1 if kind is int else 0.5))
    if allowed.high is not None:
        values.append(allowed.high if allowed.high_open else allowed.high + (1 if kind is int else 0.5))
    return [kind(v) for v in values] + ([math.nan, math.inf] if kind is float else [])


def test_every_numeric_option_has_a_range():
    for command, (_, cls, _) in COMMANDS.items():
        missing = [name for name, _, allowed in numeric_options(cls) if allowed is None]
        assert not missing, f"{command}: numeric options without a range: {missing}"
        assert all(outside(kind, allowed) for _, kind, allowed in numeric_options(cls))


OUT_OF_RANGE = [(command, name, value) for command, (_, cls, _) in COMMANDS.items()
                for name, kind, allowed in numeric_options(cls) if allowed is not None
                for value in outside(kind, allowed)]


@pytest.mark.parametrize("command, name, value", OUT_OF_RANGE,
                         ids=[f"{c}--{n.replace('_', '-')}={v}" for c, n, v in OUT_OF_RANGE])
def test_an_option_out_of_range_is_one_error_before_anything_runs(command, name, value, tmp_path, capsys):
    main, cls, required = COMMANDS[command]
    flag, out = "--" + name.replace("_", "-"), tmp_path / "out"
    where = {"predict": ["--output", str(out / "p.csv")], "prepare_data": ["--cache-dir", str(out)]}.get(
        command, ["--output-dir", str(out)])
    # a model that does not exist: had anything been loaded before the check, the error would be another
    argv = ["--model", str(tmp_path / "no-model"), *required[2:], *where, flag, str(value)]
    code = run(main, cls, command, argv)
    err = squash(capsys.readouterr().err)
    assert code == 2, err
    assert "error:" in err and "fix:" in err and "Traceback" not in err
    assert squash(f"{flag} {value!r} is out of range") in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- issue 19: one-class data, failed starts, class names


def test_one_class_training_labels_need_both_a_declared_label_space_and_the_override(tmp_path):
    one = write(tmp_path / "one.parquet", text=["good", "fine", "nice", "great"] * 4, label=["pos"] * 16)
    for refused in (DataConfig(train_file=one), DataConfig(train_file=one, allow_one_class=True),
                    DataConfig(train_file=one, label_names=["neg", "pos"])):
        with pytest.raises(ToolkitError, match="are all one class, 'pos'") as err:
            build_splits(refused, log=lambda *a: None)
        assert "--allow-one-class" in err.value.fix and "--label-names" in err.value.fix
    cfg = DataConfig(train_file=one, label_names=["neg", "pos"], allow_one_class=True)
    build_splits(cfg, log=lambda *a: None)
    assert cfg.num_labels == 2 and cfg.label_names == ["neg", "pos"]
    # scoring only (evaluate): the training rows just fix the split, one class is fine there
    build_splits(DataConfig(train_file=one, label_names=["neg", "pos"]), log=lambda *a: None, training=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm):
    """Random 2-block BERTs with MiniLM's tokenizer, one per class count: these checks need no learning."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    folders = {}
    for labels in (2, 4):
        folders[labels] = str(tmp_path_factory.mktemp(f"tiny{labels}"))
        torch.manual_seed(0)
        BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=64, num_labels=labels)
                                      ).save_pretrained(folders[labels])
        tokenizer.save_pretrained(folders[labels])
    return folders


@pytest.mark.parametrize("failure, code", [(ToolkitError("the tracker broke", "mend it"), 2),
                                           (KeyboardInterrupt(), 130), (RuntimeError("a bug"), None)])
def test_a_start_that_fails_before_the_first_step_leaves_the_disk_as_it_was(failure, code, tiny, good, tmp_path,
                                                                            monkeypatch, capsys):
    from toolkit.output import trackers as tracking

    written = []

    # late: the model is wrapped, config.json written
    def failing(accelerator, run_log, trackers, out, *args, **kwargs):
        written.append((out / "config.json").is_file())
        raise failure

    monkeypatch.setattr(tracking, "start", failing)
    argv = ["--model", tiny[2], "--train-file", good, "--cpu", "--max-length", "32", "--max-steps", "2"]

    def attempt(out):
        if code is None:
            with pytest.raises(RuntimeError, match="a bug"):
                run(train_main, TrainConfig, "train", [*argv, "--output-dir", str(out)])
        else:
            assert run(train_main, TrainConfig, "train", [*argv, "--output-dir", str(out)]) == code
        err = squash(capsys.readouterr().err)
        assert written.pop() is True and "Traceback" not in err
        assert {2: "thetrackerbroke", 130: "interrupted(Ctrl-C)", None: ""}[code] in err, err

    attempt(tmp_path / "new" / "deeper" / "run")
    assert not (tmp_path / "new").exists(), "every folder the run created goes"
    old = tmp_path / "old"
    old.mkdir()
    for name, text in (("config.json", "{}"), ("metrics.json", "{}"), ("notes.txt", "mine")):
        (old / name).write_text(text)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    attempt(old)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_per_class_metric_rows_show_the_class_names(tiny, tmp_path, capsys):
    names = ["books", "music", "film", "games"]
    four = write(tmp_path / "four.parquet", text=[f"a {n} review, number {i}" for i in range(8) for n in names],
                 label=names * 8)
    out = tmp_path / "run"
    assert run(train_main, TrainConfig, "train", ["--model", tiny[4], "--train-file", four, "--output-dir", str(out),
                                                  "--cpu", "--max-length", "32", "--max-steps", "1", "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert run(evaluate_main, EvalConfig, "evaluate", ["--model", str(out), "--same-data", "--cpu",
                                                       "--output-dir", str(tmp_path / "eval")]) == 0
    scored = capsys.readouterr().out
    for table in (shown, scored):
        for name in names:
            for metric in ("precision", "recall", "f1"):
                assert f"{metric}[{name}]" in table, table


# ---------------------------------------------------------------- issue 20: the learning-rate search


@pytest.fixture
def four_rows_per_class(tmp_path):
    return write(tmp_path / "small.parquet", text=[f"review {i}" for i in range(8)], label=[0, 1] * 4)


SEARCH_CASES = {
    "no validation split": ([], "there is none", "--validation-fraction"),
    "lr and lr search": (["--validation-fraction", "0.5", "--lr", "3e-4"], "which one would decide", "drop --lr"),
    "empty grid": (["--validation-fraction", "0.5", "--lr-grid", "none="], "--lr-grid 'none=' is empty", "lora=1e-3"),
    "zero rate": (["--validation-fraction", "0.5", "--lr-grid", "none=0,1e-3"], "0 is not a positive rate", "> 0"),
    "negative rate": (["--validation-fraction", "0.5", "--lr-grid", "none=-1e-3"], "-0.001 is not a positive rate",
                      "> 0"),
    "grid of an unlisted policy": (["--validation-fraction", "0.5", "--lr-grid", "lora=1e-3"],
                                   "names policy 'lora', which --policies does not list", "none"),
    "a class empty in validation": (["--validation-fraction", "0.1"], "leaves class 0 with 0 of its 3",
                                    "--validation-fraction"),
    "a class empty in training": (["--validation-fraction", "0.9"], "leaves class 0 with 3 of its 3",
                                  "--validation-fraction"),
    "unwritable study storage": (["--validation-fraction", "0.5", "--study-storage", "{tmp}/small.parquet/s.journal"],
                                 "cannot be written", "--study-storage"),
}


@pytest.mark.parametrize("case", SEARCH_CASES, ids=list(SEARCH_CASES))
def test_a_bad_search_is_one_error_and_writes_nothing(case, four_rows_per_class, tmp_path, capsys):
    extra, problem, fix = SEARCH_CASES[case]
    before = sorted(tmp_path.iterdir())
    argv = ["--model", str(tmp_path / "no-model"), "--train-file", four_rows_per_class, "--eval-samples", "2",
            "--policies", "none", "--lr-search", "--cpu", "--output-dir", str(tmp_path / "out"),
            *[e.replace("{tmp}", str(tmp_path)) for e in extra]]
    code = run(compare_main, CompareConfig, "compare", argv)
    err = squash(capsys.readouterr().err)
    assert code == 2, err
    assert squash(problem) in err and "fix:" in err and squash(fix) in err.split("fix:", 1)[1], err
    assert "Traceback" not in err and sorted(tmp_path.iterdir()) == before


def test_search_options_without_the_search_are_refused(tmp_path, capsys):
    code = run(compare_main, CompareConfig, "compare", ["--model", str(tmp_path / "m"), "--lr-grid", "none=1e-4",
                                                        "--output-dir", str(tmp_path / "out")])
    assert code == 2 and "add --lr-search" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--no-score-test", "--pause-at-step"])
def test_scoring_only_the_validation_split_needs_one(flag, good, tmp_path, capsys):
    code, err = train(base(str(tmp_path / "m"), tmp_path, "--train-file", good, flag,
                           *(["2"] if flag == "--pause-at-step" else [])), capsys)
    assert code == 2 and f"{flag} scores the validation split, and there is none" in err
    assert "--validation-fraction" in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- issue 21: compare's workers

def test_compare_started_as_several_processes_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what accelerate launch / torchrun / srun give every process
    code = run(compare_main, CompareConfig, "compare", ["--model", str(tmp_path / "m"), "--output-dir",
                                                        str(tmp_path / "out")])
    err = squash(capsys.readouterr().err)
    assert code == 2 and squash("was started as several processes") in err and "--processes-per-run" in err
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_the_workers_cannot_lock_is_refused_before_any_run(good, tmp_path, capsys):
    before = sorted(tmp_path.iterdir())
    code = run(compare_main, CompareConfig, "compare", ["--model", str(tmp_path / "m"), "--train-file", good,
                                                        "--cpu", "--output-dir", str(tmp_path / "good.parquet" / "o")])
    err = squash(capsys.readouterr().err)
    assert code == 2 and squash("the workers' folder") in err and squash("cannot be written") in err
    assert "fix:" in err and "Traceback" not in err and sorted(tmp_path.iterdir()) == before


LAUNCH_SCRIPTS = ["train", "evaluate", "predict", "compare", "prepare_data", "bundle"]


@pytest.mark.parametrize("args", [["--help"], ["--no-such-option"], ["--max-length", "0"]],
                         ids=["help", "unknown option", "out of range"])
def test_help_and_a_bad_option_answer_before_torch_loads(args, tmp_path):
    """--help and a bad flag or range answer at once: the command's module (torch, transformers, datasets:
    10-20 s to import on a small CPU) loads only after its options parse."""
    for script in LAUNCH_SCRIPTS:
        argv = ["--python-version", "three"] if script == "bundle" and args[0] == "--max-length" else args
        proc = python("-c", MODULES_AT_EXIT, f"launch/{script}.py", *argv, "--output-dir", str(tmp_path / script),
                      check=False)
        code = 0 if args == ["--help"] else 2
        assert f"exit {code} loaded []" in proc.stdout, (script, proc.stdout[-500:], proc.stderr[-2000:])
    assert not list(tmp_path.iterdir())
