"""accelerate_configs/: every YAML goes through Accelerate's own loader and launcher logic,
every DeepSpeed JSON through Accelerate's "auto" resolution and DeepSpeed's own parser,
and each DeepSpeed JSON trains for real (2 CPU processes, gloo).

The DeepSpeed runs are real: the offload ones JIT-compile DeepSpeed's CPU Adam once
(about a minute, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, accelerate_launch, read_json, read_predictions, run_cmd

CONFIGS = ROOT / "accelerate_configs"

# file -> what it must mean once Accelerate has read it
YAMLS = {
    "single_gpu.yaml": dict(distributed_type="NO", num_processes=1, mixed_precision="fp16"),
    "multi_gpu.yaml": dict(distributed_type="MULTI_GPU", num_processes=2, mixed_precision="bf16"),
    "multi_node.yaml": dict(distributed_type="MULTI_GPU", num_processes=16, num_machines=2, mixed_precision="bf16"),
    "cpu_2proc.yaml": dict(distributed_type="MULTI_GPU", num_processes=2, mixed_precision="no", use_cpu=True),
    "fsdp.yaml": dict(distributed_type="FSDP", num_processes=2, mixed_precision="bf16"),
    # DeepSpeed: no mixed_precision in the YAML (Accelerate refuses one next to a deepspeed_config_file);
    # the toolkit's --mixed-precision resolves the JSON's "enabled": "auto".
    "deepspeed_zero1.yaml": dict(distributed_type="DEEPSPEED", num_processes=2, ds="ds_zero1.json"),
    "deepspeed_zero2.yaml": dict(distributed_type="DEEPSPEED", num_processes=2, ds="ds_zero2.json"),
    "deepspeed_zero2_offload.yaml": dict(distributed_type="DEEPSPEED", num_processes=2, ds="ds_zero2_offload.json"),
    "deepspeed_zero3.yaml": dict(distributed_type="DEEPSPEED", num_processes=2, ds="ds_zero3.json"),
    "deepspeed_zero3_offload.yaml": dict(distributed_type="DEEPSPEED", num_processes=2, ds="ds_zero3_offload.json"),
    "cpu_deepspeed_zero2.yaml": dict(distributed_type="DEEPSPEED", num_processes=2, ds="ds_zero2.json"),
    "cpu_deepspeed_zero3.yaml": dict(distributed_type="DEEPSPEED", num_processes=2, ds="ds_zero3.json"),
}

# DeepSpeed JSON -> (ZeRO stage, offload_optimizer device, offload_param device)
DS_JSONS = {
    "ds_zero1.json": (1, "none", "none"),
    "ds_zero2.json": (2, "none", "none"),
    "ds_zero2_offload.json": (2, "cpu", "none"),
    "ds_zero3.json": (3, "none", "none"),
    "ds_zero3_offload.json": (3, "cpu", "cpu"),
}

# one process: DeepSpeedConfig takes the world size from torch.distributed, 1 when it is not initialised
MICRO_BATCH, GRAD_ACCUM, WORLD, HIDDEN = 8, 2, 1, 384


def _yaml_dict(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_every_config_file_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(YAMLS)
    assert sorted(p.name for p in CONFIGS.glob("*.json")) == sorted(DS_JSONS)
    referenced = {spec["ds"] for spec in YAMLS.values() if "ds" in spec}
    assert referenced == set(DS_JSONS)


# ---------------------------------------------------------------- YAML files


@pytest.mark.parametrize("name", sorted(YAMLS))
def test_yaml_starts_with_one_comment_line(name):
    lines = (CONFIGS / name).read_text().splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 20
    assert not lines[1].startswith("#")


@pytest.mark.parametrize("name", sorted(YAMLS))
def test_yaml_loads_with_accelerates_loader(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    spec = YAMLS[name]
    # rejects unknown top-level keys and unknown distributed types
    cfg = load_config_from_file(str(CONFIGS / name))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type == DistributedType(spec["distributed_type"])
    assert cfg.num_processes == spec["num_processes"]
    assert cfg.num_machines == spec.get("num_machines", 1)
    assert cfg.mixed_precision == spec.get("mixed_precision")
    assert cfg.use_cpu == spec.get("use_cpu", False)
    if "ds" in spec:
        assert cfg.deepspeed_config["deepspeed_config_file"] == f"accelerate_configs/{spec['ds']}"
        # ZeRO-3 init would hand the freeze code empty (partitioned) tensors; BERT fits in RAM anyway
        assert cfg.deepspeed_config["zero3_init_flag"] is False
    else:
        assert cfg.deepspeed_config == {}


@pytest.mark.parametrize("name", sorted(YAMLS))
def test_yaml_nested_keys_are_real_launch_options(name):
    """Accelerate copies deepspeed_config/fsdp_config entries onto its launch arguments without
    checking them: a typo'd key would be silently ignored, so check them against the parser."""
    from accelerate.commands.launch import launch_command_parser

    dests = {action.dest for action in launch_command_parser()._actions}
    raw = _yaml_dict(name)
    for section in ("deepspeed_config", "fsdp_config"):
        for key in raw.get(section, {}):
            assert key in dests, f"{name}: {section}.{key} is not an accelerate launch option"


def _launch_args(name: str, monkeypatch):
    """What `accelerate launch --config_file <name> launch/train.py` resolves, without launching."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.chdir(ROOT)  # the deepspeed_config_file paths are relative to the repository root
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "launch/train.py"])
    return _validate_launch_command(args)


def _child_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


@pytest.mark.parametrize("name", sorted(n for n, s in YAMLS.items()
                                        if "ds" not in s and s["distributed_type"] != "FSDP"))
def test_yaml_picks_the_intended_launcher(name, monkeypatch):
    args, _, _ = _launch_args(name, monkeypatch)
    spec = YAMLS[name]
    assert not args.use_deepspeed and not args.use_fsdp and not args.cpu
    # MULTI_GPU = torchrun with num_processes workers; cpu_2proc.yaml relies on it (see docs/backends.md)
    assert args.multi_gpu == (spec["distributed_type"] == "MULTI_GPU")
    assert args.num_processes == spec["num_processes"] and args.mixed_precision == spec["mixed_precision"]


@pytest.mark.parametrize("name", sorted(n for n, s in YAMLS.items() if "ds" in s))
def test_deepspeed_yaml_builds_accelerates_deepspeed_plugin(name, monkeypatch):
    """The env `accelerate launch` hands each process, turned into the DeepSpeedPlugin the process builds.
    This is where Accelerate refuses YAML fields that conflict with a deepspeed_config_file."""
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin, patch_environment
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults, mp_from_config = _launch_args(name, monkeypatch)
    assert args.use_deepspeed and not args.cpu
    # as in accelerate.commands.launch.launch_command
    fields = list(defaults.deepspeed_config.keys()) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    with patch_environment(**_child_env(env)):
        plugin = DeepSpeedPlugin()
    stage, opt_off, param_off = DS_JSONS[YAMLS[name]["ds"]]
    assert plugin.zero_stage == stage
    assert plugin.offload_optimizer_device == opt_off and plugin.offload_param_device == param_off
    assert plugin.zero3_init_flag is False
    assert plugin.zero3_save_16bit_model is (stage == 3)


def _tiny_classifier(kind: str):
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

    common = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_hidden_layers=2)
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(**common))
    if kind == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(**common))
    if kind == "distilbert":
        return DistilBertForSequenceClassification(DistilBertConfig(n_layers=2, dim=32, n_heads=2, hidden_dim=64,
                                                                    vocab_size=100))
    if kind == "deberta-v2":
        return DebertaV2ForSequenceClassification(DebertaV2Config(relative_attention=True, position_buckets=16,
                                                                  **common))
    return ModernBertForSequenceClassification(ModernBertConfig(global_attn_every_n_layers=2, pad_token_id=0, **common))


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "deberta-v2", "modernbert"])
def test_fsdp_yaml_builds_accelerates_fsdp_plugin_and_wraps_each_block(monkeypatch, kind):
    """fsdp.yaml names no layer class: Accelerate wraps what the model lists in _no_split_modules,
    so every supported architecture gets one FSDP unit per encoder block (a hard-coded BertLayer
    made Accelerate raise for all but BERT)."""
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import ShardingStrategy, StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from toolkit.backends.accelerator import fsdp_wrap_classes
    from toolkit.policy.blocks import find_blocks

    args, _, _ = _launch_args("fsdp.yaml", monkeypatch)
    assert args.use_fsdp and not args.cpu
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env
    # rank 0's weights are broadcast at wrap time; the plugin looks up the GPU for that, so build it
    # without the broadcast on a GPU-less test machine
    assert env["FSDP_SYNC_MODULE_STATES"] == "true"
    env["FSDP_SYNC_MODULE_STATES"] = "false"
    with patch_environment(**_child_env(env)):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1
    assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.use_orig_params is True  # frozen and trainable parameters in one flat unit
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap is None
    assert plugin.cpu_offload.offload_params is False
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    model = _tiny_classifier(kind)
    # what toolkit.train does before prepare(): the model's _no_split_modules, or its block class where
    # transformers lists none (DistilBERT, DeBERTa-v2)
    plugin.transformer_cls_names_to_wrap = fsdp_wrap_classes(model)
    assert plugin.transformer_cls_names_to_wrap == (sorted(model._no_split_modules)
                                                    or [type(find_blocks(model)[1][0]).__name__])
    plugin.set_auto_wrap_policy(model)  # Accelerate raises here for a class name the model does not have
    _, blocks = find_blocks(model)
    policy = plugin.auto_wrap_policy
    assert all(policy(module=block, recurse=False, nonwrapped_numel=0) for block in blocks)
    assert not policy(module=model, recurse=False, nonwrapped_numel=0)


# ---------------------------------------------------------------- DeepSpeed JSON files

def _ds_keys() -> set[str]:
    import deepspeed.runtime.constants as ds_constants
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    keys = {v for k, v in vars(ds_constants).items() if k.isupper() and isinstance(v, str)}
    return keys | {ZERO_OPTIMIZATION}


def _contains_auto(node) -> bool:
    if isinstance(node, dict):
        return any(_contains_auto(v) for v in node.values())
    return node == "auto"


def resolve_like_accelerate(path: Path, mixed_precision: str) -> dict:
    """The DeepSpeed config a process ends up with: Accelerate's DeepSpeedPlugin reads the file,
    `set_mixed_precision` fills the bf16/fp16 "auto"s, and the rest are filled exactly as
    Accelerator._prepare_deepspeed fills them (batch from the loader, accumulation from the
    Accelerator, bucket sizes from model.config.hidden_size)."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    plugin.set_mixed_precision(mixed_precision)
    plugin.fill_match("gradient_accumulation_steps", must_match=False, gradient_accumulation_steps=GRAD_ACCUM)
    plugin.deepspeed_config_process(must_match=False, **{
        "gradient_clipping": 1.0,
        "zero_optimization.stage3_gather_16bit_weights_on_model_save": False,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "train_batch_size": MICRO_BATCH * GRAD_ACCUM * WORLD,
        "zero_optimization.reduce_bucket_size": HIDDEN * HIDDEN,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * HIDDEN * HIDDEN),
        "zero_optimization.stage3_param_persistence_threshold": 10 * HIDDEN,
    })
    return plugin.deepspeed_config


def parse_with_deepspeed(config: dict):
    """DeepSpeed's own parser: pydantic models that forbid unknown keys, plus the batch-size arithmetic."""
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(copy.deepcopy(config))


@pytest.mark.parametrize("name", sorted(DS_JSONS))
def test_ds_json_has_comment_first_and_only_deepspeed_keys(name):
    pytest.importorskip("deepspeed")
    raw = json.loads((CONFIGS / name).read_text())
    assert list(raw)[0] == "_comment" and len(raw["_comment"]) > 20
    # DeepSpeed ignores unknown top-level keys (it accepts "_comment"), so a typo there would pass silently
    unknown = set(raw) - _ds_keys() - {"_comment"}
    assert not unknown, f"{name}: not DeepSpeed keys: {unknown}"
    # the toolkit passes its own AdamW + linear schedule through accelerator.prepare
    assert "optimizer" not in raw and "scheduler" not in raw
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert raw[key] == "auto", key
    assert raw["bf16"]["enabled"] == "auto" and raw["fp16"]["enabled"] == "auto"


@pytest.mark.parametrize("mixed_precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(DS_JSONS))
def test_ds_json_resolves_and_passes_deepspeeds_parser(name, mixed_precision):
    pytest.importorskip("deepspeed")
    config = resolve_like_accelerate(CONFIGS / name, mixed_precision)
    assert not _contains_auto(config), config
    ds = parse_with_deepspeed(config)
    stage, opt_off, param_off = DS_JSONS[name]
    assert ds.zero_enabled and ds.zero_optimization_stage == stage
    assert str(ds.zero_config.offload_optimizer.device if ds.zero_config.offload_optimizer else "none") == opt_off
    assert str(ds.zero_config.offload_param.device if ds.zero_config.offload_param else "none") == param_off
    assert ds.bfloat16_config.enabled == (mixed_precision == "bf16")
    assert ds.float16_config.enabled == (mixed_precision == "fp16")
    if mixed_precision == "fp16":
        assert ds.float16_config.loss_scale == 0  # dynamic loss scaling on T4/V100
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (MICRO_BATCH, GRAD_ACCUM)
    assert ds.train_batch_size == MICRO_BATCH * GRAD_ACCUM * WORLD
    if stage == 3:
        # a consolidated save_pretrained model needs the 16-bit gather at save time
        assert ds.zero_config.gather_16bit_weights_on_model_save is True
    # client optimizer + offload: Accelerate swaps the torch AdamW for DeepSpeedCPUAdam (same param
    # groups) unless zero_force_ds_cpu_optimizer is false; keep DeepSpeed's default (True)
    assert ds.zero_force_ds_cpu_optimizer is True


@pytest.mark.parametrize("mutation, message", [
    (lambda c: c["zero_optimization"].update(overlap_com=True), "overlap_com"),
    (lambda c: c["zero_optimization"].update(stage=4), "stage"),
    (lambda c: c["zero_optimization"].update(offload_optimizer={"device": "gpu"}), "device"),
    (lambda c: c["bf16"].update(enabeld=True), "enabeld"),
    (lambda c: c["fp16"].update(loss_scal=0), "loss_scal"),
])
def test_deepspeeds_parser_rejects_broken_configs(mutation, message):
    """Control: the parser used above does catch typos and invalid values."""
    pytest.importorskip("deepspeed")
    config = resolve_like_accelerate(CONFIGS / "ds_zero2.json", "no")
    parse_with_deepspeed(config)
    mutation(config)
    with pytest.raises(Exception, match=message):
        parse_with_deepspeed(config)


def test_top_level_typo_is_caught_by_the_key_check():
    pytest.importorskip("deepspeed")
    assert "gradient_clipping" in _ds_keys() and "gradient_cliping" not in _ds_keys()


# ---------------------------------------------------------------- real 2-process runs on CPU

PROBE = r'''
"""A stand-in for the toolkit's training step: a tiny BERT with frozen embeddings, torch AdamW over the
trainable parameters (no decay for bias/LayerNorm), a linear schedule, all through accelerator.prepare."""
import faulthandler, json, os, sys, torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from transformers import BertConfig, BertForSequenceClassification

from toolkit.engine.model import linear_schedule

mixed_precision, result_file = sys.argv[1], sys.argv[2]
faulthandler.enable()  # a native abort prints where each rank was
# like toolkit.backends.accelerator.setup: one scheduler step per optimizer step, gloo on CPU
acc = Accelerator(mixed_precision=mixed_precision, step_scheduler_with_optimizer=False,
                  kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64, num_labels=2))
for name, p in model.named_parameters():
    p.requires_grad = not name.startswith("bert.embeddings")
no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n
named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
optimizer = torch.optim.AdamW([{"params": [p for n, p in named if not no_decay(n)], "weight_decay": 0.01},
                               {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}], lr=1e-3)
scheduler = linear_schedule(optimizer, 0, 4)
data = torch.utils.data.TensorDataset(torch.randint(0, 128, (64, 16)), torch.randint(0, 2, (64,)))
loader = torch.utils.data.DataLoader(data, batch_size=8)
model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
engine = acc.deepspeed_engine_wrapped.engine
losses, lrs = [], []
for x, y in loader:
    loss = model(input_ids=x, labels=y).loss
    acc.backward(loss)
    optimizer.step(); scheduler.step(); optimizer.zero_grad()
    losses.append(acc.reduce(loss.detach().float(), "mean").item())
    lrs.append([g["lr"] for g in engine.basic_optimizer.param_groups])
model.eval()
with torch.no_grad():
    model(input_ids=torch.randint(0, 128, (4, 16)).to(acc.device))  # ZeRO-3: every rank must join
state = acc.get_state_dict(model)
if acc.is_main_process:  # a file, not stdout: two ranks' output can interleave on one line
    open(result_file, "w").write(json.dumps({
        "distributed_type": str(acc.distributed_type), "world": acc.num_processes,
        "stage": engine.zero_optimization_stage(), "basic_optimizer": type(engine.basic_optimizer).__name__,
        "weight_decays": [g["weight_decay"] for g in engine.basic_optimizer.param_groups],
        "losses": losses, "lrs": lrs, "bf16": engine.bfloat16_enabled(),
        "saved_numel": sum(v.numel() for v in state.values()),
        "model_numel": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                           for p in acc.unwrap_model(model).parameters()),
    }))
acc.wait_for_everyone()
acc.end_training()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # like toolkit.cli.finish: no interpreter teardown of DeepSpeed's gloo groups
'''


def _cpu_deepspeed_yaml(tmp_path: Path, ds_json: str) -> Path:
    raw = _yaml_dict("cpu_deepspeed_zero2.yaml")
    raw["deepspeed_config"]["deepspeed_config_file"] = str(CONFIGS / ds_json)
    path = tmp_path / f"cpu_{ds_json}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name, mixed_precision", [
    ("ds_zero1.json", "no"),
    ("ds_zero2.json", "bf16"),
    ("ds_zero2_offload.json", "no"),
    ("ds_zero3.json", "bf16"),
    ("ds_zero3_offload.json", "no"),
])
def test_ds_json_trains_with_two_cpu_processes(tmp_path, name, mixed_precision):
    pytest.importorskip("deepspeed")
    probe, result = tmp_path / "probe.py", tmp_path / "result.json"
    probe.write_text(PROBE)
    run_cmd([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(_cpu_deepspeed_yaml(tmp_path, name)), "--main_process_port", "0",
             str(probe), mixed_precision, str(result)], timeout=900)
    got = read_json(result)
    stage, opt_off, _ = DS_JSONS[name]
    assert got["distributed_type"] == "DistributedType.DEEPSPEED" and got["world"] == 2
    assert got["stage"] == stage and got["bf16"] == (mixed_precision == "bf16")
    # offload + client optimizer: Accelerate's swap to DeepSpeedCPUAdam keeps the toolkit's param groups
    assert got["basic_optimizer"] == ("DeepSpeedCPUAdam" if opt_off == "cpu" else "AdamW")
    assert got["weight_decays"] == [0.01, 0.0]
    # 64 rows / (8 x 2 ranks) = 4 steps, and the toolkit's linear schedule drives DeepSpeed's optimizer
    assert len(got["losses"]) == 4 and all(0 < x < 5 for x in got["losses"])
    assert [round(lr[0], 6) for lr in got["lrs"]] == [0.00075, 0.0005, 0.00025, 0.0]
    # the gathered state dict is the whole model (ZeRO-3: gathered from the shards)
    assert got["saved_numel"] == got["model_numel"]


def test_cpu_2proc_yaml_forms_one_gloo_group_of_two(tmp_path):
    probe = tmp_path / "world.py"
    probe.write_text("import sys\nfrom pathlib import Path\nfrom accelerate import Accelerator\n"
                     "acc = Accelerator(cpu=True)\n"
                     "Path(sys.argv[1], f'rank{acc.process_index}').write_text(f'{acc.num_processes} "
                     "{acc.distributed_type}')\n")
    run_cmd([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(CONFIGS / "cpu_2proc.yaml"), str(probe), str(tmp_path)], timeout=300)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == "2 DistributedType.MULTI_CPU"


# ---------------------------------------------------------------- the toolkit itself under DeepSpeed

CORE_ARGS = ["--task", "imdb-subset", "--train-samples", "64", "--eval-samples", "42", "--max-length", "64",
             "--batch-size", "8", "--freeze", "last2", "--lr", "3e-4", "--seed", "0", "--cpu"]


# fp32 so the 1-process re-evaluation of the saved model can be compared prediction by prediction;
# bf16 under DeepSpeed is exercised by test_ds_json_trains_with_two_cpu_processes.
@pytest.mark.parametrize("config, mixed_precision", [("cpu_deepspeed_zero2.yaml", "no"),
                                                     ("cpu_deepspeed_zero3.yaml", "no")])
def test_toolkit_trains_under_deepspeed_on_two_cpu_processes(tmp_path, minilm, data_dir, config, mixed_precision):
    pytest.importorskip("deepspeed")
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    accelerate_launch("launch/train.py", "--model", minilm, "--data-dir", data_dir, *CORE_ARGS,
                      "--mixed-precision", mixed_precision, "--output-dir", str(out),
                      config=str(CONFIGS / config))
    resolved = read_json(out / "config.json")["resolved"]
    assert resolved["distributed_type"] == "DistributedType.DEEPSPEED"  # not a silent fallback to DDP
    assert resolved["world_size"] == 2 and resolved["mixed_precision"] == mixed_precision
    metrics = read_json(out / "metrics.json")
    assert metrics["global_step"] == 4 and metrics["train_samples"] == 64
    assert [r[0] for r in read_predictions(out / "predictions.csv")] == list(range(42))
    assert list((out / "checkpoints").glob("step-*/progress.json"))
    # the exported model is complete (ZeRO-3: consolidated from the shards) and frozen weights did not move
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    pretrained = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2).state_dict()
    trained = model.state_dict()
    assert set(trained) == set(pretrained)
    saved_dtype = next(iter(load_file(out / "model" / "model.safetensors").values())).dtype
    frozen = [n for n in pretrained if n.startswith("bert.embeddings") or ".layer.0." in n]
    assert frozen
    for name in frozen:
        # bf16 runs save the 16-bit weights DeepSpeed trained with
        assert torch.equal(trained[name].to(saved_dtype), pretrained[name].to(saved_dtype)), name
    assert not torch.equal(trained["bert.encoder.layer.5.output.dense.weight"].to(saved_dtype),
                           pretrained["bert.encoder.layer.5.output.dense.weight"].to(saved_dtype))
    # exact gathered evaluation: one plain process on the consolidated model predicts the same
    ev = tmp_path / "eval"
    run_cmd([sys.executable, "launch/evaluate.py", "--model", str(out / "model"), "--data-dir", data_dir,
             *CORE_ARGS[:8], "--eval-batch-size", "16", "--output-dir", str(ev), "--cpu"])
    assert read_predictions(ev / "predictions.csv") == read_predictions(out / "predictions.csv")
    assert read_json(ev / "metrics.json")["f1"] == metrics["f1"]
