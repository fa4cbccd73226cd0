"""The comparison's numbers: read every run's own files, then per policy n, mean, std, min, max and a
95 % confidence interval over seeds, paired differences against the baseline, degenerate runs.

Nothing here writes or draws (report.py writes report.md/json, chart.py draws report.png), and every
figure comes from the runs' metrics.json and predictions.csv, so the report cannot disagree with them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

CONFIDENCE = 0.95
# Published by the seed experiments, quoted for comparison only (never measured here).
SEED_LABEL = "seed write-up (bert-base-cased, 1x T4)"
SEED_FIGURES = {
    "imdb-subset": {"none": {"train_time_s": 743, "f1": 0.926}, "last2": {"train_time_s": 323, "f1": 0.907},
                    "head": {"train_time_s": 249, "f1": 0.595}},
    "amazon-subset": {"last2": {"train_time_s": None, "f1": 0.80, "approximate": True}},
}
METRIC_KEYS = ("trainable_params", "total_params", "train_runtime_s", "train_samples_per_s", "eval_samples_per_s",
               "f1", "accuracy", "eval_loss", "train_samples", "world_size", "peak_memory_bytes", "peak_memory_kind",
               "optimizer_state_bytes", "validation_f1")
SPREAD_KEYS = ("f1", "accuracy", "train_runtime_s", "train_samples_per_s", "eval_samples_per_s")


def describe_hardware(device_type: str, world_size: int) -> str:
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        return f"{world_size} x {name}" if world_size > 1 else f"1 x {name}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = f"{cores}-core CPU ({cpu_model()})"
    return f"{world_size} processes on a {cpu}" if world_size > 1 else cpu


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pct(value: float) -> str:
    # two significant digits below 0.1%: a head-only policy trains ~0.003%, not "0.00%"
    return f"{value:.2f}%" if value >= 0.1 else f"{value:.2g}%"


def t_quantile(n: int) -> float:
    """Two-sided Student's t quantile for a CONFIDENCE interval of a mean of n values (n - 1 degrees of freedom)."""
    from scipy.stats import t  # scipy comes with scikit-learn

    return float(t.ppf(0.5 + CONFIDENCE / 2, n - 1))


def spread(values: list[float]) -> dict:
    """n, mean, sample std, min, max and the t confidence interval of the mean; std and CI need n >= 2."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "ci95": None}
    n, mean = len(values), statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else None
    half = t_quantile(n) * std / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values),
            "ci95": [mean - half, mean + half] if half is not None else None}


def predicted_classes(path: Path) -> list[int] | None:
    """The distinct predicted labels in a run's predictions.csv (one value: a degenerate run)."""
    if not path.is_file():
        return None
    with path.open(newline="") as fh:
        return sorted({int(row["prediction"]) for row in csv.DictReader(fh)})


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_rows(out: Path, records: list[dict], hardware: str) -> list[dict]:
    rows = []
    for record in records:
        row, run_dir = dict(record), out / record["run_dir"]
        metrics = _read(run_dir / "metrics.json") if record["status"] in ("trained", "reused") else {}
        row.update({k: metrics.get(k) for k in METRIC_KEYS})
        row["finished"] = bool(metrics)
        row["lr"] = _read(run_dir / "config.json").get("lr") if metrics else None
        row["trainable_pct"] = 100 * metrics["trainable_params"] / metrics["total_params"] if metrics else None
        # a run trained outside compare (e.g. by train.py into this folder) has no hardware.json: this machine
        row["hardware"] = (_read(run_dir / "hardware.json").get("hardware") or hardware) if metrics else None
        classes = predicted_classes(run_dir / "predictions.csv") if metrics else None
        row["predicted_classes"] = classes
        row["degenerate"] = bool(metrics) and classes is not None and len(classes) == 1
        rows.append(row)
    return rows


def policy_summary(policy: str, rows: list[dict], baseline: list[dict] | None) -> dict:
    done = [r for r in rows if r["finished"]]
    healthy = [r for r in done if not r["degenerate"]]
    first = done[0] if done else {}
    summary = {
        "policy": policy, "folder": rows[0]["run_dir"].split("/")[0], "seeds": [r["seed"] for r in rows],
        "n": len(done), "failed": [r["seed"] for r in rows if r["status"] == "failed"],
        "not_finished": [r["seed"] for r in rows if not r["finished"]],
        "trainable_params": first.get("trainable_params"), "total_params": first.get("total_params"),
        "trainable_pct": first.get("trainable_pct"), "lr": first.get("lr"),
        **{key: spread([r[key] for r in done]) for key in SPREAD_KEYS},
        "degenerate": len(done) - len(healthy), "degenerate_seeds": [r["seed"] for r in done if r["degenerate"]],
        "f1_without_degenerate": spread([r["f1"] for r in healthy]),
        "accuracy_without_degenerate": spread([r["accuracy"] for r in healthy]),
        "peak_memory_bytes": max((r["peak_memory_bytes"] for r in done if r["peak_memory_bytes"]), default=None),
        "optimizer_state_bytes": max((r["optimizer_state_bytes"] for r in done
                                      if r["optimizer_state_bytes"] is not None), default=None),
        "vs_baseline": None,
    }
    if baseline is not None:
        base = {r["seed"]: r for r in baseline if r["finished"]}
        pairs = [(base[r["seed"]], r) for r in done if r["seed"] in base]
        if pairs:
            change = spread([r["f1"] - b["f1"] for b, r in pairs])
            ratios = [b["train_runtime_s"] / r["train_runtime_s"] for b, r in pairs if r["train_runtime_s"]]
            summary["vs_baseline"] = {
                "seeds": [r["seed"] for _, r in pairs],
                "f1_change": change,
                "f1_change_per_seed": {str(r["seed"]): r["f1"] - b["f1"] for b, r in pairs},
                # the paired interval includes 0: the data cannot tell the two policies' F1 apart
                "inside_noise": change["ci95"][0] <= 0 <= change["ci95"][1] if change["ci95"] else None,
                "speedup": {"n": len(ratios), "mean": statistics.fmean(ratios) if ratios else None,
                            "min": min(ratios, default=None), "max": max(ratios, default=None)},
                "speedup_per_seed": {str(r["seed"]): b["train_runtime_s"] / r["train_runtime_s"]
                                     for b, r in pairs if r["train_runtime_s"]},
                "pairs_with_degenerate": sum(b["degenerate"] or r["degenerate"] for b, r in pairs),
            }
    return summary


def collect(out: Path, records: list[dict], base: dict, hardware: str, baseline: str | None, seeds: list[int]) -> dict:
    """report.json's content: settings, one row per run, one summary per policy (in --policies order)."""
    task = base["data"]["task"]
    reference = None if base["data"].get("train_file") else SEED_FIGURES.get(task)
    rows = run_rows(out, records, hardware)
    by_policy: dict[str, list[dict]] = {}
    for row in rows:
        by_policy.setdefault(row["policy"], []).append(row)
    base_rows = by_policy.get(baseline) if baseline else None
    if base_rows is not None and not any(r["finished"] for r in base_rows):
        base_rows = None
    policies = [policy_summary(p, rs, base_rows) for p, rs in by_policy.items()]
    for summary in policies:
        summary["seed_reference"] = reference.get(summary["policy"]) if reference else None
    done = [r for r in rows if r["finished"]]
    resolved = next((_read(out / r["run_dir"] / "config.json").get("resolved", {}) for r in done), {})
    world_sizes = sorted({r["world_size"] for r in done if r["world_size"] is not None})
    return {
        "task": task, "model": base["model"], "output_dir": str(out), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hardware": "; ".join(sorted({r["hardware"] for r in done}) or [hardware]),
        "baseline": baseline if base_rows is not None else None,
        "seeds": seeds, "confidence": CONFIDENCE,
        "interval": "Student's t, n-1 degrees of freedom, sample std",
        "world_sizes": world_sizes, "mixed_world_sizes": len(world_sizes) > 1,
        "memory_kinds": sorted({r["peak_memory_kind"] for r in done if r["peak_memory_kind"]}),
        "settings": {"train_examples": resolved.get("train_examples", base["data"]["train_samples"]),
                     "validation_examples": resolved.get("validation_examples", 0),
                     "eval_examples": resolved.get("eval_examples", base["data"]["eval_samples"]),
                     "max_length": resolved.get("max_length", base["data"]["max_length"]),
                     "world_size": resolved.get("world_size"), "mixed_precision": resolved.get("mixed_precision"),
                     "data_seed": base["data"]["data_seed"],
                     **{k: base[k] for k in ("epochs", "lr", "batch_size")}},
        "seed_reference_label": SEED_LABEL if reference else None,
        "policies": policies,
        "runs": rows,
    }
