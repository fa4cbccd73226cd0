"""Successive halving, per policy, as pure functions of the arms' validation scores.

All arms of a policy train to the first rung (a fraction of the step budget); the best 1/eta of them go on
to the next rung, and so on to the full budget. It runs within each policy, so no policy is ever
eliminated, only its weaker learning rates. Nothing here trains or reads files: lr_search.py feeds in the
scores, and a test can recompute every decision from the trials' own files with these same functions.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Score:
    """One arm (policy, lr) at one rung: its search seeds' median validation F1."""

    f1: float | None  # None: a seed diverged (no weights to score)
    degenerate: bool = False  # a seed predicted one class only: its F1 says nothing about learning

    @property
    def diverged(self) -> bool:
        return self.f1 is None

    @property
    def healthy(self) -> bool:
        return self.f1 is not None and not self.degenerate


def arm_score(per_seed: list[dict]) -> Score:
    """The arm's Score from its seeds' results ({"validation_f1", "classes_predicted"} or {"diverged": True})."""
    if any(r.get("diverged") for r in per_seed):
        return Score(None)
    return Score(statistics.median(r["validation_f1"] for r in per_seed),
                 any(r["classes_predicted"] < 2 for r in per_seed))


def rung_steps(budget: int, arms: int, eta: int) -> list[int]:
    """The steps at which arms are scored: budget / eta^h, ..., budget / eta, budget, with one halving per
    factor eta in the number of arms (4 arms, eta 3: [budget / 3, budget]; eta 1: [budget])."""
    halvings = 0
    if eta > 1:
        while arms // eta ** (halvings + 1) >= 1:
            halvings += 1
    return sorted({max(1, round(budget / eta**k)) for k in range(halvings, -1, -1)})


def _rank(lr: float, score: Score) -> tuple:
    # healthy before one-class before diverged; then the higher F1; a tie goes to the smaller rate
    return (score.healthy, not score.diverged, score.f1 if score.f1 is not None else -math.inf, -lr)


def promote(scores: dict[float, Score], eta: int) -> list[float]:
    """The rates that go on to the next rung: the best max(1, n // eta), never one that diverged."""
    keep = max(1, len(scores) // eta)
    ranked = sorted(scores, key=lambda lr: _rank(lr, scores[lr]), reverse=True)[:keep]
    return sorted(lr for lr in ranked if not scores[lr].diverged)


def choose(by_rung: list[dict[float, Score]]) -> float | None:
    """The chosen rate: every rate judged at the last rung it reached. Healthy first, then the later rung
    (more training), then the higher F1, then the smaller rate. So a survivor that collapses to one class
    at the full budget hands the choice back to a healthy arm pruned earlier. None if all diverged."""
    last: dict[float, tuple[int, Score]] = {}
    for rung, scores in enumerate(by_rung):
        for lr, score in scores.items():
            last[lr] = (rung, score)
    candidates = [lr for lr, (_, score) in last.items() if not score.diverged]
    if not candidates:
        return None
    return max(candidates, key=lambda lr: (last[lr][1].healthy, last[lr][0], last[lr][1].f1, -lr))
