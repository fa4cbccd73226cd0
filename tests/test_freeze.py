"""Freeze policies select the seeds' exact parameter sets, found by module structure."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from toolkit.core.errors import ToolkitError
from toolkit.engine.model import build_optimizer
from toolkit.policy.blocks import find_blocks
from toolkit.policy.policy import Policy, apply_freeze


@pytest.fixture(scope="module")
def bert_base():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=2))  # BertConfig() defaults are bert-base


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_bert_base_none_trains_everything(bert_base):
    summary = apply_freeze(bert_base, "none")
    assert trainable(bert_base) == {n for n, _ in bert_base.named_parameters()}
    assert summary.trainable == summary.total == sum(p.numel() for p in bert_base.parameters())


def test_bert_base_last2_matches_seed_rules(bert_base):
    apply_freeze(bert_base, "last2")
    names = [n for n, _ in bert_base.named_parameters()]
    by_substring = {n for n in names if any(k in n for k in ("encoder.layer.10", "encoder.layer.11", "pooler",
                                                             "classifier"))}
    by_index = {n for i, n in enumerate(names) if i >= 165}  # the seed notebook's rule
    assert len(names) == 201
    assert trainable(bert_base) == by_substring == by_index


def test_bert_base_head_is_classifier_only(bert_base):
    summary = apply_freeze(bert_base, "head")
    assert trainable(bert_base) == {"classifier.weight", "classifier.bias"}
    assert summary.trainable == 768 * 2 + 2


def test_optimizer_holds_only_trainable_params_and_skips_decay_for_bias_and_layernorm(bert_base):
    apply_freeze(bert_base, "last2")
    opt = build_optimizer(bert_base, 2e-5, 0.01)
    names = {id(p): n for n, p in bert_base.named_parameters()}
    in_opt = {names[id(p)] for g in opt.param_groups for p in g["params"]}
    assert in_opt == trainable(bert_base)
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert no_decay == {n for n in in_opt if n.endswith("bias") or "LayerNorm" in n}


@pytest.mark.parametrize("policy", ["last0", "lastx", "bottom2", "", "Last2"])
def test_unknown_policy_is_a_clear_error(policy):
    with pytest.raises(ToolkitError, match="unknown freeze policy"):
        Policy.parse(policy)


def test_last_n_larger_than_model(bert_base):
    with pytest.raises(ToolkitError, match="asks for 13 blocks but this model has 12"):
        apply_freeze(bert_base, "last13")


def _tiny(kind):
    common = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=3)
    if kind == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(num_hidden_layers=4,
                                                              **common)), "roberta.encoder.layer", []
    if kind == "distilbert":
        cfg = DistilBertConfig(n_layers=4, dim=32, n_heads=2, hidden_dim=64, vocab_size=100, num_labels=3)
        return DistilBertForSequenceClassification(cfg), "distilbert.transformer.layer", []
    if kind == "deberta-v2":
        cfg = DebertaV2Config(num_hidden_layers=4, relative_attention=True, position_buckets=16, **common)
        return DebertaV2ForSequenceClassification(cfg), "deberta.encoder.layer", []
    if kind == "modernbert":
        cfg = ModernBertConfig(num_hidden_layers=4, global_attn_every_n_layers=2, pad_token_id=0, **common)
        return ModernBertForSequenceClassification(cfg), "model.layers", ["model.final_norm"]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["roberta", "distilbert", "deberta-v2", "modernbert"])
def test_last_n_on_other_architectures(kind):
    model, blocks, post = _tiny(kind)
    prefix = model.base_model_prefix
    assert find_blocks(model)[0] == blocks.split(".", 1)[1]
    apply_freeze(model, "last1")
    names = [n for n, _ in model.named_parameters()]
    head = {n for n in names if not n.startswith(prefix + ".")}
    expected = (head | {n for n in names if n.startswith(f"{blocks}.3.")}
                | {n for n in names if any(n.startswith(p + ".") for p in post)})
    assert head, "every sequence classifier has a head outside the backbone"
    assert trainable(model) == expected
    # the frozen blocks and embeddings really are frozen
    assert not any(n.startswith(f"{blocks}.2.") for n in trainable(model))
    apply_freeze(model, "head")
    assert trainable(model) == head


def test_model_without_block_list_is_a_clear_error():
    class Flat(torch.nn.Module):
        base_model_prefix = "body"

        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 4)
            self.classifier = torch.nn.Linear(4, 2)

        @property
        def base_model(self):
            return self.body

    with pytest.raises(ToolkitError, match="no list of encoder blocks"):
        apply_freeze(Flat(), "last1")
    apply_freeze(Flat(), "head")  # head needs no blocks


def test_ddp_unused_parameter_probe():
    from toolkit.backends.accelerator import unused_trainable_parameters

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100, num_labels=2))
    example = {"input_ids": torch.tensor([[2, 5, 7, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
               "labels": torch.tensor([1])}
    for policy in ("none", "last1", "head"):
        apply_freeze(model, policy)
        assert unused_trainable_parameters(model, example) == []  # every policy trains parts that run
    model.extra = torch.nn.Linear(2, 2)  # trainable but never called by forward()
    assert unused_trainable_parameters(model, example) == ["extra.weight", "extra.bias"]
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind
