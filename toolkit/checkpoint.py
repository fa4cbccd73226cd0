"""Checkpoints that are either complete or absent, and the final exported model.

A checkpoint is written by `accelerator.save_state` into a temporary folder; only
when every rank has finished does the main process add `progress.json` and rename
the folder into place. A kill during a save leaves a `.tmp-*` folder that is never
picked up as "latest". The final model goes to `model/` the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator

PROGRESS = "progress.json"


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def save_checkpoint(accelerator: Accelerator, output_dir: Path, progress: dict, keep: int) -> Path:
    """Save a resumable checkpoint; `progress` holds the loop state and the run's hyperparameters."""
    root = checkpoint_root(output_dir)
    step = progress["state"]["global_step"]
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / PROGRESS).write_text(json.dumps(progress, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / PROGRESS).is_file())


def resolve_resume(resume_from: str | None, output_dir: Path) -> Path | None:
    """'auto' -> newest complete checkpoint in output_dir (or None); a path -> that checkpoint."""
    from .errors import ToolkitError

    if resume_from is None:
        return None
    if resume_from == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / PROGRESS).is_file():
        found = list_checkpoints(path)  # a run folder: take its newest checkpoint
        if not found:
            raise ToolkitError(f"no complete checkpoint at {path}", "pass a checkpoints/step-* folder, a run folder, or 'auto'")
        path = found[-1]
    return path


def read_progress(checkpoint: Path) -> dict:
    return json.loads((checkpoint / PROGRESS).read_text())


def save_model(accelerator: Accelerator, model, tokenizer, target: Path) -> None:
    """A plain `save_pretrained` folder, consolidated from ZeRO-3/FSDP shards if needed.

    `get_state_dict` must run on every rank (it gathers shards); only the main
    process receives the full dict and writes. A LoRA model (peft) is saved merged, and
    its unmerged adapter goes next to it, to `adapter/` (see toolkit/lora.py).
    """
    from . import lora

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
