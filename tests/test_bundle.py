"""launch/bundle.py for real: a bundle built against a fresh venv that holds only what a GPU node of the kind
this project is checked on has (transformers 5.17, accelerate 1.15, peft, tokenizers, pyarrow, pandas,
scikit-learn, matplotlib, rich, tensorboard; torch as the CPU wheel), installed there with pip --no-index
from the bundle alone, then benchmarks/gpu_check.py and one tiny training run from it.

The bundle's own steps (pip download, DeepSpeed's sdist built into a wheel) take a minute or two.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, read_json, read_predictions, run_cmd

# The GPU node's packages (issue 22; KINDS.md of the device tool), at its versions where they matter here.
NODE_PACKAGES = ["transformers==5.17.0", "accelerate==1.15.0", "peft", "tokenizers", "pyarrow", "pandas",
                 "scikit-learn", "matplotlib", "rich", "tensorboard", "packaging"]
# (pydantic too on the GPU node; this venv gets it with one of the packages above)
NODE_LACKS = {"datasets", "dill", "multiprocess", "deepspeed", "hjson", "evaluate", "optuna"}
DATA = ["--task", "imdb-subset", "--train-samples", "40", "--eval-samples", "16"]
TIMEOUT = 900


def clean_env(**extra: str) -> dict:
    """No index, no pip configuration, no venv of ours on the path: what a node without network has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1", **extra}


# Copied (hard-linked) from this venv rather than installed again: the node's environment is the setting here,
# not the thing under test, and pip takes about 3 minutes to unpack torch and the rest on a slow CPU.
# transformers and accelerate, at the node's older versions, and peft (which needs them) pip installs as usual.
LINKED_FROM_HERE = ["torch", "tokenizers", "pyarrow", "pandas", "scikit-learn", "matplotlib", "rich", "tensorboard",
                    "packaging"]


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Path:
    """A fresh venv with the node's packages only (and the CPU torch wheel, as .ci/install pins it)."""
    venv = tmp_path_factory.mktemp("node") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(run_cmd([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    link_installed(LINKED_FROM_HERE, site)
    run_cmd([str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / ".ci" / "constraints-cpu.txt"), "torch",
             *NODE_PACKAGES], timeout=TIMEOUT)
    return py


def link_installed(names: list[str], site: Path) -> None:
    """Put these installed distributions and everything they require into `site`, file by file as pip laid
    them out (their .dist-info included, so the venv's pip sees them installed)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    here = Path(metadata.distribution("torch").locate_file("")).resolve()
    todo, seen = list(names), set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(name)
        for file in dist.files or []:
            src = Path(dist.locate_file(file)).resolve()
            if here not in src.parents or not src.is_file():
                continue  # console scripts in bin/: not needed on the node
            dst = site / src.relative_to(here)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # another file system
                shutil.copy2(src, dst)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, node, tiny_bert, data_dir) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("bundle")
    freeze = work / "node-freeze.txt"
    freeze.write_text(run_cmd([str(node), "-m", "pip", "list", "--format=freeze"]).stdout)
    out = work / "gpu-bundle"
    proc = run_cmd([sys.executable, "launch/bundle.py", "--output-dir", str(out), "--model", tiny_bert,
                    "--with-weights", "--data-dir", data_dir, *DATA, "--python-version",
                    f"{sys.version_info.major}.{sys.version_info.minor}", "--skip-installed", str(freeze)],
                   timeout=TIMEOUT)
    return out, proc.stdout


def test_bundle_carries_exactly_what_the_node_lacks(bundle, node):
    out, printed = bundle
    manifest = read_json(out / "bundle.json")
    carried = {p["name"] for p in manifest["packages"]}
    assert NODE_LACKS <= carried
    # what the node has at a version the toolkit accepts stays the node's; torch is never carried
    node_has = {line.split("==")[0].lower() for line in (out.parent / "node-freeze.txt").read_text().split()}
    assert not carried & node_has
    assert {"torch", "transformers", "accelerate", "peft", "tokenizers"} <= node_has
    assert manifest["node_must_have"] and manifest["node_must_have"][0].startswith("torch")
    wheels = sorted(p.name for p in (out / "wheels").glob("*.whl"))
    assert wheels == manifest["wheels"] and not list((out / "wheels").glob("*.tar.gz"))
    assert len(wheels) == len(carried) + 1  # + the toolkit's own
    assert any(w.startswith("deepspeed-") and w.endswith("-py3-none-any.whl") for w in wheels)  # built from its sdist
    assert any(w.startswith("bert_finetune_toolkit-") for w in wheels)
    assert not any("minilm" in w.lower() for w in wheels)
    # the tokenizer and the weights of --model, the rows, the scripts gpu_check and training need
    assert (out / "model" / "tokenizer.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert manifest["rows"] == {"train": 40, "eval": 16}
    for path in ("run.sh", "benchmarks/gpu_check.py", "launch/train.py", "accelerate_configs/deepspeed_zero3.yaml"):
        assert (out / path).is_file(), path
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    assert total < 60 and f"{total:.1f} MiB" in printed


def test_the_rows_are_the_runs_own_in_its_order(bundle, data_dir):
    """data/train.parquet and data/eval.parquet hold the rows that --task imdb-subset picks, in its order."""
    import pyarrow.parquet as pq

    from toolkit.core.config import DataConfig
    from toolkit.data.dataset import build_splits

    out, _ = bundle
    cfg = DataConfig(task="imdb-subset", data_dir=data_dir, train_samples=40, eval_samples=16)
    train, evals = build_splits(cfg, log=lambda *a, **k: None)
    for name, ds in (("train", train), ("eval", evals)):
        table = pq.read_table(out / "data" / f"{name}.parquet").to_pydict()
        assert table["text"] == list(ds["text"])
        assert table["label"] == [cfg.label_names[i] for i in ds["labels"]]
        assert set(table["label"]) == {"negative", "positive"}


def test_gpu_check_and_a_training_run_work_from_the_bundle_on_the_node(bundle, node, tiny_bert, data_dir,
                                                                        tmp_path):
    out, _ = bundle
    env = clean_env(PYTHON=str(node))
    # two first calls at once, as the ranks of a job make them: one installs, the other waits for it
    where = subprocess.Popen(["bash", str(out / "run.sh"), str(node), "-c",
                              "import json, datasets, transformers, torch; "
                              "print(json.dumps([m.__file__ for m in (datasets, transformers, torch)]))"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    check = subprocess.run(["bash", str(out / "run.sh"), str(node), "benchmarks/gpu_check.py"], env=env,
                           capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    where_out, where_err = where.communicate(timeout=TIMEOUT)
    assert where.returncode == 0, where_err[-3000:]
    text = check.stdout + check.stderr
    assert (text + where_err).count("[bundle] installed") == 1, (text + where_err)[-3000:]
    assert not list(out.glob(".site.*"))  # no private install folder left behind
    assert (out / "site" / "deepspeed").is_dir() and (out / "site" / "toolkit").is_dir()
    assert f"bundle {out}" in text
    versions = [line for line in text.splitlines() if line.startswith("[gpu_check] versions")]
    assert "transformers 5.17.0" in versions[0] and "accelerate 1.15.0" in versions[0], text[-3000:]
    assert len(versions) == 1  # no requirement of the toolkit above what the node has
    assert "[gpu_check] imports       11/11 ok" in text, text[-3000:]
    assert check.returncode == 1 and "no CUDA GPU visible" in text  # past every import, stopped by the missing GPU
    manifest = read_json(out / "bundle.json")
    run = subprocess.run(["bash", str(out / "run.sh"), str(node), "launch/train.py", "--model", "model",
                          *manifest["data_args"], "--max-length", "32", "--batch-size", "8", "--cpu", "--seed", "0",
                          "--output-dir", str(tmp_path / "run")],
                         env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "[bundle] installed" not in run.stderr  # installed once
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert metrics["global_step"] == 5 and metrics["train_samples"] == 40  # 40 rows / batch 8
    # the node's run scored the bundle's 16 eval rows, whose labels are those of the preset's rows here
    from toolkit.core.config import DataConfig
    from toolkit.data.dataset import build_splits

    _, evals = build_splits(DataConfig(task="imdb-subset", data_dir=data_dir, train_samples=40, eval_samples=16),
                            log=lambda *a, **k: None)
    assert [label for _, label, _ in read_predictions(tmp_path / "run" / "predictions.csv")] == list(evals["labels"])
    # the node's own packages stay the node's; what the bundle carries comes from its site folder
    ds_file, tf_file, torch_file = json.loads(where_out.strip().splitlines()[-1])
    assert ds_file.startswith(str(out / "site"))
    assert tf_file.startswith(str(node.parent.parent)) and torch_file.startswith(str(node.parent.parent))
    assert not list((node.parent.parent / "lib").glob("python*/site-packages/datasets"))  # nothing installed there


BAD = {
    "output folder exists": (lambda t: ["--output-dir", str(t / "exists")], "already exists"),
    "freeze line": (lambda t: ["--skip-installed", _write(t / "f.txt", "torch 2.13.0\n")], "is not NAME==VERSION"),
    "node without torch": (lambda t: ["--skip-installed", _write(t / "f.txt", "numpy==2.4.0\n")], "has no torch"),
    "node's torch too old": (lambda t: ["--skip-installed", _write(t / "f.txt", "torch==1.13.1\n")],
                             "has torch 1.13.1"),
    "unknown extra": (lambda t: ["--extras", "deepspeed,bogus"], "unknown bogus"),
    "model": (lambda t: ["--model", str(t / "no-such-model")], "not a local folder"),
    "python version": (lambda t: ["--python-version", "3.12.1"], "--python-version"),
}


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bundle_input_is_one_clear_error_and_writes_nothing(case, tmp_path, minilm):
    make, problem = BAD[case]
    (tmp_path / "exists").mkdir()
    extra = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    args = ["--output-dir", str(tmp_path / "bundle"), "--model", minilm, *extra]
    proc = run_cmd([sys.executable, "launch/bundle.py", *args], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert problem in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr
    assert sorted(tmp_path.rglob("*")) == before
