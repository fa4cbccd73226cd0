"""`compare --lr-search`: each policy at its own learning rate, chosen on the validation split.

For each policy, every rate of its grid is an arm; each arm trains with the search seeds on the training
rows minus the validation split, and is scored on the validation split only (its runs are started with
--no-score-test: the test rows are never even loaded). Successive halving (halving.py) stops the weaker
arms at the rungs; a survivor resumes from its rung checkpoint with the toolkit's exact resume, on a
learning-rate schedule that spans the whole budget from its first step. The study (study.py) records it
all. Trials live in OUTPUT_DIR/search/<policy>/lr-<rate>/seed-<seed>/. walk() replays the halving on what
their files hold and names the trials due next; the workers (workers.py) train them, each in a process of
its own, any number at once. A finished rung is never trained again, so a rerun after a kill, a
preemption or with an extra policy trains only what is missing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from .core.config import TrainConfig
from .core.errors import ToolkitError
from .data.dataset import build_splits, split_validation
from .engine.loop import optimizer_steps
from .policy.policy import Policy
from .search import halving
from .search import study as studies
from .search.grids import default_grid


@dataclass(frozen=True)
class Arm:
    policy: Policy
    lr: float
    seed: int

    def folder(self, out: Path) -> Path:
        return out / "search" / self.policy.slug / f"lr-{self.lr:g}" / f"seed-{self.seed}"


class SearchStopped(Exception):
    """A trial was stopped by a request (preemption, Ctrl-C) with a checkpoint: the search waits for a rerun."""

    def __init__(self, code: int):
        self.code = code
        super().__init__(f"stopped with exit status {code}")


def budget_steps(cfg: TrainConfig, world_size: int) -> int:
    """Optimizer steps of a full run on the training rows minus the validation split (bad input raises here,
    before anything is written: e.g. a validation fraction that leaves a class without rows)."""
    data = copy.deepcopy(cfg.data)
    train, _ = build_splits(data, log=lambda *a: None)
    train, _ = split_validation(train.select_columns(["labels"]), data.validation_fraction, data.num_labels,
                                data.data_seed)
    return optimizer_steps(math.ceil(len(train) / cfg.batch_size), world_size, cfg.grad_accum, cfg.epochs,
                           cfg.max_steps)


def grids_for(policies: list[Policy], overrides: dict[str, tuple[float, ...]]) -> dict[str, dict]:
    """{spec: {"grid": rates, "reason": why those}}."""
    grids = {}
    for policy in policies:
        rates, reason = default_grid(policy)
        if policy.spec in overrides:
            rates, reason = overrides[policy.spec], "--lr-grid"
        grids[policy.spec] = {"grid": list(rates), "reason": reason}
    return grids


def trial_config(base: TrainConfig, arm: Arm, out: Path, step: int, budget: int) -> TrainConfig:
    return dataclasses.replace(copy.deepcopy(base), **arm.policy.config_fields(), lr=arm.lr, seed=arm.seed,
                               output_dir=str(arm.folder(out)), resume_from="auto", score_test=False,
                               pause_at_step=step if step < budget else None)


def trial_result(folder: Path, step: int, budget: int) -> dict | None:
    """What the trial's files say about it at `step`: {"validation_f1", "classes_predicted", "train_s"},
    {"diverged": True, ...}, or None when it has not got there yet."""
    source = folder / "metrics.json" if step >= budget else folder / "rungs" / f"step-{step}.json"
    if source.is_file():
        found = json.loads(source.read_text())
        return {"validation_f1": found["validation_f1"], "classes_predicted": found["validation_classes_predicted"],
                "train_s": found["train_runtime_s"]}
    failed = folder / "diverged.json"
    diverged = json.loads(failed.read_text()) if failed.is_file() else None
    return {"diverged": True, **diverged} if diverged is not None and diverged["rung"] <= step else None


def check_plan(out: Path, plan: dict) -> None:
    """A rerun must search the same way: the same settings, seeds, halving, budget and grids for the policies
    searched before (new policies may be added)."""
    path = out / "search" / "plan.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    diffs = [key for key in ("settings", "search_seeds", "eta", "budget_steps") if saved.get(key) != plan.get(key)]
    diffs += [f"grid of {spec}" for spec, g in plan["policies"].items()
              if spec in saved["policies"] and saved["policies"][spec] != g]
    if diffs:
        raise ToolkitError(f"{out} holds a learning-rate search with other settings ({', '.join(diffs)})",
                           "use the same options as before, or a new --output-dir")


@dataclass
class Walk:
    """Where one policy's search stands, read from its trials' folders: the rungs scored so far, and the trials
    to train next (none once the policy is decided)."""

    policy: Policy
    rungs: list[int]
    found: list[dict]  # per rung reached: {(lr, seed): trial_result or None (not there yet)}
    by_rung: list[dict]  # per rung complete: {lr: halving.Score}
    missing: list[tuple[Arm, int]]  # (arm, rung step) to train now; they may all train at once
    chosen: float | None = None

    @property
    def done(self) -> bool:
        return len(self.by_rung) == len(self.rungs)

    def last_results(self) -> dict[tuple[float, int], tuple[int, dict]]:
        """(lr, seed) -> (step, result) at the last rung the trial has a result for."""
        last = {}
        for step, found in zip(self.rungs, self.found):
            last.update({key: (step, result) for key, result in found.items() if result is not None})
        return last


def walk(policy: Policy, plan: dict, out: Path) -> Walk:
    """Successive halving replayed on the trials' files: every decision a pure function of what they hold, so
    any worker on any machine reaches the same ones, and a killed search goes on where its files end."""
    grid, seeds, eta, budget = plan["policies"][policy.spec]["grid"], plan["search_seeds"], plan["eta"], \
        plan["budget_steps"]
    rungs = halving.rung_steps(budget, len(grid), eta)
    state = Walk(policy, rungs, [], [], [])
    alive = list(grid)
    for i, step in enumerate(rungs):
        found = {(lr, seed): trial_result(Arm(policy, lr, seed).folder(out), step, budget)
                 for lr in alive for seed in seeds}
        state.found.append(found)
        state.missing = [(Arm(policy, lr, seed), step) for (lr, seed), result in found.items() if result is None]
        if state.missing:
            return state
        scores = {lr: halving.arm_score([found[lr, seed] for seed in seeds]) for lr in alive}
        state.by_rung.append(scores)
        if i < len(rungs) - 1:
            alive = halving.promote(scores, eta)
    state.chosen = halving.choose(state.by_rung)
    return state


def sync_study(study, state: Walk, grid: list[float], budget: int, out: Path) -> None:
    """Record in the study what the files say (idempotent: a rerun or another worker adds only what is new);
    once the policy is decided, close its trials and drop the pruned arms' checkpoints."""
    spec = state.policy.spec
    for step, found in zip(state.rungs, state.found):
        for (lr, seed), result in found.items():
            if result is not None:
                number = studies.arm_trial(study, spec, lr, seed, tuple(grid))
                studies.report_rung(study, number, step, result.get("validation_f1"))
    if not state.done:
        return
    for (lr, seed), (step, result) in state.last_results().items():
        outcome = "diverged" if result.get("diverged") else "complete" if step >= budget else "pruned"
        studies.finish(study, studies.arm_trial(study, spec, lr, seed, tuple(grid)), outcome,
                       result.get("validation_f1"))
        if outcome == "pruned":  # its rung score is on file; its weights will never train again
            shutil.rmtree(Arm(state.policy, lr, seed).folder(out) / "checkpoints", ignore_errors=True)


def search_record(walks: list[Walk], plan: dict, study_path: Path, device: str, world_size: int,
                  failed: dict[str, str]) -> dict:
    """search.json: every policy's arms, rungs, choice and cost; `failed` names the policies whose search
    stopped on a failed trial (spec -> error)."""
    budget = plan["budget_steps"]
    record = {"eta": plan["eta"], "budget_steps": budget, "search_seeds": plan["search_seeds"],
              "study": str(study_path), "device": device, "world_size": world_size, "policies": []}
    for state in walks:
        grid = plan["policies"][state.policy.spec]
        results = state.last_results()
        chosen = state.chosen if state.done else None
        entry = policy_record(state.policy, grid, state.rungs, state.by_rung, results, chosen, budget)
        if state.policy.spec in failed:
            entry["status"] = f"search failed: {failed[state.policy.spec]}"
        record["policies"].append(entry)
    totals = [p["cost_s"] for p in record["policies"]], [p["full_grid_cost_s"] for p in record["policies"]]
    record.update(rungs=sorted({step for p in record["policies"] for step in p["rungs"]}), cost_s=sum(totals[0]),
                  full_grid_cost_s=sum(totals[1]), saved_s=sum(totals[1]) - sum(totals[0]),
                  gpu_hours=sum(totals[0]) * world_size / 3600 if device == "cuda" else None)
    return record


def policy_record(policy: Policy, grid: dict, rungs: list[int], by_rung: list[dict], results: dict,
                  chosen: float | None, budget: int) -> dict:
    arms = []
    for lr in grid["grid"]:
        reached = [(rungs[i], scores[lr]) for i, scores in enumerate(by_rung) if lr in scores]
        if not reached:  # a search stopped by a failed trial before this rate was scored
            continue
        step, score = reached[-1]
        seeds = [(seed, r) for (rate, seed), (_, r) in results.items() if rate == lr]
        train_s = sum(r.get("train_s", 0.0) for _, r in seeds)
        arms.append({
            "lr": lr, "reached_step": step, "pruned": step < budget and not score.diverged,
            "diverged": score.diverged, "degenerate": score.degenerate, "score": score.f1,
            "rungs": {str(s): {"validation_f1": sc.f1, "degenerate": sc.degenerate} for s, sc in reached},
            "train_s": train_s,
            # what this arm would have cost at the full budget, from its own speed
            "full_budget_s": train_s * budget / step if step and not score.diverged else train_s,
        })
    chosen_arm = next((a for a in arms if a["lr"] == chosen), None)
    degenerate_all = all(a["degenerate"] or a["diverged"] for a in arms)
    status = ("all arms diverged" if chosen is None else "all arms predict one class" if degenerate_all else "ok")
    return {"policy": policy.spec, "grid": grid["grid"], "grid_reason": grid["reason"], "rungs": rungs,
            "chosen_lr": chosen, "chosen_step": chosen_arm["reached_step"] if chosen_arm else None,
            "chosen_validation_f1": chosen_arm["score"] if chosen_arm else None, "status": status,
            "cost_s": sum(a["train_s"] for a in arms), "full_grid_cost_s": sum(a["full_budget_s"] for a in arms),
            "arms": arms}
