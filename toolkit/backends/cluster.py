"""Where am I running? One view of SLURM, torchrun, `accelerate launch` and plain python.

`detect()` reads the environment only (no network, no subprocess) and returns a
`ClusterEnv`. The rank information comes from whoever started the process:

* ``accelerate``: `accelerate launch` set RANK/WORLD_SIZE/LOCAL_RANK (it always
  exports ACCELERATE_MIXED_PRECISION / ACCELERATE_DYNAMO_BACKEND to its workers);
* ``torchrun``: torchrun (torch elastic) or anything else that set RANK and WORLD_SIZE;
* ``slurm``: the process is a task of an `srun` step (one task per GPU), nobody set
  RANK, so rank = SLURM_PROCID and world size = number of tasks in the step;
* ``python``: a single process.

The SLURM job facts (job id, restart count, node count) are filled whenever the
process runs inside a SLURM job, whatever the launcher: the sbatch templates in
`slurm/` run `accelerate launch` under `srun`, so there the launcher is
``accelerate`` and `job_id` / `restart_count` come from SLURM.

`export_torch_distributed_env()` turns a multi-task ``slurm`` launch into the
env:// variables torch.distributed and Accelerate read, so that
`srun --ntasks-per-node=<gpus> python launch/train.py ...` works without a launcher.

`master_port_for_job()` is the port rule shared with the sbatch templates
(`slurm/common.sh: toolkit_master_port`): 15000 + job_id mod 15000, i.e. within
15000..29999, below Linux's ephemeral range (32768+), and different for jobs whose
ids differ by less than 15000, so two jobs sharing a node do not collide.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from typing import Mapping

PORT_BASE = 15000
PORT_SPAN = 15000

LAUNCHERS = ("slurm", "torchrun", "accelerate", "python")

# Variables `accelerate launch` always exports to the processes it starts
# (simple and multi-process launchers alike).
_ACCELERATE_MARKERS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")
# Set by export_torch_distributed_env() so that detect() still says 'slurm' afterwards.
_EXPORTED_MARKER = "TOOLKIT_LAUNCHER"


@dataclass(frozen=True)
class ClusterEnv:
    launcher: str  # 'slurm' | 'torchrun' | 'accelerate' | 'python'
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    job_id: str | None = None  # SLURM job id, kept across requeues
    restart_count: int = 0  # SLURM_RESTART_COUNT: 0 on the first start, +1 per requeue
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def in_slurm(self) -> bool:
        return self.job_id is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        """One log line, e.g. for the start of training."""
        s = (
            f"launcher={self.launcher} rank={self.rank}/{self.world_size} "
            f"local_rank={self.local_rank} node={self.node_rank}/{self.num_nodes}"
        )
        if self.master_addr:
            s += f" master={self.master_addr}:{self.master_port}"
        if self.in_slurm:
            s += f" slurm_job={self.job_id} restart_count={self.restart_count}"
        return s


def master_port_for_job(job_id: str | int | None) -> int:
    """Deterministic rendezvous port for a job: 15000 + job_id % 15000.

    Same rule as `toolkit_master_port` in slurm/common.sh. A non-numeric id (never
    produced by SLURM, but accepted) is hashed with CRC32; None gives 29500, the
    torch default.
    """
    if job_id is None or str(job_id).strip() == "":
        return 29500
    text = str(job_id).strip()
    n = int(text) if text.isdigit() else zlib.crc32(text.encode())
    return PORT_BASE + n % PORT_SPAN


# ---------------------------------------------------------------- hostlists

_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in (p.strip() for p in parts) if p]


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[: m.start()], item[m.end() :]
    out: list[str] = []
    for rng in m.group(1).split(","):
        r = _RANGE_RE.match(rng.strip())
        if not r:
            raise ValueError(f"bad hostlist range {rng!r} in {item!r}")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        width = len(lo) if lo.startswith("0") else 0  # zero padding: gpu[01-10]
        for i in range(int(lo), int(hi) + 1):
            # the tail may hold another bracket (rack[1-2]-n[1-3])
            out.extend(_expand_one(f"{head}{i:0{width}d}{tail}"))
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM hostlist, like `scontrol show hostnames` does.

    'n[1-3],gpu[01-02,07],login' -> ['n1', 'n2', 'n3', 'gpu01', 'gpu02', 'gpu07', 'login']
    """
    hosts: list[str] = []
    for item in _split_top(hostlist or ""):
        hosts.extend(_expand_one(item))
    return hosts


# ---------------------------------------------------------------- detection


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = env.get(name)
        if value is None or value.strip() == "":
            continue
        m = re.match(r"^\s*(\d+)", value)  # SLURM_TASKS_PER_NODE style '4(x2)' -> 4
        if m:
            return int(m.group(1))
    return default


def _slurm_job(env: Mapping[str, str]) -> tuple[str | None, int]:
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or None
    restart = _int(env, "SLURM_RESTART_COUNT", default=0) if job_id else 0
    return job_id, restart or 0


def _is_slurm_task(env: Mapping[str, str]) -> bool:
    """True for a task of an `srun` step (not the batch script, not an salloc shell).

    The batch step also has SLURM_PROCID=0 and, with --ntasks, SLURM_NTASKS>1, so
    SLURM_NTASKS alone would make a plain `python train.py` in the batch script wait
    forever for ranks that do not exist. Only srun steps set SLURM_STEP_NUM_TASKS.
    """
    in_job = bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))
    return in_job and "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env


def detect(environ: Mapping[str, str] | None = None) -> ClusterEnv:
    """Read the launcher / SLURM environment. Pure: looks at `environ` (default os.environ)."""
    env = os.environ if environ is None else environ
    job_id, restart = _slurm_job(env)
    slurm_nodes = _int(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES") if job_id else None

    if "RANK" in env and "WORLD_SIZE" in env:
        if env.get(_EXPORTED_MARKER) == "slurm" and "SLURM_PROCID" in env:
            launcher = "slurm"  # export_torch_distributed_env() filled RANK etc. from an srun task
        elif any(k in env for k in _ACCELERATE_MARKERS):
            launcher = "accelerate"
        else:
            launcher = "torchrun"
        rank = _int(env, "RANK", default=0)
        world = _int(env, "WORLD_SIZE", default=1)
        local_rank = _int(env, "LOCAL_RANK", default=0)
        local_world = _int(env, "LOCAL_WORLD_SIZE")
        if local_world:
            num_nodes = max(1, world // local_world)
            node_rank = _int(env, "GROUP_RANK", "NODE_RANK", default=rank // local_world)
        else:
            num_nodes = _int(env, "NNODES", default=None) or slurm_nodes or 1
            node_rank = _int(env, "GROUP_RANK", "NODE_RANK", default=0)
        port = _int(env, "MASTER_PORT")
        return ClusterEnv(
            launcher=launcher,
            rank=rank,
            local_rank=local_rank,
            world_size=world,
            node_rank=node_rank,
            num_nodes=num_nodes,
            job_id=job_id,
            restart_count=restart,
            master_addr=env.get("MASTER_ADDR") or None,
            master_port=port,
        )

    if _is_slurm_task(env):
        world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        try:
            hosts = expand_hostlist(nodelist) if nodelist else []
        except ValueError:
            hosts = []
        addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else None)
        port = _int(env, "MASTER_PORT") or master_port_for_job(job_id)
        return ClusterEnv(
            launcher="slurm",
            rank=_int(env, "SLURM_PROCID", default=0),
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            world_size=world,
            node_rank=_int(env, "SLURM_NODEID", default=0),
            num_nodes=_int(env, "SLURM_STEP_NUM_NODES", default=None) or slurm_nodes or 1,
            job_id=job_id,
            restart_count=restart,
            master_addr=addr,
            master_port=port,
        )

    return ClusterEnv(
        launcher="python",
        num_nodes=1,
        job_id=job_id,
        restart_count=restart,
    )


def device_ordinal(local_rank: int, cuda_visible_devices: str | None) -> int:
    """The GPU a task uses, as an index into the GPUs it can see.

    Accelerate and DeepSpeed open `cuda:LOCAL_RANK`. With `srun --gpus-per-task=1` (or
    `--gpu-bind=single:1`) SLURM gives each task its own CUDA_VISIBLE_DEVICES with one GPU, so
    SLURM_LOCALID 3 would name a device that does not exist there; the task's GPU is then 0.
    Tasks that see all of the node's GPUs keep SLURM_LOCALID.
    """
    visible = [d for d in (cuda_visible_devices or "").split(",") if d.strip()]
    if not visible or cuda_visible_devices == "NoDevFiles" or local_rank < len(visible):
        return local_rank
    return local_rank % len(visible)


def export_torch_distributed_env(env: ClusterEnv | None = None, environ: dict | None = None) -> None:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from SLURM.

    Only for `srun python launch/train.py` with more than one task (launcher 'slurm');
    a no-op under torchrun / accelerate launch / plain python and for a single task,
    and it never overwrites a variable that is already set.
    """
    env = detect(environ) if env is None else env
    target = os.environ if environ is None else environ
    if env.launcher != "slurm" or env.world_size <= 1:
        return
    local_world = _int(target, "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    values = {
        "RANK": env.rank,
        "WORLD_SIZE": env.world_size,
        "LOCAL_RANK": device_ordinal(env.local_rank, target.get("CUDA_VISIBLE_DEVICES")),
        "LOCAL_WORLD_SIZE": local_world or max(1, env.world_size // max(1, env.num_nodes)),
        "NODE_RANK": env.node_rank,
        "MASTER_ADDR": env.master_addr or "127.0.0.1",
        "MASTER_PORT": env.master_port or master_port_for_job(env.job_id),
    }
    for key, value in values.items():
        target.setdefault(key, str(value))
    target.setdefault(_EXPORTED_MARKER, "slurm")
