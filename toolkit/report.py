"""The comparison report: report.json (for machines), report.md (a table), report.png (a chart).

Every number is read from the runs' own metrics.json, so the report can never disagree with
the runs it summarises.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from .config import save_json

BASELINE = "none"
# Published by the seed experiments, quoted for comparison only (never measured here).
SEED_LABEL = "seed write-up (bert-base-cased, 1x T4)"
SEED_FIGURES = {
    "imdb-subset": {"none": {"train_time_s": 743, "f1": 0.926}, "last2": {"train_time_s": 323, "f1": 0.907},
                    "head": {"train_time_s": 249, "f1": 0.595}},
    "amazon-subset": {"last2": {"train_time_s": None, "f1": 0.80, "approximate": True}},
}
METRIC_KEYS = ("trainable_params", "total_params", "train_runtime_s", "train_samples_per_s", "eval_samples_per_s",
               "f1", "accuracy", "eval_loss", "train_samples", "world_size")


def describe_hardware(device_type: str, world_size: int) -> str:
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        return f"{world_size} x {name}" if world_size > 1 else f"1 x {name}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = f"{cores}-core CPU ({_cpu_model()})"
    return f"{world_size} processes on a {cpu}" if world_size > 1 else cpu


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(out: Path, records: list[dict], base: dict, hardware: str) -> dict:
    task = base["data"]["task"]
    seeds = None if base["data"].get("train_file") else SEED_FIGURES.get(task)
    runs, resolved = [], {}
    for record in records:
        row = dict(record)
        metrics = _read(out / record["run_dir"] / "metrics.json") if record["status"] in ("trained", "reused") else {}
        row.update({k: metrics.get(k) for k in METRIC_KEYS})
        row["trainable_pct"] = 100 * metrics["trainable_params"] / metrics["total_params"] if metrics else None
        row["hardware"] = _read(out / record["run_dir"] / "hardware.json").get("hardware") if metrics else None
        row["seed_reference"] = seeds.get(record["policy"]) if seeds else None
        resolved = resolved or (_read(out / record["run_dir"] / "config.json").get("resolved", {}) if metrics else {})
        runs.append(row)
    baseline = next((r for r in runs if r["policy"] == BASELINE and r["f1"] is not None), None)
    for row in runs:
        ok = baseline is not None and row["f1"] is not None
        timed = ok and row["train_runtime_s"]
        row["speedup_vs_none"] = baseline["train_runtime_s"] / row["train_runtime_s"] if timed else None
        row["f1_change_vs_none"] = row["f1"] - baseline["f1"] if ok else None
    # a run trained outside compare (e.g. by train.py into this folder) has no hardware.json: assume this machine
    hardware_seen = sorted({r["hardware"] or hardware for r in runs if r["f1"] is not None}) or [hardware]
    return {
        "task": task, "model": base["model"], "output_dir": str(out), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hardware": "; ".join(hardware_seen), "baseline": BASELINE if baseline else None,
        "settings": {"train_examples": resolved.get("train_examples", base["data"]["train_samples"]),
                     "eval_examples": resolved.get("eval_examples", base["data"]["eval_samples"]),
                     "max_length": resolved.get("max_length", base["data"]["max_length"]),
                     "world_size": resolved.get("world_size"), "mixed_precision": resolved.get("mixed_precision"),
                     **{k: base[k] for k in ("epochs", "lr", "batch_size", "seed")}},
        "seed_reference_label": SEED_LABEL if seeds else None,
        "runs": runs,
    }


def pct(value: float) -> str:
    # two significant digits below 0.1%: a head-only policy trains ~0.003%, not "0.00%"
    return f"{value:.2f}%" if value >= 0.1 else f"{value:.2g}%"


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _seed_cell(ref: dict | None) -> str:
    if not ref:
        return "—"
    f1 = f"F1 ≈ {ref['f1']:.2f}" if ref.get("approximate") else f"F1 {ref['f1']:.3f}"
    return f"{ref['train_time_s']} s · {f1}" if ref.get("train_time_s") else f1


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Freeze-policy comparison: {report['task']}", "",
             (f"Model `{report['model']}` · hardware: {report['hardware']} · mixed precision {s['mixed_precision']} · "
              f"{s['train_examples']} train / {s['eval_examples']} eval examples · max length {s['max_length']} · "
              f"{s['epochs']} epoch(s) · lr {s['lr']} · batch size {s['batch_size']} · seed {s['seed']}"), ""]
    head = ["policy", "status", "trainable params", "train time", "train samples/s", "eval samples/s", "F1", "accuracy",
            "eval loss", "speed-up vs none", "F1 change vs none"]
    seeds = report["seed_reference_label"]
    head += [seeds] if seeds else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in report["runs"]:
        status = r["status"] if not r["error"] else f"{r['status']}: {r['error']}".replace("|", "\\|").replace("\n", " ")
        trainable = "—" if r["trainable_params"] is None else f"{r['trainable_params']:,} ({pct(r['trainable_pct'])})"
        cells = [f"`{r['policy']}`", status, trainable, _fmt(r["train_runtime_s"], ".1f", " s"),
                 _fmt(r["train_samples_per_s"], ".1f"), _fmt(r["eval_samples_per_s"], ".1f"), _fmt(r["f1"], ".4f"),
                 _fmt(r["accuracy"], ".4f"), _fmt(r["eval_loss"], ".4f"), _fmt(r["speedup_vs_none"], ".2f", "×"),
                 _fmt(r["f1_change_vs_none"], "+.4f")]
        cells += [_seed_cell(r["seed_reference"])] if seeds else []
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", ("Train time counts training steps only (evaluation and checkpointing excluded). Speed-up = train time "
                   "of `none` / train time of the policy; F1 change = F1 − F1 of `none`.")]
    if seeds:
        lines.append("The last column quotes the figures the seed experiments published (bert-base-cased on one T4 GPU, "
                     "the full preset subset) for reference; they were not measured here.")
    return "\n".join(lines) + "\n"


def write_report(out: Path, records: list[dict], base: dict, hardware: str) -> dict:
    report = collect(out, records, base, hardware)
    save_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    from .chart import write_chart  # matplotlib loads only when a report is drawn

    write_chart(report, out / "report.png")
    return report
