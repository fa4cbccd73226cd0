"""Check an allocation before a long run: do all ranks join one process group?

Stands in for launch/train.py (it accepts and ignores the training options):

    TRAIN_SCRIPT=slurm/probe.py sbatch slurm/multi_node.sbatch            # through a template
    srun --nodes=2 --ntasks-per-node=4 python slurm/probe.py --output-dir runs/probe   # one task per GPU

Every rank reports its view of the cluster (toolkit.backends.cluster.detect) and host; rank 0
prints the table and writes OUTPUT_DIR/metrics.json with the world size seen by
torch.distributed. Uses gloo on CPU with --cpu (or when there is no GPU), NCCL otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the toolkit without installing it

from toolkit.backends.cluster import ClusterEnv, detect, export_torch_distributed_env  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/probe")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU even when GPUs are visible")
    args, _ignored = parser.parse_known_args(argv)

    cluster = detect()
    export_torch_distributed_env(cluster)

    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    me = {
        "rank": state.process_index,
        "local_rank": state.local_process_index,
        "host": socket.gethostname(),
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "accelerate_use_deepspeed": os.environ.get("ACCELERATE_USE_DEEPSPEED"),
        "cluster": asdict(cluster),
    }
    if state.num_processes > 1:
        everyone: list = [None] * state.num_processes
        dist.all_gather_object(everyone, me)
        total = torch.tensor([float(state.process_index)], device=state.device)
        dist.all_reduce(total)
        rank_sum = int(total.item())
    else:
        everyone, rank_sum = [me], 0

    if state.is_main_process:
        world = state.num_processes
        for r in everyone:
            where = r["slurm_node"] or r["host"]
            print(f"[probe] rank {r['rank']} on {where}: {ClusterEnv(**r['cluster']).describe()}")
        ok = rank_sum == world * (world - 1) // 2
        print(f"[probe] world size {world}, all_reduce {'ok' if ok else 'WRONG'} ({rank_sum})", flush=True)
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        result = {"probe": True, "world_size": world, "all_reduce_ok": ok, "backend": state.backend, "ranks": everyone}
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
    if state.num_processes > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
