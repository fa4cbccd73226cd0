"""SLURM support: toolkit.backends.cluster (pure parsing) and the sbatch templates on a real local cluster.

The cluster tests start a throwaway SLURM cluster on this machine (conftest.py, tests/slurm_cluster.sh:
slurmctld + two slurmd "nodes" n1, n2 + munge, from the distribution's packages) once per
session, submit the templates from slurm/ unchanged apart from sbatch resource options and the
CPU switch (TOOLKIT_CPU=N: N CPU processes per node instead of one per GPU), and tear the
cluster down at the end. Without root or packages they skip with the reason; with CI=true
they fail instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TORCH_DIST_VARS, Cluster

from toolkit.backends.cluster import (
    ClusterEnv,
    detect,
    expand_hostlist,
    export_torch_distributed_env,
    master_port_for_job,
)
from toolkit.core.test_delays import STEP_DELAY_ENV

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "slurm"
TEMPLATES = ["single_node.sbatch", "multi_node.sbatch", "multi_node_deepspeed.sbatch"]
JOB_TIMEOUT = 480  # seconds for one job, requeues included

# ------------------------------------------------------------------ toolkit.backends.cluster, pure parsing

SRUN_TASK_N2 = {  # what `srun --nodes=2 --ntasks-per-node=2` gives task 3 (seen on slurm 22.05)
    "SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "4",
    "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_NTASKS_PER_NODE": "2", "SLURM_RESTART_COUNT": "2",
}
BATCH_STEP = {  # the batch script itself: SLURM_PROCID=0 and SLURM_NTASKS=2, but no step variables
    "SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
    "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-2]",
}


def test_master_port_is_deterministic_and_in_range():
    assert master_port_for_job("1") == 15001
    assert master_port_for_job(123456) == 15000 + 123456 % 15000
    assert master_port_for_job("123456") == master_port_for_job(123456)
    assert master_port_for_job(None) == 29500
    ports = {master_port_for_job(i) for i in range(1000, 1100)}
    assert len(ports) == 100  # neighbouring jobs on a shared node do not collide
    for job in ["0", "14999", "15000", "99999999", "abc", "123_4"]:
        assert 15000 <= master_port_for_job(job) < 30000  # below the ephemeral range 32768+


def test_master_port_same_in_bash_and_python():
    ids = ["1", "7", "14999", "15000", "31337", "4294967295", "008"]
    script = f'source {SLURM_DIR / "common.sh"}; for i in {" ".join(ids)}; do toolkit_master_port "$i"; done'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert [int(p) for p in out] == [master_port_for_job(i) for i in ids]


@pytest.mark.parametrize("hostlist, hosts", [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[07-10],login", ["gpu07", "gpu08", "gpu09", "gpu10", "login"]),
    ("a[1,3-4]b,c", ["a1b", "a3b", "a4b", "c"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ("", []),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_detect_plain_python():
    env = detect({"HOME": "/root"})
    assert env == ClusterEnv(launcher="python")
    assert not env.in_slurm and not env.distributed and env.is_main


def test_detect_srun_task():
    env = detect(SRUN_TASK_N2)
    assert env == ClusterEnv(launcher="slurm", rank=3, local_rank=1, world_size=4, node_rank=1, num_nodes=2,
                             job_id="4242", restart_count=2, master_addr="gpu07", master_port=15000 + 4242)
    assert "restart_count=2" in env.describe()


def test_detect_batch_script_is_one_process():
    # A plain `python train.py` in the batch script must not wait for SLURM_NTASKS ranks.
    env = detect(BATCH_STEP)
    assert (env.launcher, env.world_size, env.rank, env.job_id, env.restart_count) == ("python", 1, 0, "77", 0)


def test_detect_accelerate_inside_slurm():
    # srun (one task per node) -> accelerate launch -> torch elastic workers: the templates' case
    env = detect({**SRUN_TASK_N2, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                  "GROUP_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "19242",
                  "ACCELERATE_MIXED_PRECISION": "bf16", "TORCHELASTIC_RUN_ID": "none"})
    assert env == ClusterEnv(launcher="accelerate", rank=5, local_rank=1, world_size=8, node_rank=1, num_nodes=2,
                             job_id="4242", restart_count=2, master_addr="gpu07", master_port=19242)


def test_detect_torchrun():
    env = detect({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                  "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"})
    assert env == ClusterEnv(launcher="torchrun", rank=2, local_rank=0, world_size=4, node_rank=1, num_nodes=2,
                             master_addr="10.0.0.1", master_port=29500)


def test_export_torch_env_for_srun_tasks():
    environ = dict(SRUN_TASK_N2)
    export_torch_distributed_env(environ=environ)
    assert {k: environ[k] for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                    "MASTER_PORT"]} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(15000 + 4242)}
    # from now on torch.distributed's env:// sees the full world, and detect() still knows who started it
    assert detect(environ) == detect(SRUN_TASK_N2)


def test_export_torch_env_keeps_existing_and_is_noop_elsewhere():
    environ = {**SRUN_TASK_N2, "MASTER_PORT": "12345"}
    export_torch_distributed_env(environ=environ)
    assert environ["MASTER_PORT"] == "12345" and environ["RANK"] == "3"
    for case in [BATCH_STEP, {}, {**SRUN_TASK_N2, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"},
                 {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}]:
        environ = dict(case)
        export_torch_distributed_env(environ=environ)
        assert environ == case


def test_export_torch_env_reads_os_environ(monkeypatch):
    for key in TORCH_DIST_VARS:
        monkeypatch.setenv(key, "x")  # so that monkeypatch restores (removes) what the call exports
        monkeypatch.delenv(key)
    for key, value in SRUN_TASK_N2.items():
        monkeypatch.setenv(key, value)
    export_torch_distributed_env(detect())
    assert os.environ["WORLD_SIZE"] == "4" and os.environ["MASTER_ADDR"] == "gpu07"


# ------------------------------------------------------------------ templates, static and bash-level


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_structure(name):
    text = (SLURM_DIR / name).read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert sbatch["signal"].startswith("B:USR1@") and "requeue" in sbatch
    assert sbatch["open-mode"] == "append" and sbatch["ntasks-per-node"] == "1"
    site = text.split("SITE SETTINGS")[1].split("# =====")[0]
    assert all(v in site for v in ["HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "HF_DATASETS_OFFLINE=1", "HF_HOME"])
    assert text.index("SITE SETTINGS") < text.index("source slurm/common.sh")
    # The per-node command is single-quoted: SLURM_NODEID is expanded on each node, not on the batch host.
    node_cmd = re.search(r"^NODE_CMD='(.*?)^'", text, re.S | re.M).group(1)
    assert "accelerate launch" in node_cmd and '"$TRAIN_SCRIPT" "$@"' in node_cmd
    code = "\n".join(line for line in text.replace(node_cmd, "").splitlines() if not line.lstrip().startswith("#"))
    assert "SLURM_NODEID" not in code
    if name != "single_node.sbatch":
        assert '--machine_rank "$SLURM_NODEID"' in node_cmd and '--num_machines "$SLURM_NNODES"' in node_cmd
        assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text
    assert "toolkit_master_port" in text or "toolkit_run" in text
    subprocess.run(["bash", "-n", str(SLURM_DIR / name)], check=True)


@pytest.mark.parametrize("env, expected", [
    ({"TOOLKIT_CPU": "3", "SLURM_GPUS_ON_NODE": "8"}, "3"),
    ({"SLURM_GPUS_ON_NODE": "4"}, "4"),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "2"),
])
def test_procs_per_node(env, expected, tmp_path):
    clean = {"PATH": f"{tmp_path}:/usr/bin:/bin"}  # no nvidia-smi
    out = subprocess.run(["bash", "-c", f"source {SLURM_DIR / 'common.sh'}; toolkit_procs_per_node"],
                         env={**clean, **env}, capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, expected)


def test_procs_per_node_without_gpus_explains(tmp_path):
    out = subprocess.run(["bash", "-c", f"source {SLURM_DIR / 'common.sh'}; toolkit_procs_per_node"],
                         env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, capture_output=True, text=True)
    assert out.returncode == 1 and "TOOLKIT_CPU" in out.stderr


# ------------------------------------------------------------------ the real cluster


# The jobs test the templates' plumbing (worlds, signals, requeues), not learning: a tiny random BERT
# (conftest's tiny_bert) keeps each step cheap; the requeued run is compared with the uninterrupted one
# bit for bit through the saved weights, which is meaningful whatever classes it predicts.
TRAIN_ARGS = ["--task", "imdb-subset", "--train-samples", "128", "--eval-samples", "40", "--max-length", "128",
              "--batch-size", "8", "--freeze", "last2", "--lr", "1e-3", "--epochs", "2", "--log-every", "1",
              "--seed", "0"]
STEPS_PER_EPOCH = 128 // (8 * 2)  # world size 2 in every job below
CPU_ONLY = ["--gres=none"]  # the templates ask for GPUs; the test nodes have none


@dataclass
class Job:
    id: str
    proc: subprocess.Popen  # the running `sbatch --wait`
    log: Path  # the template's --output=%x-%j.out, in the submit folder
    cluster: Cluster

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, n: int = 6000) -> str:
        return self.log_text()[-n:] or f"(no log at {self.log})"

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], env=self.cluster.env(), capture_output=True, timeout=30)

    def finish(self, timeout: int = JOB_TIMEOUT, expect_ok: bool = True) -> str:
        """Wait for `sbatch --wait` (it follows the job through requeues); return the log."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            self.proc.kill()
            raise AssertionError(f"job {self.id} still running after {timeout} s\n{self.tail()}")
        if expect_ok:
            code = self.proc.returncode
            assert code == 0, f"job {self.id}: sbatch --wait exited {code}\n{self.tail()}"
        return self.log_text()


def submit(cluster, workdir: Path, template: str, sbatch_opts: list[str], args: list[str], env: dict) -> Job:
    """`sbatch --wait` a template from slurm/ as it is, from `workdir`, without waiting here."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_name = re.search(r"^#SBATCH --job-name=(\S+)", (SLURM_DIR / template).read_text(), re.M).group(1)
    cmd = ["sbatch", "--parsable", "--wait", *sbatch_opts, str(SLURM_DIR / template), *args]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline().strip()
    if not first:
        proc.wait(timeout=30)
        raise AssertionError(f"sbatch failed: {proc.stderr.read()}")
    job_id = first.split(";")[0]
    return Job(job_id, proc, workdir / f"{job_name}-{job_id}.out", cluster)


def run_template(cluster, workdir, template, sbatch_opts, args, env) -> tuple[str, str]:
    job = submit(cluster, workdir, template, sbatch_opts, args, env)
    return job.id, job.finish()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def single_node_run(slurm_cluster, tmp_path_factory, tiny_bert, data_dir):
    """slurm/single_node.sbatch, 2 CPU processes on one node: also the uninterrupted reference."""
    work = tmp_path_factory.mktemp("slurm-single")
    out = work / "run"
    t0 = time.monotonic()
    job_id, log = run_template(slurm_cluster, work, "single_node.sbatch", [*CPU_ONLY, "--cpus-per-task=2"],
                               ["--model", tiny_bert, "--data-dir", data_dir, *TRAIN_ARGS, "--output-dir", str(out)],
                               slurm_cluster.env(TOOLKIT_CPU="2"))
    return out, log, job_id, time.monotonic() - t0


def test_single_node_template_trains(single_node_run):
    out, log, job_id, seconds = single_node_run
    metrics = read_json(out / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["global_step"] == 2 * STEPS_PER_EPOCH
    assert (out / "predictions.csv").read_text().count("\n") == 41
    assert f"job {job_id} (bert-1node) SLURM_RESTART_COUNT=0" in log
    assert "[slurm] node 0/1 (n1): accelerate launch with 2 process(es)" in log
    assert "training finished" in log and "requeueing job" not in log
    print(f"single-node job {job_id}: {seconds:.0f} s")


def test_multi_node_template_forms_one_group(slurm_cluster, tmp_path, tiny_bert, data_dir):
    out = tmp_path / "run"
    job_id, log = run_template(slurm_cluster, tmp_path, "multi_node.sbatch", [*CPU_ONLY, "--cpus-per-task=2"],
                               ["--model", tiny_bert, "--data-dir", data_dir, *TRAIN_ARGS, "--output-dir", str(out)],
                               slurm_cluster.env(TOOLKIT_CPU="1"))
    # One process per node: a world of 2 exists only if both nodes joined one process group.
    assert read_json(out / "metrics.json")["world_size"] == 2
    assert (out / "predictions.csv").exists()
    assert "[slurm] node 0/2 (n1): accelerate launch with 1 process(es)" in log
    assert "[slurm] node 1/2 (n2): accelerate launch with 1 process(es)" in log
    assert f"main process n1:{master_port_for_job(job_id)}" in log


def test_deepspeed_template_launches_on_both_nodes(slurm_cluster, tmp_path):
    """The DeepSpeed template's launch path (accelerate's deepspeed launcher, one per node).

    slurm/probe.py stands in for training: on CPU the toolkit trains with DDP over gloo
    (DeepSpeed needs GPUs), so this checks the wiring, not ZeRO itself.
    """
    out = tmp_path / "probe"
    job_id, log = run_template(slurm_cluster, tmp_path, "multi_node_deepspeed.sbatch",
                               [*CPU_ONLY, "--cpus-per-task=1"], ["--output-dir", str(out), "--task", "ignored"],
                               slurm_cluster.env(TOOLKIT_CPU="1", TRAIN_SCRIPT="slurm/probe.py"))
    probe = read_json(out / "metrics.json")
    assert probe["world_size"] == 2 and probe["all_reduce_ok"]
    assert sorted(r["slurm_node"] for r in probe["ranks"]) == ["n1", "n2"]
    assert {r["accelerate_use_deepspeed"] for r in probe["ranks"]} == {"true"}
    assert {r["cluster"]["launcher"] for r in probe["ranks"]} == {"accelerate"}
    assert {r["cluster"]["job_id"] for r in probe["ranks"]} == {job_id}


def test_srun_tasks_without_launcher(slurm_cluster, tmp_path):
    """`srun python ...` with one task per node: toolkit.backends.cluster turns SLURM_* into a torch world."""
    out = tmp_path / "probe"
    proc = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", sys.executable,
                           str(SLURM_DIR / "probe.py"), "--cpu", "--output-dir", str(out)],
                          cwd=ROOT, env=slurm_cluster.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    probe = read_json(out / "metrics.json")
    assert probe["world_size"] == 2 and probe["all_reduce_ok"]
    by_rank = {r["rank"]: r for r in probe["ranks"]}
    assert [by_rank[i]["slurm_node"] for i in (0, 1)] == ["n1", "n2"]
    clusters = [by_rank[i]["cluster"] for i in (0, 1)]
    assert [c["launcher"] for c in clusters] == ["slurm", "slurm"]
    assert [c["node_rank"] for c in clusters] == [0, 1] and {c["num_nodes"] for c in clusters} == {2}
    assert {c["master_addr"] for c in clusters} == {"n1"}
    assert {c["master_port"] for c in clusters} == {master_port_for_job(clusters[0]["job_id"])}


def test_failed_training_is_not_requeued(slurm_cluster, tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('failing on purpose', flush=True)\nsys.exit(3)\n")
    job = submit(slurm_cluster, tmp_path, "single_node.sbatch", [*CPU_ONLY, "--cpus-per-task=1"],
                 ["--output-dir", str(tmp_path / "run")], slurm_cluster.env(TOOLKIT_CPU="1", TRAIN_SCRIPT=str(script)))
    log = job.finish(expect_ok=False)
    assert job.proc.returncode != 0, log
    assert "failing on purpose" in log and "training failed" in log and "requeueing job" not in log


def test_usr1_checkpoints_requeues_and_resumes_mid_epoch(slurm_cluster, single_node_run, tmp_path, tiny_bert,
                                                        data_dir):
    ref_out = single_node_run[0]
    out = tmp_path / "run"
    # 1 s more per step: the signal sent after step 2 lands well inside the 8-step epoch on any CPU
    env = slurm_cluster.env(TOOLKIT_CPU="2", **{STEP_DELAY_ENV: "1"})
    job = submit(slurm_cluster, tmp_path, "single_node.sbatch", [*CPU_ONLY, "--cpus-per-task=2"],
                 ["--model", tiny_bert, "--data-dir", data_dir, *TRAIN_ARGS, "--output-dir", str(out)], env)
    try:
        # 1. wait until training is a little way into the first epoch, then warn the batch shell
        #    exactly as `--signal=B:USR1@...` does before the time limit
        deadline = time.monotonic() + JOB_TIMEOUT
        while max(_logged_steps(out / "metrics.jsonl"), default=0) < 2:
            assert job.proc.poll() is None, f"job ended before it could be signalled\n{job.tail()}"
            assert time.monotonic() < deadline, f"no training step logged\n{job.tail()}"
            time.sleep(0.1)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job.id], env=env, check=True, timeout=30)

        # 2. the batch shell asks for a checkpoint and requeues: catch the checkpoint it stopped at
        while "requeueing job" not in job.log_text():
            assert job.proc.poll() is None, f"job ended without requeueing\n{job.tail()}"
            assert time.monotonic() < deadline, f"no requeue\n{job.tail()}"
            time.sleep(0.2)
        stopped_at = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
        assert 0 < stopped_at < STEPS_PER_EPOCH, f"stopped at step {stopped_at}: not inside the first epoch"
        assert not (out / "metrics.json").exists()
    except BaseException:
        job.cancel()
        raise

    # 3. the second start resumes from that checkpoint and finishes
    log = job.finish()
    assert f"job {job.id} (bert-1node) SLURM_RESTART_COUNT=0" in log
    assert f"job {job.id} (bert-1node) SLURM_RESTART_COUNT=1" in log  # same log file: opened in append mode
    assert "received SIGUSR1" in log and log.count("requeueing job") == 1

    # every step trained exactly once over the two starts: the resumed run skipped what was done
    assert sorted(_logged_steps(out / "metrics.jsonl")) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    # ... and it ends exactly where the uninterrupted run ended
    assert (out / "predictions.csv").read_text() == (ref_out / "predictions.csv").read_text()
    got, ref = read_json(out / "metrics.json"), read_json(ref_out / "metrics.json")
    for key in ["f1", "accuracy", "precision", "recall", "global_step", "train_samples", "world_size"]:
        assert got[key] == ref[key], key
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6)
    # the same weights, bit for bit (also meaningful when a tiny run predicts one class only)
    ref_files = sorted(p.relative_to(ref_out / "model") for p in (ref_out / "model").rglob("*") if p.is_file())
    assert ref_files == sorted(p.relative_to(out / "model") for p in (out / "model").rglob("*") if p.is_file())
    # (digests, not bytes: on a mismatch pytest would diff two weight files byte by byte for hours)
    differ = [str(n) for n in ref_files if _sha256(out / "model" / n) != _sha256(ref_out / "model" / n)]
    assert not differ, f"saved files differ from the uninterrupted run's: {differ}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logged_steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if "loss" in rec and "step" in rec:
            steps.append(rec["step"])
    return steps

