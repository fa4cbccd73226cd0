"""Loading a pretrained encoder as a sequence classifier, its optimizer and its learning-rate schedule."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..core.errors import ToolkitError
from ..policy.policy import Policy


def _hub_error(name: str, exc: Exception) -> ToolkitError:
    return ToolkitError(
        f"could not load model '{name}': not a local folder, and the Hugging Face Hub failed "
        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
        "pass --model /path/to/folder (config.json + weights + tokenizer files), "
        "or go online once so the Hub cache holds it",
    )


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    _check_local(name)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from exc


def max_positions(name: str) -> int | None:
    """The model's position limit from its config alone (no weights: the data phase runs before the model loads)."""
    _check_local(name)
    try:
        return getattr(AutoConfig.from_pretrained(name), "max_position_embeddings", None)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from exc


def load_model(name: str, num_labels: int, label_names: list[str] | tuple[str, ...] | None = None,
               log=None) -> PreTrainedModel:
    """The classifier with `num_labels` outputs; label names become its id2label/label2id, so a saved model's
    pipeline("text-classification") answers with them. `log` gets one line naming the weights the checkpoint
    lacked (the new head), in place of transformers' load report (silenced by logs.configure)."""
    _check_local(name)
    names = (list(label_names) if label_names and len(label_names) == num_labels
             else [f"LABEL_{i}" for i in range(num_labels)])
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name,
            num_labels=num_labels,
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            output_loading_info=True,
        )
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from exc
    except RuntimeError as exc:
        if "mismatch" not in str(exc).lower():
            raise
        raise ToolkitError(f"model '{name}' already has a classification head of another size than the "
                           f"{num_labels} classes of the data", "start from its base encoder, or pass --num-labels / "
                           "--label-names to match the head it has") from exc
    if log is not None:
        new = sorted(info.get("missing_keys", []))
        unused = info.get("unexpected_keys", [])
        log(f"new (randomly initialised) weights: {', '.join(new) if new else 'none'}"
            + (f"; {len(unused)} checkpoint weights unused (e.g. a pre-training head)" if unused else ""))
    return model


def _check_local(name: str) -> None:
    # A path-looking name that does not exist is a typo, not a Hub id: say so directly.
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path and not Path(name).expanduser().is_dir():
        raise ToolkitError(f"model folder not found: {name}", "check the path given to --model")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    policy: "Policy | None" = None) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad, grouped by `policy.param_groups`.

    Frozen parameters are left out entirely so no optimizer state is allocated for them;
    biases and normalisation weights get no weight decay; LLRD sets each group's lr.
    """
    groups = (policy or Policy("none")).param_groups(model, lr, weight_decay)
    return torch.optim.AdamW(groups, lr=lr)


def _linear_lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warm-up to each group's lr, then linear decay to 0: transformers'
    `get_linear_schedule_with_warmup`, factor for factor (tests/test_policy.py compares them).

    Written here because importing it from transformers loads transformers.trainer_utils, which
    imports peft, which imports Bloom's modeling code: about a second of start-up in every run.
    """
    return LambdaLR(optimizer, partial(_linear_lr_factor, warmup_steps=warmup_steps, total_steps=total_steps))
