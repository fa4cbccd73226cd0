"""compare's workers, for real: every run in a process of its own; one worker and two workers (one of them
killed with kill -9 in the middle of a run) and a 2-task SLURM array on the local cluster give the same
trials, each run exactly once, the same chosen rates and identical predictions and losses; Ctrl-C stops a
comparison at a checkpoint and a rerun resumes it; --status and --report-only read a comparison from its
files.

conftest's tiny_bert: these tests check who ran what and that it made no difference, not
learning, so every figure is compared exactly (losses to the last bit), not only the predictions."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, python, read_json, read_predictions

from toolkit.core.test_delays import STEP_DELAY_ENV
from toolkit.fanout.devices import share

DATA = ["--task", "imdb-subset", "--train-samples", "64", "--eval-samples", "16", "--max-length", "24",
        "--validation-fraction", "0.25"]
# 48 training rows / batch 8 = 6 steps; 2 rates per policy, eta 2: rungs 3 and 6; then 2 policies x 2 seeds
SEARCH = [*DATA, "--batch-size", "8", "--cpu", "--policies", "none,head", "--lr-search", "--lr-grid",
          "none=1e-3,1e-2", "--lr-grid", "head=1e-2,1e-1", "--halving-eta", "2", "--seeds", "0,1",
          "--threads-per-run", "1", "--checkpoint-every", "2", "--quiet"]
RUNS = {"trial.none.lr-0.001.seed-0.step-3", "trial.none.lr-0.01.seed-0.step-3",
        "trial.head.lr-0.01.seed-0.step-3", "trial.head.lr-0.1.seed-0.step-3",
        "run.none.seed-0", "run.none.seed-1", "run.head.seed-0", "run.head.seed-1"}  # + one step-6 trial each
TIMEOUT = 300


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, tiny_bert, data_dir):
    out = tmp_path_factory.mktemp("one") / "cmp"
    args = ["launch/compare.py", "--model", tiny_bert, "--data-dir", data_dir, *SEARCH, "--output-dir", str(out)]
    printed = python(*args, "--workers", "1").stderr  # what the person who started it saw
    return out, args, printed


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "workers" / "history.jsonl").read_text().splitlines()]


def outcome(out: Path) -> dict:
    """Everything a run computed, per run folder: predictions, losses, F1s, steps, rung scores (not timings)."""
    found = {}
    for metrics in sorted(out.rglob("metrics.json")):
        folder = metrics.parent
        m = read_json(metrics)
        found[str(folder.relative_to(out))] = (
            read_predictions(folder / "predictions.csv"), m["global_step"],
            {k: v for k, v in m.items() if k.endswith(("_loss", "f1", "accuracy"))})
    for rung in sorted(out.glob("search/*/lr-*/seed-*/rungs/step-*.json")):
        r = read_json(rung)
        found[str(rung.relative_to(out))] = (r["validation_loss"], r["validation_f1"], r["step"])
    return found


def choices(out: Path) -> dict:
    search = read_json(out / "search.json")
    return {p["policy"]: (p["chosen_lr"], [(a["lr"], a["reached_step"], a["score"]) for a in p["arms"]])
            for p in search["policies"]}


def test_one_worker_runs_every_run_once_each_in_its_own_process(one_worker):
    out, _, printed = one_worker
    lines = history(out)
    runs = [line["run"] for line in lines]
    assert len(runs) == len(set(runs)) == 10 and RUNS <= set(runs)
    assert all(line["exit_code"] == 0 and line["threads"] == 1 for line in lines)
    assert len({line["worker"] for line in lines}) == 1 and lines[0]["worker"].endswith("-w0")
    pids = [line["pid"] for line in lines]
    assert len(set(pids)) == 10 and lines[0]["worker_pid"] not in pids  # a fresh process per run
    report = read_json(out / "report.json")
    assert {(r["policy"], r["seed"]): (r["status"], r["worker"]) for r in report["runs"]} == {
        (p, s): ("trained", lines[0]["worker"]) for p in ("none", "head") for s in (0, 1)}
    assert {p: c[0] for p, c in choices(out).items()} == {p["policy"]: p["lr"] for p in report["policies"]}
    # what the person who started it saw: each worker's run as it changed, every run's end, the total
    name, printed = lines[0]["worker"], " ".join(printed.split())
    assert f"1 worker(s): {name} (1 thread(s))" in printed and f"{name}: run.head.seed-1" in printed
    assert all(f"{name}: {run} done" in printed for run in runs)
    assert "runs: 10 done, 0 running, 0 waiting, 0 failed" in printed


def test_two_workers_one_killed_mid_run_give_the_same_results(one_worker, tmp_path):
    reference, args, _ = one_worker
    out = tmp_path / "cmp"
    argv = [a if a != str(reference) else str(out) for a in args] + ["--workers", "2"]
    # half a second more per step: a run is still training well after its step-2 checkpoint, on any CPU
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", STEP_DELAY_ENV: "0.5"}
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        victim = None
        while victim is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            for checkpoint in out.glob("*/seed-*/checkpoints/step-00000002"):
                folder = checkpoint.parents[1]
                claim = out / "workers" / "claims" / f"run.{folder.parent.name}.{folder.name}.json"
                if not (folder / "metrics.json").exists() and claim.exists():
                    victim = read_json(claim)
                    break
            time.sleep(0.05)
        os.kill(victim["pid"], signal.SIGKILL)  # the worker; its run dies with it
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert f"worker {victim['worker']} ended with signal 9" in " ".join(err.split())
    lines = history(out)
    runs = [line["run"] for line in lines]
    assert sorted(runs) == sorted(line["run"] for line in history(reference))  # each run exactly once
    resumed = next(line for line in lines if line["run"] == victim["run"])
    assert resumed["worker"] != victim["worker"] and resumed["resumed_from_step"] >= 2
    assert len({line["worker"] for line in lines}) == 2
    assert choices(out) == choices(reference)
    assert outcome(out) == outcome(reference)  # predictions, losses, F1s of every run and rung, bit for bit


def test_ctrl_c_stops_at_a_checkpoint_and_a_rerun_resumes(tiny_bert, data_dir, tmp_path):
    out = tmp_path / "cmp"
    argv = ["launch/compare.py", "--model", tiny_bert, "--data-dir", data_dir, *DATA, "--batch-size", "8", "--cpu",
            "--policies", "none,head", "--seeds", "0", "--lr", "1e-3", "--checkpoint-every", "2", "--quiet",
            "--output-dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", STEP_DELAY_ENV: "0.5"}
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "none" / "seed-0" / "checkpoints" / "step-00000002").exists():  # the first run is training
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err[-3000:]
    runs = {r["policy"]: r for r in read_json(out / "report.json")["runs"]}
    assert runs["none"]["status"] == "interrupted" and "Ctrl-C" in runs["none"]["error"]
    assert runs["head"]["status"] == "not run"
    assert list((out / "none" / "seed-0" / "checkpoints").glob("step-*"))
    assert not (out / "none" / "seed-0" / "metrics.json").exists() and not (out / "head").exists()
    python(*argv)
    lines = history(out)
    assert [line["run"] for line in lines] == ["run.none.seed-0", "run.none.seed-0", "run.head.seed-0"]
    assert lines[0]["exit_code"] == 130 and lines[1]["resumed_from_step"] >= 2
    assert {r["policy"]: r["status"] for r in read_json(out / "report.json")["runs"]} == {"none": "trained",
                                                                                         "head": "trained"}


def test_status_and_report_only_read_the_comparison_from_its_files(one_worker):
    out, _, _ = one_worker
    status = python("-m", "toolkit", "compare", "--status", str(out))
    text = " ".join(status.stdout.split())
    assert "runs: 10 done, 0 running, 0 waiting, 0 failed" in text
    assert "2 complete, 2 pruned trials" in text
    before = read_json(out / "report.json")
    (out / "report.md").unlink()
    python("-m", "toolkit", "compare", "--report-only", str(out))
    after = read_json(out / "report.json")
    assert {**after, "created": None} == {**before, "created": None} and (out / "report.md").is_file()


def test_devices_are_shared_out_among_the_workers():
    gpus = ["0", "1", "2", "3"]
    assert [s.gpus for s in share(None, 1, None, gpus, 16)] == [("0",), ("1",), ("2",), ("3",)]
    assert [s.gpus for s in share(None, 2, None, gpus, 16)] == [("0", "1"), ("2", "3")]
    assert [s.threads for s in share(2, 2, None, gpus, 16)] == [4, 4]
    assert share(2, 1, None, [], 2)[1].threads == 1 and share(None, 1, None, [], 2)[0].threads == 2
    assert share(None, 1, 3, [], 2)[0].threads == 3  # --threads-per-run is taken as given
    assert share(1, 1, None, ["5", "7"], 8)[0].env()["CUDA_VISIBLE_DEVICES"] == "5"
    from toolkit.core.errors import ToolkitError

    with pytest.raises(ToolkitError, match="needs 6 GPUs, 4 visible"):
        share(3, 2, None, gpus, 16)


def test_a_slurm_array_of_two_tasks_shares_one_queue(one_worker, slurm_cluster, tmp_path):
    """slurm/compare_array.sbatch with --array=0-1 on the local cluster: two compare tasks, one CPU worker each,
    share one queue and one study through the output folder; every run is run once, by a task's worker, with
    the results of one worker."""
    from test_slurm import CPU_ONLY, JOB_TIMEOUT, submit

    reference, args, _ = one_worker
    out = tmp_path / "array"
    argv = [a if a != str(reference) else str(out) for a in args[1:]]  # the same options, another folder
    job = submit(slurm_cluster, tmp_path, "compare_array.sbatch", [*CPU_ONLY, "--cpus-per-task=1", "--array=0-1"],
                 argv, slurm_cluster.env(TOOLKIT_CPU="1"))
    try:
        job.proc.wait(timeout=JOB_TIMEOUT)  # sbatch --wait follows every task of the array
    finally:
        if job.proc.poll() is None:
            job.cancel()
            job.proc.kill()
    logs = {task: tmp_path / f"bert-compare-{job.id}_{task}.out" for task in (0, 1)}
    text = {task: log.read_text() if log.exists() else "(no log)" for task, log in logs.items()}
    assert job.proc.returncode == 0, "\n".join(t[-3000:] for t in text.values())
    for task in (0, 1):
        assert f"array job {job.id} task {task}" in text[task] and "compare finished" in text[task], text[task][-3000:]
    lines = history(out)
    runs = [line["run"] for line in lines]
    assert sorted(runs) == sorted(line["run"] for line in history(reference))  # each run exactly once
    assert {line["session"] for line in lines} == {f"slurm-array-{job.id}"}
    assert all(re.search(r"-task[01]-w0$", line["worker"]) for line in lines)
    assert (out / "report.md").is_file() and (out / "search.json").is_file()
    assert choices(out) == choices(reference) and outcome(out) == outcome(reference)
