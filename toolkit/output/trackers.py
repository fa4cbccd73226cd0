"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, trackio) through Accelerate's tracking API.

`check()` runs first, before anything is written, so a typo or a missing package stops the run
with exit 2. `start()` runs once the run folder and the resume point are known: it builds
Accelerate's own tracker classes with the settings the toolkit wants (where they write, the run
name, the ids of the run being resumed), hands them to `accelerator.init_trackers` and makes
`RunLog.record` send every metrics.jsonl line to them at the same step. Only the main process
tracks; the others never import a tracker package.

Resume (`--resume-from`): the ids go to `<run>/trackers.json`, and a resumed run continues the
same tracker run where the tracker can:
  * wandb: same run id with `resume="allow"` (offline runs share the id and sync into one run);
  * mlflow: same `run_id` (metrics append to the run's history);
  * trackio: same project and run name with `resume="must"`;
  * tensorboard: same log folder; `purge_step` drops the events a preempted run logged after its
    last checkpoint, so the replayed steps are not drawn twice.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import secrets
import sys
from pathlib import Path

from ..core.errors import ToolkitError
from .console import plain

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
PROJECT = "bert-finetune-toolkit"  # W&B / trackio project, MLflow experiment (their env variables override it)
IDS_FILE = "trackers.json"


def check(report_to: str | None) -> list[str]:
    """The trackers named by --report-to, each importable; 'none' (or nothing) is none."""
    names = [n.strip().lower() for n in (report_to or "none").split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ToolkitError(f"unknown tracker(s) in --report-to: {', '.join(unknown)}",
                           f"use any of {', '.join(TRACKERS)} (comma-separated), or none")
    for name in names:
        try:
            importlib.import_module("torch.utils.tensorboard" if name == "tensorboard" else name)
        except ImportError as exc:
            raise ToolkitError(f"--report-to {name}: the {name} package is not installed ({exc})",
                               f"pip install 'bert-finetune-toolkit[{name}]' (or: pip install {name})") from exc
    return list(dict.fromkeys(names))


def hyperparameters(config: dict, prefix: str = "") -> dict:
    """Flat name -> value, with types every tracker stores (TensorBoard's hparams refuse None and lists)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(hyperparameters(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def default_run_name(out: Path) -> str:
    """The run folder's name; a comparison's OUTPUT_DIR/<policy>/seed-<s> folder is named <policy>/seed-<s>."""
    return f"{out.parent.name}/{out.name}" if re.fullmatch(r"seed-\d+", out.name) else out.name


def start(accelerator, run_log, names: list[str], out: Path, run_name: str, config: dict, resume_step: int | None,
          verbosity: int = 1) -> None:
    """Start the trackers on the main process and route `run_log.record` to them.

    `resume_step`: the optimizer step a resumed run continues from (None for a new run); the
    hyperparameters are logged by a new run only (MLflow refuses a parameter that changes value,
    and a resumed run's --resume-from differs from the original's).
    """
    if not names or not accelerator.is_main_process:
        return
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    ids_path = out / IDS_FILE
    known = json.loads(ids_path.read_text()) if resume_step is not None and ids_path.exists() else {}
    ids = {"run_name": known.get("run_name", run_name)}
    run_name = ids["run_name"]  # a resumed run keeps the name its trackers know it by
    trackers = []
    if "tensorboard" in names:
        # Events go to <run>/tensorboard; `tensorboard --logdir runs` shows every run by its folder name.
        kwargs = {"purge_step": resume_step + 1} if resume_step is not None else {}
        trackers.append(TensorBoardTracker("tensorboard", str(out), **kwargs))
        ids["tensorboard"] = {"logdir": str(out / "tensorboard")}
    if "wandb" in names:
        import wandb

        run_id = known.get("wandb", {}).get("id") or secrets.token_hex(4)  # chosen here, so it is known before init
        ids["wandb"] = {"id": run_id}
        settings = wandb.Settings(silent=True) if verbosity == 0 else None
        trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, id=run_id, resume="allow",
                                     dir=os.environ.get("WANDB_DIR", str(out)), settings=settings))
    if "mlflow" in names:
        # The store is MLFLOW_TRACKING_URI (e.g. file:/path/mlruns or a server), else MLflow's default.
        trackers.append(MLflowTracker(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT),
                                      run_id=known.get("mlflow", {}).get("run_id"), run_name=run_name))
    if "trackio" in names:
        # A local SQLite database in TRACKIO_DIR (default ~/.cache/huggingface/trackio); no Space, no upload.
        # "must" continues the run of that name; a new run never appends to an older one of the same name.
        trackers.append(TrackioTracker(os.environ.get("TRACKIO_PROJECT", PROJECT), name=run_name,
                                       resume="must" if "trackio" in known else "never",
                                       embed=False, auto_log_cpu=False, auto_log_gpu=False))
        ids["trackio"] = {"project": os.environ.get("TRACKIO_PROJECT", PROJECT), "name": run_name}
    # The run folder is known only once the process group exists (rank 0 names it), after the
    # Accelerator is built, so the tracker objects are handed over here rather than to Accelerator(log_with=).
    accelerator.log_with = trackers
    try:
        with _quiet_stdout(verbosity):
            accelerator.init_trackers(PROJECT, config=hyperparameters(config) if resume_step is None else None)
    except Exception as err:  # the tracker's own settings (a store URI, a project, a login), not this toolkit's
        first_line = (str(err).strip() or "no message").splitlines()[0]
        raise ToolkitError(f"--report-to {','.join(names)}: a tracker could not start ({type(err).__name__}: "
                           f"{first_line})",
                           "check its settings (MLFLOW_TRACKING_URI, WANDB_MODE / WANDB_DIR, TRACKIO_DIR, ...) "
                           "or leave it out of --report-to") from None
    if "mlflow" in names:
        ids["mlflow"] = {"run_id": accelerator.get_tracker("mlflow").tracker.info.run_id,
                         "tracking_uri": _mlflow_uri()}
    ids_path.write_text(json.dumps(ids, indent=2) + "\n")
    run_log.trackers = accelerator
    what = ", ".join(names) + (f" (resumed at step {resume_step})" if resume_step is not None else "")
    run_log.print(f"trackers: {plain(what)}; run name {plain(run_name)}; ids in {plain(ids_path)}")


def _mlflow_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _quiet_stdout(verbosity: int):
    # trackio prints seven lines of dashboard hints on stdout at start and at finish; --verbose keeps them.
    return contextlib.nullcontext() if verbosity >= 2 else contextlib.redirect_stdout(io.StringIO())


def finish(accelerator, run_log) -> None:
    """Close the trackers (not `accelerator.end_training`, which would also end the process group)."""
    with _quiet_stdout(run_log.verbosity):
        for tracker in getattr(accelerator, "trackers", []):
            tracker.finish()
    if (trackio := sys.modules.get("trackio")) is not None:
        # finished above; trackio's exit hook would finish (and announce on stdout) the same run again
        trackio.context_vars.current_run.set(None)
    if hasattr(accelerator, "trackers"):
        accelerator.trackers = []
    run_log.trackers = None
