"""Markdown tables from benchmark result files (benchmarks/results/*.json by default).

    python benchmarks/table.py                       # every result file
    python benchmarks/table.py benchmarks/results/last2-len256-*.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _m(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f}"


def _r(stats: dict, digits: int = 2) -> str:
    return f"**{stats['median']:.{digits}f}** ({stats['min']:.{digits}f}–{stats['max']:.{digits}f})"


def rows(path: Path) -> list[str]:
    d = json.loads(path.read_text())
    if d.get("partial"):
        return []
    s, runs, summary = d["settings"], d["runs"], d["summary"]
    arms = list(d["arms"])
    base = arms[0]
    out = []
    for arm in arms[1:]:
        ratio = summary["ratios"][f"{arm}/{base}"]
        a = [r for r in runs if r["arm"] == base]
        b = [r for r in runs if r["arm"] == arm]
        base_name = f"{base} (bf16)" if base == "trainer" and s.get("trainer_bf16") else base
        out.append(
            f"| {_cpu(d['machine'])} | {s['freeze']} | {s['max_length']} | {s['train_samples']}/{s['eval_samples']} | "
            f"{s['lr']:g} | {s['epochs']} | {base_name} vs {arm} | {_m([r['train_samples_per_s'] for r in a])} → "
            f"{_m([r['train_samples_per_s'] for r in b])} | {_r(ratio['train_samples_per_s'])} | "
            f"{_m([r['eval_samples_per_s'] for r in a], 1)} → {_m([r['eval_samples_per_s'] for r in b], 1)} | "
            f"{_r(ratio['eval_samples_per_s'])} | {_m([r['f1'] for r in a], 3)} → {_m([r['f1'] for r in b], 3)} | "
            f"{_m([r['accuracy'] for r in a], 3)} → {_m([r['accuracy'] for r in b], 3)} | "
            f"{_m([r['total_s'] for r in a], 0)} → {_m([r['total_s'] for r in b], 0)} | "
            f"{max(r['load_before'] for r in runs):.1f} |")
    return out


def _cpu(machine: dict) -> str:
    name = "GPU " + machine["gpu"] if machine.get("gpu") else machine["cpu"].replace("(R)", "").replace(" Processor",
                                                                                                        "")
    simd = machine.get("simd")  # not recorded by the first runs (a Xeon with AMX-BF16 and AVX-512)
    return f"{name} ({', '.join(simd[:1])})" if simd else name


HEADER = ("| CPU | freeze | max len | train/eval rows | lr | epochs | arms (A vs B) | train samples/s A → B | train ×, "
          "median (min–max) | eval samples/s A → B | eval ×, median (min–max) | F1 A → B (median) | accuracy A → B | "
          "total s A → B | max load |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str]) -> None:
    files = [Path(a) for a in argv] or sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    print(HEADER)
    for f in files:
        for line in rows(f):
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
