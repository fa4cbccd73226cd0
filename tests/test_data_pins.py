"""Pins written before the data path went columnar: the presets must select exactly the rows, texts and
batches they selected before (tests/test_train.py and test_slurm.py compare predictions across runs, and
the balanced IMDb subset with seed 42 is the seed recipe's)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from toolkit.core.config import DataConfig
from toolkit.data.dataset import EpochBatchSampler, build_splits


def digest(xs) -> str:
    return hashlib.sha256(json.dumps([x for x in xs]).encode()).hexdigest()[:16]


def selected(cfg: DataConfig) -> list[str]:
    train, evals = build_splits(cfg, log=lambda *a: None)
    return [digest(train["text"]), digest(train["labels"]), digest(evals["text"]), digest(evals["labels"])]


def test_balanced_imdb_subset_selects_the_same_rows(data_dir):
    cfg = DataConfig(task="imdb-subset", data_dir=data_dir, train_samples=30, eval_samples=11)
    assert selected(cfg) == ["2539d6cebcfa0235", "3953db2203e24320", "447cf6c584e99346", "6130ea719493d8e5"]


@pytest.mark.parametrize("columns, expected", [
    (None, ["f90ee6c8ca5d4fcb", "3f4b8c61535f4fd7", "c631ca7576e04bfc", "20d678c9cd22a108"]),
    ("title,content", ["e6d8b86dce309012", "3f4b8c61535f4fd7", "42af509c295a9d06", "20d678c9cd22a108"]),
])
def test_amazon_head_split_and_joined_columns_are_unchanged(data_dir, tmp_path, columns, expected):
    (tmp_path / "amazon_polarity").mkdir()
    sample = Path(data_dir) / "amazon_polarity" / "train_sample.parquet"
    (tmp_path / "amazon_polarity" / "train.parquet").symlink_to(sample)
    cfg = DataConfig(task="amazon-subset", data_dir=str(tmp_path), train_samples=40, eval_samples=9,
                     text_column=columns)
    assert selected(cfg) == expected


def test_own_file_sample_and_split_are_unchanged(data_dir):
    cfg = DataConfig(train_file=str(Path(data_dir) / "amazon_polarity" / "test.parquet"), text_column="title,content",
                     train_samples=25, eval_samples=7)
    assert selected(cfg) == ["4fea84b87be7e617", "3838eb83d0b72f65", "2f71a4d677e1d60a", "2cbfd3b73b9169b7"]


@pytest.mark.parametrize("kind, expected", [
    (dict(shuffle=True, group_by_length=True), "e4da613691bb696f"),
    (dict(shuffle=True), "03fe83a2ea956f45"),
    (dict(shuffle=False, sort_by_length=True), "2754f0ffb2d9b607"),
    (dict(shuffle=False), "01b5bbb6c2048d92"),
])
def test_batches_are_unchanged(kind, expected):
    rng = random.Random(0)
    lengths = [rng.randint(5, 90) for _ in range(203)]  # many ties: the order among equal lengths is pinned too
    sampler = EpochBatchSampler(lengths, 8, 3, **kind)
    sampler.epoch = 1
    assert digest([[int(i) for i in b] for b in sampler]) == expected
