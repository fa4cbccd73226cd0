"""Trackers, `evaluate` metrics, curves, installed commands and quiet logs, with real components.

One tiny real training (a 2-layer BertConfig model saved with the MiniLM tokenizer, 48 real IMDb
reviews, --max-length 32) logs to TensorBoard, W&B (offline), MLflow (a `file:` store) and trackio
(its local SQLite database) at once, all in tmp; it is then resumed for a second epoch, and every
tracker is read back with its own reader. One real 2-process CPU launch (`accelerate launch -m
toolkit train`) checks the per-rank output and an `evaluate` metric loaded from a local script.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
from conftest import ROOT, accelerate_launch, read_json, read_predictions
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

DATA = ["--task", "imdb-subset", "--train-samples", "48", "--eval-samples", "24", "--max-length", "32",
        "--batch-size", "8", "--lr", "1e-3", "--seed", "0", "--log-every", "2"]
METRIC_SCRIPT = Path(__file__).parent / "metric_scripts" / "numpy_binary"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, minilm) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)  # a backbone only: the classifier head is new at fine-tuning
    tokenizer.save_pretrained(folder)
    return str(folder)


def _module_run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """`python -m toolkit train ...` from a folder outside the checkout (the worktree on PYTHONPATH, as installed)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **env}
    proc = subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_model, data_dir):
    """One epoch logged to all four trackers, then resumed from its checkpoint for a second epoch."""
    tmp = tmp_path_factory.mktemp("tracked")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb-dir"), "WANDB_SILENT": "true",
           # MLflow 3 keeps the file store only on request (it prefers a database); the brief asks for file:
           "MLFLOW_TRACKING_URI": f"file:{tmp / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
           "TRACKIO_DIR": str(tmp / "trackio")}
    (tmp / "wandb-dir").mkdir()
    out = tmp / "run"
    common = ["train", "--model", tiny_model, "--data-dir", data_dir, *DATA, "--output-dir", str(out),
              "--report-to", "tensorboard,wandb,mlflow,trackio", "--run-name", "t13"]
    first = _module_run([*common, "--epochs", "1", "--verbose"], tmp, env)
    ids_first = read_json(out / "trackers.json")
    second = _module_run([*common, "--epochs", "2", "--resume-from", "auto", "--quiet"], tmp, env)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"tmp": tmp, "out": out, "env": env, "ids_first": ids_first, "ids": read_json(out / "trackers.json"),
            "train": [e for e in lines if "loss" in e], "eval": [e for e in lines if "eval_f1" in e],
            "first": first.stdout + first.stderr, "second": second.stdout + second.stderr}


def test_run_log_steps(tracked):
    # 48 rows / batch 8 = 6 steps an epoch, logged every 2; the resumed epoch continues at step 8.
    assert [e["step"] for e in tracked["train"]] == [2, 4, 6, 8, 10, 12]
    assert [(e["epoch"], e["step"]) for e in tracked["eval"]] == [(1, 6), (2, 12)]
    assert tracked["ids"] == tracked["ids_first"], "a resumed run must keep its tracker ids"



def test_verbose_and_quiet_output(tracked):
    # --verbose (first run): the libraries' own reports and the trackers' notices are back.
    assert "trackers: tensorboard, wandb, mlflow, trackio; run name t13" in tracked["first"]
    assert "LOAD REPORT" in tracked["first"] and "Trackio project initialized" in tracked["first"]
    # --quiet (resumed run): the final table only.
    assert "final metrics" in tracked["second"] and "f1" in tracked["second"]
    for shown_by_default in ("world 1 process", "data: 48", "freeze policy", "resumed from", "trackers:",
                             "Trackio project initialized", "Run finished", "epoch 2:"):
        assert shown_by_default not in tracked["second"], shown_by_default


def test_tensorboard_events_hold_the_metrics(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked["out"] / "tensorboard"))
    acc.Reload()
    for key, rows in (("loss", tracked["train"]), ("lr", tracked["train"]), ("eval_f1", tracked["eval"]),
                      ("eval_loss", tracked["eval"])):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in rows], key
        np.testing.assert_allclose([e.value for e in events], [r[key] for r in rows], rtol=1e-6, atol=1e-9)
    assert tracked["train"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # linear decay to 0 over both epochs


def test_mlflow_run_holds_the_metrics_once_resumed(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    client = MlflowClient(tracking_uri=tracked["env"]["MLFLOW_TRACKING_URI"])
    run = client.get_run(tracked["ids"]["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "t13"
    assert run.data.params["lr"] == "0.001" and run.data.params["data.max_length"] == "32"
    for key, rows in (("loss", tracked["train"]), ("eval_f1", tracked["eval"])):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [r["step"] for r in rows], key
        np.testing.assert_allclose([m.value for m in history], [r[key] for r in rows], rtol=1e-6)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == 1, "the resumed run must continue the MLflow run, not start another"


def test_wandb_offline_run_folders(tracked):
    run_id = tracked["ids"]["wandb"]["id"]
    folders = sorted((tracked["tmp"] / "wandb-dir" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2, "one offline folder per process, both of the same run id (they sync into one run)"
    for folder in folders:
        records = (folder / f"run-{run_id}.wandb").read_bytes()
        assert len(records) > 1000 and b"eval_f1" in records and b"loss" in records
    # The hyperparameters (flattened config) go with the first process only: logged once.
    first, resumed = ((f / f"run-{run_id}.wandb").read_bytes() for f in folders)
    assert b"data.max_length" in first and b"data.max_length" not in resumed


def test_trackio_local_database(tracked):
    code = (f"from trackio.sqlite_storage import SQLiteStorage as S; import json; "
            "print(json.dumps([[r['step'], r.get('loss'), r.get('eval_f1')] for r in "
            f"S.get_logs('{tracked['ids']['trackio']['project']}', 't13')]))")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **tracked["env"]}, capture_output=True,
                          text=True, timeout=120, check=True)  # TRACKIO_DIR is read when trackio is imported
    logs = json.loads(proc.stdout.strip().splitlines()[-1])
    loss = {step: value for step, value, _ in logs if value is not None}
    f1 = {step: value for step, _, value in logs if value is not None}
    assert sorted(loss) == [2, 4, 6, 8, 10, 12]
    assert loss[12] == pytest.approx(tracked["train"][-1]["loss"]) and sorted(f1) == [6, 12]


def test_curves_png_and_plot_overlay(tracked, tmp_path):
    out = tracked["out"]
    png = (out / "curves.png").read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (width, height) == (1500, 800)
    # A comparison's layout, OUTPUT_DIR/<policy>/seed-<s>/: the plot command finds both runs below it.
    for policy in ("none", "last2"):
        (tmp_path / "cmp" / policy / "seed-0").mkdir(parents=True)
        (tmp_path / "cmp" / policy / "seed-0" / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text())
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "plot.py"), str(tmp_path / "cmp")], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 run(s) drawn" in proc.stdout and (tmp_path / "cmp" / "curves.png").stat().st_size > 20_000
    from toolkit.output.curves import _labels, find_runs

    assert _labels(find_runs([tmp_path / "cmp"])) == ["last2/seed-0", "none/seed-0"]
    bad = subprocess.run([sys.executable, str(ROOT / "launch" / "plot.py"), str(tmp_path / "empty-nothing")],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no metrics.jsonl" in bad.stderr


def test_two_processes_quiet_ranks_and_evaluate_metric(tmp_path, tiny_model, data_dir):
    """accelerate launch -m toolkit train (2 CPU processes): rank 1 prints nothing; rank 0 prints the world, the
    data, the head line, the policy table, one bar and the final table and none of the library noise; a local
    `evaluate` metric script gives scikit-learn's values on the gathered predictions."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    proc = accelerate_launch("--log_dir", str(logs), "--tee", "3", "-m", "toolkit", "train", "--cpu",
                             "--model", tiny_model, "--data-dir", data_dir, *DATA, "--freeze", "last1",
                             "--metrics", str(METRIC_SCRIPT), "--output-dir", str(out),
                             env={"PYTHONPATH": str(ROOT), "HF_EVALUATE_OFFLINE": "1",
                                  "HF_MODULES_CACHE": str(tmp_path / "modules")})
    per_rank = {int(f.parent.name): f for f in logs.rglob("stdout.log")}
    assert sorted(per_rank) == [0, 1], list(logs.rglob("*"))
    rank1 = per_rank[1].read_text() + (per_rank[1].parent / "stderr.log").read_text()
    assert rank1.strip() == "", f"rank 1 printed:\n{rank1}"
    shown = per_rank[0].read_text() + (per_rank[0].parent / "stderr.log").read_text()
    for expected in ("world 2 process(es)", "new (randomly initialised) weights: classifier.bias, classifier.weight",
                     "data: 48 train / 24 eval examples, max length 32", "freeze policy: last1", "train ",
                     f"final metrics ({out})\n"):
        assert expected in shown, expected
    for noise in ("Flattening the indices", "drop empty", "tokenize:", "Loading weights", "LOAD REPORT",
                  "newly initialized", "Setting accelerator to CPU", "Writing model shards", "Map"):
        assert noise not in shown + proc.stderr, noise
    metrics = read_json(out / "metrics.json")
    rows = read_predictions(out / "predictions.csv")
    labels, preds = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    assert len(rows) == 24
    assert metrics["np_f1"] == pytest.approx(f1_score(labels, preds, zero_division=0), abs=1e-12)
    assert metrics["np_f1"] == pytest.approx(metrics["f1"], abs=1e-12)
    assert metrics["np_accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-12)
    assert metrics["np_matthews"] == pytest.approx(matthews_corrcoef(labels, preds), abs=1e-12)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_f1" in line]
    assert evals[-1]["eval_np_matthews"] == metrics["np_matthews"]


def test_bad_tracker_and_metric_fail_before_output(tmp_path, monkeypatch):
    from toolkit.cli import run
    from toolkit.core.config import TrainConfig
    from toolkit.core.errors import ToolkitError
    from toolkit.output.trackers import check
    from toolkit.train import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python does when the package is absent: ImportError
    with pytest.raises(ToolkitError) as err:
        check("tensorboard,wandb")
    assert "bert-finetune-toolkit[wandb]" in err.value.fix
    out = tmp_path / "never"
    assert run(main, TrainConfig, "t", ["--report-to", "tensorbord", "--output-dir", str(out)]) == 2
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    with pytest.raises(ToolkitError) as err:
        __import__("toolkit.engine.extra_metrics").engine.extra_metrics.load("no_such_metric_13")
    assert "HF_EVALUATE_OFFLINE=1" in err.value.fix and "evaluate.load('no_such_metric_13')" in err.value.fix
    assert run(main, TrainConfig, "t", ["--metrics", "no_such_metric_13", "--output-dir", str(out)]) == 2
    assert not out.exists()


def test_a_tracker_that_cannot_start_is_one_clear_error(tmp_path, tiny_model, data_dir, monkeypatch, capsys):
    from toolkit.cli import run
    from toolkit.core.config import TrainConfig
    from toolkit.train import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")  # MLflow knows no store for that scheme
    out = tmp_path / "run"
    code = run(main, TrainConfig, "train", ["--model", tiny_model, "--data-dir", data_dir, *DATA, "--cpu",
                                            "--report-to", "mlflow", "--output-dir", str(out)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err, err
    assert "--report-to mlflow: a tracker could not start" in err and "MLFLOW_TRACKING_URI" in err
    assert not out.exists()  # a new run's folder goes with the error


def test_installed_commands():
    """Every [project.scripts] entry runs from outside the checkout.

    The shared development venv's editable install predates the scripts, and reinstalling it would
    repoint it, so here each `module:function` target is called the way the generated script calls
    it (import, call with sys.argv set), in one interpreter started in another folder. In CI the
    package is installed with `pip install -e .[dev,...]`, so the real scripts exist in the venv's
    bin/ and are run too (no skip there).
    """
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"bert-ft-train", "bert-ft-evaluate", "bert-ft-predict", "bert-ft-compare", "bert-ft-plot",
                            "bert-ft-bundle"}
    code = (
        "import contextlib, importlib, io, json, sys\n"
        f"scripts = {scripts!r}\n"
        "seen = {}\n"
        "for name, target in scripts.items():\n"
        "    module, func = target.split(':')\n"
        "    sys.argv = [name, '--help']\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n"
        "            getattr(importlib.import_module(module), func)()\n"
        "        except SystemExit as exc:\n"
        "            seen[name] = [exc.code, buf.getvalue()]\n"
        "print(json.dumps(seen))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {name: code for name, (code, _) in seen.items()} == {name: 0 for name in scripts}
    assert "--freeze" in seen["bert-ft-train"][1] and "--report-to" in seen["bert-ft-train"][1]
    assert "--policies" in seen["bert-ft-compare"][1] and "RUN_DIR" in seen["bert-ft-plot"][1]
    assert "--input" in seen["bert-ft-predict"][1] and "--same-data" in seen["bert-ft-evaluate"][1]
    assert "--skip-installed" in seen["bert-ft-bundle"][1] and "--python-version" in seen["bert-ft-bundle"][1]
    if os.environ.get("CI"):
        bin_dir = Path(sys.executable).parent
        for name in scripts:
            assert (bin_dir / name).exists(), f"{name} not installed in {bin_dir}"
            real = subprocess.run([str(bin_dir / name), "--help"], cwd="/", capture_output=True, text=True, timeout=120)
            assert real.returncode == 0 and "usage" in real.stdout.lower(), (name, real.stderr[-2000:])
