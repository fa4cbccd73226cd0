"""Train several freeze policies over several training seeds under identical settings, then report them.

The orchestration only: summary.py computes the statistics, report.py writes report.md/json and
chart.py draws report.png. Each (policy, seed) is an ordinary training run (toolkit.train.main) in
OUTPUT_DIR/<policy folder>/seed-<seed>/, always started from the pretrained --model on the same data
rows (--data-seed), so runs of one seed differ only in what they freeze and runs of one policy only in
their training seed. A run is finished iff its metrics.json exists (train.main writes it last).
Finished runs are reused, so re-running the command after a failure, a preemption or with an extra
policy or seed trains only what is missing; a finished run trained with other settings is refused
rather than mixed into the table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import broadcast_object_list
from rich.console import Console

from . import lr_search
from .backends.accelerator import setup
from .core import exit_codes
from .core.config import COUNT, NON_NEGATIVE, POSITIVE, SEED, Range, TrainConfig, option, save_json
from .core.errors import ToolkitError
from .output import library_logs
from .output.console import plain
from .output.run_dir import shared_output_dir
from .policy.policy import Policy
from .report import markdown as report
from .report import stats as summary
from .search import grids
from .search import study as studies
from .train import main as train_main

BASELINE = "none"  # the baseline of the paired differences when listed, else the first policy
# Settings that change how a run is carried out or logged, not what it computes.
NOT_COMPARED = {"output_dir", "resume_from", "stop_file", "log_every", "checkpoint_every", "keep_checkpoints",
                "num_workers", "resolved", "report_to", "run_name", "quiet", "verbose", "pause_at_step"}
# The --lora-* settings change only LoRA runs: a list's `none` run stays reusable when --lora-r changes.
POLICY_FIELDS = {"freeze", "layer_lr_decay", "unfreeze_every", "unfreeze_to"}
LORA_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.name.startswith("lora_"))


@dataclass
class CompareConfig(TrainConfig):
    policies: str = option("none,last2,head", "comma-separated policies to train one after another: none, head, lastN, "
                           "lora (with the --lora-* settings), +llrdF for layer-wise lr decay (last2+llrd0.9), "
                           "START>TARGET@N for gradual unfreezing every N steps (head>none@50); 'none' (else the first "
                           "one listed) is the baseline for the paired F1 change and speed-up")
    seeds: Optional[str] = option(None, "comma-separated training seeds, every policy trained once per seed (e.g. "
                                  "42,43,44; default: --seed alone); the data rows stay those of --data-seed")
    repeats: Optional[int] = option(None, "train every policy with K seeds: --seed, --seed+1, ..., --seed+K-1", COUNT)
    lr: Optional[float] = option(None, "one peak learning rate for every policy (default 2e-5); with --lr-search each "
                                 "policy gets its own instead", POSITIVE)
    lr_search: bool = option(False, "choose each policy's learning rate on the validation split (needs "
                             "--validation-fraction): a grid per policy, successive halving, an Optuna study; then "
                             "the final runs over --seeds at the chosen rates (see docs/experiments.md)")
    lr_grid: Optional[list] = option(None, "with --lr-search: POLICY=LR,LR,... replaces that policy's default grid "
                                     "(repeatable, e.g. --lr-grid lora=1e-4,3e-4,1e-3)", action="append", type=str)
    search_seeds: Optional[str] = option(None, "with --lr-search: comma-separated seeds every arm trains with; an "
                                         "arm's score is their median validation F1 (default: the first of --seeds)")
    halving_eta: int = option(3, "with --lr-search: successive halving keeps the best 1/eta of a policy's rates at "
                              "every rung (1: every rate trains the whole budget)", COUNT)
    study_storage: Optional[str] = option(None, "with --lr-search: the Optuna journal file of the study (default: "
                                          "OUTPUT_DIR/search/study.journal)")
    # replaced by --policies; given anyway -> a clear error
    freeze: Optional[str] = option(None, argparse.SUPPRESS)
    layer_lr_decay: Optional[float] = option(None, argparse.SUPPRESS, Range(0, 1, low_open=True))
    unfreeze_every: Optional[int] = option(None, argparse.SUPPRESS, NON_NEGATIVE)
    unfreeze_to: Optional[str] = option(None, argparse.SUPPRESS)

    def resolve_output_dir(self) -> Path:
        if self.output_dir is None:
            self.output_dir = f"runs/compare-{self.data.task}-{time.strftime('%Y%m%d-%H%M%S')}"
        return Path(self.output_dir)


def parse_policies(text: str) -> list[Policy]:
    """The list's policies, parsed with the spelling of toolkit/policy/policy.py."""
    policies = [Policy.parse(p) for p in text.split(",") if p.strip()]
    if not policies:
        raise ToolkitError("--policies is empty", "pass e.g. --policies none,last2,head")
    specs = [p.spec for p in policies]
    repeated = sorted({p for p in specs if specs.count(p) > 1})
    if repeated:
        raise ToolkitError(f"--policies names {', '.join(repeated)} more than once", "list each policy once")
    folders: dict[str, str] = {}
    for policy in policies:
        other = folders.setdefault(policy.slug, policy.spec)
        if other != policy.spec:
            raise ToolkitError(f"--policies {other} and {policy.spec} would share the run folder {policy.slug}",
                               "compare them in two --output-dir folders")
    return policies


def parse_seeds(cfg: "CompareConfig") -> list[int]:
    if cfg.seeds is not None and cfg.repeats is not None:
        raise ToolkitError("--seeds and --repeats both choose the training seeds", "pass only one of them")
    if cfg.repeats is not None:  # at least 1: its Range
        return [cfg.seed + k for k in range(cfg.repeats)]
    if cfg.seeds is None:
        return [cfg.seed]
    return seed_list(cfg.seeds, "--seeds")


def seed_list(text: str, flag: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ToolkitError(f"{flag} {text!r} is not a list of integers", f"pass e.g. {flag} 42,43,44") from None
    if not seeds:
        raise ToolkitError(f"{flag} is empty", f"pass e.g. {flag} 42,43,44")
    if bad := [s for s in seeds if not SEED.accepts(s)]:
        raise ToolkitError(f"{flag} {', '.join(map(str, bad))} is out of range: a seed must be {SEED.describe()}",
                           f"pass e.g. {flag} 42,43,44")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ToolkitError(f"{flag} names {', '.join(map(str, repeated))} more than once", "list each seed once")
    return seeds


def check_search_options(cfg: "CompareConfig", seeds: list[int]) -> list[int] | None:
    """The --lr-search options, checked before anything loads; returns the search seeds (None: no search)."""
    if not cfg.lr_search:
        for flag, given in (("--lr-grid", cfg.lr_grid), ("--search-seeds", cfg.search_seeds),
                            ("--study-storage", cfg.study_storage)):
            if given is not None:
                raise ToolkitError(f"{flag} is an option of the learning-rate search", "add --lr-search")
        return None
    if cfg.lr is not None:
        raise ToolkitError(f"--lr-search chooses each policy's learning rate, and --lr {cfg.lr:g} sets one for all: "
                           "which one would decide?", "drop --lr (or drop --lr-search to train every policy at --lr)")
    if cfg.data.validation_fraction is None:
        raise ToolkitError("--lr-search chooses on a validation split, and there is none (the test split must "
                           "never choose)", "add --validation-fraction, e.g. 0.1")
    studies.require_optuna()
    return seed_list(cfg.search_seeds, "--search-seeds") if cfg.search_seeds is not None else seeds[:1]


def search_plan(cfg: "CompareConfig", base: TrainConfig, policies: list[Policy], search_seeds: list[int],
                world_size: int) -> dict:
    """What the search will do: its settings, seeds, halving factor, step budget and each policy's grid."""
    overrides = grids.parse_grid_overrides(cfg.lr_grid, [p.spec for p in policies])
    settings = {k: v for k, v in base.to_dict().items() if k not in NOT_COMPARED | POLICY_FIELDS | {"lr", "seed"}}
    return {"settings": settings, "search_seeds": search_seeds, "eta": cfg.halving_eta,
            "budget_steps": lr_search.budget_steps(base, world_size),
            "policies": lr_search.grids_for(policies, overrides)}


def run_dir(policy: Policy, seed: int) -> str:
    return f"{policy.slug}/seed-{seed}"


def run_config(base: TrainConfig, policy: Policy, seed: int, out: Path, lr: float | None = None) -> TrainConfig:
    # deep copy: train.main may fill in fields, and no run may see another's changes
    return dataclasses.replace(copy.deepcopy(base), **policy.config_fields(), seed=seed, lr=lr or base.lr,
                               output_dir=str(out / run_dir(policy, seed)))


def _mismatch(saved: dict, wanted: dict, defaults: dict, prefix: str = "",
              ignore: frozenset = frozenset()) -> list[str]:
    keys = (set(saved) | set(wanted)) - NOT_COMPARED - ignore
    diffs = []
    for key in sorted(keys):
        # an option added to the toolkit after that run was trained had its default value then
        a, b = saved.get(key, defaults.get(key)), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _mismatch(a, b, defaults.get(key) or {}, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return diffs


def plan(out: Path, runs: dict[tuple[str, int], TrainConfig], world_size: int) -> dict[tuple[str, int], str]:
    """(policy, seed) -> 'reuse' | 'train'; refuses finished runs whose settings differ from this invocation's."""
    decisions = {}
    for (policy, seed), cfg in runs.items():
        folder = Path(cfg.output_dir).parent
        if (folder / "metrics.json").is_file():
            raise ToolkitError(f"{folder} holds a single run from an older compare "
                               "(no seed-<s>/ folders)",
                               "move it to a seed-<its seed>/ folder inside, or use a new --output-dir")
        run_dir = Path(cfg.output_dir)
        if not (run_dir / "metrics.json").is_file():
            decisions[policy, seed] = "train"
            continue
        saved = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
        diffs = _mismatch(saved, cfg.to_dict(), TrainConfig().to_dict(),
                          ignore=frozenset() if cfg.freeze == "lora" else LORA_FIELDS)
        trained_on = saved.get("resolved", {}).get("world_size", world_size)
        if trained_on != world_size:
            diffs.append(f"processes: {trained_on} there, {world_size} now")
        if diffs:
            raise ToolkitError(f"{run_dir} holds a finished '{policy}' run (seed {seed}) with other settings "
                               f"({'; '.join(diffs[:4])})",
                               "use the same options as before, a new --output-dir, or delete that run folder")
        decisions[policy, seed] = "reuse"
    return decisions


def _or_error(compute):
    """compute() on the main process; a ToolkitError is returned, to be raised on every rank after a broadcast."""
    try:
        return compute()
    except ToolkitError as err:
        return err


def _checked_plan(cfg: "CompareConfig", base: TrainConfig, policies: list[Policy], search_seeds: list[int],
                  world_size: int, out: Path, study_path: Path) -> dict:
    studies.check_writable(study_path)
    search = search_plan(cfg, base, policies, search_seeds, world_size)
    lr_search.check_plan(out, search)
    return search


def _free_memory() -> None:
    # the finished run's model and optimizer are garbage now; hand their GPU memory back
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(cfg: CompareConfig) -> int:
    if cfg.freeze is not None:
        raise ToolkitError("compare trains every policy in --policies; it does not take --freeze",
                           f"pass --policies {cfg.freeze} (or a list such as none,last2,head)")
    for flag, value in (("--layer-lr-decay", cfg.layer_lr_decay), ("--unfreeze-every", cfg.unfreeze_every),
                        ("--unfreeze-to", cfg.unfreeze_to)):
        if value is not None:
            raise ToolkitError(f"compare takes {flag} per policy, inside --policies",
                               "spell it in the list: last2+llrd0.9 (layer-wise lr decay), head>none@50 (gradual)")
    policies = parse_policies(cfg.policies)
    seeds = parse_seeds(cfg)
    search_seeds = check_search_options(cfg, seeds)
    if cfg.resume_from not in (None, "auto"):
        raise ToolkitError(f"compare resumes each run from its own folder, not from {cfg.resume_from}",
                           "pass --resume-from auto (or nothing) together with the same --output-dir")
    base = TrainConfig(**{f.name: copy.deepcopy(getattr(cfg, f.name)) for f in dataclasses.fields(TrainConfig)})
    base.lr = cfg.lr if cfg.lr is not None else TrainConfig.lr
    accelerator = setup(cfg.cpu, cfg.mixed_precision, cfg.grad_accum, cfg.dist_timeout, cfg.tf32)
    # the search plan reads the data before any run does: the same quiet libraries as in a run
    library_logs.configure(0 if cfg.quiet else 2 if cfg.verbose else 1, accelerator.is_main_process, False)
    out = shared_output_dir(accelerator, cfg)
    console = Console(stderr=True, highlight=False) if accelerator.is_main_process else None
    chosen, search_record = {}, None
    if search_seeds is not None:
        study_path = Path(cfg.study_storage) if cfg.study_storage else out / "search" / "study.journal"
        planned = [_or_error(lambda: _checked_plan(cfg, base, policies, search_seeds, accelerator.num_processes, out,
                                                study_path)) if accelerator.is_main_process else None]
        broadcast_object_list(planned, from_process=0)
        if isinstance(planned[0], ToolkitError):
            raise planned[0]  # on every rank: bad input, nothing written
        if accelerator.is_main_process:
            (out / "search").mkdir(parents=True, exist_ok=True)
            saved = out / "search" / "plan.json"
            previous = json.loads(saved.read_text()) if saved.is_file() else {}
            merged = {**planned[0], "policies": {**previous.get("policies", {}), **planned[0]["policies"]}}
            if merged != previous:  # a rerun rewrites nothing
                save_json(saved, merged)
        log = (lambda text: console.print(plain(text))) if console else (lambda text: None)
        try:
            search_record = lr_search.search(base, policies, planned[0], out, study_path, accelerator, log)
        except lr_search.SearchStopped as stop:
            return stop.code  # the trial checkpointed; a rerun goes on from there
        chosen = {p["policy"]: p["chosen_lr"] for p in search_record["policies"]}
        if accelerator.is_main_process:
            save_json(out / "search.json", search_record)
    # seed by seed: after the first seed the table already compares every policy, should the rest be cut short
    runs = {(policy.spec, seed): run_config(base, policy, seed, out, chosen.get(policy.spec))
            for seed in seeds for policy in policies if search_record is None or chosen[policy.spec] is not None}
    decisions = [_or_error(lambda: plan(out, runs, accelerator.num_processes)) if accelerator.is_main_process
                 else None]
    broadcast_object_list(decisions, from_process=0)  # every rank must train the same runs in the same order
    if isinstance(decisions[0], ToolkitError):
        raise decisions[0]  # on every rank, so none is left waiting for the others
    if accelerator.is_main_process:  # the report's folder: a run that fails to start removes only its own
        out.mkdir(parents=True, exist_ok=True)
    hardware = summary.describe_hardware(accelerator.device.type, accelerator.num_processes)

    records = {(p.spec, seed): {"policy": p.spec, "seed": seed, "run_dir": run_dir(p, seed), "status": "not run",
                                "error": None} for seed in seeds for p in policies}
    for key, record in records.items():
        if key not in runs:
            record.update(status="skipped", error="every learning rate of its search diverged")
    code = 0
    for key, run_cfg in runs.items():
        record, name = records[key], f"{key[0]} (seed {key[1]})"
        if decisions[0][key] == "reuse":
            record["status"] = "reused"
            if console:
                console.print(f"[green]{plain(name)}: finished run found in {plain(run_cfg.output_dir)}, "
                              f"reused[/green]")
            continue
        try:
            result = train_main(run_cfg)
        except Exception as exc:  # one run failing must not cost the others theirs
            record.update(status="failed", error=_describe(exc))
            if console:
                console.print(f"[bold red]{plain(name)} failed:[/bold red] {plain(record['error'])}")
                if not isinstance(exc, ToolkitError):
                    traceback.print_exc()
            result = None
        _free_memory()
        if result in (exit_codes.PREEMPTED, exit_codes.INTERRUPTED):  # checkpointed; the rest wait for a rerun
            record.update(status="interrupted", error="stopped by "
                          + ("Ctrl-C" if result == exit_codes.INTERRUPTED else "a stop request") + "; checkpoint saved")
            code = result
            break
        if result == 0:
            record["status"] = "trained"
            if accelerator.is_main_process:
                save_json(Path(run_cfg.output_dir) / "hardware.json", {"hardware": hardware})
        elif result is not None:
            record.update(status="failed", error=f"training exited with status {result}")

    if accelerator.is_main_process:
        # in --policies order, each policy's seeds in --seeds order
        ordered = [records[p.spec, s] for p in policies for s in seeds]
        specs = [p.spec for p in policies]
        baseline = BASELINE if BASELINE in specs else specs[0]
        data = {**summary.collect(out, ordered, base.to_dict(), hardware, baseline, seeds), "search": search_record}
        report.write_report(out, data)
        from .report.chart import write_chart  # matplotlib loads only when a report is drawn

        write_chart(data, out / "report.png")
        drawn = [out / "report.md", out / "report.png", out / "report.json"]
        if search_record is not None:
            from .report.search import write_search_chart

            write_search_chart(search_record, out / "search.png")
            drawn += [out / "search.json", out / "search.png"]
        print(f"\n{report.markdown(data)}\nreport: {', '.join(map(str, drawn))}", flush=True)
        failed = [f"{r['policy']} (seed {r['seed']})" for r in ordered if r["status"] == "failed"]
        if failed:
            console.print(f"[bold red]{len(failed)} of {len(ordered)} runs failed: {plain(', '.join(failed))}[/bold "
                          f"red] "
                          "(see report.md)")
    accelerator.wait_for_everyone()
    if code:
        return code
    return exit_codes.SOME_RUNS_FAILED if any(r["status"] == "failed" for r in records.values()) else exit_codes.OK


def _describe(exc: Exception) -> str:
    if isinstance(exc, ToolkitError):
        return f"{exc.problem} (fix: {exc.fix})" if exc.fix else exc.problem
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
