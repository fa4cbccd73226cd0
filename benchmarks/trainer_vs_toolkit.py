"""Benchmark: the seeds' HF-Trainer recipe vs this toolkit, same machine, data, model and settings.

    python benchmarks/trainer_vs_toolkit.py --model PATH --data-dir ../shared/data \\
        --train-samples 320 --eval-samples 400 --max-length 256 --freeze last2 --repeats 3

Arms, run alternately (repeat r runs them in order, repeat r+1 in reverse order, so a drift
in machine load does not favour one side), each in a fresh process:

  trainer   the seed recipe: transformers.Trainer + DataCollatorWithPadding, random batches,
            AdamW lr 2e-5 (or --lr), batch 16, weight decay 0.01, 1 epoch, eval every epoch;
  toolkit   `launch/train.py` with the same data, model, max length, batch size, lr, weight
            decay, epochs, seed and freeze policy, and its defaults otherwise
            (--arm NAME="FLAGS" adds toolkit arms with extra flags, e.g. bf16 or --cache-frozen).

Repeat r uses seed + r on every arm (training seed: init of the head, dropout, batch order),
so the F1 medians span seeds. Both get the identical rows: the toolkit's imdb-subset sampling
(balanced, data seed 42) and tokenization (truncation at --max-length, no padding). Train samples/s
is training time only (for the Trainer: on_epoch_begin..on_epoch_end, which excludes its end-of-epoch evaluation;
its own `train_samples_per_second`, which includes that evaluation, is recorded too). Eval
samples/s is the end-of-epoch evaluation of each side. Prints every run, then per arm
min/median/max, and the ratios arm/baseline (per repeat pair) with min/median/max; writes
everything to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--task", default="imdb-subset")
    p.add_argument("--train-file", default=None, help="the toolkit's --train-file (e.g. a bundle's data/train.parquet)")
    p.add_argument("--eval-file", default=None)
    p.add_argument("--label-names", default=None, help="the toolkit's --label-names, comma-separated")
    p.add_argument("--train-samples", type=int, default=320)
    p.add_argument("--eval-samples", type=int, default=400)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--freeze", default="last2")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=32, help="both sides (the Trainer's default would be 8)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--same-seed", action="store_true",
                   help="every repeat with --seed (default: repeat r uses seed + r on every arm, so F1 medians span "
                        "seeds)")
    p.add_argument("--arm", action="append", default=None,
                   help='toolkit arm NAME="extra flags" (repeatable; default: toolkit="")')
    p.add_argument("--no-trainer", action="store_true", help="toolkit arms only; ratios are against the first arm")
    p.add_argument("--trainer-bf16", action="store_true", help="give the Trainer bf16=True (CPU autocast / bf16 GPUs)")
    p.add_argument("--trainer-fp16", action="store_true", help="give the Trainer fp16=True (the seeds' T4 setting)")
    p.add_argument("--out", default=None, help="JSON result file (default: benchmarks/results/<settings>.json)")
    p.add_argument("--worker", choices=["trainer"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def data_config(args: argparse.Namespace):
    """Both sides' rows: the toolkit's own loading and sampling."""
    from toolkit.core.config import DataConfig

    return DataConfig(task=args.task, data_dir=args.data_dir, train_file=args.train_file, eval_file=args.eval_file,
                      label_names=args.label_names.split(",") if args.label_names else None,
                      train_samples=args.train_samples, eval_samples=args.eval_samples)


def data_flags(args: argparse.Namespace) -> list[str]:
    """The same rows as launch/train.py options."""
    return [*(["--data-dir", args.data_dir] if args.data_dir else []),
            *(["--train-file", args.train_file] if args.train_file else []),
            *(["--eval-file", args.eval_file] if args.eval_file else []),
            *(["--label-names", args.label_names] if args.label_names else [])]


# ---------------------------------------------------------------- the seed recipe (worker process)


def run_trainer(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from toolkit.data.dataset import build_splits, tokenize
    from toolkit.engine.metrics import classification_metrics
    from toolkit.engine.model import load_model, load_tokenizer
    from toolkit.policy.policy import apply_freeze

    hf_logging.set_verbosity_error()
    tokenizer = load_tokenizer(args.model)
    train, evals = build_splits(data_config(args), log=lambda *a: None)
    train_tok = tokenize(train, tokenizer, args.max_length).remove_columns(["idx", "length"])
    eval_tok = tokenize(evals, tokenizer, args.max_length).remove_columns(["idx", "length"])
    torch.manual_seed(args.seed)
    model = load_model(args.model, 2)
    apply_freeze(model, args.freeze)  # the seeds froze by requires_grad, as the toolkit does

    class Clock(TrainerCallback):
        def __init__(self):
            self.train_s, self.t0 = 0.0, None

        def on_epoch_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, *a, **k):  # called before the end-of-epoch evaluation
            self.train_s += time.perf_counter() - self.t0

    def compute_metrics(pred):
        return classification_metrics(np.asarray(pred.label_ids), np.asarray(pred.predictions).argmax(-1), 2)

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.eval_batch_size, num_train_epochs=args.epochs,
            weight_decay=args.weight_decay, eval_strategy="epoch", save_strategy="no", report_to="none",
            seed=args.seed, use_cpu=not torch.cuda.is_available(), bf16=args.trainer_bf16, fp16=args.trainer_fp16,
            disable_tqdm=True, logging_strategy="epoch",
        )
        trainer = Trainer(model=model, args=targs, train_dataset=train_tok, eval_dataset=eval_tok,
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics,
                          callbacks=[clock])
        out = trainer.train()
    evals_logged = [e for e in trainer.state.log_history if "eval_f1" in e]
    last = evals_logged[-1]
    n_train = len(train_tok) * args.epochs
    return {
        "train_samples_per_s": n_train / clock.train_s,
        "train_runtime_s": clock.train_s,
        "trainer_train_samples_per_s_incl_eval": out.metrics["train_samples_per_second"],
        "eval_samples_per_s": last["eval_samples_per_second"],
        "eval_runtime_s": last["eval_runtime"],
        "total_s": clock.train_s + sum(e["eval_runtime"] for e in evals_logged),
        "f1": last["eval_f1"],
        "accuracy": last["eval_accuracy"],
        "eval_loss": last["eval_loss"],
    }


# ---------------------------------------------------------------- the toolkit (launch/train.py)


def run_toolkit(args: argparse.Namespace, extra: str, log: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "launch/train.py", "--model", args.model, "--task", args.task,
               "--train-samples", str(args.train_samples), "--eval-samples", str(args.eval_samples),
               "--max-length", str(args.max_length), "--freeze", args.freeze, "--lr", str(args.lr),
               "--batch-size", str(args.batch_size), "--eval-batch-size", str(args.eval_batch_size),
               "--weight-decay", str(args.weight_decay), "--epochs", str(args.epochs), "--seed", str(args.seed),
               "--log-every", "1000000", "--keep-checkpoints", "1", "--output-dir", f"{tmp}/run",
               *data_flags(args), *shlex.split(extra)]
        _run(cmd, log)
        m = json.loads(Path(f"{tmp}/run/metrics.json").read_text())
        evals = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
        eval_s = sum(e["eval_runtime_s"] for e in evals if "eval_runtime_s" in e)
    return {
        "train_samples_per_s": m["train_samples_per_s"], "train_runtime_s": m["train_runtime_s"],
        "eval_samples_per_s": m["eval_samples_per_s"], "eval_runtime_s": m["eval_runtime_s"],
        "total_s": m["train_runtime_s"] + eval_s + m.get("cache_eval_s", 0.0),
        "f1": m["f1"], "accuracy": m["accuracy"], "eval_loss": m["eval_loss"],
        "train_tokens_per_s": m.get("train_tokens_per_s"), "train_padding_fraction": m.get("train_padding_fraction"),
        "eval_padding_fraction": m.get("eval_padding_fraction"),
        **{k: m[k] for k in ("cache_train_s", "cache_eval_s") if k in m},
    }


# ---------------------------------------------------------------- driver


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-4000:]}")


def _forwarded(args: argparse.Namespace) -> list[str]:
    keys = ["model", "data_dir", "task", "train_samples", "eval_samples", "max_length", "freeze", "lr", "batch_size",
            "eval_batch_size", "weight_decay", "epochs", "seed"]
    flags = []
    for k in keys:
        v = getattr(args, k)
        if v is not None:
            flags += ["--" + k.replace("_", "-"), str(v)]
    return flags + (["--trainer-bf16"] if args.trainer_bf16 else []) + (["--trainer-fp16"] if args.trainer_fp16 else [])


def run_arm(args: argparse.Namespace, name: str, extra: str, logdir: Path, r: int) -> dict:
    args = argparse.Namespace(**{**vars(args), "seed": args.seed + (0 if args.same_seed else r)})
    load_before = os.getloadavg()[0]
    log = logdir / f"{name}-{r}.log"
    if name == "trainer":
        result_file = logdir / f"trainer-{r}.json"
        _run([sys.executable, __file__, "--worker", "trainer", "--result", str(result_file), *_forwarded(args)], log)
        result = json.loads(result_file.read_text())
    else:
        result = run_toolkit(args, extra, log)
    return {"arm": name, "repeat": r, "seed": args.seed, "load_before": load_before,
            "load_after": os.getloadavg()[0], **result}


def trainer_padding(args: argparse.Namespace) -> dict:
    """Padding fraction of the Trainer's batches: random train batches (mean over 200 shuffles), eval in row order."""
    import torch

    from toolkit.data.dataset import build_splits, tokenize
    from toolkit.engine.model import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    train, evals = build_splits(data_config(args), log=lambda *a: None)
    lengths = {name: torch.tensor(tokenize(ds, tokenizer, args.max_length)["length"]) for name, ds in
               (("train", train), ("eval", evals))}

    def fraction(lens: torch.Tensor, size: int) -> float:
        padded = sum(int(lens[i:i + size].max()) * len(lens[i:i + size]) for i in range(0, len(lens), size))
        return 1 - int(lens.sum()) / padded

    gen = torch.Generator().manual_seed(0)
    shuffled = [fraction(lengths["train"][torch.randperm(len(lengths["train"]), generator=gen)], args.batch_size)
                for _ in range(200)]
    return {"train_padding_fraction": statistics.mean(shuffled),
            "eval_padding_fraction": fraction(lengths["eval"], args.eval_batch_size)}


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(runs: list[dict], arms: list[str], baseline: str) -> dict:
    summary: dict = {"arms": {}, "ratios": {}}
    for arm in arms:
        rows = [r for r in runs if r["arm"] == arm]
        summary["arms"][arm] = {k: _stats([r[k] for r in rows])
                                for k in ("train_samples_per_s", "eval_samples_per_s", "f1", "total_s")}
    base = {r["repeat"]: r for r in runs if r["arm"] == baseline}
    for arm in arms:
        if arm == baseline:
            continue
        rows = [r for r in runs if r["arm"] == arm]
        summary["ratios"][f"{arm}/{baseline}"] = {
            "train_samples_per_s": _stats([r["train_samples_per_s"] / base[r["repeat"]]["train_samples_per_s"]
                                           for r in rows]),
            "eval_samples_per_s": _stats([r["eval_samples_per_s"] / base[r["repeat"]]["eval_samples_per_s"]
                                          for r in rows]),
            "total_time_saved": _stats([1 - r["total_s"] / base[r["repeat"]]["total_s"] for r in rows]),
            "f1_difference": _stats([r["f1"] - base[r["repeat"]]["f1"] for r in rows]),
            "median_f1_difference": summary["arms"][arm]["f1"]["median"] - summary["arms"][baseline]["f1"]["median"],
        }
    return summary


def machine() -> dict:
    import torch
    import transformers

    cpu, simd = platform.processor(), []
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                    if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = info.get("model name", cpu)
        # the vector units decide CPU speed, bf16 above all (AMX / AVX512-BF16 run it natively)
        flags = info.get("flags", "").split()
        simd = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    except OSError:
        pass
    return {"cpu": cpu, "simd": simd, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker == "trainer":
        Path(args.result).write_text(json.dumps(run_trainer(args)))
        return
    arms = ([] if args.no_trainer else [("trainer", "")])
    for spec in args.arm or ["toolkit="]:
        name, _, extra = spec.partition("=")
        arms.append((name, extra))
    baseline = arms[0][0]
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"{args.freeze}-len{args.max_length}-n{args.train_samples}-lr{args.lr:g}-e{args.epochs}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory() as logdir:
        for r in range(args.repeats):
            for name, extra in (arms if r % 2 == 0 else arms[::-1]):
                res = run_arm(args, name, extra, Path(logdir), r)
                runs.append(res)
                out.write_text(json.dumps({"partial": True, "settings": vars(args), "runs": runs}, indent=2) + "\n")
                print(f"repeat {r} {name:>10}: train {res['train_samples_per_s']:7.2f} samples/s  "
                      f"eval {res['eval_samples_per_s']:7.2f} samples/s  f1 {res['f1']:.4f}  total "
                      f"{res['total_s']:7.1f} s  (load before {res['load_before']:.2f})", flush=True)
    names = [a for a, _ in arms]
    summary = summarize(runs, names, baseline)
    if not args.no_trainer:
        summary["trainer_padding"] = trainer_padding(args)
    print(f"\n{args.freeze}, max length {args.max_length}, {args.train_samples} train / {args.eval_samples} eval, "
          f"lr {args.lr:g}, batch {args.batch_size}, {args.epochs} epoch(s), {args.repeats} repeats")
    for arm in names:
        s = summary["arms"][arm]
        print(f"  {arm:>10}: train samples/s {_fmt(s['train_samples_per_s'])}  eval samples/s "
              f"{_fmt(s['eval_samples_per_s'])}  f1 {_fmt(s['f1'], 4)}  total s {_fmt(s['total_s'], 1)}")
    for arm in names:
        rows = [r for r in runs if r["arm"] == arm and r.get("train_padding_fraction") is not None]
        if rows:
            print(f"  {arm:>10}: padding fraction train {rows[0]['train_padding_fraction']:.3f}, "
                  f"eval {rows[0]['eval_padding_fraction']:.3f}")
    if "trainer_padding" in summary:
        tp = summary["trainer_padding"]
        print(f"  {'trainer':>10}: padding fraction train {tp['train_padding_fraction']:.3f} (random batches, "
              f"expected), eval {tp['eval_padding_fraction']:.3f}")
    for key, s in summary["ratios"].items():
        print(f"  {key}: train x{_fmt(s['train_samples_per_s'])}  eval x{_fmt(s['eval_samples_per_s'])}  "
              f"time saved {_fmt(s['total_time_saved'], 3)}  median f1 difference {s['median_f1_difference']:+.4f}")
    result = {"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "settings": vars(args),
              "arms": dict(arms), "machine": machine(), "max_load_before": max(r["load_before"] for r in runs),
              "runs": runs, "summary": summary}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def _fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}..{s['max']:.{digits}f}]"


if __name__ == "__main__":
    main()
