"""The Optuna study of one comparison's search: every arm is a trial, every rung score an intermediate value.

Stored in Optuna's journal storage on a file (its recommendation for shared and network filesystems), so
several processes, on several machines, can read and add to one study. The study is the record; the
decisions come from halving.py, and the trials' run folders hold the scores they are made from, so a
killed search re-synchronises the study from the folders when it is run again.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import ToolkitError

STUDY_NAME = "lr-search"
INSTALL = "pip install -e '.[tune]' (Optuna)"


def require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ToolkitError("compare --lr-search needs Optuna, which is not installed", INSTALL) from None


def check_writable(path: Path) -> None:
    """Before anything is written: the journal file can be created (or appended to) at `path`."""
    if path.exists():
        ok = path.is_file() and os.access(path, os.W_OK)
    else:
        parent = path.parent
        while not parent.exists():  # created later, with the output folder
            parent = parent.parent
        ok = parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    if not ok:
        raise ToolkitError(f"the study storage {path} cannot be written",
                           "pass a --study-storage file in a folder you can write, or leave it out "
                           "(default: OUTPUT_DIR/search/study.journal)")


def open_study(path: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize", load_if_exists=True)


def arm_key(spec: str, lr: float, seed: int) -> str:
    return f"{spec}|lr={lr!r}|seed={seed}"


def arm_trial(study, spec: str, lr: float, seed: int, grid: tuple[float, ...]) -> int:
    """The number of the arm's trial, created (with lr as its parameter) when the study has none yet."""
    key = arm_key(spec, lr, seed)
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get("arm") == key:
            return trial.number
    study.enqueue_trial({"lr": lr}, user_attrs={"arm": key, "policy": spec, "seed": seed})
    trial = study.ask()
    trial.suggest_float("lr", min(grid), max(grid), log=True)  # the enqueued rate
    return trial.number


def report_rung(study, number: int, step: int, f1: float | None) -> None:
    """The arm's validation F1 at a rung, unless recorded already (a rerun re-synchronises)."""
    import optuna

    frozen = study.get_trials(deepcopy=False)[number]
    if f1 is None or frozen.state != optuna.trial.TrialState.RUNNING or step in frozen.intermediate_values:
        return
    optuna.trial.Trial(study, frozen._trial_id).report(f1, step)


def finish(study, number: int, outcome: str, f1: float | None = None) -> None:
    """Close an arm's trial: "complete" (trained to the full budget), "pruned" or "diverged"."""
    import optuna

    state = optuna.trial.TrialState
    if study.get_trials(deepcopy=False)[number].state != state.RUNNING:
        return
    if outcome == "complete":
        study.tell(number, f1)
    else:
        study.tell(number, state=state.PRUNED if outcome == "pruned" else state.FAIL)
