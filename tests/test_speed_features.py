"""Throughput features (issue 6): length-grouped batches, sorted evaluation, frozen-part
handling, --cache-frozen, FLOPs / MFU accounting and the throughput metrics."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import accelerate_launch, python, read_json, read_predictions
from safetensors.torch import load_file
from torch import nn

from toolkit.core.config import DataConfig, TrainConfig, parse_args
from toolkit.data.dataset import Collator, EpochBatchSampler, build_splits, make_loader, tokenize
from toolkit.engine.flops import FlopModel, gpu_family, peak_flops
from toolkit.engine.frozen_cache import FrozenCache
from toolkit.engine.loop import validate
from toolkit.engine.model import load_model, load_tokenizer
from toolkit.policy.blocks import find_blocks
from toolkit.policy.policy import apply_freeze, disable_frozen_dropout

MAX_LEN = 48  # end-to-end runs
EVAL_LEN = 192  # in-process checks: long enough that review lengths differ

# ---------------------------------------------------------------- sampler


def _lengths(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)  # skewed like review lengths, capped like truncation
    return [min(256, int(x)) for x in (torch.rand(n, generator=g) ** 3 * 400 + 8).tolist()]


def _padding(batches, lengths) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("n,size", [(1000, 16), (256, 16), (37, 8), (16, 16), (5, 8)])
def test_grouped_sampler_is_a_deterministic_permutation_with_less_padding(n, size):
    lengths = _lengths(n)
    sampler = EpochBatchSampler(lengths, size, seed=3, shuffle=True, group_by_length=True)
    assert not hasattr(sampler, "batch_size")  # Accelerate must deal whole batches (see the docstring)
    seen_orders = []
    for epoch in range(3):
        sampler.epoch = epoch
        batches = list(sampler)
        assert len(batches) == len(sampler) == math.ceil(n / size)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))  # every row exactly once
        assert sum(len(b) < size for b in batches) <= 1 and all(len(b) <= size for b in batches)
        assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first
        again = EpochBatchSampler(lengths, size, seed=3, shuffle=True, group_by_length=True)
        again.epoch = epoch
        assert list(again) == batches  # a pure function of (seed, epoch): what mid-epoch resume relies on
        seen_orders.append(flat)
    if n >= 100:
        assert seen_orders[0] != seen_orders[1] != seen_orders[2]
        plain = EpochBatchSampler(lengths, size, seed=3, shuffle=True)
        grouped_pad = _padding(list(sampler), lengths)
        assert grouped_pad < 0.5 * _padding(list(plain), lengths)
        # still random: the batches of two epochs are mostly different sets of rows
        sampler.epoch = 0
        first = {frozenset(b) for b in sampler}
        sampler.epoch = 1
        assert len(first & {frozenset(b) for b in sampler}) < 0.2 * len(first)


def test_train_flags_default_on_and_switch_off():
    cfg = parse_args(TrainConfig, [])
    assert cfg.group_by_length and not cfg.frozen_dropout and not cfg.cache_frozen and not cfg.compile
    cfg = parse_args(TrainConfig, ["--no-group-by-length", "--frozen-dropout", "--cache-frozen", "--compile"])
    assert not cfg.group_by_length and cfg.frozen_dropout and cfg.cache_frozen and cfg.compile


# ---------------------------------------------------------------- FLOPs and MFU


D, F, L, C = 384, 1536, 6, 2  # MiniLM-L6


def _hand_forward(n: int) -> int:
    """Matmul FLOPs of one forward pass over a sequence of n tokens, by hand."""
    return L * ((4 * D * D + 2 * D * F) * 2 * n + 2 * 2 * n * n * D) + 2 * D * D + 2 * D * C


@pytest.fixture(scope="module")
def eager_minilm(minilm):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2, attn_implementation="eager")


def test_flop_model_matches_hand_count_and_torch_flop_counter(eager_minilm):
    from torch.utils.flop_counter import FlopCounterMode

    model, lengths = eager_minilm, [10, 20, 7]
    sq = sum(n * n for n in lengths)
    none = FlopModel.from_model(model, "none")
    last2 = FlopModel.from_model(model, "last2")
    head = FlopModel.from_model(model, "head")
    layer = 8 * D * D + 4 * D * F
    # the hand count of the throughput.py docstring, written out for MiniLM
    assert none == FlopModel(per_token=3 * L * layer, per_len_sq=3 * L * 4 * D, per_seq=3 * 2 * D * D + 3 * 2 * D * C)
    assert last2 == FlopModel(per_token=(4 + 3 * 2) * layer - 6 * D * D, per_len_sq=(4 + 3 * 2) * 4 * D,
                              per_seq=3 * 2 * D * D + 3 * 2 * D * C)
    assert head == FlopModel(per_token=L * layer, per_len_sq=L * 4 * D, per_seq=2 * D * D + 2 * 2 * D * C)
    assert none.flops(sum(lengths), sq, len(lengths)) == 3 * sum(_hand_forward(n) for n in lengths)
    cached = FlopModel.from_model(model, "head", cached_prefix=True)
    assert cached.flops(sum(lengths), sq, 3) == 3 * 2 * 2 * D * C

    # and what PyTorch counts for real training steps (eager attention: its matmuls are visible)
    model.eval()  # no dropout: the same work, deterministic
    for policy, fm in (("none", none), ("last2", last2), ("head", head)):
        apply_freeze(model, policy)
        counted = 0
        for n in lengths:
            with FlopCounterMode(display=False) as counter:
                model(input_ids=torch.randint(1000, 2000, (1, n)), labels=torch.tensor([1])).loss.backward()
            counted += counter.get_total_flops()
        model.zero_grad(set_to_none=True)
        assert fm.flops(sum(lengths), sq, len(lengths)) == counted, policy


def test_peak_flops_table_and_mfu():
    assert gpu_family("NVIDIA H100 80GB HBM3") == "H100" and gpu_family("NVIDIA H100 PCIe") == "H100 PCIe"
    assert gpu_family("Tesla V100-SXM2-16GB") == "V100" and gpu_family("Tesla V100-PCIE-32GB") == "V100-PCIE"
    assert gpu_family("NVIDIA H200") == "H200" and gpu_family("NVIDIA A100-SXM4-80GB") == "A100"
    assert gpu_family("Tesla T4") == "T4" and gpu_family("NVIDIA GeForce GTX 1080") is None
    assert peak_flops("Tesla T4", "fp16") == 65e12 and peak_flops("Tesla T4", "no") == 8.1e12
    assert peak_flops("Tesla T4", "bf16") is None  # no bf16 tensor cores: no honest peak
    assert peak_flops("NVIDIA A100-SXM4-40GB", "bf16") == 312e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "no") == 19.5e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "no", allow_tf32=True) == 156e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H200", "fp16") == pytest.approx(989.4e12) and peak_flops("NVIDIA H200", "no") == 67e12
    assert peak_flops("Some CPU", "no") is None


# ---------------------------------------------------------------- frozen part


def test_frozen_prefix_records_no_autograd_state_and_dropout_switch(minilm):
    torch.manual_seed(0)
    model = load_model(minilm, 2)
    apply_freeze(model, "last2")
    _, blocks = find_blocks(model)
    outs = {}
    hooks = [blocks[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i in (3, 4)]
    model.train()
    ids = torch.randint(1000, 2000, (2, 12))
    model(input_ids=ids)
    # frozen blocks: no graph, nothing saved for backward (already free, no extra code needed)
    assert outs[3].grad_fn is None and not outs[3].requires_grad
    assert outs[4].grad_fn is not None
    first3 = outs[3].clone()
    model(input_ids=ids)
    assert not torch.equal(first3, outs[3])  # a model in train mode has dropout in its frozen part too
    assert disable_frozen_dropout(model, "last2") == 1 + 3 * 4  # embeddings + 3 per frozen block
    model(input_ids=ids)
    a3, a4 = outs[3].clone(), outs[4].clone()
    model(input_ids=ids)
    assert torch.equal(a3, outs[3]) and not torch.equal(a4, outs[4])  # trained blocks keep their dropout
    model.eval()
    model(input_ids=ids)
    assert torch.allclose(a3, outs[3], atol=1e-6)  # = eval mode
    for h in hooks:
        h.remove()


@pytest.fixture(scope="module")
def accelerator():
    from accelerate.state import AcceleratorState

    from toolkit.backends.accelerator import setup

    acc = setup(cpu=True, mixed_precision="no")
    yield acc
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def tiny_data(minilm, data_dir):
    tok = load_tokenizer(minilm)
    train, evals = build_splits(DataConfig(task="imdb-subset", data_dir=data_dir, train_samples=40, eval_samples=30),
                                log=lambda *a: None)
    return tok, tokenize(train, tok, EVAL_LEN), tokenize(evals, tok, EVAL_LEN)


def _random_head(model):
    torch.manual_seed(1)
    nn.init.normal_(model.classifier.weight, std=0.5)  # predictions of both classes, not one
    return model


def test_sorted_evaluation_returns_predictions_in_row_order(accelerator, minilm, tiny_data):
    tok, _, eval_tok = tiny_data
    model = _random_head(load_model(minilm, 2)).eval()
    loader = make_loader(eval_tok, Collator(tok, None), 8, 0, train=False)
    assert [i for b in loader.batch_sampler for i in b] != list(range(len(eval_tok)))  # really reordered
    result = validate(accelerator, model, loader, 2, len(eval_tok))
    assert result.index.tolist() == list(range(len(eval_tok)))
    assert result.labels.tolist() == list(eval_tok["labels"])
    one_by_one = []
    model.eval()  # validate() hands the model back in training mode
    with torch.no_grad():
        for row in eval_tok:
            ids = torch.tensor([row["input_ids"]])
            one_by_one.append(int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.argmax()))
    assert result.preds.tolist() == one_by_one
    assert 0 < len(set(one_by_one)) and result.metrics["eval_padding_fraction"] < 0.05


@pytest.mark.parametrize("policy", ["head", "last2"])
def test_cache_frozen_gives_the_normal_path_results(accelerator, minilm, tiny_data, policy):
    tok, train_tok, eval_tok = tiny_data
    model = _random_head(load_model(minilm, 2))
    apply_freeze(model, policy)
    collator = Collator(tok, None)
    normal = validate(accelerator, model, make_loader(eval_tok, collator, 8, 0, train=False), 2, len(eval_tok))
    cache = FrozenCache.build(accelerator, model, policy, train_tok, eval_tok, collator, 8, log=lambda *a: None)
    cached = validate(accelerator, model, cache.loader("eval", 8, 0), 2, len(eval_tok))
    assert cached.preds.tolist() == normal.preds.tolist() and len(set(normal.preds.tolist())) == 2
    assert cached.metrics["eval_loss"] == pytest.approx(normal.metrics["eval_loss"], rel=1e-5)
    # the training batches are the same rows in the same order as without the cache
    plain = make_loader(train_tok, collator, 8, 5, train=True, group_by_length=True)
    from_cache = cache.loader("train", 8, 5, group_by_length=True)
    for loader in (plain, from_cache):
        loader.batch_sampler.epoch = 1
    assert [b["idx"].tolist() for b in plain] == [b["idx"].tolist() for b in from_cache]
    cache.restore()
    again = validate(accelerator, model, make_loader(eval_tok, collator, 8, 0, train=False), 2, len(eval_tok))
    assert again.preds.tolist() == normal.preds.tolist()


def test_cache_frozen_refuses_what_it_cannot_do(accelerator, minilm, tiny_data):
    from toolkit.core.errors import ToolkitError

    _, train_tok, eval_tok = tiny_data
    model = load_model(minilm, 2)
    with pytest.raises(ToolkitError, match="--freeze none"):
        FrozenCache.preflight(accelerator, model, "none", train_tok, eval_tok)
    with pytest.raises(ToolkitError, match="GiB"):
        FrozenCache.preflight(accelerator, model, "last2", train_tok, eval_tok, memory_share=1e-9)


# ---------------------------------------------------------------- end to end (real runs, tiny)


BASE = ["launch/train.py", "--task", "imdb-subset", "--max-length", str(MAX_LEN), "--batch-size", "8",
        "--seed", "0", "--cpu", "--log-every", "1"]


def test_cache_frozen_head_trains_on_two_processes_and_saves_a_normal_model(tmp_path, minilm, data_dir, accelerator,
                                                                            tiny_data):
    out = tmp_path / "cached"
    # 2 gloo processes: each computes half of the features, both gather all of them
    accelerate_launch(*BASE, "--model", minilm, "--data-dir", data_dir, "--train-samples", "40", "--eval-samples", "30",
                      "--freeze", "head", "--cache-frozen", "--epochs", "3", "--lr", "1e-2", "--output-dir", str(out))
    metrics = read_json(out / "metrics.json")
    assert metrics["cache_train_s"] > 0 and metrics["cache_eval_s"] > 0
    assert metrics["world_size"] == 2 and metrics["global_step"] == 9  # 5 batches of 8 over 2 ranks, 3 epochs
    entries = [__import__("json").loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    eval_losses = [e["eval_loss"] for e in entries if "eval_loss" in e]
    assert len(eval_losses) == 3 and eval_losses[-1] < eval_losses[0]  # it learns
    trained = load_file(out / "model" / "model.safetensors")
    pretrained = load_model(minilm, 2).state_dict()
    assert all(torch.equal(trained[k], v) for k, v in pretrained.items() if not k.startswith("classifier"))
    # the saved model, run the normal way (frozen part included), reproduces the cached-path predictions
    tok = tiny_data[0]
    eval_tok = tokenize(build_splits(DataConfig(task="imdb-subset", data_dir=data_dir, train_samples=40,
                                                eval_samples=30),
                                     log=lambda *a: None)[1], tok, MAX_LEN)
    saved = load_model(str(out / "model"), 2)
    normal = validate(accelerator, saved, make_loader(eval_tok, Collator(tok, None), 16, 0, train=False), 2,
                      len(eval_tok))
    assert [r[2] for r in read_predictions(out / "predictions.csv")] == normal.preds.tolist()


def test_metrics_report_tokens_padding_and_flops(tmp_path, minilm, data_dir):
    out = tmp_path / "run"
    proc = python(*BASE, "--model", minilm, "--data-dir", data_dir, "--train-samples", "64", "--eval-samples", "24",
                  "--freeze", "last2", "--max-steps", "3", "--lr", "3e-4", "--output-dir", str(out),
                  "--verbose")  # the frozen-dropout line is a detail, shown with --verbose
    # by default the frozen part runs without dropout: embeddings + 3 dropouts in each of 4 frozen blocks
    assert "frozen part without dropout (13 dropout modules" in " ".join(proc.stdout.split())
    assert read_json(out / "config.json")["frozen_dropout"] is False
    metrics = read_json(out / "metrics.json")
    for key in ("train_samples_per_s", "train_tokens_per_s", "train_padding_fraction", "eval_tokens_per_s",
                "eval_padding_fraction", "train_model_tflops", "mfu"):
        assert key in metrics, key
    assert metrics["mfu"] is None  # CPU: no peak to divide by
    assert metrics["train_tokens_per_s"] > metrics["train_samples_per_s"] > 0
    assert 0 <= metrics["train_padding_fraction"] < 0.2 and 0 <= metrics["eval_padding_fraction"] < 0.2
    # the FLOPs and token totals are those of the three batches the sampler dealt
    tok = load_tokenizer(minilm)
    train, _ = build_splits(DataConfig(task="imdb-subset", data_dir=data_dir, train_samples=64, eval_samples=24),
                            log=lambda *a: None)
    lengths = list(tokenize(train, tok, MAX_LEN)["length"])
    batches = list(EpochBatchSampler(lengths, 8, 0, shuffle=True, group_by_length=True))[:3]
    seen = [lengths[i] for b in batches for i in b]
    model = load_model(minilm, 2)
    fm = FlopModel.from_model(model, "last2")
    assert metrics["train_model_tflops"] * 1e12 == pytest.approx(fm.flops(sum(seen), sum(n * n for n in seen),
                                                                          len(seen)))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert metrics["train_padding_fraction"] == pytest.approx(1 - sum(seen) / padded)
    log = [e for e in map(__import__("json").loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    assert len(log) == 3 and all("tokens_per_s" in e and "padding_fraction" in e for e in log)
