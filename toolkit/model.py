"""Loading a pretrained encoder as a sequence classifier, and its optimizer."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import ToolkitError
from .policy import Policy


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


def load_model(name: str, num_labels: int, label_names: tuple[str, ...] | None = None) -> PreTrainedModel:
    _check_local(name)
    names = label_names if label_names and len(label_names) == num_labels else tuple(f"LABEL_{i}" for i in range(num_labels))
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            name,
            num_labels=num_labels,
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
        )
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from exc


def _check_local(name: str) -> None:
    # A path-looking name that does not exist is a typo, not a Hub id: say so directly.
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path and not Path(name).expanduser().is_dir():
        raise ToolkitError(f"model folder not found: {name}", "check the path given to --model")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, policy: "Policy | None" = None) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad, grouped by `policy.param_groups`.

    Frozen parameters are left out entirely so no optimizer state is allocated for them;
    biases and normalisation weights get no weight decay; LLRD sets each group's lr.
    """
    groups = (policy or Policy("none")).param_groups(model, lr, weight_decay)
    return torch.optim.AdamW(groups, lr=lr)
