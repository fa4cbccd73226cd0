"""The GPU-only paths, tested where their logic separates from CUDA (issue 14).

Precision from the launcher's environment and command line for each GPU class; TF32 and the
build's kernels; the process-group timeout and the data phase's wait (a real 2-process gloo run
with a rank 0 that tokenizes for longer than the main group's timeout); --cache-frozen features
meeting 16-bit weights; FSDP's clip; srun's LOCAL_RANK; the DeepSpeed sbatch template's arguments.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_json, run_cmd

from toolkit.backends.precision import has_kernels, launcher_choice, resolve_mixed_precision, tf32_applies
from toolkit.core.errors import ToolkitError

T4, V100, A100, H100, CPU = (7, 5), (7, 0), (8, 0), (9, 0), None
GPUS = {"T4": T4, "V100": V100, "A100": A100, "H100": H100, "CPU": CPU}
CONFIGS = ROOT / "accelerate_configs"
LAUNCH = ["/venv/bin/python", "/venv/bin/accelerate", "launch"]
AUTO = {"T4": "fp16", "V100": "fp16", "A100": "bf16", "H100": "bf16", "CPU": "no"}


def _resolve(flag, env, argv, gpu, default_config=None):
    return resolve_mixed_precision(flag, env, argv, GPUS[gpu], default_config)


# ---------------------------------------------------------------- mixed precision: who asked for what

@pytest.mark.parametrize("gpu", list(GPUS))
def test_launcher_default_is_not_a_choice(gpu):
    # `accelerate launch launch/train.py`: the launcher exports "no" without being asked
    mode, why = _resolve(None, {"ACCELERATE_MIXED_PRECISION": "no"}, LAUNCH + ["launch/train.py", "--freeze", "last2"],
                         gpu)
    assert mode == AUTO[gpu] and "auto" in why and "default" in why
    # plain python: nothing set at all
    assert _resolve(None, {}, None, gpu)[0] == AUTO[gpu]
    # a DeepSpeed YAML cannot carry mixed_precision: the launcher's "no" is its default there too
    ds = LAUNCH + ["--config_file", str(CONFIGS / "deepspeed_zero2.yaml"), "launch/train.py"]
    assert _resolve(None, {"ACCELERATE_MIXED_PRECISION": "no"}, ds, gpu)[0] == AUTO[gpu]


@pytest.mark.parametrize("gpu", list(GPUS))
def test_a_users_no_is_honoured(gpu):
    env = {"ACCELERATE_MIXED_PRECISION": "no"}
    flag = LAUNCH + ["--mixed_precision", "no", "launch/train.py"]
    where = "CPU" if gpu == "CPU" else "compute capability %d.%d" % GPUS[gpu]
    assert _resolve(None, env, flag, gpu) == ("no", f"accelerate launch --mixed_precision on {where}")
    config = LAUNCH + ["--config_file", str(CONFIGS / "cpu_2proc.yaml"), "launch/train.py"]  # says mixed_precision: no
    mode, why = _resolve(None, env, config, gpu)
    assert mode == "no" and "cpu_2proc.yaml" in why
    # the script's own flag wins over a launcher config that says bf16
    bf16_config = LAUNCH + ["--config_file", str(CONFIGS / "multi_gpu.yaml"), "launch/train.py"]
    assert _resolve("no", {"ACCELERATE_MIXED_PRECISION": "bf16"}, bf16_config, gpu) == (
        "no", f"--mixed-precision on {'CPU' if gpu == 'CPU' else 'compute capability %d.%d' % GPUS[gpu]}")
    # ACCELERATE_MIXED_PRECISION exported by hand, no launcher above the process: the user's value
    assert _resolve(None, env, None, gpu)[0] == "no"


@pytest.mark.parametrize("gpu", list(GPUS))
def test_launcher_configs_are_checked_per_device(gpu):
    bf16 = LAUNCH + ["--config_file", str(CONFIGS / "multi_gpu.yaml"), "launch/train.py"]
    fp16 = LAUNCH + ["--config_file", str(CONFIGS / "single_gpu.yaml"), "launch/train.py"]
    env_bf16, env_fp16 = {"ACCELERATE_MIXED_PRECISION": "bf16"}, {"ACCELERATE_MIXED_PRECISION": "fp16"}
    if gpu in ("T4", "V100"):
        with pytest.raises(ToolkitError, match="compute capability"):
            _resolve(None, env_bf16, bf16, gpu)
    else:
        assert _resolve(None, env_bf16, bf16, gpu)[0] == "bf16"
    if gpu == "CPU":
        with pytest.raises(ToolkitError, match="CPU"):
            _resolve(None, env_fp16, fp16, gpu)
    else:
        assert _resolve(None, env_fp16, fp16, gpu)[0] == "fp16"


def test_default_config_file_counts_unless_launched_with_cpu(tmp_path):
    default = tmp_path / "default_config.yaml"
    default.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\n")
    assert launcher_choice(LAUNCH + ["launch/train.py"], default) == ("bf16", f"mixed_precision in {default}")
    # accelerate reads no default config with --cpu (accelerate/commands/launch.py, _validate_launch_command)
    assert launcher_choice(LAUNCH + ["--cpu", "launch/train.py"], default)[0] is None
    assert launcher_choice(["python", "-m", "accelerate.commands.launch", "x.py"], tmp_path / "absent.yaml")[0] is None


# ---------------------------------------------------------------- TF32, and kernels of the torch build

@pytest.mark.parametrize("gpu, expected", [("T4", False), ("V100", False), ("A100", True), ("H100", True),
                                           ("CPU", False)])
def test_tf32_on_ampere_and_newer_unless_switched_off(gpu, expected):
    assert tf32_applies(True, GPUS[gpu]) is expected
    assert tf32_applies(False, GPUS[gpu]) is False


# torch.cuda.get_arch_list() of the PyTorch CUDA wheels since 2.11 (pytorch/pytorch#172352): only the
# CUDA 12.6 build keeps Volta; 12.8 and 13.0 start at Turing.
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


@pytest.mark.parametrize("arch_list, v100", [(CU126, True), (CU128, False), (CU130, False)])
def test_v100_needs_a_build_with_sm70(arch_list, v100):
    assert has_kernels(V100, arch_list) is v100
    for gpu in (T4, A100, (8, 9), H100):  # L4 (8.9) runs the sm_86 cubin
        assert has_kernels(gpu, arch_list)
    assert not has_kernels(A100, ["sm_90"]) and has_kernels((12, 1), CU130)  # PTX compute_120 is JIT-compiled
    assert has_kernels(V100, [])  # a CPU build says nothing


def test_this_build_is_checked_against_its_own_arch_list():
    if torch.cuda.is_available():
        assert has_kernels(torch.cuda.get_device_capability(), torch.cuda.get_arch_list())
    else:
        assert torch.cuda.get_arch_list() == []


# ---------------------------------------------------------------- process-group timeouts

def test_every_multi_process_group_gets_the_timeout():
    from toolkit.backends.distributed import process_group_kwargs

    assert process_group_kwargs(cpu=False, world_size=1, timeout_s=60) == []
    gpu = process_group_kwargs(cpu=False, world_size=8, timeout_s=1800)[0].to_kwargs()
    assert gpu == {"timeout": timedelta(seconds=1800)}  # the backend stays Accelerate's (nccl / cuda:nccl,cpu:gloo)
    assert process_group_kwargs(cpu=True, world_size=2, timeout_s=5)[0].to_kwargs() == {
        "backend": "gloo", "timeout": timedelta(seconds=5)}
    # 600 s is InitProcessGroupKwargs' default, which to_kwargs() would drop (gloo would then wait 30 min)
    kept = process_group_kwargs(cpu=True, world_size=2, timeout_s=600)[0].to_kwargs()["timeout"]
    assert abs(kept.total_seconds() - 600) < 1e-3


def _reviews(tmp_path: Path, rows: int) -> Path:
    """A small train file of real reviews, both classes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(ROOT.parent / "shared" / "data" / "imdb" / "train.parquet")
    half = rows // 2  # the file holds all negatives first, then all positives
    path = tmp_path / "reviews.parquet"
    pq.write_table(pa.concat_tables([table.slice(0, half), table.slice(12500, rows - half)]), path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, minilm) -> str:
    """A 2-block BERT (hidden 32, random weights) with the MiniLM tokenizer: for runs where weights do not matter."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, num_labels=2)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return str(folder)


def test_slow_rank0_data_phase_outlasts_a_short_process_group_timeout(tmp_path, tiny_model, data_dir):
    """Rank 0 holds the data phase for 3x --dist-timeout while rank 1 waits: the wait is on the data
    phase's own gloo group, so the run finishes. (With the wait on the main group, as
    accelerator.main_process_first() does, rank 1's barrier times out after --dist-timeout.)
    The hold comes from TOOLKIT_TEST_DATA_PHASE_DELAY_S, not from tokenizing: any CPU meets the premise.
    The launcher gets no --mixed_precision and no config: its exported "no" is read as its default."""
    from toolkit.core.test_delays import DATA_PHASE_DELAY_ENV

    timeout_s, hold_s = 5, 15
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", "0"]
    proc = run_cmd([*launcher, "launch/train.py", "--model", tiny_model, "--train-file", str(_reviews(tmp_path, 40)),
                    "--eval-fraction", "0.2", "--max-length", "32", "--batch-size", "4", "--max-steps", "2", "--cpu",
                    "--dist-timeout", str(timeout_s), "--output-dir", str(out)],
                   timeout=600,
                   env={"HF_DATASETS_CACHE": str(tmp_path / "cache"),
                        "HF_HOME": str(tmp_path / "hf"),  # no default accelerate config from this machine
                        DATA_PHASE_DELAY_ENV: str(hold_s)})
    assert read_json(out / "metrics.json")["world_size"] == 2
    assert "mixed precision no (auto for CPU (accelerate launch's default 'no' is not a choice))" in proc.stdout
    assert f"process-group timeout {timeout_s} s" in proc.stdout
    # the premise: rank 0, and only rank 0, held the data phase past the main group's timeout
    assert proc.stderr.count(f"rank 0's data phase held {hold_s} s longer") == 1, proc.stderr[-2000:]


# ---------------------------------------------------------------- --cache-frozen under DeepSpeed's 16-bit weights

REVIEWS = ["A wonderful film, moving and funny.", "Dull, far too long, and the plot makes no sense at all.",
           "I loved every minute of it.", "Terrible acting. Avoid.", "Not bad, but the ending drags on and on and on.",
           "One of the best films of the decade, with a cast at the top of its game."]


def test_cached_features_meet_16bit_weights(tiny_model):
    """DeepSpeed casts the parameters to bf16/fp16 (no autocast) after the fp32 cache is built."""
    from accelerate import Accelerator
    from datasets import Dataset

    from toolkit.data.dataset import Collator, tokenize
    from toolkit.engine.frozen_cache import FrozenCache
    from toolkit.engine.model import load_model, load_tokenizer
    from toolkit.policy.policy import apply_freeze

    folder = tiny_model
    tok = load_tokenizer(folder)
    rows = tokenize(Dataset.from_dict({"text": REVIEWS, "labels": [1, 0, 1, 0, 0, 1]}), tok, 32)
    for policy in ("head", "last1"):
        model = load_model(folder, 2)
        apply_freeze(model, policy)
        cache = FrozenCache.build(Accelerator(cpu=True), model, policy, rows, rows, Collator(tok, None), 4,
                                  log=lambda *a: None)
        model.eval()
        batch = next(iter(cache.loader("eval", 8, 0)))
        batch.pop("idx")
        reference = model(**batch).logits
        model.to(torch.bfloat16)  # what deepspeed/runtime/engine.py does with "bf16": {"enabled": true}
        logits = model(**batch).logits  # fp32 features into bf16 blocks: a dtype error without the cast
        assert logits.dtype == torch.bfloat16, policy
        assert torch.allclose(logits.float(), reference, atol=0.05), policy
        cache.restore()


# ---------------------------------------------------------------- FSDP: clip over all parameters

def test_fsdp_clip_gets_all_parameters_so_accelerate_uses_fsdps_own_clip():
    """accelerate.Accelerator.clip_grad_norm_ calls the FSDP module's clip only for exactly
    model.parameters(); the trainable subset falls through to a second unscale and a per-shard clip."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from toolkit.backends.accelerator import clip_parameters

    class Wrapped(torch.nn.Module):  # stands in for the FSDP wrapper: records which clip accelerate picked
        def __init__(self):
            super().__init__()
            self.frozen, self.trained = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
            self.frozen.requires_grad_(False)
            self.calls = []

        def clip_grad_norm_(self, max_norm, norm_type=2):
            self.calls.append(max_norm)
            return torch.tensor(0.0)

    class State:  # the attributes clip_grad_norm_ reads
        distributed_type, is_fsdp2 = DistributedType.FSDP, False

        def __init__(self, model):
            self._models, self.unscaled = [model], 0

        def unscale_gradients(self):
            self.unscaled += 1

        _clip_grad_norm_dtensor_aware = staticmethod(lambda params, max_norm, norm_type=2: torch.tensor(0.0))

    model = Wrapped()
    acc = State(model)
    Accelerator.clip_grad_norm_(acc, clip_parameters(acc, model), 1.0)
    assert model.calls == [1.0] and acc.unscaled == 1
    Accelerator.clip_grad_norm_(acc, [p for p in model.parameters() if p.requires_grad], 1.0)  # the old call
    assert model.calls == [1.0] and acc.unscaled == 3  # unscaled twice (fp16: "unscale_() has already been called")
    acc.distributed_type = DistributedType.MULTI_GPU
    assert clip_parameters(acc, model) == list(model.trained.parameters())


# ---------------------------------------------------------------- srun: one GPU per task

def test_srun_task_with_its_own_gpu_uses_ordinal_zero():
    from toolkit.backends.cluster import export_torch_distributed_env

    base = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NODEID": "0",
            "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NODELIST": "n1",
            "SLURM_STEP_TASKS_PER_NODE": "4"}
    for visible, local_rank in (("3", "0"), ("0,1,2,3", "3"), (None, "3"), ("NoDevFiles", "3"), ("4,5", "1")):
        environ = dict(base, **({"CUDA_VISIBLE_DEVICES": visible} if visible else {}))
        export_torch_distributed_env(environ=environ)
        assert environ["LOCAL_RANK"] == local_rank and environ["RANK"] == "3" and environ["LOCAL_WORLD_SIZE"] == "4"


# ---------------------------------------------------------------- slurm/multi_node_deepspeed.sbatch

def _node_command(script: Path) -> str:
    text = script.read_text()
    start = text.index("NODE_CMD='") + len("NODE_CMD='")
    return text[start:text.index("\n'\n", start)]


@pytest.mark.parametrize("zero_stage, ds_config", [("3", ""), ("2", ""), ("2", "accelerate_configs/ds_zero3.json")])
def test_deepspeed_template_saves_the_model_under_zero3(tmp_path, monkeypatch, zero_stage, ds_config):
    """Render the per-node command of the template with a recording `accelerate`, then let accelerate's
    own parser and DeepSpeed plugin read the arguments it got."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, patch_environment
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text(f'#!/bin/bash\nprintf "%s\\0" "$@" > {tmp_path}/argv\n')
    (bin_dir / "accelerate").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURMD_NODENAME": "n2",
           "SLURM_GPUS_ON_NODE": "4", "MAIN_IP": "n1", "MAIN_PORT": "15007", "TRAIN_SCRIPT": "launch/train.py",
           "ZERO_STAGE": zero_stage, "DS_CONFIG": ds_config}
    subprocess.run(["bash", "-c", "source slurm/common.sh; export -f toolkit_procs_per_node; "
                                  "bash -c \"$0\" toolkit-node --task imdb --freeze none",
                    _node_command(ROOT / "slurm" / "multi_node_deepspeed.sbatch")],
                   cwd=ROOT, env={**os.environ, **env}, check=True, capture_output=True)
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert argv[0] == "launch" and argv[-5:] == ["launch/train.py", "--task", "imdb", "--freeze", "none"]
    monkeypatch.chdir(ROOT)
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv[1:]))
    assert (args.num_machines, args.machine_rank, args.num_processes) == (2, 1, 8)
    args.deepspeed_fields_from_accelerate_config = ""
    _, child = prepare_deepspeed_cmd_env(args)
    with patch_environment(**{k: v for k, v in child.items() if os.environ.get(k) != v}):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == (3 if ds_config else int(zero_stage))
    assert plugin.zero3_save_16bit_model is True  # else get_state_dict raises after training under ZeRO-3
    assert plugin.zero3_init_flag is False  # the freeze policy needs whole tensors


def test_tf32_switch_keeps_both_torch_apis_readable():
    from toolkit.backends.precision import enable_tf32

    before = torch.get_float32_matmul_precision()
    try:
        enable_tf32()
        # throughput.device_peak_flops (and accelerate) read the legacy flag; the new API must agree
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_gpu_check_stops_at_once_without_a_gpu():
    proc = run_cmd([sys.executable, "benchmarks/gpu_check.py"], timeout=120, check=False,
                   env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1
    # what a node has is reported before the GPU is looked for; nothing after that is attempted
    steps = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("[gpu_check]")]
    assert steps == ["python", "versions", "imports", "no"], proc.stdout
    assert f"transformers {metadata.version('transformers')}" in proc.stdout and " ok\n" in proc.stdout
    assert proc.stdout.rstrip().endswith("no CUDA GPU visible (torch %s): nothing checked; run this on a machine "
                                         "with an NVIDIA GPU" % metadata.version("torch")), proc.stdout
