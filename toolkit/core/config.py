"""Typed run settings and the command line built from them.

Every option lives in exactly one place: a dataclass field with its default and help
text. `add_arguments` turns the fields into argparse flags, so the CLI, `config.json`
and the code can never disagree about a name or a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, get_type_hints

from .errors import ToolkitError

DEFAULT_MODEL = "bert-base-cased"
DEFAULT_DIST_TIMEOUT_S = 1800  # the main process group: any collective that waits longer is a hang
DEFAULT_DATA_TIMEOUT_S = 6 * 3600  # rank 0 loading and tokenizing while the others wait
LAYOUTS = "a run folder, its model/ folder, or a checkpoints/step-N folder"  # what --model of evaluate/predict takes


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts. parse_args refuses any other value (exit 2) before
    anything loads, so a bad count or rate never reaches torch as a ZeroDivisionError or a
    half-created run folder. Non-finite values (nan, inf) are never accepted."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `low` itself is excluded
    high_open: bool = False

    def accepts(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        # ints as ints: 4294967295, not 4.29497e+09
        low, high = (f"{x:g}" if isinstance(x, float) else str(x) for x in (self.low, self.high))
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


COUNT = Range(1)  # batches, epochs, steps, intervals: at least one
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)  # rates, scales, timeouts
FRACTION = Range(0, 1, high_open=True)  # dropout, warm-up share: 1 would leave nothing
SEED = Range(0, 2**32 - 1)  # what numpy's and datasets' seeding accept


def option(default: Any, help: str, range: Range | None = None, **argparse_kwargs: Any) -> Any:
    """A settings field: its default, its --help text, for a number the Range it must lie in, and any
    argparse keywords (type, choices, required)."""
    return field(default=default, metadata={"help": help, "range": range, **argparse_kwargs})



@dataclass
class DataConfig:
    task: str = option("imdb-subset", "preset: imdb, imdb-subset, amazon-subset, amazon (see docs/data.md)")
    data_dir: Optional[str] = option(None, "local folder with the preset's files (e.g. ../shared/data) instead of the "
                                     "Hub")
    train_file: Optional[str] = option(None, "local train file (.parquet, .csv, .jsonl/.json); overrides the preset's "
                                       "source")
    eval_file: Optional[str] = option(None, "local eval file; without it, --train-file is split by --eval-fraction")
    eval_fraction: float = option(0.2, "share of --train-file held out for evaluation when no --eval-file is given",
                                  Range(0, 1, low_open=True, high_open=True))
    text_column: Optional[str] = option(None, "text column; 'title,content' joins several (default: the preset's)")
    label_column: str = option("label", "label column: class names (e.g. positive/negative) or ids 0..N-1 (1.0 is "
                               "fine)")
    label_names: Optional[list] = option(None, "class names in id order, comma-separated (e.g. neg,pos so that pos = "
                                         "1); default: sorted names from the training labels, or the preset's",
                                         type=lambda s: [n.strip() for n in s.split(",")])
    num_labels: Optional[int] = option(None, "number of classes (default: inferred from the training labels; checked "
                                       "when given)", Range(2))
    allow_one_class: bool = option(False, "train although the training labels hold one class only (refused by default: "
                                   "such a model can only say one thing); needs --num-labels or --label-names")
    file_encoding: str = option("utf-8", "text encoding of CSV / JSON files (e.g. latin-1, cp1252, utf-16)")
    train_samples: Optional[int] = option(None, "number of training examples (default: the preset's)", COUNT)
    eval_samples: Optional[int] = option(None, "number of evaluation examples (default: the preset's)", COUNT)
    max_length: Optional[int] = option(None, "truncate to this many tokens (default: the model's maximum)", COUNT)
    validation_fraction: Optional[float] = option(None, "carve a stratified validation set of this share out of the "
                                                  "training rows (the same rows for every run of one --data-seed); "
                                                  "compare --lr-search decides on it, never on the eval (test) rows",
                                                  Range(0, 1, low_open=True, high_open=True))
    data_seed: int = option(42, "seed for subset sampling and splits (the seed recipe uses 42)", SEED)
    data_timeout: float = option(DEFAULT_DATA_TIMEOUT_S, "seconds the other processes wait for rank 0 to load and "
                                 "tokenize the data (on a gloo group of its own, apart from --dist-timeout)", POSITIVE)
    num_proc: Optional[int] = option(None, "processes for tokenization (default: the CPU cores this process may use, "
                                     "at most 8, and 1 below 20k rows)", COUNT)
    cache_dir: Optional[str] = option(None, "datasets cache folder (default: HF_DATASETS_CACHE); put it on a shared "
                                      "filesystem and run launch/prepare_data.py once, so every job starts warm")


@dataclass
class TrainConfig:
    model: str = option(DEFAULT_MODEL, "Hub name or local folder of a pretrained encoder")
    freeze: str = option("none", "none | lastN (e.g. last2: last N blocks + pooler + classifier) | head (classifier "
                         "only) | lora (LoRA adapters + pooler + classifier, see --lora-*)")
    layer_lr_decay: float = option(1.0, "layer-wise lr decay F in (0, 1]: head and pooler get --lr, block i of L "
                                   "lr*F^(L-i), embeddings lr*F^(L+1); 1 = off (with --freeze none or lastN)",
                                   Range(0, 1, low_open=True))
    unfreeze_every: int = option(0, "gradual unfreezing: every N optimizer steps thaw the next block from the top (the "
                                 "pooler with the first), starting from --freeze; 0 = off", NON_NEGATIVE)
    unfreeze_to: Optional[str] = option(None, "where gradual unfreezing stops: lastN or none (default none; needs "
                                        "--unfreeze-every)")
    lora_r: int = option(8, "--freeze lora: rank of the LoRA update matrices (>= 1)", COUNT)
    lora_alpha: float = option(16.0, "--freeze lora: LoRA scale alpha (the update is scaled by alpha / r)", POSITIVE)
    lora_dropout: float = option(0.1, "--freeze lora: dropout on the LoRA branch's input, in [0, 1)", FRACTION)
    lora_targets: Optional[str] = option(None, "--freeze lora: comma-separated module-name suffixes to adapt, e.g. "
                                         "attention.self.query,attention.output.dense (default: every block's "
                                         "attention query and value projections, found by structure)")
    lr: float = option(2e-5, "peak learning rate (AdamW)", POSITIVE)
    weight_decay: float = option(0.01, "AdamW weight decay (never applied to biases and LayerNorm)", NON_NEGATIVE)
    batch_size: int = option(16, "training batch size per device", COUNT)
    eval_batch_size: Optional[int] = option(None, "evaluation batch size per device (default: 2 x batch size)", COUNT)
    epochs: int = option(1, "training epochs", COUNT)
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps (default: all epochs)", COUNT)
    grad_accum: int = option(1, "gradient accumulation steps", COUNT)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)", NON_NEGATIVE)
    warmup_ratio: float = option(0.0, "share of steps with linear warm-up", FRACTION)
    mixed_precision: Optional[str] = option(None, "no | fp16 | bf16 (default: the accelerate config, else chosen for "
                                            "the device)")
    seed: int = option(42, "seed for initialisation, dropout and data order", SEED)
    cpu: bool = option(False, "run on CPU even if a GPU is visible (automatic when none is)")
    tf32: bool = option(True, "fp32 matmuls on TF32 tensor cores on GPUs with compute capability >= 8.0 (--no-tf32: "
                        "full fp32)")
    dist_timeout: float = option(DEFAULT_DIST_TIMEOUT_S, "seconds a collective may wait for the other processes before "
                                 "the run fails (the process group's timeout; the data phase has --data-timeout)",
                                 POSITIVE)
    output_dir: Optional[str] = option(None, "run folder (default: runs/<task>-<freeze>-<time>)")
    resume_from: Optional[str] = option(None, "checkpoint folder, or 'auto' for the newest one in --output-dir")
    checkpoint_every: int = option(0, "also checkpoint every N optimizer steps (0: only at the end of each epoch)",
                                   NON_NEGATIVE)
    keep_checkpoints: int = option(2, "how many step checkpoints to keep (0: keep them all)", NON_NEGATIVE)
    log_every: int = option(10, "log training metrics every N optimizer steps", COUNT)
    max_skipped_steps: int = option(100, "fp16: stop (exit 3) after more than this many optimizer steps in a row "
                                    "skipped by the loss scaler (a few are normal; a long run means inf/NaN gradients)",
                                    NON_NEGATIVE)
    pause_at_step: Optional[int] = option(None, "score the validation split at this optimizer step, checkpoint and "
                                          "exit 0 (a rung of successive halving); --resume-from auto goes on, on "
                                          "the schedule of the whole run", COUNT)
    score_test: bool = option(True, "score the eval (test) split; --no-score-test: score only the validation split "
                              "(the lr-search trials: their files hold no test row)")
    stop_file: Optional[str] = option(None, "if this file appears, checkpoint at the next step and exit 75 (for "
                                      "requeue)")
    num_workers: Optional[int] = option(None, "DataLoader worker processes (default: 0 on CPU; on a GPU up to 4 per "
                                        "process)", NON_NEGATIVE)
    group_by_length: bool = option(True, "train on shuffled groups of similar-length rows (less padding, order still "
                                   "random); --no-group-by-length: plain random batches")
    frozen_dropout: bool = option(False, "--frozen-dropout: dropout in the frozen layers too, as the seeds' Trainer "
                                  "did; default: the frozen part runs as in inference, without dropout (up to 2x "
                                  "faster on CPU, same F1 within seed noise; see docs/performance.md)")
    cache_frozen: bool = option(False, "head/lastN: compute the frozen part's outputs once (eval mode, no dropout) and "
                                "train the trainable part on them every epoch (see docs/performance.md)")
    compile: bool = option(False, "torch.compile the model (opt-in: compile time is only repaid by long runs)")
    report_to: str = option("none", "experiment trackers, comma-separated: tensorboard, wandb, mlflow, trackio (or "
                            "none)")
    run_name: Optional[str] = option(None, "the run's name in the trackers (default: the output folder's name)")
    metrics: Optional[str] = option(None, "extra eval metrics from the `evaluate` library, e.g. "
                                    "matthews_correlation,f1 (Hub names, cached ones, or paths to metric scripts); the "
                                    "default set is scikit-learn's f1/accuracy/precision/recall")
    quiet: bool = option(False, "print only the final metrics table (and errors)")
    verbose: bool = option(False, "also show library logs and progress bars (datasets, transformers) and extra details")
    data: DataConfig = field(default_factory=DataConfig)

    def resolve_output_dir(self) -> Path:
        if self.output_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.output_dir = f"runs/{self.data.task}-{self.freeze}-{stamp}"
        return Path(self.output_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Options that contradict each other. A run that scores only the validation split, or pauses at a rung
        to score it, needs one."""
        if self.data.validation_fraction is not None:
            return
        for needed, flag in ((not self.score_test, "--no-score-test"),
                             (self.pause_at_step is not None, "--pause-at-step")):
            if needed:
                raise ToolkitError(f"{flag} scores the validation split, and there is none",
                                   "add --validation-fraction (e.g. 0.1)")


@dataclass
class EvalConfig:
    model: str = option(None, "what to score: a run folder, its model/ folder, or a checkpoints/step-N folder",
                        required=True)
    same_data: bool = option(False, "score on the run's own eval set (its data options; --data-dir still relocates the "
                             "files)")
    eval_batch_size: Optional[int] = option(None, "evaluation batch size per device (default: the run's, else 32)",
                                            COUNT)
    mixed_precision: Optional[str] = option(None, "no | fp16 | bf16")
    cpu: bool = option(False, "run on CPU even if a GPU is visible")
    tf32: bool = option(True, "fp32 matmuls on TF32 tensor cores on GPUs with compute capability >= 8.0 (--no-tf32: "
                        "full fp32)")
    dist_timeout: float = option(DEFAULT_DIST_TIMEOUT_S, "seconds a collective may wait for the other processes "
                                 "(process-group timeout)", POSITIVE)
    seed: int = option(42, "seed", SEED)
    output_dir: Optional[str] = option(None, "where metrics.json and predictions.csv go (default: "
                                       "runs/eval-<task>-<time>)")
    metrics: Optional[str] = option(None, "extra metrics from the `evaluate` library (see train --help)")
    data: DataConfig = field(default_factory=DataConfig)

    def resolve_output_dir(self) -> Path:
        if self.output_dir is None:
            self.output_dir = f"runs/eval-{self.data.task}-{time.strftime('%Y%m%d-%H%M%S')}"
        return Path(self.output_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PrepareConfig:
    model: str = option(DEFAULT_MODEL, "the model the training run will use (only its tokenizer and config are read)")
    data: DataConfig = field(default_factory=DataConfig)


# The options of compare and predict live here too, beside the others: a command's --help and its bad
# options answer before the command's own module (torch, transformers) loads.
@dataclass
class CompareConfig(TrainConfig):
    policies: str = option("none,last2,head", "comma-separated policies to train one after another: none, head, lastN, "
                           "lora (with the --lora-* settings), +llrdF for layer-wise lr decay (last2+llrd0.9), "
                           "START>TARGET@N for gradual unfreezing every N steps (head>none@50); 'none' (else the first "
                           "one listed) is the baseline for the paired F1 change and speed-up")
    seeds: Optional[str] = option(None, "comma-separated training seeds, every policy trained once per seed (e.g. "
                                  "42,43,44; default: --seed alone); the data rows stay those of --data-seed")
    repeats: Optional[int] = option(None, "train every policy with K seeds: --seed, --seed+1, ..., --seed+K-1", COUNT)
    lr: Optional[float] = option(None, "one peak learning rate for every policy (default 2e-5); with --lr-search each "
                                 "policy gets its own instead", POSITIVE)
    lr_search: bool = option(False, "choose each policy's learning rate on the validation split (needs "
                             "--validation-fraction): a grid per policy, successive halving, an Optuna study; then "
                             "the final runs over --seeds at the chosen rates (see docs/experiments.md)")
    lr_grid: Optional[list] = option(None, "with --lr-search: POLICY=LR,LR,... replaces that policy's default grid "
                                     "(repeatable, e.g. --lr-grid lora=1e-4,3e-4,1e-3)", action="append", type=str)
    search_seeds: Optional[str] = option(None, "with --lr-search: comma-separated seeds every arm trains with; an "
                                         "arm's score is their median validation F1 (default: the first of --seeds)")
    halving_eta: int = option(3, "with --lr-search: successive halving keeps the best 1/eta of a policy's rates at "
                              "every rung (1: every rate trains the whole budget)", COUNT)
    study_storage: Optional[str] = option(None, "with --lr-search: the Optuna journal file of the study (default: "
                                          "OUTPUT_DIR/search/study.journal)")
    workers: Optional[int] = option(None, "worker processes that train the comparison's runs side by side, each run in "
                                    "a fresh process (default: one per --processes-per-run GPUs, else 1)", COUNT)
    processes_per_run: int = option(1, "processes of each run: on GPUs each worker owns this many and runs each run "
                                    "under `accelerate launch` on them; on CPU a gloo group", COUNT)
    threads_per_run: Optional[int] = option(None, "CPU threads of each run's process (default: the cores shared out "
                                            "among the workers)", COUNT)
    status: Optional[str] = option(None, "print what the comparison in this OUTPUT_DIR is doing (runs done, running, "
                                   "pending, failed; the study) and exit; any node may ask")
    report_only: Optional[str] = option(None, "write the report of the comparison in this OUTPUT_DIR from its runs' "
                                        "files and exit (e.g. when the last worker of an array was cancelled)")
    # replaced by --policies; given anyway -> a clear error
    freeze: Optional[str] = option(None, argparse.SUPPRESS)
    layer_lr_decay: Optional[float] = option(None, argparse.SUPPRESS, Range(0, 1, low_open=True))
    unfreeze_every: Optional[int] = option(None, argparse.SUPPRESS, NON_NEGATIVE)
    unfreeze_to: Optional[str] = option(None, argparse.SUPPRESS)

    def resolve_output_dir(self) -> Path:
        if self.output_dir is None:
            self.output_dir = f"runs/compare-{self.data.task}-{time.strftime('%Y%m%d-%H%M%S')}"
        return Path(self.output_dir)



@dataclass
class PredictConfig:
    model: str = option(None, f"trained model: {LAYOUTS}", required=True)
    input: str = option("-", "texts: .txt (one per line), .csv, .jsonl, .parquet, or '-' for one per line on stdin")
    output: Optional[str] = option(None, "result file, .csv or .jsonl (default: JSON Lines on stdout)")
    text_column: str = option("text", "text column of a .csv / .jsonl / .parquet input")
    batch_size: int = option(32, "texts per forward pass", COUNT)
    max_length: Optional[int] = option(None, "truncate to this many tokens (default: what the model was trained with)",
                                       COUNT)
    cpu: bool = option(False, "run on CPU even if a GPU is visible")



def _add_fields(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = get_type_hints(cls)
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            _add_fields(parser.add_argument_group(f.name), hints[f.name])
            continue
        flag = _flag(f.name)
        kind = hints[f.name]
        extra = {k: v for k, v in f.metadata.items() if k not in ("help", "range")}
        if kind is bool:  # --flag / --no-flag, so scripts can state either side whatever the default
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
            continue
        base = next((t for t in getattr(kind, "__args__", (kind,)) if t is not type(None)), str)
        if base in (int, float) and f.metadata.get("range") is None:  # caught when any command builds its parser
            raise TypeError(f"{cls.__name__}.{f.name} is a number without a range: give its option() a Range")
        default = None if extra.get("required") else f.default
        extra.setdefault("type", base)  # a field may bring its own parser (e.g. a comma-separated list)
        parser.add_argument(flag, default=default, help=f.metadata["help"], **extra)


def _build(cls: type, values: dict) -> Any:
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values)
        else:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranges(cfg: Any) -> None:
    """Every numeric option inside its Range, or a ToolkitError naming the option, the value and the range."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value)
            continue
        allowed = f.metadata.get("range")
        if allowed is None or value is None or isinstance(value, bool) or allowed.accepts(value):
            continue
        kind = "an integer" if isinstance(value, int) else "a finite number"
        default = "or leave it out for the default" if f.default is None else f"the default is {f.default!r}"
        raise ToolkitError(f"{_flag(f.name)} {value!r} is out of range: it must be {kind} {allowed.describe()}",
                           f"pass {_flag(f.name)} {allowed.describe()} ({default})")


def parse_args(cls: type, argv: list[str] | None = None, description: str | None = None) -> Any:
    """The config from the command line; raises ToolkitError for a value outside its option's Range or options
    that contradict each other (the config's check())."""
    parser = argparse.ArgumentParser(description=description)
    _add_fields(parser, cls)
    cfg = _build(cls, vars(parser.parse_args(argv)))
    check_ranges(cfg)
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def save_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
