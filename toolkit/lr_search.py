"""`compare --lr-search`, the search that compare.py runs: each policy at its own learning rate, chosen on the
validation split.

For each policy, every rate of its grid is an arm; each arm trains with the search seeds on the training
rows minus the validation split, and is scored on the validation split only (its runs are started with
--no-score-test: the test rows are never even loaded). Successive halving (halving.py) stops the weaker
arms at the rungs; a survivor resumes from its rung checkpoint with the toolkit's exact resume, on a
learning-rate schedule that spans the whole budget from its first step. The study (study.py) records it
all. Trials live in OUTPUT_DIR/search/<policy>/lr-<rate>/seed-<seed>/; a finished rung is never
trained again, so a rerun after a kill, a preemption or with an extra policy trains only what is missing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import broadcast_object_list

from .core import exit_codes
from .core.config import TrainConfig, save_json
from .core.errors import RunFailed, ToolkitError
from .data.dataset import build_splits, split_validation
from .engine.loop import optimizer_steps
from .policy.policy import Policy
from .search import halving
from .search import study as studies
from .search.grids import default_grid
from .train import main as train_main


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


def run_trial(base: TrainConfig, arm: Arm, out: Path, step: int, budget: int, is_main: bool = True) -> dict:
    """Train one arm with one seed up to `step` (resuming from its last checkpoint) and return its result.
    A function of its arguments and the trial's folder only: any process, on any machine, may run it."""
    folder = arm.folder(out)
    found = [trial_result(folder, step, budget) if is_main else None]
    broadcast_object_list(found, from_process=0)
    if found[0] is not None:
        return {**found[0], "reused": True}
    try:
        code = train_main(trial_config(base, arm, out, step, budget))
    except RunFailed as err:
        if err.exit_code != exit_codes.DIVERGED:
            raise
        if is_main:
            folder.mkdir(parents=True, exist_ok=True)
            save_json(folder / "diverged.json", {"rung": step, "error": err.problem})
        code = exit_codes.OK
    if code in (exit_codes.PREEMPTED, exit_codes.INTERRUPTED):
        raise SearchStopped(code)
    found = [trial_result(folder, step, budget) if is_main else None]
    broadcast_object_list(found, from_process=0)
    if code != exit_codes.OK or found[0] is None:
        raise ToolkitError(f"the trial in {folder} ended with status {code} and no score at step {step}",
                           "see its messages above; rerunning the command retries it")
    return {**found[0], "reused": False}


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


def search(base: TrainConfig, policies: list[Policy], plan: dict, out: Path, study_path: Path, accelerator,
           log) -> dict:
    """Search every policy's grid with successive halving; returns search.json's content, with chosen rates."""
    is_main = accelerator.is_main_process
    study = studies.open_study(study_path) if is_main else None
    seeds, eta, budget = plan["search_seeds"], plan["eta"], plan["budget_steps"]
    record = {"eta": eta, "budget_steps": budget, "search_seeds": seeds, "study": str(study_path),
              "device": accelerator.device.type, "world_size": accelerator.num_processes, "policies": []}
    for policy in policies:
        grid = plan["policies"][policy.spec]["grid"]
        rungs = halving.rung_steps(budget, len(grid), eta)
        alive, by_rung, results, trials = list(grid), [], {}, {}
        for step in rungs:
            scores = {}
            for lr in alive:
                per_seed = []
                for seed in seeds:
                    arm = Arm(policy, lr, seed)
                    result = run_trial(base, arm, out, step, budget, is_main)
                    per_seed.append(result)
                    results[lr, seed] = (step, result)
                    if is_main:
                        trials[lr, seed] = studies.arm_trial(study, policy.spec, lr, seed, tuple(grid))
                        studies.report_rung(study, trials[lr, seed], step, result.get("validation_f1"))
                scores[lr] = halving.arm_score(per_seed)
                log(f"search {policy.spec} lr {lr:g} step {step}/{budget}: " + (
                    "diverged" if scores[lr].diverged else f"validation F1 {scores[lr].f1:.4f}"
                    + (" (one class predicted)" if scores[lr].degenerate else ""))
                    + (" (reused)" if all(r["reused"] for r in per_seed) else ""))
            by_rung.append(scores)
            if step != rungs[-1]:
                alive = halving.promote(scores, eta)
        chosen = halving.choose(by_rung)
        if is_main:
            for (lr, seed), (step, result) in results.items():
                outcome = ("diverged" if result.get("diverged") else "complete" if step >= budget else "pruned")
                studies.finish(study, trials[lr, seed], outcome, result.get("validation_f1"))
                if outcome == "pruned":  # its rung score is on file; its weights will never train again
                    shutil.rmtree(Arm(policy, lr, seed).folder(out) / "checkpoints", ignore_errors=True)
        record["policies"].append(policy_record(policy, plan["policies"][policy.spec], rungs, by_rung, results,
                                                chosen, budget))
        log(f"search {policy.spec}: " + (f"lr {chosen:g} chosen" if chosen is not None
                                          else "every learning rate diverged; no final runs"))
    totals = [p["cost_s"] for p in record["policies"]], [p["full_grid_cost_s"] for p in record["policies"]]
    record.update(rungs=sorted({step for p in record["policies"] for step in p["rungs"]}), cost_s=sum(totals[0]),
                  full_grid_cost_s=sum(totals[1]), saved_s=sum(totals[1]) - sum(totals[0]),
                  gpu_hours=(sum(totals[0]) * accelerator.num_processes / 3600
                             if accelerator.device.type == "cuda" else None))
    return record


def policy_record(policy: Policy, grid: dict, rungs: list[int], by_rung: list[dict], results: dict,
                  chosen: float | None, budget: int) -> dict:
    arms = []
    for lr in grid["grid"]:
        reached = [(rungs[i], scores[lr]) for i, scores in enumerate(by_rung) if lr in scores]
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
