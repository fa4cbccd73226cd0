"""Task presets, loading (Hub or local files), validation, tokenization, batching.

Everything here returns Hugging Face `datasets` objects so loading and tokenization
are cached on disk (keyed by content fingerprints) and reused by later runs and by
the other ranks of a distributed run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import datasets
import torch
from datasets import Dataset, concatenate_datasets
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from .config import DataConfig
from .errors import ToolkitError

FILE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}


@dataclass(frozen=True)
class Preset:
    hub_name: str
    local_name: str  # sub-folder of --data-dir
    text_column: str
    train_split: str
    eval_split: str | None  # None: carve the eval set out of the train pool
    train_samples: int | None
    eval_samples: int | None
    sampling: str  # "all" | "balanced" | "head-split"
    label_names: tuple[str, ...] = ("negative", "positive")


PRESETS = {
    "imdb": Preset("stanfordnlp/imdb", "imdb", "text", "train", "test", None, None, "all"),
    # The seed recipe: 4000 + 4000 train reviews and 1000 + 1000 test reviews, seed 42.
    "imdb-subset": Preset("stanfordnlp/imdb", "imdb", "text", "train", "test", 8000, 2000, "balanced"),
    # The seed recipe: train[:10000], then an 80/20 split.
    "amazon-subset": Preset("fancyzhx/amazon_polarity", "amazon_polarity", "content", "train", None, 8000, 2000, "head-split"),
    "amazon": Preset("fancyzhx/amazon_polarity", "amazon_polarity", "content", "train", "test", None, None, "all"),
}


def get_preset(task: str) -> Preset:
    if task not in PRESETS:
        raise ToolkitError(f"unknown task '{task}'", f"use one of: {', '.join(PRESETS)} (or --train-file for your own data)")
    return PRESETS[task]


# ---------------------------------------------------------------- loading


def load_data_file(path: Path) -> Dataset:
    if not path.exists():
        raise ToolkitError(f"data file not found: {path}", "check the path, or pass --data-dir / --train-file / --eval-file")
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ToolkitError(f"unsupported file type '{path.suffix}' for {path}", f"use one of {', '.join(FILE_FORMATS)}")
    return datasets.load_dataset(fmt, data_files=str(path), split="train")


def _find_split_file(data_dir: Path, preset: Preset, split: str) -> Path:
    if not data_dir.is_dir():
        raise ToolkitError(f"data folder not found: {data_dir}", "pass an existing folder to --data-dir")
    candidates = [d / f"{split}{ext}" for d in (data_dir / preset.local_name, data_dir) for ext in FILE_FORMATS]
    for path in candidates:
        if path.exists():
            return path
    raise ToolkitError(
        f"no '{split}' file for this task in {data_dir} (looked for {preset.local_name}/{split}.parquet|csv|jsonl|json)",
        f"put the file there, or name it with --train-file / --eval-file",
    )


def _load_hub(preset: Preset, split: str) -> Dataset:
    try:
        return datasets.load_dataset(preset.hub_name, split=split)
    except Exception as exc:  # offline, no cache, or no such dataset
        raise ToolkitError(
            f"could not load '{preset.hub_name}' ({split}) from the Hugging Face Hub: {type(exc).__name__}: {str(exc)[:200]}",
            "without Hub access, pass --data-dir DIR (with e.g. imdb/train.parquet, imdb/test.parquet) or --train-file/--eval-file",
        ) from exc


def load_raw(cfg: DataConfig) -> tuple[Dataset, Dataset | None]:
    """The train pool and the eval pool (None when eval is carved out of the train pool)."""
    preset = get_preset(cfg.task)
    if cfg.train_file:
        train = load_data_file(Path(cfg.train_file))
        return train, load_data_file(Path(cfg.eval_file)) if cfg.eval_file else None
    if cfg.eval_file:
        raise ToolkitError("--eval-file was given without --train-file", "pass both, or use --data-dir")
    if cfg.data_dir:
        load = lambda split: load_data_file(_find_split_file(Path(cfg.data_dir), preset, split))  # noqa: E731
    else:
        load = lambda split: _load_hub(preset, split)  # noqa: E731
    return load(preset.train_split), load(preset.eval_split) if preset.eval_split else None


# ---------------------------------------------------------------- validation


def text_columns(cfg: DataConfig) -> list[str]:
    names = cfg.text_column or get_preset(cfg.task).text_column
    return [c.strip() for c in names.split(",") if c.strip()]


def clean(ds: Dataset, cfg: DataConfig, name: str, log=print) -> Dataset:
    """Join text columns into `text`, drop empty texts, check labels. Errors name the fix."""
    cols = text_columns(cfg)
    missing = [c for c in cols + [cfg.label_column] if c not in ds.column_names]
    if missing:
        raise ToolkitError(
            f"{name} data has no column(s) {missing}; it has {ds.column_names}",
            "name the right columns with --text-column / --label-column",
        )
    if len(ds) == 0:
        raise ToolkitError(f"{name} data has no rows", "check the file or the sample counts")

    def join(batch):
        parts = zip(*(batch[c] for c in cols))
        return {"text": [". ".join(p.strip() for p in row if p is not None and p.strip()) for row in parts]}

    ds = ds.map(join, batched=True, desc=f"{name}: text")
    labels = list(ds[cfg.label_column])
    bad = sorted({lab for lab in labels if not isinstance(lab, int) or not 0 <= lab < cfg.num_labels}, key=str)
    if bad:
        raise ToolkitError(
            f"{name} labels outside 0..{cfg.num_labels - 1} in column '{cfg.label_column}': {bad[:10]}",
            "labels must be integers 0..N-1: pass --num-labels N, or map the labels in the file",
        )
    before = len(ds)
    ds = ds.filter(lambda batch: [bool(t) for t in batch["text"]], batched=True, desc=f"{name}: drop empty")
    dropped = before - len(ds)
    if len(ds) == 0:
        raise ToolkitError(f"all {before} {name} texts are empty or null", f"check the text column(s) {cols}")
    if dropped:
        log(f"[yellow]{name}: dropped {dropped} of {before} rows with an empty or null text[/yellow]")
    keep = ["text", cfg.label_column]
    ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
    return ds.rename_column(cfg.label_column, "labels") if cfg.label_column != "labels" else ds


# ---------------------------------------------------------------- sampling


def _balanced(ds: Dataset, n: int, num_labels: int, seed: int, name: str) -> Dataset:
    """n examples, as equal per class as n allows, each class shuffled with `seed`, then all shuffled."""
    labels = list(ds["labels"])
    parts = []
    for cls in range(num_labels):
        want = n // num_labels + (1 if cls < n % num_labels else 0)
        idx = [i for i, lab in enumerate(labels) if lab == cls]
        if len(idx) < want:
            raise ToolkitError(f"{name}: class {cls} has {len(idx)} examples, {want} needed for a balanced subset", "ask for fewer samples")
        parts.append(ds.select(idx).shuffle(seed=seed).select(range(want)))
    return concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()


def take_sample(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n)).flatten_indices()


def build_splits(cfg: DataConfig, log=print) -> tuple[Dataset, Dataset]:
    """Train and eval datasets with columns `text`, `labels`, per the preset and overrides."""
    preset = get_preset(cfg.task)
    custom = cfg.train_file is not None
    n_train = cfg.train_samples if cfg.train_samples is not None else (None if custom else preset.train_samples)
    n_eval = cfg.eval_samples if cfg.eval_samples is not None else (None if custom else preset.eval_samples)
    for flag, n in (("--train-samples", n_train), ("--eval-samples", n_eval)):
        if n is not None and n < 1:
            raise ToolkitError(f"{flag} must be at least 1, got {n}", f"pass a positive {flag}")
    train_raw, eval_raw = load_raw(cfg)

    if eval_raw is None:
        pool = clean(train_raw, cfg, "train", log)
        if preset.sampling == "head-split" and not custom:
            # the seed recipe keeps the *first* rows, then splits them
            pool = pool.select(range(min(len(pool), (n_train or 8000) + (n_eval or 2000))))
        test_size = n_eval if n_eval is not None else max(1, round(len(pool) * cfg.eval_fraction))
        if test_size >= len(pool):
            raise ToolkitError(f"eval share {test_size} leaves no training rows out of {len(pool)}", "lower --eval-samples")
        split = pool.train_test_split(test_size=test_size, seed=cfg.data_seed)
        return take_sample(split["train"], n_train, cfg.data_seed), split["test"]

    train, evals = clean(train_raw, cfg, "train", log), clean(eval_raw, cfg, "eval", log)
    if preset.sampling == "balanced" and not custom:
        return (_balanced(train, n_train, cfg.num_labels, cfg.data_seed, "train"),
                _balanced(evals, n_eval, cfg.num_labels, cfg.data_seed, "eval"))
    return take_sample(train, n_train, cfg.data_seed), take_sample(evals, n_eval, cfg.data_seed)


# ---------------------------------------------------------------- tokenization


def tokenize(ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Token ids (unpadded), plus `idx` (row position) and `length` for batching.

    The fingerprint names exactly what the output depends on, so the cache is reused
    across runs and ranks instead of relying on pickling the tokenizer.
    """
    fingerprint = Hasher.hash((ds._fingerprint, tokenizer.name_or_path, len(tokenizer), max_length, "v1"))

    def encode(batch, indices):
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        enc["idx"] = indices
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    return ds.map(encode, batched=True, with_indices=True, remove_columns=["text"],
                  new_fingerprint=fingerprint, desc="tokenize")


def resolve_max_length(requested: int | None, tokenizer: PreTrainedTokenizerBase, model_max_positions: int | None) -> int:
    limits = [n for n in (tokenizer.model_max_length, model_max_positions) if n and n < 1_000_000]
    model_max = min(limits) if limits else 512
    if requested is None:
        return model_max
    if requested < 8 or requested > model_max:
        raise ToolkitError(f"--max-length {requested} is outside 8..{model_max} for this model", f"pass a value up to {model_max}")
    return requested


# ---------------------------------------------------------------- batching


class EpochBatchSampler(Sampler[list[int]]):
    """Global batches for one epoch, a pure function of (seed, epoch).

    Accelerate deals these batches round-robin to the ranks, so every world size sees
    the same batches in the same order, and a resumed run can skip exactly the batches
    already done. It deliberately has no `batch_size` attribute: Accelerate then pads
    uneven ends with whole duplicate batches instead of mixing extra rows into the last
    real batch, which keeps every real batch (and its padding) the same on any world size.

    shuffle=False, sort_by_length=True: evaluation order, longest first, so each batch
    holds similar lengths and little padding; results are put back in row order by `idx`.

    shuffle=True, group_by_length=True: training batches of similar lengths in random
    order. A random permutation is cut into groups of `group_batches` batches; each group
    is sorted by length (each length scaled by a random factor within +-`length_jitter`,
    so rows of similar length land in different batches every epoch, even when the whole
    dataset is one group) and cut into batches; the batch order is then shuffled, and the
    batch holding the longest row goes first (a run that will run out of memory does so
    at step 1). Every row is used once per epoch, and it is still a pure function of
    (seed, epoch), so resuming mid-epoch works as before.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, shuffle: bool, sort_by_length: bool = False,
                 group_by_length: bool = False, group_batches: int = 16, length_jitter: float = 0.05):
        self.lengths = lengths
        self.size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.sort_by_length = sort_by_length
        self.group_by_length = group_by_length
        self.group_batches = group_batches
        self.length_jitter = length_jitter
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.size)

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.lengths)
        if self.shuffle and self.group_by_length:
            yield from self._grouped_batches(torch.Generator().manual_seed(self.seed + self.epoch))
            return
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen).tolist()
        elif self.sort_by_length:
            order = sorted(range(n), key=lambda i: -self.lengths[i])
        else:
            order = list(range(n))
        for start in range(0, n, self.size):
            yield order[start:start + self.size]

    def _grouped_batches(self, gen: torch.Generator) -> list[list[int]]:
        n = len(self.lengths)
        perm = torch.randperm(n, generator=gen).tolist()
        scale = (1 + self.length_jitter * (2 * torch.rand(n, generator=gen) - 1)).tolist()
        group = self.size * self.group_batches  # a multiple of the batch size: only the very last batch can be short
        batches = []
        for start in range(0, n, group):
            rows = sorted(perm[start:start + group], key=lambda i: -self.lengths[i] * scale[i])  # stable: ties stay random
            batches += [rows[j:j + self.size] for j in range(0, len(rows), self.size)]
        batches = [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]
        longest = max(range(len(batches)), key=lambda k: max(self.lengths[i] for i in batches[k]))
        batches[0], batches[longest] = batches[longest], batches[0]
        return batches


class Collator:
    """Dynamic padding to the longest row of each batch; `idx` rides along as a tensor."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None):
        self.pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, rows: list[dict]) -> dict:
        idx = torch.tensor([r.pop("idx") for r in rows])
        for r in rows:
            r.pop("length", None)
        batch = self.pad(rows)
        batch["idx"] = idx
        return batch


def make_loader(ds: Dataset, collator: Collator, batch_size: int, seed: int, train: bool, num_workers: int = 0,
                group_by_length: bool = False) -> DataLoader:
    sampler = EpochBatchSampler(list(ds["length"]), batch_size, seed, shuffle=train, sort_by_length=not train,
                                group_by_length=group_by_length)
    # persistent: workers are not restarted for every epoch and every evaluation
    return DataLoader(ds, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
