"""Checkpoints that are either complete or absent, and the final exported model.

A checkpoint is written by `accelerator.save_state` into a temporary folder; only
when every rank has finished does the main process add `progress.json` and rename
the folder into place. A kill during a save leaves a `.tmp-*` folder that is never
picked up as "latest". The final model goes to `model/` the same way.

`progress.json` also records the size and sha256 of every file in the checkpoint, and a
resume checks them: `--resume-from auto` passes over a checkpoint that fails (bit rot, a
truncated copy, a disk that filled up under another writer) to the newest one that checks
out; a checkpoint named explicitly must check out. A save that fails on any rank (disk full,
read-only, something in the way) fails on every rank together, leaves the previous
checkpoints as they were and stops the run with a message.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from ..core import exit_codes
from ..core.errors import RunFailed, ToolkitError
from ..output.console import plain

PROGRESS = "progress.json"


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def saver(accelerator: Accelerator, out: Path, cfg, policy, model) -> Callable:
    """fit()'s checkpoint callback: the loop's state, the run's options and the policy with its current stage
    (`model` unwrapped), so a resume can check that it continues the same run."""

    def save(state):
        record = {**policy.record(), "stage": policy.stage(model, state.global_step).spec}
        return save_checkpoint(accelerator, out, {"state": state.to_dict(), "config": cfg.to_dict(), "policy": record},
                               cfg.keep_checkpoints)

    return save


def save_checkpoint(accelerator: Accelerator, output_dir: Path, progress: dict, keep: int) -> Path:
    """Save a resumable checkpoint; `progress` holds the loop state and the run's hyperparameters."""
    root = checkpoint_root(output_dir)
    step = progress["state"]["global_step"]
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"

    def make_tmp() -> None:
        if tmp.is_dir():
            shutil.rmtree(tmp)  # left by a save that was killed
        tmp.mkdir(parents=True)

    def publish() -> None:
        files = file_digests(tmp)  # before progress.json, which cannot hold its own digest
        (tmp / PROGRESS).write_text(json.dumps({**progress, "files": files}, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    # Each phase ends with the ranks agreeing whether it worked (a collective per phase: checkpoints
    # are rare), so a rank whose write fails never leaves the others waiting at the next barrier.
    _all_ok(accelerator, tmp, make_tmp if accelerator.is_main_process else None)
    _all_ok(accelerator, tmp, lambda: accelerator.save_state(str(tmp)))
    _all_ok(accelerator, tmp, publish if accelerator.is_main_process else None)
    if accelerator.is_main_process:
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _all_ok(accelerator: Accelerator, tmp: Path, work: Callable[[], object] | None) -> None:
    error = None
    if work is not None:
        try:
            work()
        # Not only OSError (ENOSPC, EROFS, EACCES, a file in the way): torch.save reports a full disk as a
        # RuntimeError from its zip writer ("unexpected pos ..."), so any failure of the write counts.
        except Exception as err:  # noqa: BLE001
            error = f"rank {accelerator.process_index}: {type(err).__name__}: {err}"
    errors = [e for e in gather_object([error]) if e]
    if not errors:
        return
    if accelerator.is_main_process and tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)  # never a half-written checkpoint next to the good ones
    try:
        free = f"{shutil.disk_usage(tmp.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    raise RunFailed(f"could not write checkpoint {tmp.parent / tmp.name.removeprefix('.tmp-')} ({free}): "
                    f"{'; '.join(errors)}. Stopped; the checkpoints saved before are untouched",
                    "free disk space or make the output folder writable (check quota and permissions, "
                    "and that nothing is in the way of the checkpoint folder), then --resume-from auto",
                    exit_code=exit_codes.SAVE_FAILED)


def file_digests(folder: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under `folder` except progress.json."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != PROGRESS:
            with path.open("rb") as fh:
                out[rel] = {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(fh, "sha256").hexdigest()}
    return out


def verify_checkpoint(checkpoint: Path) -> str | None:
    """None when every file recorded in progress.json is there with its size and sha256, else what is wrong."""
    try:
        progress = read_progress(checkpoint)
    except (OSError, ValueError) as err:
        return f"{PROGRESS} is unreadable ({err})"
    files = progress.get("files")
    if files is None:
        return None  # written before checkpoints recorded digests: nothing to check against
    for rel, want in files.items():
        path = checkpoint / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{rel} has {path.stat().st_size} bytes, {want['bytes']} were written"
        with path.open("rb") as fh:
            if hashlib.file_digest(fh, "sha256").hexdigest() != want["sha256"]:
                return f"{rel} does not match its sha256 (the file changed after it was written)"
    return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / PROGRESS).is_file())


def resolve_resume(resume_from: str | None, output_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """'auto' -> newest checkpoint in output_dir that verifies (or None); a path -> that checkpoint, verified.

    Reads every file of the checkpoints it checks: call it on one rank and share the answer.
    """
    if resume_from is None:
        return None
    if resume_from == "auto":
        for candidate in reversed(list_checkpoints(output_dir)):
            problem = verify_checkpoint(candidate)
            if problem is None:
                return candidate
            log(f"[yellow]skipping checkpoint {plain(candidate)}: {plain(problem)}[/yellow]")
        return None
    path = Path(resume_from)
    if not (path / PROGRESS).is_file():
        found = list_checkpoints(path)  # a run folder: take its newest checkpoint
        if not found:
            raise ToolkitError(f"no complete checkpoint at {path}",
                               "pass a checkpoints/step-* folder, a run folder, or 'auto'")
        path = found[-1]
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ToolkitError(f"checkpoint {path} failed verification: {problem}",
                           "resume from another checkpoint (--resume-from auto takes the newest one that verifies)")
    return path


def read_progress(checkpoint: Path) -> dict:
    return json.loads((checkpoint / PROGRESS).read_text())


def open_output_dir(accelerator: Accelerator, out: Path, resume_from: str | None, log) -> Path | None:
    """Rank 0 makes sure the run folder can be written and picks (and verifies) the checkpoint to resume
    from; every rank gets its answer, so a problem stops all of them before training, with exit 2."""
    answer: list = [None, None]  # checkpoint to resume from, (problem, fix)
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("")
            probe.unlink()
            answer[0] = resolve_resume(resume_from, out, log)
        except OSError as err:
            answer[1] = (f"cannot write to the output folder {out}: {err}",
                         "pass an --output-dir that can be created and written (check the path, permissions and free "
                         "space)")
        except ToolkitError as err:
            answer[1] = (err.problem, err.fix)
    broadcast_object_list(answer, from_process=0)
    if answer[1] is not None:
        raise ToolkitError(*answer[1])
    return answer[0]


def check_resume_policy(resume: Path | None, record: dict, describe: Callable[[dict], str]) -> None:
    """A run resumes only the policy its checkpoint was trained with (`record`: Policy.record())."""
    recorded = read_progress(resume).get("policy") if resume is not None else None
    # a checkpoint from before the LoRA settings were recorded is checked on its spelling alone
    if recorded is not None and (recorded["spec"], recorded.get("lora", record["lora"])) != (record["spec"],
                                                                                              record["lora"]):
        raise ToolkitError(f"checkpoint {resume} was trained with policy {describe(recorded)}, this run "
                           f"asks for {describe(record)}",
                           "resume with the same --freeze / --layer-lr-decay / --unfreeze-* / --lora-* options")


def load_resume_state(accelerator: Accelerator, resume: Path, log: Callable[[str], None]) -> dict:
    """Load a checkpoint into the prepared objects; its loop position (TrainState fields) is returned."""
    progress = read_progress(resume)
    if progress["state"]["world_size"] != accelerator.num_processes:
        raise ToolkitError(f"checkpoint {resume} was written by {progress['state']['world_size']} processes, "
                           f"this run has {accelerator.num_processes}", "resume with the same number of processes")
    accelerator.load_state(str(resume))
    state = progress["state"]
    log(f"[green]resumed from {plain(resume)}: epoch {state['epoch']}, step {state['global_step']}, "
        f"{state['batches_done']} batches into the epoch[/green]")
    return state


def save_model(accelerator: Accelerator, model, tokenizer, target: Path) -> None:
    """A plain `save_pretrained` folder, consolidated from ZeRO-3/FSDP shards if needed.

    `get_state_dict` must run on every rank (it gathers shards); only the main
    process receives the full dict and writes. A LoRA model (peft) is saved merged, and
    its unmerged adapter goes next to it, to `adapter/` (see toolkit/policy/lora.py).
    """
    from ..policy import lora

    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if lora.is_lora(unwrapped):
            # LoRA: model/ is the adapter merged into a plain copy; adapter/ keeps it unmerged (+ head and pooler)
            _write_folder(target.with_name("adapter"), lambda tmp: lora.save_adapter(unwrapped, tmp, state_dict))
            unwrapped, state_dict = lora.merged_model(unwrapped, state_dict), None

        def write(tmp: Path) -> None:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            _clear_call_state(tokenizer)
            tokenizer.save_pretrained(tmp)

        _write_folder(target, write)
    accelerator.wait_for_everyone()


def _write_folder(target: Path, write) -> None:
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _clear_call_state(tokenizer) -> None:
    """Drop the padding/truncation a fast tokenizer keeps from its last call.

    transformers sets both on the Rust tokenizer at every call and leaves them there, so
    tokenizer.json would record whatever this process last did (a run that reused cached
    tokenization would save the model folder's original "Fixed 128" padding, a run that
    tokenized would save its truncation). Cleared, the saved folder is the same either way;
    loading and calling it behave as before, since each call sets its own.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
