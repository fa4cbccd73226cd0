"""Task presets, loading (Hub or local files), validation, tokenization, batching.

Everything here returns Hugging Face `datasets` objects so loading and tokenization
are cached on disk (keyed by content fingerprints) and reused by later runs and by
the other ranks of a distributed run.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets import Dataset, concatenate_datasets
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from ..core.config import DataConfig
from ..core.errors import ToolkitError
from ..output.library_logs import tokenize_progress

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
    "amazon-subset": Preset("fancyzhx/amazon_polarity", "amazon_polarity", "content", "train", None, 8000, 2000,
                            "head-split"),
    "amazon": Preset("fancyzhx/amazon_polarity", "amazon_polarity", "content", "train", "test", None, None, "all"),
}


def get_preset(task: str) -> Preset:
    if task not in PRESETS:
        raise ToolkitError(f"unknown task '{task}'",
                           f"use one of: {', '.join(PRESETS)} (or --train-file for your own data)")
    return PRESETS[task]


# ---------------------------------------------------------------- loading


ENCODING_FIX = ("pass --file-encoding with the file's encoding (e.g. latin-1, cp1252, utf-16; any Python codec name), "
                "or save the file as UTF-8")


def load_data_file(path: Path, encoding: str = "utf-8", cache_dir: str | None = None) -> Dataset:
    """A local file as a Dataset; every way a file can be unreadable ends in one ToolkitError."""
    if not path.exists():
        raise ToolkitError(f"data file not found: {path}",
                           "check the path, or pass --data-dir / --train-file / --eval-file")
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ToolkitError(f"unsupported file type '{path.suffix}' for {path}", f"use one of {', '.join(FILE_FORMATS)}")
    if path.stat().st_size == 0:
        raise ToolkitError(f"data file {path} is empty", "write a header and at least one row into it")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ToolkitError(f"unknown --file-encoding '{encoding}'",
                           "use a Python codec name: utf-8, latin-1, cp1252, utf-16, ...")
    columns = _header(path, fmt, encoding)
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise ToolkitError(f"{path} has duplicate column names {dupes} (columns: {columns})",
                           "give every column a distinct name in the file")
    kwargs = {"encoding": encoding} if fmt in ("csv", "json") else {}
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own "Failed to read ..." line would repeat ours
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one message naming the file
        raise _read_error(path, fmt, encoding, exc) from exc
    finally:
        datasets.logging.set_verbosity(verbosity)
    if len(ds) == 0:
        raise ToolkitError(f"data file {path} has no rows",
                           "add rows to the file (below its header), or pass another file")
    return ds


def _header(path: Path, fmt: str, encoding: str) -> list[str]:
    """Column names as the file states them (pandas would silently rename a duplicate to 'name.1')."""
    if fmt == "parquet":
        try:
            return pq.read_schema(path).names
        except (pa.ArrowException, OSError) as exc:
            raise ToolkitError(f"{path} is not a readable Parquet file ({str(exc)[:160]})",
                               "check the file (a .parquet name needs Parquet content), or re-export it") from exc
    if fmt == "csv":
        try:
            with path.open(newline="", encoding=encoding) as fh:
                return next(csv.reader(fh), [])
        except UnicodeError as exc:
            raise _encoding_error(path, encoding, exc) from exc
    return []  # JSON: an object cannot hold a key twice once parsed


def _encoding_error(path: Path, encoding: str, exc: Exception) -> ToolkitError:
    return ToolkitError(f"{path} is not valid {encoding} text ({exc})", ENCODING_FIX)


def _read_error(path: Path, fmt: str, encoding: str, exc: BaseException) -> ToolkitError:
    chain, err = [], exc
    while err is not None and len(chain) < 10:
        chain.append(err)
        err = err.__cause__ or err.__context__
    for err in chain:
        if isinstance(err, UnicodeError):
            return _encoding_error(path, encoding, err)
        empty = "corresponds to no data" in str(err) or type(err).__name__ == "EmptyDataError"
        if empty or isinstance(err, StopIteration):
            return ToolkitError(f"data file {path} has no rows",
                                "add rows to the file (below its header), or pass another file")
    detail = next((f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" for e in reversed(chain) if str(e)),
                  type(exc).__name__)
    what = {"json": "JSON / JSON Lines (one object per line)", "csv": "CSV", "parquet": "Parquet"}[fmt]
    return ToolkitError(f"could not read {path} as {what}: {detail}",
                        f"check the file's format (it must be {what}), or re-export it")


def _find_split_file(data_dir: Path, preset: Preset, split: str) -> Path:
    if not data_dir.is_dir():
        raise ToolkitError(f"data folder not found: {data_dir}", "pass an existing folder to --data-dir")
    candidates = [d / f"{split}{ext}" for d in (data_dir / preset.local_name, data_dir) for ext in FILE_FORMATS]
    for path in candidates:
        if path.exists():
            return path
    raise ToolkitError(
        f"no '{split}' file for this task in {data_dir} "
        f"(looked for {preset.local_name}/{split}.parquet|csv|jsonl|json)",
        "put the file there, or name it with --train-file / --eval-file",
    )


def _load_hub(preset: Preset, split: str, cache_dir: str | None = None) -> Dataset:
    try:
        return datasets.load_dataset(preset.hub_name, split=split, cache_dir=cache_dir)
    except Exception as exc:  # offline, no cache, or no such dataset
        raise ToolkitError(
            f"could not load '{preset.hub_name}' ({split}) from the Hugging Face Hub: {type(exc).__name__}: "
            f"{str(exc)[:200]}",
            "without Hub access, pass --data-dir DIR (with e.g. imdb/train.parquet, imdb/test.parquet) or "
            "--train-file/--eval-file",
        ) from exc


def load_raw(cfg: DataConfig) -> tuple[Dataset, Dataset | None]:
    """The train pool and the eval pool (None when eval is carved out of the train pool)."""
    preset = get_preset(cfg.task)
    load_file = lambda path: load_data_file(Path(path), cfg.file_encoding, cfg.cache_dir)  # noqa: E731
    if cfg.train_file:
        train = load_file(cfg.train_file)
        return train, load_file(cfg.eval_file) if cfg.eval_file else None
    if cfg.eval_file:
        raise ToolkitError("--eval-file was given without --train-file", "pass both, or use --data-dir")
    if cfg.data_dir:
        load = lambda split: load_file(_find_split_file(Path(cfg.data_dir), preset, split))  # noqa: E731
    else:
        load = lambda split: _load_hub(preset, split, cfg.cache_dir)  # noqa: E731
    return load(preset.train_split), load(preset.eval_split) if preset.eval_split else None


# ---------------------------------------------------------------- validation


def text_columns(cfg: DataConfig) -> list[str]:
    names = cfg.text_column or get_preset(cfg.task).text_column
    return [c.strip() for c in names.split(",") if c.strip()]


def arrow_column(ds: Dataset, name: str) -> pa.ChunkedArray:
    """One column as Arrow, without building a Python object per row (the table is memory-mapped)."""
    if ds._indices is None:
        return ds.data.column(name)
    return ds.with_format("arrow")[:][name]  # a selection (shuffle/select): only its rows


def numpy_column(ds: Dataset, name: str) -> np.ndarray:
    return arrow_column(ds, name).to_numpy()


def _nulls(col: pa.ChunkedArray, what: str, name: str, column: str) -> None:
    if col.null_count:
        rows = np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))
        raise ToolkitError(
            f"{name} data: {col.null_count} row(s) have no {what} in column '{column}', at row positions "
            f"{rows[:10].tolist()}{' ...' if len(rows) > 10 else ''} (0 = first data row)",
            "fill in or remove those rows")


def resolve_labels(ds: Dataset, cfg: DataConfig, name: str = "train", training: bool = True) -> None:
    """Fix the label space from the training rows: cfg.num_labels and cfg.label_names are filled in.

    String labels become ids by sorted name, or by --label-names' order; integer labels (and integral
    floats, as pandas writes a column with a gap) stay ids, with --num-labels inferred as max + 1.
    Saved with the run (config.json, the model's id2label), so evaluation maps the same way.
    Training rows of one class only are refused (see _one_class).
    """
    _check_columns(ds, cfg, name)
    col = arrow_column(ds, cfg.label_column)
    _nulls(col, "label", name, cfg.label_column)
    given = list(cfg.label_names) if cfg.label_names else None
    declared = cfg.num_labels is not None or given is not None
    if given is not None and len(set(given)) != len(given):
        raise ToolkitError(f"--label-names repeats a name: {given}", "name every class once")
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        found = sorted(pc.unique(col).to_pylist())
        if given is not None:
            unknown = [v for v in found if v not in given]
            if unknown:
                raise ToolkitError(f"{name} labels {unknown[:10]} in column '{cfg.label_column}' are not in "
                                   f"--label-names {given}",
                                   "add them to --label-names (its order gives the ids 0, 1, ...)")
        names = given or found
        if cfg.num_labels is not None and cfg.num_labels != len(names):
            raise ToolkitError(f"--num-labels {cfg.num_labels} but the labels name {len(names)} classes: {names[:10]}",
                               f"pass --num-labels {len(names)}, or leave it out (it is inferred)")
        cfg.num_labels, cfg.label_names = len(names), names
        if training:
            _one_class(found, cfg, name, declared)
        return
    ids = _integer_labels(col, name, cfg.label_column)
    top = int(pc.max(ids).as_py())
    if cfg.num_labels is None:
        cfg.num_labels = len(given) if given else max(top + 1, 2)
    if given is not None and len(given) != cfg.num_labels:
        raise ToolkitError(f"--label-names names {len(given)} classes but there are {cfg.num_labels}",
                           "give one name per class id 0..N-1, in order")
    _check_range(ids, cfg, name)
    if given is None and not cfg.train_file:
        preset_names = get_preset(cfg.task).label_names
        given = list(preset_names) if len(preset_names) == cfg.num_labels else None
    cfg.label_names = given
    if training:
        _one_class(pc.unique(ids).to_pylist(), cfg, name, declared)


def _one_class(found: list, cfg: DataConfig, name: str, declared: bool) -> None:
    """A model trained on one class can only ever say that class, and its eval metrics read perfect
    (F1 1.0 on eval rows of that class): refused unless the user says, twice, that this is meant."""
    if len(found) > 1:
        return
    if cfg.allow_one_class and declared and cfg.num_labels >= 2:
        return
    only = found[0]
    shown = f"'{only}'" if isinstance(only, str) else (
        f"{only} ({cfg.label_names[only]})" if cfg.label_names and 0 <= only < len(cfg.label_names) else str(only))
    raise ToolkitError(
        f"{name} labels in column '{cfg.label_column}' are all one class, {shown}: a model trained on them can only "
        "predict that class",
        "check --label-column and the file (or --train-samples, if a small sample took one class); to train on it "
        "anyway, e.g. as a first stage, pass --allow-one-class together with --num-labels N or --label-names")


def _integer_labels(col: pa.ChunkedArray, name: str, column: str) -> pa.ChunkedArray:
    if pa.types.is_integer(col.type) or pa.types.is_boolean(col.type):
        return pc.cast(col, pa.int64())
    if pa.types.is_floating(col.type):
        frac = pc.invert(pc.equal(col, pc.floor(col)))  # NaN and inf count as non-integral
        if pc.any(frac).as_py():
            bad = pc.unique(pc.filter(col, frac)).to_pylist()
            raise ToolkitError(f"{name} labels in column '{column}' are not whole numbers: {sorted(bad)[:10]}",
                               "labels must be class ids 0..N-1 (1.0 is fine) or class names")
        return pc.cast(col, pa.int64())
    raise ToolkitError(f"{name} label column '{column}' has type {col.type}", "use integer class ids or class names")


def _check_range(ids: pa.ChunkedArray, cfg: DataConfig, name: str) -> None:
    outside = pc.or_(pc.less(ids, 0), pc.greater_equal(ids, cfg.num_labels))
    if pc.any(outside).as_py():
        bad = sorted(pc.unique(pc.filter(ids, outside)).to_pylist())
        raise ToolkitError(
            f"{name} labels outside 0..{cfg.num_labels - 1} in column '{cfg.label_column}': {bad[:10]}",
            "labels must be integers 0..N-1 or class names: pass --num-labels N (or leave it out: it is inferred), "
            "or map the labels in the file")


def _check_columns(ds: Dataset, cfg: DataConfig, name: str) -> None:
    missing = [c for c in text_columns(cfg) + [cfg.label_column] if c not in ds.column_names]
    if missing:
        raise ToolkitError(
            f"{name} data has no column(s) {missing}; it has {ds.column_names}",
            "name the right columns with --text-column / --label-column",
        )
    if len(ds) == 0:
        raise ToolkitError(f"{name} data has no rows", "check the file or the sample counts")


def _label_ids(col: pa.ChunkedArray, cfg: DataConfig, name: str) -> pa.ChunkedArray:
    """Labels as int64 ids in 0..num_labels-1, per the label space resolve_labels fixed."""
    _nulls(col, "label", name, cfg.label_column)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        names = list(cfg.label_names or [])
        ids = pc.index_in(col, value_set=pa.array(names, type=col.type))
        if ids.null_count:
            unseen = sorted(pc.unique(pc.filter(col, pc.is_null(ids))).to_pylist())
            raise ToolkitError(f"{name} labels {unseen[:10]} in column '{cfg.label_column}' are not among the training "
                               f"labels {names[:20]}", "use the same class names in every file (or --label-names)")
        return pc.cast(ids, pa.int64())
    ids = _integer_labels(col, name, cfg.label_column)
    _check_range(ids, cfg, name)
    return ids


def _joined_text(table: pa.Table, cols: list[str]) -> pa.Array:
    """Columns stripped and joined with '. ', empty parts skipped; "" when nothing is left."""
    joined = None
    for c in cols:
        part = pc.utf8_trim_whitespace(pc.cast(table.column(c), pa.string()))
        part = pc.if_else(pc.equal(part, ""), pa.scalar(None, pa.string()), part)
        if joined is None:
            joined = part
        else:  # (binary_join_element_wise's null_handling="skip" drops all-null rows in pyarrow 25: not used)
            both = pc.binary_join_element_wise(joined, part, ". ")
            joined = pc.if_else(pc.is_null(joined), part, pc.if_else(pc.is_null(part), joined, both))
    return pc.fill_null(joined, "")


def clean(ds: Dataset, cfg: DataConfig, name: str, log=print) -> Dataset:
    """`text` (text columns joined) and `labels` (ids), empty texts dropped: one columnar pass, one copy.

    The label space must be fixed first (resolve_labels on the training rows, or the model's names).
    """
    cols = text_columns(cfg)
    _check_columns(ds, cfg, name)
    if cfg.num_labels is None:
        resolve_labels(ds, cfg, name)
    _label_ids(arrow_column(ds, cfg.label_column), cfg, name)  # every error before the pass, not inside it

    def one_pass(table: pa.Table) -> pa.Table:
        text = _joined_text(table, cols)
        out = pa.table({"text": text, "labels": _label_ids(table.column(cfg.label_column), cfg, name)})
        return out.filter(pc.not_equal(text, ""))

    fingerprint = Hasher.hash((ds._fingerprint, cols, cfg.label_column, cfg.label_names, cfg.num_labels, "clean-v2"))
    before = len(ds)
    ds = ds.with_format("arrow").map(one_pass, batched=True, batch_size=20_000, remove_columns=ds.column_names,
                                     new_fingerprint=fingerprint, desc=f"{name}: text and labels").with_format(None)
    dropped = before - len(ds)
    if len(ds) == 0:
        raise ToolkitError(f"all {before} {name} texts are empty or null", f"check the text column(s) {cols}")
    if dropped:
        log(f"[yellow]{name}: dropped {dropped} of {before} rows with an empty or null text[/yellow]")
    return ds


# ---------------------------------------------------------------- sampling


def _balanced(ds: Dataset, n: int, num_labels: int, seed: int, name: str) -> Dataset:
    """n examples, as equal per class as n allows, each class shuffled with `seed`, then all shuffled."""
    labels = numpy_column(ds, "labels")
    parts = []
    for cls in range(num_labels):
        want = n // num_labels + (1 if cls < n % num_labels else 0)
        idx = np.flatnonzero(labels == cls)
        if len(idx) < want:
            raise ToolkitError(f"{name}: class {cls} has {len(idx)} examples, {want} needed for a balanced subset",
                               "ask for fewer samples")
        parts.append(ds.select(idx).shuffle(seed=seed).select(range(want)))
    return concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()


def take_sample(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n)).flatten_indices()


def build_splits(cfg: DataConfig, log=print, training: bool = True) -> tuple[Dataset, Dataset]:
    """Train and eval datasets with columns `text`, `labels`, per the preset and overrides.

    Also resolves the label space into cfg (num_labels, label_names) from the training rows;
    `training=False` (scoring only) accepts training rows of one class.
    """
    preset = get_preset(cfg.task)
    custom = cfg.train_file is not None
    n_train = cfg.train_samples if cfg.train_samples is not None else (None if custom else preset.train_samples)
    n_eval = cfg.eval_samples if cfg.eval_samples is not None else (None if custom else preset.eval_samples)
    for flag, n in (("--train-samples", n_train), ("--eval-samples", n_eval)):
        if n is not None and n < 1:
            raise ToolkitError(f"{flag} must be at least 1, got {n}", f"pass a positive {flag}")
    train_raw, eval_raw = load_raw(cfg)
    resolve_labels(train_raw, cfg, training=training)

    if eval_raw is None:
        pool = clean(train_raw, cfg, "train", log)
        if preset.sampling == "head-split" and not custom:
            # the seed recipe keeps the *first* rows, then splits them
            pool = pool.select(range(min(len(pool), (n_train or 8000) + (n_eval or 2000))))
        test_size = n_eval if n_eval is not None else max(1, round(len(pool) * cfg.eval_fraction))
        if test_size >= len(pool):
            raise ToolkitError(f"eval share {test_size} leaves no training rows out of {len(pool)}",
                               "lower --eval-samples")
        split = pool.train_test_split(test_size=test_size, seed=cfg.data_seed)
        return take_sample(split["train"], n_train, cfg.data_seed), split["test"]

    train, evals = clean(train_raw, cfg, "train", log), clean(eval_raw, cfg, "eval", log)
    if preset.sampling == "balanced" and not custom:
        return (_balanced(train, n_train, cfg.num_labels, cfg.data_seed, "train"),
                _balanced(evals, n_eval, cfg.num_labels, cfg.data_seed, "eval"))
    return take_sample(train, n_train, cfg.data_seed), take_sample(evals, n_eval, cfg.data_seed)


# ---------------------------------------------------------------- tokenization


def default_num_proc(rows: int) -> int:
    """The cores this process may use, at most 8 (tokenizing is CPU-bound; more rarely pays on one disk), and one
    process for small sets, where starting workers costs more than it saves."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8, rows // 20_000))


_FINGERPRINTS: dict[int, tuple[PreTrainedTokenizerBase, str]] = {}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the token ids depend on: the tokenizer's content, not its path (a CPU node and a GPU node may mount
    the model at different places) and not the truncation/padding state its last call left behind."""
    known = _FINGERPRINTS.get(id(tokenizer))
    if known is None or known[0] is not tokenizer:  # hashing the vocabulary takes a while: once per tokenizer
        _FINGERPRINTS[id(tokenizer)] = known = (tokenizer, _tokenizer_fingerprint(tokenizer))
    return known[1]


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return Hasher.hash((type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer)))
    # Every call sets truncation and padding again (transformers' set_truncation_and_padding), so clearing
    # them here changes no output; it leaves only the vocabulary, normalizer and special tokens to hash.
    backend.no_truncation()
    backend.no_padding()
    content = hashlib.sha256(backend.to_str().encode()).hexdigest()  # C speed: Hasher (dill) takes seconds here
    return Hasher.hash((type(tokenizer).__name__, content, len(tokenizer)))


def tokenize(ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, num_proc: int | None = None) -> Dataset:
    """Token ids (unpadded), plus `idx` (row position) and `length` for batching.

    The fingerprint names exactly what the output depends on, so the cache is reused
    across runs, ranks and machines (launch/prepare_data.py) instead of relying on pickling
    the tokenizer. The number of processes does not enter it: datasets reuses shards
    written with another --num-proc.
    """
    fingerprint = Hasher.hash((ds._fingerprint, tokenizer_fingerprint(tokenizer), max_length, "v2"))

    def encode(batch, indices):
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        enc["idx"] = indices
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    num_proc = num_proc or default_num_proc(len(ds))
    with tokenize_progress(len(ds)):
        return ds.map(encode, batched=True, with_indices=True, remove_columns=["text"],
                      num_proc=num_proc if num_proc > 1 else None, new_fingerprint=fingerprint, desc="tokenize")


def resolve_max_length(requested: int | None, tokenizer: PreTrainedTokenizerBase,
                       model_max_positions: int | None) -> int:
    limits = [n for n in (tokenizer.model_max_length, model_max_positions) if n and n < 1_000_000]
    model_max = min(limits) if limits else 512
    if requested is None:
        return model_max
    if requested < 8 or requested > model_max:
        raise ToolkitError(f"--max-length {requested} is outside 8..{model_max} for this model",
                           f"pass a value up to {model_max}")
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

    def __init__(self, lengths, batch_size: int, seed: int, shuffle: bool, sort_by_length: bool = False,
                 group_by_length: bool = False, group_batches: int = 16, length_jitter: float = 0.05):
        self.lengths = np.asarray(lengths, dtype=np.int64)  # a column, never a Python list of rows
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
            order, starts = self._grouped_batches(torch.Generator().manual_seed(self.seed + self.epoch))
            for start in starts.tolist():
                yield order[start:start + self.size].tolist()
            return
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen).numpy()
        elif self.sort_by_length:
            order = np.argsort(-self.lengths, kind="stable")
        else:
            order = np.arange(n)
        for start in range(0, n, self.size):
            yield order[start:start + self.size].tolist()

    def _grouped_batches(self, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's row order and the start of each batch in it, in batch order."""
        n = len(self.lengths)
        perm = torch.randperm(n, generator=gen).numpy()
        scale = (1 + self.length_jitter * (2 * torch.rand(n, generator=gen) - 1)).numpy().astype(np.float64)
        group = self.size * self.group_batches  # a multiple of the batch size: only the very last batch can be short
        key = -self.lengths[perm].astype(np.float64) * scale[perm]
        order = np.empty_like(perm)
        for start in range(0, n, group):  # a loop over groups (n / 16 batches), each sorted by NumPy
            stop = min(start + group, n)
            order[start:stop] = perm[start:stop][np.argsort(key[start:stop], kind="stable")]  # stable: ties stay random
        starts = np.arange(0, n, self.size)
        starts = starts[torch.randperm(len(starts), generator=gen).numpy()]
        batch_max = np.maximum.reduceat(self.lengths[order], np.arange(0, n, self.size))  # in row order of `order`
        longest = int(np.argmax(batch_max[starts // self.size]))  # the first batch (in batch order) holding the max
        starts[[0, longest]] = starts[[longest, 0]]
        return order, starts


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
    sampler = EpochBatchSampler(numpy_column(ds, "length"), batch_size, seed, shuffle=train, sort_by_length=not train,
                                group_by_length=group_by_length)
    # persistent: workers are not restarted for every epoch and every evaluation
    return DataLoader(ds, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)


def split_validation(ds: Dataset, fraction: float, num_labels: int, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation): round(fraction * n_c) rows of every class c go to validation, drawn with `seed`.

    Stratified, so a small validation set keeps the training classes' shares, and a function of the
    rows and the seed only, so every run of a comparison holds out exactly the same rows.
    """
    labels = numpy_column(ds, "labels")
    rng = np.random.default_rng(seed)
    held = []
    for cls in range(num_labels):
        idx = np.flatnonzero(labels == cls)
        n_valid = int(round(fraction * len(idx)))
        if len(idx) and not 0 < n_valid < len(idx):
            raise ToolkitError(f"--validation-fraction {fraction:g} leaves class {cls} with {n_valid} of its "
                               f"{len(idx)} training rows in the validation split and {len(idx) - n_valid} in "
                               "training: each class needs rows in both",
                               f"pass --validation-fraction between {1 / len(idx):.2g} and "
                               f"{1 - 1 / len(idx):.2g}, or more --train-samples")
        held.append(rng.permutation(idx)[:n_valid])
    valid = np.sort(np.concatenate(held))
    train = np.setdiff1d(np.arange(len(ds)), valid)
    return ds.select(train).flatten_indices(), ds.select(valid).flatten_indices()


def prepare_splits(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, model_max_positions: int | None, log=print,
                   need_train: bool = True, need_eval: bool = True
                   ) -> tuple[Dataset | None, Dataset | None, Dataset | None, int]:
    """Train, validation (None without --validation-fraction) and eval splits, validated and tokenized, and the
    max length used (run it rank 0 first). The validation rows are cut from the tokenized training rows, so the
    tokenization cache is the same with and without a validation split. `need_eval=False` leaves the eval (test)
    rows untokenized and unreturned: a run that must not score them never holds them."""
    train_ds, eval_ds = build_splits(cfg, log=log)
    max_length = resolve_max_length(cfg.max_length, tokenizer, model_max_positions)
    train_tok = tokenize(train_ds, tokenizer, max_length, cfg.num_proc) if need_train else None
    valid_tok = None
    if cfg.validation_fraction is not None and train_tok is not None:
        train_tok, valid_tok = split_validation(train_tok, cfg.validation_fraction, cfg.num_labels, cfg.data_seed)
    eval_tok = tokenize(eval_ds, tokenizer, max_length, cfg.num_proc) if need_eval else None
    return train_tok, valid_tok, eval_tok, max_length


def first_example(ds: Dataset, collator: "Collator") -> dict:
    """One collated training row, as the model takes it (without the row id)."""
    example = collator([{k: ds[0][k] for k in ds.column_names}])
    example.pop("idx")
    return example


def default_num_workers(device_type: str, local_processes: int, cpus: int | None = None) -> int:
    """DataLoader workers when --num-workers is not given: 0 on CPU, where the cores train; on a GPU,
    up to 4 per process from this node's cores, so collation overlaps the device's work."""
    if device_type != "cuda":
        return 0
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    return max(0, min(4, cpus // max(1, local_processes) - 1))
