"""The policy object: spelling, layer-wise lr decay, gradual unfreezing (1 process and 2-process DDP).

Mechanics (exact learning rates, bit-identical frozen weights, exact resumed predictions) run on a
tiny BERT (4 blocks, hidden 32) saved with the MiniLM tokenizer, on real IMDb reviews.
"""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import accelerate_launch, read_json, read_predictions
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup

from toolkit.cli import run
from toolkit.compare import parse_policies
from toolkit.core.config import TrainConfig
from toolkit.core.errors import ToolkitError
from toolkit.engine.flops import FlopModel
from toolkit.engine.model import build_optimizer, linear_schedule
from toolkit.policy.policy import Policy
from toolkit.train import main as train_main

LAYERS = 4


def tiny_bert(vocab_size: int = 100) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=vocab_size,
                                                    max_position_embeddings=64, num_labels=2))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, minilm) -> str:
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    tiny_bert(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------- spelling and bad input


@pytest.mark.parametrize("text", ["none", "last2", "head", "last2+llrd0.9", "none+llrd0.8", "head>none@50",
                                  "head>last2@3", "last1>none@2+llrd0.8"])
def test_spelling_round_trips_through_the_flags(text):
    policy = Policy.parse(text)
    assert Policy.parse(policy.spec) == policy and policy.spec == text
    fields = policy.config_fields()  # what compare puts into each run's TrainConfig
    assert Policy.from_config(TrainConfig(**fields)) == policy
    assert ">" not in policy.slug and "@" not in policy.slug


@pytest.mark.parametrize("text, message", [
    ("last2+llrd1.5", "outside (0, 1]"), ("last2+llrd0", "outside (0, 1]"),
    ("head+llrd0.9", "no blocks to decay"),
    ("none>last2@3", "start policy that freezes something"),
    ("last2>last1@3", "does not train more than the start"), ("last2>last2@3", "does not train more than the start"),
    ("head>none", "START>TARGET@N"), ("head>none@0", "every 0 steps"), ("last2+lora", "+llrdF"), ("bottom3", "unknown"),
])
def test_bad_spellings_are_one_clear_error(text, message):
    with pytest.raises(ToolkitError, match=None) as err:
        Policy.parse(text)
    assert message in err.value.problem + (err.value.fix or "") and err.value.fix


@pytest.mark.parametrize("extra, message", [
    (["--layer-lr-decay", "1.5"], "--layer-lr-decay 1.5 is out of range"),
    (["--layer-lr-decay", "0"], "--layer-lr-decay 0.0 is out of range"),
    (["--unfreeze-every", "5"], "start policy that freezes something"),  # --freeze none (the default)
    (["--freeze", "last2", "--unfreeze-every", "5", "--unfreeze-to", "head"], "does not train more than the start"),
    (["--freeze", "head", "--unfreeze-to", "last2"], "without --unfreeze-every"),
    (["--freeze", "last2+llrd0.9"], "use the flags"),
    (["--freeze", "head", "--unfreeze-every", "5", "--unfreeze-to", "last9"], "asks for 9 blocks but this model has 4"),
    (["--freeze", "head", "--unfreeze-every", "5", "--cache-frozen"], "static frozen prefix"),
])
def test_bad_policy_flags_exit_2_and_write_nothing(extra, message, tiny_model_dir, data_dir, tmp_path, capsys):
    argv = ["--model", tiny_model_dir, "--data-dir", data_dir, "--train-samples", "16", "--eval-samples", "8",
            "--max-length", "32", "--cpu", "--output-dir", str(tmp_path / "out"), *extra]
    code = run(train_main, TrainConfig, "train", argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "fix:" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_compare_spelling_and_backends_that_cannot_thaw():
    assert [p.spec for p in parse_policies("none, last2,head,last2+llrd0.9,head>none@50")] == \
        ["none", "last2", "head", "last2+llrd0.9", "head>none@50"]
    gradual = Policy.parse("head>none@50")
    for backend in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        with pytest.raises(ToolkitError, match="does not run under") as err:
            gradual.check_backend(backend)
        assert "DDP" in err.value.fix
    for backend in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        gradual.check_backend(backend)
    Policy.parse("last2+llrd0.9").check_backend(DistributedType.DEEPSPEED)  # static policies run everywhere


# ---------------------------------------------------------------- LLRD, in process


def expected_lr(name: str, lr: float, decay: float) -> float:
    if name.startswith("bert.encoder.layer."):
        return lr * decay ** (LAYERS - int(name.split(".")[3]))
    if name.startswith("bert.embeddings."):
        return lr * decay ** (LAYERS + 1)
    return lr  # pooler, classifier


@pytest.mark.parametrize("text", ["none+llrd0.8", "last2+llrd0.5"])
def test_llrd_group_learning_rates_after_one_step(text):
    model, policy, lr, total = tiny_bert(), Policy.parse(text), 1e-3, 10
    policy.apply(model)
    optimizer = build_optimizer(model, lr, 0.01, policy)
    scheduler = linear_schedule(optimizer, 0, total)
    batch = {"input_ids": torch.tensor([[2, 5, 7, 3], [2, 9, 3, 0]]),
             "attention_mask": torch.tensor([[1] * 4, [1, 1, 1, 0]]),
             "labels": torch.tensor([1, 0])}
    model(**batch).loss.backward()
    optimizer.step()
    scheduler.step()
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            assert group["lr"] == pytest.approx(expected_lr(name, lr, policy.layer_lr_decay) * (total - 1) / total,
                                                rel=1e-12), name
            assert (group["weight_decay"] == 0) == (name.endswith("bias") or "LayerNorm" in name), name
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
    if text.startswith("last2"):
        assert not any(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.",
                                     "bert.encoder.layer.1.")) for n in seen)


@pytest.mark.parametrize("warmup, total", [(0, 4), (0, 1), (3, 10), (10, 10), (1, 0)])
def test_the_linear_schedule_is_transformers_factor_for_factor(warmup, total):
    """The toolkit's own linear schedule (no transformers.trainer_utils import) gives the exact lrs of
    transformers' get_linear_schedule_with_warmup, over and past the run, and resumes from its state."""
    def optimizer():
        return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 3e-4},
                                {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3}])

    def lrs(make, steps=12):
        opt = optimizer()
        scheduler = make(opt, warmup, total)
        seen = []
        for _ in range(steps):
            seen.append([g["lr"] for g in opt.param_groups])
            opt.step()
            scheduler.step()
        return seen, scheduler

    ours, scheduler = lrs(linear_schedule)
    assert ours == lrs(get_linear_schedule_with_warmup)[0]  # exact floats, not approx
    assert ours[0] == ([0.0, 0.0] if warmup else [3e-4, 1e-3])
    # a resumed run's schedule (its state from a checkpoint) goes on where the first one was
    resumed = linear_schedule(optimizer(), warmup, total)
    resumed.load_state_dict(scheduler.state_dict())
    resumed.step(), scheduler.step()
    assert resumed.get_last_lr() == scheduler.get_last_lr() and resumed.last_epoch == 13


def test_gradual_stages_and_flop_count_follow_the_schedule():
    model = tiny_bert()
    policy = Policy.parse("head>none@3")
    assert [(s, p.spec) for s, p in policy.schedule(model)] == \
        [(0, "head"), (3, "last1"), (6, "last2"), (9, "last3"), (12, "last4"), (15, "none")]
    assert policy.stage(model, 2).spec == "head" and policy.stage(model, 4).spec == "last1"
    assert policy.stage(model, 99).spec == "none"
    policy.apply(model)  # the eventual set: everything
    assert all(p.requires_grad for p in model.parameters())
    assert policy.set_stage(model, 0).spec == "head"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    assert policy.set_stage(model, 1) is None  # no change within a stage
    assert policy.set_stage(model, 3).spec == "last1"
    assert {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("bert.")} == \
        {"encoder", "pooler"}
    assert FlopModel.from_model(model, policy.stage(model, 3)) == FlopModel.from_model(model, "last1")
    assert policy.frozen_prefix(model) == []  # everything thaws: no dropout is switched off
    assert Policy.parse("head>last2@3").frozen_prefix(model)[1:] == list(model.bert.encoder.layer[:2])


# ---------------------------------------------------------------- gradual unfreezing end to end

STEPS = 8  # 32 rows / (8 per step) = 4 steps per epoch, 2 epochs
GRADUAL = ["--task", "imdb-subset", "--train-samples", "32", "--eval-samples", "24", "--max-length", "32",
           "--epochs", "2", "--lr", "1e-3", "--seed", "5", "--log-every", "100", "--cpu",
           "--freeze", "head", "--unfreeze-every", "1", "--unfreeze-to", "none", "--layer-lr-decay", "0.8"]
# module prefix -> optimizer steps after which it thaws (every 1 step: block 3 + pooler, 2, 1, 0, embeddings)
THAWS = {"classifier.": 0, "bert.pooler.": 1, "bert.encoder.layer.3.": 1, "bert.encoder.layer.2.": 2,
         "bert.encoder.layer.1.": 3, "bert.encoder.layer.0.": 4, "bert.embeddings.": 5}


def check_gradual_run(straight, stopped, model_dir):
    """Frozen weights bit-identical until their thaw, exact LLRD learning rates, exact resume."""
    initial = load_file(f"{model_dir}/model.safetensors")
    checkpoints = sorted((straight / "checkpoints").glob("step-*"))
    assert len(checkpoints) == STEPS
    for step, folder in enumerate(checkpoints, start=1):
        weights = load_file(folder / "model.safetensors")
        for prefix, thaw in THAWS.items():
            names = [n for n in weights if n.startswith(prefix)]
            same = all(torch.equal(weights[n], initial[n]) for n in names)
            assert same == (step <= thaw), (step, prefix)  # unchanged up to its thaw, moved by the first step after
        progress = read_json(folder / "progress.json")
        assert progress["policy"]["spec"] == "head>none@1+llrd0.8"
        assert progress["policy"]["stage"] == Policy.parse("head>none@1+llrd0.8").stage(tiny_bert(), step).spec
    # learning rates after step 1, as the optimizer saved them: lr * 0.8^depth * (T-1)/T
    saved = torch.load(checkpoints[0] / "optimizer.bin", weights_only=False)
    groups = read_json(straight / "config.json")["resolved"]["param_groups"]
    assert len(saved["param_groups"]) == len(groups) == 2 * (LAYERS + 2)  # (embeddings, 4 blocks, head) x decay or not
    vocab = len(initial["bert.embeddings.word_embeddings.weight"])
    assert sum(g["params"] for g in groups) == sum(p.numel() for p in tiny_bert(vocab).parameters())
    for group, recorded in zip(saved["param_groups"], groups):
        assert group["name"] == recorded["name"]
        level = recorded["name"].rsplit(" ", 1)[0]
        depth = ({"head": 0, "embeddings": LAYERS + 1}[level] if level in ("head", "embeddings")
                 else LAYERS - int(level.split()[1]))
        assert recorded["lr"] == pytest.approx(1e-3 * 0.8 ** depth, rel=1e-12)
        assert group["lr"] == pytest.approx(1e-3 * 0.8 ** depth * (STEPS - 1) / STEPS, rel=1e-12)
        decay = 0.0 if recorded["name"].endswith("no_decay") else 0.01
        assert group["weight_decay"] == recorded["weight_decay"] == decay
    # AdamW holds state only for what has trained: after step 1, the classifier alone
    assert len(saved["state"]) == 2
    # the stopped-and-resumed run (stopped after step 1, i.e. after the first thaw) ends exactly as the straight one
    assert read_predictions(stopped / "predictions.csv") == read_predictions(straight / "predictions.csv")
    a, b = read_json(straight / "metrics.json"), read_json(stopped / "metrics.json")
    assert a["eval_loss"] == b["eval_loss"] and a["global_step"] == b["global_step"] == STEPS
    final_a = load_file(straight / "model" / "model.safetensors")
    final_b = load_file(stopped / "model" / "model.safetensors")
    assert all(torch.equal(final_a[n], final_b[n]) for n in final_a)
    assert a["freeze"] == "head>none@1+llrd0.8" and a["trainable_params"] == a["total_params"]
    log = (straight / "metrics.jsonl").read_text()
    assert '"unfrozen_to": "last1+llrd0.8"' in log and '"unfrozen_to": "none+llrd0.8"' in log


def test_gradual_unfreezing_one_process(tiny_model_dir, data_dir, tmp_path, capsys):
    args = ["--model", tiny_model_dir, "--data-dir", data_dir, *GRADUAL, "--batch-size", "8"]
    assert run(train_main, TrainConfig, "train", [*args, "--output-dir", str(tmp_path / "straight"),
                                                   "--checkpoint-every", "1", "--keep-checkpoints", "0"]) == 0
    stop = tmp_path / "STOP"
    stop.touch()  # present from the start: checkpoint after step 1 (the first thaw) and exit 75
    resumed = [*args, "--output-dir", str(tmp_path / "stopped")]
    assert run(train_main, TrainConfig, "train", [*resumed, "--stop-file", str(stop)]) == 75
    stop.unlink()
    assert run(train_main, TrainConfig, "train", [*resumed, "--resume-from", "auto"]) == 0
    # the same checkpoint cannot be resumed under another policy
    assert run(train_main, TrainConfig, "train", [*args, "--layer-lr-decay", "1", "--output-dir",
                                                  str(tmp_path / "stopped"),
                                                   "--resume-from", "auto"]) == 2
    assert "was trained with policy 'head>none@1+llrd0.8'" in capsys.readouterr().err
    check_gradual_run(tmp_path / "straight", tmp_path / "stopped", tiny_model_dir)


def test_gradual_unfreezing_two_process_ddp(tiny_model_dir, data_dir, tmp_path):
    args = ["launch/train.py", "--model", tiny_model_dir, "--data-dir", data_dir, *GRADUAL, "--batch-size", "4"]
    accelerate_launch(*args, "--output-dir", str(tmp_path / "straight"), "--checkpoint-every", "1",
                      "--keep-checkpoints", "0")
    stop = tmp_path / "STOP"
    stop.touch()
    first = accelerate_launch(*args, "--output-dir", str(tmp_path / "stopped"), "--stop-file", str(stop), check=False)
    # every rank exits 75 after the stop checkpoint; the launcher (torchrun) reports that as a failure
    assert first.returncode != 0 and "exitcode  : 75" in first.stderr, first.stderr[-3000:]
    assert not (tmp_path / "stopped" / "metrics.json").exists()
    stop.unlink()
    second = accelerate_launch(*args, "--output-dir", str(tmp_path / "stopped"), "--resume-from", "auto")
    assert "resumed from" in second.stdout
    assert read_json(tmp_path / "straight" / "metrics.json")["world_size"] == 2
    check_gradual_run(tmp_path / "straight", tmp_path / "stopped", tiny_model_dir)


def test_compare_runs_the_new_spellings(tiny_model_dir, data_dir, tmp_path, capsys):
    from toolkit.compare import CompareConfig
    from toolkit.compare import main as compare_main

    out = tmp_path / "cmp"
    argv = ["--model", tiny_model_dir, "--data-dir", data_dir, "--train-samples", "32", "--eval-samples", "16",
            "--max-length", "32", "--batch-size", "8", "--lr", "1e-3", "--log-every", "100", "--cpu",
            "--output-dir", str(out), "--policies", "last2+llrd0.5,head>none@1"]
    assert run(compare_main, CompareConfig, "compare", argv) == 0
    report = {r["policy"]: r for r in read_json(out / "report.json")["runs"]}
    assert set(report) == {"last2+llrd0.5", "head>none@1"} and all(r["status"] == "trained" for r in report.values())
    llrd, gradual = (read_json(out / folder / "seed-42" / "config.json") for folder in ("last2+llrd0.5",
                                                                                        "head-to-none-every-1"))
    assert (llrd["freeze"], llrd["layer_lr_decay"], llrd["unfreeze_every"]) == ("last2", 0.5, 0)
    assert (gradual["freeze"], gradual["unfreeze_every"], gradual["unfreeze_to"]) == ("head", 1, "none")
    assert {g["name"]: g["lr"] for g in llrd["resolved"]["param_groups"]}["block 2 decay"] == pytest.approx(1e-3 * 0.25)
    assert read_json(out / "head-to-none-every-1" / "seed-42" / "metrics.json")["freeze"] == "head>none@1"
    assert run(compare_main, CompareConfig, "compare", argv) == 0  # the same command again reuses both runs
    assert all(r["status"] == "reused" for r in read_json(out / "report.json")["runs"])
    # per-policy options go inside the list, not next to it
    assert run(compare_main, CompareConfig, "compare", [*argv, "--layer-lr-decay", "0.9"]) == 2
    assert "inside --policies" in capsys.readouterr().err
