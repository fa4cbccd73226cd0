"""Load a trained classifier from whichever folder the user points at.

Three layouts are accepted, so that any run or checkpoint can be re-scored or used:

  model folder       `save_pretrained` output (config.json + weights + tokenizer), e.g. a run's model/
  run folder         a training OUTPUT_DIR, which holds model/
  checkpoint folder  OUTPUT_DIR/checkpoints/step-N/ from `accelerator.save_state`: it holds the full
                     classifier's weights but no architecture or tokenizer, so those come from the
                     base model named in its progress.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from ..core.config import LAYOUTS
from ..core.errors import ToolkitError
from ..data.dataset import get_preset
from .checkpoint import PROGRESS, list_checkpoints
from .model import load_model, load_tokenizer


@dataclass
class Saved:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: str  # "model" | "run" | "checkpoint"
    path: Path  # the folder the weights came from
    run_config: dict | None  # the TrainConfig dict it was trained with, when known

    @property
    def train_max_length(self) -> int | None:
        """The truncation the model was trained with: scoring with another one changes results."""
        if not self.run_config:
            return None
        resolved = self.run_config.get("resolved", {}).get("max_length")
        return resolved or self.run_config.get("data", {}).get("max_length")

    @property
    def train_eval_batch_size(self) -> int | None:
        if not self.run_config:
            return None
        return self.run_config.get("eval_batch_size") or 2 * self.run_config.get("batch_size", 16)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _run_config(run_dir: Path) -> dict | None:
    cfg = _read_json(run_dir / "config.json")
    # A plain model folder has a config.json too (the architecture): only a run's has "freeze".
    return cfg if cfg and "freeze" in cfg and "data" in cfg else None


def load_saved(path: str) -> Saved:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ToolkitError(f"model folder not found: {path}", f"pass {LAYOUTS} (written by launch/train.py)")
    if (folder / PROGRESS).is_file():
        return _from_checkpoint(folder)
    run_config = _run_config(folder)
    if run_config is not None or (folder / "checkpoints").is_dir():
        if (folder / "model").is_dir():
            return _from_model_folder(folder / "model", "run", run_config)
        found = list_checkpoints(folder)
        if found:
            raise ToolkitError(f"run {folder} has no model/ folder: it did not finish",
                               f"pass its newest checkpoint, {found[-1]}, or finish it with --resume-from auto")
        raise ToolkitError(f"run {folder} has neither model/ nor a checkpoint: it stopped before saving any",
                           "train it again, or pass another run")
    if (folder / "config.json").is_file():
        return _from_model_folder(folder, "model", _run_config(folder.parent))
    runs = sorted(d for d in folder.iterdir() if (d / "model").is_dir())
    raise ToolkitError(f"{folder} holds no saved model", f"pass one of the runs inside it, e.g. {runs[0]}" if runs
                       else f"pass {LAYOUTS}")


def _from_model_folder(folder: Path, kind: str, run_config: dict | None) -> Saved:
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"could not load the model in {folder}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]}",
                           f"pass {LAYOUTS}; a model folder needs config.json, weights and tokenizer files") from exc
    return Saved(model.eval(), tokenizer, kind, folder, run_config)


def _checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ToolkitError(
        f"checkpoint {folder} has no model.safetensors (DeepSpeed / FSDP checkpoints store sharded weights)",
        "score the run's model/ folder instead (written consolidated at the end of training)")


def _from_checkpoint(folder: Path) -> Saved:
    progress = _read_json(folder / PROGRESS) or {}
    cfg = progress.get("config")
    if not cfg or "model" not in cfg:
        raise ToolkitError(f"{folder / PROGRESS} does not name the run's settings", f"pass {LAYOUTS}")
    base, data = cfg["model"], cfg["data"]
    labels = data.get("label_names") or (None if data.get("train_file") else get_preset(data["task"]).label_names)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "classifier newly initialised" warning is moot: the checkpoint fills it
    try:
        tokenizer = load_tokenizer(base)
        model = load_model(base, data["num_labels"], labels)
    except ToolkitError as err:
        raise ToolkitError(f"checkpoint {folder} needs its base model '{base}' (architecture and tokenizer): "
                           f"{err.problem}",
                           "make that model available at the same path, or score the run's model/ folder") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    if cfg.get("freeze") == "lora":  # the checkpoint holds the PeftModel's weights: rebuild it, then merge
        from ..policy.lora import apply_lora

        model = apply_lora(model, cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg.get("lora_targets"))
    missing, unexpected = model.load_state_dict(_checkpoint_weights(folder), strict=False)
    if missing or unexpected:
        raise ToolkitError(f"checkpoint {folder} does not fit base model '{base}' "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                           "the base model changed since training: use the same one, or the run's model/ folder")
    if cfg.get("freeze") == "lora":
        model = model.merge_and_unload()
    # progress.json holds the raw settings; the run's config.json adds what was resolved (e.g. max length).
    run_config = _run_config(folder.parent.parent) or cfg
    return Saved(model.eval(), tokenizer, "checkpoint", folder, run_config)
