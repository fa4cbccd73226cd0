"""Extra eval metrics from the `evaluate` library (--metrics), next to the scikit-learn default set.

They are loaded before training (a bad name stops the run with exit 2 before anything is
written) and computed on the main process only, on the labels and predictions that validate()
has already gathered and de-duplicated: evaluate's own multi-process mode (num_process /
process_id, a file lock per rank) is never used, so every eval row counts exactly once.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np

from ..core.errors import ToolkitError


def load(names: str | None) -> list:
    """evaluate.load for each comma-separated name: a Hub metric (or its cache) or a local script path."""
    wanted = [n.strip() for n in (names or "").split(",") if n.strip()]
    if not wanted:
        return []
    try:
        import evaluate
    except ImportError as exc:
        raise ToolkitError("--metrics needs the `evaluate` package",
                           "pip install 'bert-finetune-toolkit[evaluate]'") from exc
    from evaluate import config as ev_config

    loaded = []
    for name in wanted:
        try:
            loaded.append(evaluate.load(name))
        except Exception as exc:  # evaluate raises FileNotFoundError, ConnectionError, ImportError, ...
            local = Path(name).exists()
            offline = ev_config.HF_EVALUATE_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
            fix = (f"on a machine with Hub access (a login node) run "
                   f"python -c \"import evaluate; evaluate.load('{name}')\" once: it is cached in "
                   f"{ev_config.HF_MODULES_CACHE} (HF_MODULES_CACHE; the same path must be visible here), then set "
                   f"HF_EVALUATE_OFFLINE=1 on the compute node; or pass the path of a metric script")
            if local:
                fix = "check the metric script (an evaluate.Metric subclass in <name>.py)"
            raise ToolkitError(f"could not load metric '{name}' with evaluate.load"
                               f"{' (offline)' if offline and not local else ''}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                               fix) from exc
    return loaded


def compute(metrics: list, labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict[str, float]:
    """Each metric's values on the gathered predictions, under the names the metric returns.

    f1/precision/recall-style metrics take an `average`: binary (positive class 1) for two
    classes and macro for more, as the scikit-learn default set does.
    """
    out: dict[str, float] = {}
    for metric in metrics:
        kwargs = {}
        if "average" in inspect.signature(metric._compute).parameters:
            kwargs["average"] = "binary" if num_labels == 2 else "macro"
        result = metric.compute(predictions=preds.tolist(), references=labels.tolist(), **kwargs)
        for key, value in (result or {}).items():
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):  # not lists, strings
                out[key] = float(value)
    return out
