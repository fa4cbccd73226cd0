"""compare --lr-search end to end on the real MiniLM and real IMDb rows: every decision recomputed here from
the trials' own files, the test split absent from every trial, pruned arms stopped at their rung, a survivor
equal to an uninterrupted run, a rerun that trains nothing, and a search killed with SIGKILL that resumes
and ends with the same choices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import ROOT, python, read_json, read_predictions
from optuna.storages.journal import JournalFileBackend, JournalStorage

from toolkit.core.config import DataConfig
from toolkit.core.test_delays import STEP_DELAY_ENV
from toolkit.data.dataset import build_splits, split_validation

DATA = ["--task", "imdb-subset", "--train-samples", "64", "--eval-samples", "16", "--max-length", "24",
        "--validation-fraction", "0.25"]
# 48 training rows / batch 8 = 6 steps. none: 2 rates, eta 2 -> rungs 3, 6; head: its 4 default rates -> 2, 3, 6
ARGS = [*DATA, "--batch-size", "8", "--cpu", "--policies", "none,head", "--lr-search", "--lr-grid", "none=1e-4,1e-3",
        "--halving-eta", "2", "--seeds", "0", "--quiet"]
BUDGET = 6


@pytest.fixture(scope="module")
def searched(tmp_path_factory, minilm, data_dir):
    out = tmp_path_factory.mktemp("search") / "cmp"
    args = ["launch/compare.py", "--model", minilm, "--data-dir", data_dir, *ARGS, "--output-dir", str(out)]
    python(*args)
    return out, args


def trial_files(out: Path) -> dict[tuple[str, float], dict]:
    """Per (policy, lr), what its folder says: {step: (validation F1, classes predicted)}, diverged or not."""
    found = {}
    for folder in (out / "search").glob("*/lr-*/seed-0"):
        policy, lr = folder.parts[-3], float(folder.parts[-2].removeprefix("lr-"))
        scores = {}
        for rung in (folder / "rungs").glob("step-*.json"):
            r = read_json(rung)
            scores[r["step"]] = (r["validation_f1"], r["validation_classes_predicted"])
        if (folder / "metrics.json").is_file():
            m = read_json(folder / "metrics.json")
            scores[m["global_step"]] = (m["validation_f1"], m["validation_classes_predicted"])
        found[policy, lr] = {"scores": scores, "diverged": (folder / "diverged.json").is_file(), "folder": folder}
    return found


def recomputed_choice(arms: dict[float, dict]) -> float:
    """Written out again, not imported: each rate at the last step it reached; healthy (both classes predicted)
    first, then the later step, the higher F1, the smaller rate."""
    def key(lr):
        step = max(arms[lr]["scores"])
        f1, classes = arms[lr]["scores"][step]
        return (classes > 1, step, f1, -lr)
    return max((lr for lr in arms if not arms[lr]["diverged"]), key=key)


def test_the_chosen_rate_is_the_one_the_trials_files_pick(searched):
    out, _ = searched
    files, search = trial_files(out), read_json(out / "search.json")
    chosen = {p["policy"]: p["chosen_lr"] for p in search["policies"]}
    assert set(files) == {("none", 1e-4), ("none", 1e-3), ("head", 1e-3), ("head", 3e-3), ("head", 1e-2),
                          ("head", 3e-2)}
    for policy in ("none", "head"):
        arms = {lr: f for (p, lr), f in files.items() if p == policy}
        assert chosen[policy] == recomputed_choice(arms)
        # the final run trained at that rate, on the same rows minus the validation split, scored on the test split
        final = read_json(out / policy / "seed-0" / "config.json")
        assert final["lr"] == chosen[policy] and final["score_test"] is True
        assert final["resolved"]["validation_examples"] == 16 and final["resolved"]["eval_examples"] == 16
        assert "f1" in read_json(out / policy / "seed-0" / "metrics.json")
    report = read_json(out / "report.json")
    assert {p["policy"]: p["lr"] for p in report["policies"]} == chosen
    md = (out / "report.md").read_text()
    assert "## Learning-rate search" in md and "never the test split" in md
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_study_holds_every_arm_with_its_rung_scores_and_prunes(searched):
    out, _ = searched
    storage = JournalStorage(JournalFileBackend(str(out / "search" / "study.journal")))
    study = optuna.load_study(study_name="lr-search", storage=storage)
    files = trial_files(out)
    assert len(study.trials) == len(files)  # one trial per arm, none twice
    for trial in study.trials:
        arm = files[trial.user_attrs["policy"], trial.params["lr"]]
        assert trial.intermediate_values == {step: f1 for step, (f1, _) in arm["scores"].items()}
        reached = max(arm["scores"])
        assert trial.state == (optuna.trial.TrialState.COMPLETE if reached == BUDGET
                               else optuna.trial.TrialState.PRUNED)


def test_pruned_arms_stopped_at_their_rung(searched):
    out, _ = searched
    search = read_json(out / "search.json")
    rungs = {p["policy"]: p["rungs"] for p in search["policies"]}
    assert rungs == {"none": [3, 6], "head": [2, 3, 6]}
    for (policy, lr), arm in trial_files(out).items():
        reached = max(arm["scores"])
        assert reached in rungs[policy]
        steps = [json.loads(line)["step"] for line in (arm["folder"] / "metrics.jsonl").read_text().splitlines()
                 if '"step"' in line]
        assert max(steps) == reached  # it never trained past its rung
        if reached < BUDGET:
            assert not (arm["folder"] / "metrics.json").exists() and not (arm["folder"] / "model").exists()
    # halving kept the best half at every rung: 2 -> 1 for none, 4 -> 2 -> 1 for head
    counts = {policy: [sum(1 for (p, _), a in trial_files(out).items() if p == policy and max(a["scores"]) >= step)
                       for step in steps] for policy, steps in rungs.items()}
    assert counts == {"none": [2, 1], "head": [4, 2, 1]}


def test_no_trial_reads_or_writes_the_test_split(searched, data_dir):
    out, _ = searched
    cfg = DataConfig(task="imdb-subset", data_dir=data_dir, train_samples=64, eval_samples=16)
    train, test = build_splits(cfg, log=lambda *a: None)
    # predictions.csv's index is a row's position in the training rows, before the validation split
    _, valid = split_validation(train.add_column("position", list(range(len(train)))), 0.25, 2, 42)
    valid_rows = sorted(valid["position"])
    test_texts = [t[:60] for t in test["text"]]
    for arm in trial_files(out).values():
        config = read_json(arm["folder"] / "config.json")
        assert config["score_test"] is False and config["resolved"]["eval_examples"] == 0
        for path in arm["folder"].rglob("*"):
            if path.suffix in (".json", ".jsonl", ".csv") and path.is_file():
                text = path.read_text()
                assert not any(t in text for t in test_texts)
        records = [json.loads(line) for line in (arm["folder"] / "metrics.jsonl").read_text().splitlines()]
        assert all(r.get("split") == "validation" for r in records if "eval_f1" in r)
        if (arm["folder"] / "predictions.csv").exists():  # survivors: predictions on the validation rows only
            assert sorted(i for i, _, _ in read_predictions(arm["folder"] / "predictions.csv")) == valid_rows


def test_a_survivor_ends_where_an_uninterrupted_run_ends(searched, minilm, data_dir, tmp_path):
    out, _ = searched
    chosen = {p["policy"]: p["chosen_lr"] for p in read_json(out / "search.json")["policies"]}
    survivor = out / "search" / "head" / f"lr-{chosen['head']:g}" / "seed-0"
    assert sorted(p.name for p in (survivor / "rungs").iterdir()) == ["step-2.json", "step-3.json"]  # paused twice
    python("launch/train.py", "--model", minilm, "--data-dir", data_dir, *DATA, "--batch-size", "8", "--cpu",
           "--freeze", "head", "--lr", str(chosen["head"]), "--seed", "0", "--no-score-test", "--quiet",
           "--output-dir", str(tmp_path / "straight"))
    assert read_predictions(survivor / "predictions.csv") == read_predictions(tmp_path / "straight" /
                                                                              "predictions.csv")
    a, b = read_json(survivor / "metrics.json"), read_json(tmp_path / "straight" / "metrics.json")
    assert (a["validation_f1"], a["validation_loss"], a["global_step"]) == (b["validation_f1"], b["validation_loss"],
                                                                            b["global_step"])


def test_a_rerun_trains_nothing(searched):
    out, args = searched
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix != ".journal"
              and p.parent != out}
    ran = (out / "workers" / "history.jsonl").read_text()
    proc = python(*args)
    err = " ".join(proc.stderr.split())
    assert "10 search trial(s) already scored at their rung: reused" in err and "none (seed 0): finished run" in err
    assert (out / "workers" / "history.jsonl").read_text() == ran  # no run started
    after = {p: p.stat().st_mtime_ns for p in stamps}
    assert after == stamps  # no trial or final run file was rewritten


def test_a_killed_search_resumes_and_ends_with_the_same_choices(searched, tmp_path):
    out, args = searched
    killed = tmp_path / "killed"
    argv = [a if a != str(out) else str(killed) for a in args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", STEP_DELAY_ENV: "0.3"}
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # killed in the middle of the head search: none is decided, head has scored its first rung
        while not list(killed.glob("search/head/lr-*/seed-0/rungs/step-2.json")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "search.json").exists()
    python(*argv)
    first, second = read_json(out / "search.json"), read_json(killed / "search.json")
    assert ({p["policy"]: p["chosen_lr"] for p in second["policies"]}
            == {p["policy"]: p["chosen_lr"] for p in first["policies"]})
    assert ({(p["policy"], a["lr"]): (a["reached_step"], a["score"]) for p in second["policies"] for a in p["arms"]}
            == {(p["policy"], a["lr"]): (a["reached_step"], a["score"]) for p in first["policies"] for a in p["arms"]})
    study = optuna.load_study(study_name="lr-search",
                              storage=JournalStorage(JournalFileBackend(str(killed / "search" / "study.journal"))))
    assert len(study.trials) == 6 and all(t.state.is_finished() for t in study.trials)
