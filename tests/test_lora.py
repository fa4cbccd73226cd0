"""LoRA (issue 9): targets by module structure, what trains, the FLOP count, the exports, every back-end."""

from __future__ import annotations

import pytest
import torch
from test_freeze import _tiny
from transformers import BertConfig, BertForSequenceClassification

from toolkit.core.errors import ToolkitError
from toolkit.engine.flops import lora_flop_model
from toolkit.policy import lora
from toolkit.policy.blocks import summarize


def tiny_bert(layers: int = 3, **kw) -> BertForSequenceClassification:
    torch.manual_seed(0)
    settings = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                    vocab_size=100, num_labels=2)
    return BertForSequenceClassification(BertConfig(**{**settings, **kw}))


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- targets and what trains

DEFAULT_TARGETS = {  # block-relative names of the default targets, found by structure
    "bert": ["attention.self.query", "attention.self.value"],
    "roberta": ["attention.self.query", "attention.self.value"],
    "distilbert": ["attention.q_lin", "attention.v_lin"],
    "deberta-v2": ["attention.self.query_proj", "attention.self.value_proj"],
    "modernbert": ["attn.Wqkv"],  # fused: adapted whole
}
FULLY_TRAINED = {  # modules outside the blocks that train in full: the head, and the pooler/final norm
    "bert": ["classifier", "bert.pooler"],
    "roberta": ["classifier"],  # RobertaForSequenceClassification has no pooler
    "distilbert": ["pre_classifier", "classifier"],
    "deberta-v2": ["pooler", "classifier"],  # DeBERTa's ContextPooler lives outside the backbone
    "modernbert": ["head", "classifier", "model.final_norm"],
}


@pytest.mark.parametrize("kind", list(DEFAULT_TARGETS))
def test_default_targets_and_trainable_set_on_every_architecture(kind):
    model, blocks = (tiny_bert(4), "bert.encoder.layer") if kind == "bert" else _tiny(kind)[:2]
    targets = lora.resolve_targets(model)
    assert sorted(targets) == sorted(f"{blocks}.{i}.{t}" for i in range(4) for t in DEFAULT_TARGETS[kind])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = lora.apply_lora(model, r=4, alpha=8, dropout=0.0)
    plain = wrapped.get_base_model()
    names = trainable(plain)
    adapters = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    assert {n.split(".lora_")[0] for n in adapters} == set(targets)
    full = {n for n, _ in plain.named_parameters() if any(n.startswith(m + ".") for m in FULLY_TRAINED[kind])}
    assert full and names == adapters | full  # nothing else: no embeddings, no base weights of the blocks
    # peft kept the pretrained weights (the adapted ones moved under base_layer)
    after = {n.replace(".base_layer.", "."): p for n, p in plain.named_parameters() if ".lora_" not in n}
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)
    # the trainable table shows the LoRA parameters per block: 2 projections x r x (d + d), or r x (d + 3d) fused
    groups = {g: t for g, t, _ in summarize(plain, "lora").groups}
    assert [groups[f"block {i}"] for i in range(4)] == [4 * (2 * 32 + 2 * 32)] * 4
    assert groups["embeddings"] == 0


def test_named_targets_match_suffixes_and_bad_targets_are_clear_errors():
    model = tiny_bert(3)
    got = lora.resolve_targets(model, "attention.output.dense,layer.2.intermediate.dense")
    assert got == {**{f"bert.encoder.layer.{i}.attention.output.dense": "o" for i in range(3)},
                   "bert.encoder.layer.2.intermediate.dense": "ffn_in"}
    assert lora.resolve_targets(model, "key")["bert.encoder.layer.0.attention.self.key"] == "k"
    with pytest.raises(ToolkitError, match="--lora-targets q_lin matches no module") as err:
        lora.resolve_targets(model, "query,q_lin")
    assert "attention.self.query" in err.value.fix and "output.dense" in err.value.fix  # names what exists
    with pytest.raises(ToolkitError, match="a BertSelfOutput, not a Linear layer"):
        lora.resolve_targets(model, "attention.output")
    with pytest.raises(ToolkitError, match="matches no module"):
        lora.resolve_targets(model, "pooler.dense")  # outside the blocks: the pooler trains in full anyway
    for r, dropout, message in ((0, 0.1, "rank must be at least 1"), (-2, 0.1, "rank must be at least 1"),
                                (8, 1.0, "outside \\[0, 1\\)"), (8, -0.1, "outside \\[0, 1\\)")):
        with pytest.raises(ToolkitError, match=message):
            lora.apply_lora(tiny_bert(2), r=r, alpha=16, dropout=dropout)


# ---------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("targets", [None, "key", "layer.1.output.dense",
                                     "layer.1.attention.self.value,layer.2.intermediate.dense"])
def test_flop_model_matches_torch_flop_counter(targets):
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_bert(3, attn_implementation="eager")  # eager attention: its matmuls are visible to the counter
    fm = lora_flop_model(model, 4, targets)
    wrapped = lora.apply_lora(model, r=4, alpha=8, dropout=0.1, targets=targets).eval()  # eval: no dropout masks
    lengths = [5, 11, 8]
    counted = 0
    for n in lengths:
        with FlopCounterMode(display=False) as counter:
            wrapped(input_ids=torch.randint(5, 90, (1, n)), labels=torch.tensor([1])).loss.backward()
        counted += counter.get_total_flops()
    assert fm.flops(sum(lengths), sum(n * n for n in lengths), len(lengths)) == counted
    if targets is None:  # the default by hand: every block is adapted, so every frozen matmul also runs backward
        d, f, r = 32, 64, 4
        lora_qv = 2 * 3 * 2 * r * (d + d)
        block = 2 * (8 * d * d + 4 * d * f) + lora_qv
        first = block - 3 * 2 * d * d - 2 * 2 * r * d  # block 0's input needs no gradient: none for Q, K, V, A
        assert fm.per_token == first + 2 * block
        assert fm.per_len_sq == (10 + 12 + 12) * d  # block 0: no key gradient (key frozen, input frozen)
        assert fm.per_seq == 3 * 2 * d * d + 3 * 2 * d * 2


# ---------------------------------------------------------------- exports


def test_merged_export_and_adapter_reload_give_the_trained_logits(tmp_path):
    from transformers import AutoModelForSequenceClassification

    base_dir = tmp_path / "base"
    tiny_bert(2).save_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir)
    wrapped = lora.apply_lora(model, r=4, alpha=8, dropout=0.1)
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    wrapped.eval()
    x = torch.randint(5, 90, (4, 9))
    with torch.no_grad():
        trained = wrapped(input_ids=x).logits
    state = {k: v.clone() for k, v in wrapped.state_dict().items()}
    merged = lora.merged_model(wrapped, state)
    assert type(merged) is type(model) and not any("lora" in n for n, _ in merged.named_parameters())
    merged.save_pretrained(tmp_path / "model")
    lora.save_adapter(wrapped, tmp_path / "adapter", state)
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "config.json"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()}
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    reloaded = lora.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, trained, atol=1e-5, rtol=0)
        assert torch.allclose(reloaded(input_ids=x).logits, trained, atol=1e-6, rtol=0)
    # the trained model was left as it was (the merge ran on a copy)
    assert any(".lora_A." in n for n, _ in wrapped.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in wrapped.state_dict().items())


# ---------------------------------------------------------------- end to end: train.main, 1 process, DDP, ZeRO

RUN_ARGS = ["--task", "imdb-subset", "--train-samples", "32", "--eval-samples", "20", "--max-length", "32",
            "--batch-size", "8", "--lr", "2e-3", "--seed", "1", "--freeze", "lora", "--lora-r", "4",
            "--lora-alpha", "8", "--log-every", "100", "--cpu"]
MAX_LEN = 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, minilm):
    """A 2-block BERT (random weights: the mechanics do not need pretrained ones) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny") / "bert"
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    tiny_bert(2, vocab_size=tokenizer.vocab_size).save_pretrained(path)  # vocab_size overrides tiny_bert's 100
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def eval_texts(data_dir):
    from toolkit.core.config import DataConfig
    from toolkit.data.dataset import build_splits

    _, eval_ds = build_splits(DataConfig(task="imdb-subset", data_dir=data_dir, train_samples=32, eval_samples=20),
                              log=lambda *a: None)
    return list(eval_ds["text"])


def check_lora_run(out, base: str, texts: list[str]) -> None:
    """What every LoRA run must leave behind, whatever the back-end."""
    import json

    from conftest import read_json, read_predictions
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config, metrics = read_json(out / "config.json"), read_json(out / "metrics.json")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    head = load_file(out / "adapter" / "head.safetensors")
    settings = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scale = settings["lora_alpha"] / settings["r"]
    # the trainable set: LoRA A/B on exactly the resolved targets, plus the head and the pooler, nothing else
    targets = config["resolved"]["lora_targets"]
    assert targets and all(t.endswith(("attention.self.query", "attention.self.value")) for t in targets)
    assert set(adapter) == {f"base_model.model.{t}.lora_{m}.weight" for t in targets for m in "AB"}
    assert set(head) == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    assert metrics["trainable_params"] == sum(v.numel() for v in [*adapter.values(), *head.values()])
    # model/ is the plain architecture: the pretrained weights, exactly, except the merged targets and the head
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    pretrained = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).state_dict()
    weights = merged.state_dict()
    assert set(weights) == set(pretrained) and not (out / "model" / "adapter_config.json").exists()
    for name, before in pretrained.items():
        target = name.removesuffix(".weight")
        if name in head:
            assert torch.equal(weights[name], head[name]), name
        elif target in targets:
            prefix = f"base_model.model.{target}"
            delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
            assert delta.abs().max() > 0, f"{target}: the adapter did not train"
            torch.testing.assert_close(weights[name], before + scale * delta, atol=1e-6, rtol=0)
        else:
            assert torch.equal(weights[name], before), f"{name} is not a LoRA target but changed"
    # merged logits == the trained (unmerged) adapter's on the eval set
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    batch = tokenizer(texts, truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt")
    unmerged = lora.load_adapter(out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, unmerged(**batch).logits, atol=1e-5, rtol=0)
    # the run's predictions came from the trained model in the run: the merged folder reproduces them
    predictions = [r[2] for r in read_predictions(out / "predictions.csv")]
    assert predictions == merged(**batch).logits.argmax(-1).tolist()


PIPELINE_WITHOUT_PEFT = r'''
import json, sys
sys.modules["peft"] = None  # any import of peft now fails: model/ must not need it
from transformers import pipeline
clf = pipeline("text-classification", model=sys.argv[1], device=-1)
texts = json.load(open(sys.argv[2]))
print(json.dumps([r["label"] for r in clf(texts, truncation=True, max_length=int(sys.argv[3]))]))
'''


def test_lora_minilm_one_process(tmp_path, minilm, data_dir, eval_texts):
    """The real pretrained model on real reviews, through train.main: exports, merged == unmerged, pipeline."""
    import json

    from conftest import python, read_json, read_predictions

    from toolkit.cli import run
    from toolkit.core.config import TrainConfig
    from toolkit.train import main

    out = tmp_path / "run"
    assert run(main, TrainConfig, "train", ["--model", minilm, "--data-dir", data_dir, *RUN_ARGS,
                                            "--output-dir", str(out)]) == 0
    check_lora_run(out, minilm, eval_texts)
    assert read_json(out / "metrics.json")["train_model_tflops"] > 0  # the LoRA FLOP count is wired in
    # a checkpoint folder scores like the run (evaluate.py / predict.py accept one): rebuilt with LoRA, merged
    from transformers import AutoModelForSequenceClassification

    from toolkit.engine.load import load_saved

    saved = load_saved(str(next((out / "checkpoints").glob("step-*"))))
    batch = saved.tokenizer(eval_texts[:6], truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(saved.model(**batch).logits, AutoModelForSequenceClassification.from_pretrained(
            out / "model")(**batch).logits, atol=1e-5, rtol=0)
    (tmp_path / "texts.json").write_text(json.dumps(eval_texts))
    script = tmp_path / "pipe.py"
    script.write_text(PIPELINE_WITHOUT_PEFT)
    labels = json.loads(python(str(script), str(out / "model"), str(tmp_path / "texts.json"),
                               str(MAX_LEN)).stdout.splitlines()[-1])
    names = {"negative": 0, "positive": 1}
    assert [names[x] for x in labels] == [r[2] for r in read_predictions(out / "predictions.csv")]


@pytest.mark.parametrize("backend", ["ddp", "zero2", "zero3"])
def test_lora_two_processes(tmp_path, tiny_dir, data_dir, eval_texts, backend):
    """2-process DDP (gloo) and DeepSpeed ZeRO-2 / ZeRO-3 on CPU: the same exports (ZeRO-3: merged from the
    gathered shards); ZeRO-2 also resumes a checkpoint."""
    import shutil

    from conftest import ROOT, accelerate_launch, read_json, read_predictions

    args = ["launch/train.py", "--model", tiny_dir, "--data-dir", data_dir, *RUN_ARGS, "--mixed-precision", "no"]
    config = str(ROOT / "accelerate_configs" / f"cpu_deepspeed_{backend}.yaml") if backend != "ddp" else None
    if backend != "ddp":
        pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    accelerate_launch(*args, "--output-dir", str(out), *(["--checkpoint-every", "1"] if backend == "zero2" else []),
                      config=config)
    resolved = read_json(out / "config.json")["resolved"]
    assert resolved["world_size"] == 2
    assert resolved["distributed_type"] == ("DistributedType.MULTI_CPU" if backend == "ddp"
                                            else "DistributedType.DEEPSPEED")
    assert read_json(out / "metrics.json")["global_step"] == 2  # 32 rows / (8 x 2 ranks)
    check_lora_run(out, tiny_dir, eval_texts)
    if backend != "zero2":
        return
    # resume from the step-1 checkpoint (DeepSpeed's engine state of the PeftModel): the same end
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-00000001", resumed / "checkpoints" / "step-00000001")
    proc = accelerate_launch(*args, "--output-dir", str(resumed), "--resume-from", "auto", config=config)
    assert "resumed from" in proc.stdout
    assert read_predictions(resumed / "predictions.csv") == read_predictions(out / "predictions.csv")
    a, b = read_json(out / "metrics.json"), read_json(resumed / "metrics.json")
    assert a["eval_loss"] == b["eval_loss"] and b["global_step"] == 2
    from safetensors.torch import load_file
    first, second = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, resumed))
    assert all(torch.equal(first[k], second[k]) for k in first)


# ---------------------------------------------------------------- bad input, the policy value, compare


@pytest.mark.parametrize("extra, message", [
    (["--lora-r", "0"], "--lora-r 0 is out of range: it must be an integer >= 1"),
    (["--lora-r", "-4"], "--lora-r -4 is out of range"),
    (["--lora-dropout", "1"], "--lora-dropout 1.0 is out of range: it must be a finite number in [0, 1)"),
    (["--lora-alpha", "0"], "--lora-alpha 0.0 is out of range: it must be a finite number > 0"),
    (["--lora-targets", "query,qkv_proj"], "--lora-targets qkv_proj matches no module"),
    (["--lora-targets", "attention"], "not a Linear layer"),
    (["--cache-frozen"], "LoRA adapts the blocks"),
    (["--layer-lr-decay", "0.9"], "neither gradual unfreezing nor layer-wise lr decay"),
])
def test_bad_lora_flags_exit_2_and_write_nothing(extra, message, tiny_dir, data_dir, tmp_path, capsys):
    from toolkit.cli import run
    from toolkit.core.config import TrainConfig
    from toolkit.train import main

    argv = ["--model", tiny_dir, "--data-dir", data_dir, "--train-samples", "16", "--eval-samples", "8",
            "--max-length", "32", "--cpu", "--freeze", "lora", "--output-dir", str(tmp_path / "out"), *extra]
    code = run(main, TrainConfig, "train", argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "fix:" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_lora_resume_with_other_lora_settings_is_refused(tiny_dir, data_dir, tmp_path, capsys):
    from toolkit.cli import run
    from toolkit.core.config import TrainConfig
    from toolkit.train import main

    out, stop = tmp_path / "out", tmp_path / "STOP"
    argv = ["--model", tiny_dir, "--data-dir", data_dir, "--train-samples", "16", "--eval-samples", "8",
            "--max-length", "32", "--batch-size", "8", "--cpu", "--freeze", "lora", "--lora-r", "4", "--output-dir",
            str(out)]
    stop.touch()  # present from the start: a checkpoint after step 1, then exit 75
    assert run(main, TrainConfig, "train", [*argv, "--stop-file", str(stop)]) == 75
    checkpoint = out / "checkpoints" / "step-00000001"
    files = {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}
    capsys.readouterr()
    # rank 8 adapters cannot take the rank-4 checkpoint's weights: one clear error, before anything is loaded
    code = run(main, TrainConfig, "train", [*argv[:-4], "--lora-r", "8", *argv[-2:], "--resume-from", "auto"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err, err
    assert "trained with policy 'lora' (LoRA r=4, alpha=16, dropout=0.1, targets=default)" in err
    assert "asks for 'lora' (LoRA r=8," in err and "--lora-* options" in err
    assert not (out / "metrics.json").exists()
    assert {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()} == files
    # the same settings resume and finish
    assert run(main, TrainConfig, "train", [*argv, "--resume-from", "auto"]) == 0
    assert (out / "metrics.json").is_file()


def test_lora_policy_value_and_compare_spelling():
    from toolkit.compare import parse_policies
    from toolkit.core.config import TrainConfig
    from toolkit.policy.policy import Policy

    policy = Policy.from_config(TrainConfig(freeze="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                            lora_targets="key"))
    assert policy.kind == "lora" and policy.spec == "lora" and policy.lora == lora.LoraSpec(4, 8, 0.0, "key")
    assert [p.spec for p in parse_policies("none,lora,last2")] == ["none", "lora", "last2"]
    assert Policy.parse("lora").lora == lora.LoraSpec()  # compare: the run's --lora-* flags fill it (config_fields)
    with pytest.raises(ToolkitError, match="neither gradual"):
        Policy.parse("head>lora@5")
    model = tiny_bert(3)
    wrapped = policy.apply(model)
    assert lora.is_lora(wrapped) and policy.apply(wrapped) is wrapped  # wraps once
    assert lora.adapted_modules(wrapped) == [f"bert.encoder.layer.{i}.attention.self.key" for i in range(3)]
    assert policy.frozen_prefix(wrapped) == [wrapped.get_base_model().bert.embeddings]
    only_top = Policy.from_config(TrainConfig(freeze="lora", lora_targets="layer.2.attention.self.value"))
    top = only_top.apply(tiny_bert(3))
    assert only_top.frozen_prefix(top)[1:] == list(top.get_base_model().bert.encoder.layer[:2])
    groups = policy.param_groups(wrapped, 1e-3, 0.01)
    in_opt = {id(p) for g in groups for p in g["params"]}
    assert in_opt == {id(p) for p in wrapped.parameters() if p.requires_grad}
