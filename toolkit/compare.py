"""Train several freeze policies over several training seeds under identical settings, then report them.

main() is the recipe: options checked -> the search planned (--lr-search) -> the final runs whose rate is
known checked against finished ones -> comparison.json written -> the workers started and followed
(workers.py) -> the report. Each (policy, seed) is an ordinary training run in OUTPUT_DIR/<policy
folder>/seed-<seed>/, in a process of its own, always started from the pretrained --model on the same data
rows (--data-seed), so runs of one seed differ only in what they freeze and runs of one policy only in
their training seed. A run is finished iff its metrics.json exists (train.main writes it last). Finished
runs are reused, so re-running the command after a failure, a preemption or with an extra policy or seed
trains only what is missing; a finished run trained with other settings is refused rather than mixed into
the table. stats.py computes the statistics, markdown.py writes report.md/json and chart.py report.png.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
import time
from pathlib import Path

import torch
from accelerate.commands.config.config_args import default_config_file as accelerate_default_config_file
from rich.console import Console

from . import launcher, lr_search, workers
from .backends.precision import device_capability, resolve_mixed_precision
from .core import exit_codes
from .core.config import SEED, CompareConfig, TrainConfig, save_json
from .core.errors import ToolkitError
from .fanout import claims, devices
from .output import library_logs
from .output.console import plain
from .policy.policy import Policy
from .report import markdown as report
from .report import stats as summary
from .search import grids
from .search import study as studies

BASELINE = "none"  # the baseline of the paired differences when listed, else the first policy
# Settings that change how a run is carried out or logged, not what it computes.
NOT_COMPARED = {"output_dir", "resume_from", "stop_file", "log_every", "checkpoint_every", "keep_checkpoints",
                "num_workers", "resolved", "report_to", "run_name", "quiet", "verbose", "pause_at_step"}
# The --lora-* settings change only LoRA runs: a list's `none` run stays reusable when --lora-r changes.
POLICY_FIELDS = {"freeze", "layer_lr_decay", "unfreeze_every", "unfreeze_to"}
LORA_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.name.startswith("lora_"))


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


def main(cfg: CompareConfig) -> int:
    if cfg.status is not None:
        return show_status(Path(cfg.status))
    if cfg.report_only is not None:
        return report_only(Path(cfg.report_only))
    if cfg.freeze is not None:
        raise ToolkitError("compare trains every policy in --policies; it does not take --freeze",
                           f"pass --policies {cfg.freeze} (or a list such as none,last2,head)")
    for flag, value in (("--layer-lr-decay", cfg.layer_lr_decay), ("--unfreeze-every", cfg.unfreeze_every),
                        ("--unfreeze-to", cfg.unfreeze_to)):
        if value is not None:
            raise ToolkitError(f"compare takes {flag} per policy, inside --policies",
                               "spell it in the list: last2+llrd0.9 (layer-wise lr decay), head>none@50 (gradual)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ToolkitError("compare was started as several processes (accelerate launch, torchrun, srun); it starts "
                           "a fresh process for every run itself",
                           "start it once (python launch/compare.py or bert-ft-compare) and give each run N processes "
                           "with --processes-per-run N")
    policies = parse_policies(cfg.policies)
    seeds = parse_seeds(cfg)
    search_seeds = check_search_options(cfg, seeds)
    if cfg.resume_from not in (None, "auto"):
        raise ToolkitError(f"compare resumes each run from its own folder, not from {cfg.resume_from}",
                           "pass --resume-from auto (or nothing) together with the same --output-dir")
    base = TrainConfig(**{f.name: copy.deepcopy(getattr(cfg, f.name)) for f in dataclasses.fields(TrainConfig)})
    base.lr = cfg.lr if cfg.lr is not None else TrainConfig.lr
    # the search plan reads the data before any run does: the same quiet libraries as in a run
    library_logs.configure(0 if cfg.quiet else 2 if cfg.verbose else 1, True, False)
    device, slots = share_devices(cfg)
    out = cfg.resolve_output_dir()
    home = workers.folder(out)
    claims.check_lockable(home)
    search, study_path = None, None
    if search_seeds is not None:
        study_path = Path(cfg.study_storage) if cfg.study_storage else out / "search" / "study.journal"
        studies.check_writable(study_path)
        search = search_plan(cfg, base, policies, search_seeds, cfg.processes_per_run)
        lr_search.check_plan(out, search)
    comp = workers.Comparison(out, base, policies, seeds, search, study_path, cfg.processes_per_run, device)
    session = session_id()
    known = workers.scan(comp, session)
    # the final runs whose rate is known already: a finished one trained with other settings is refused
    decisions = plan(out, {key: comp.config(unit) for key, unit in known.finals.items()}, cfg.processes_per_run)

    # ---- every input is good: write the plan, start the workers, follow them
    console = Console(stderr=True, highlight=False)
    with claims.locked(home):
        if search is not None:
            saved = out / "search" / "plan.json"
            saved.parent.mkdir(parents=True, exist_ok=True)
            previous = json.loads(saved.read_text()) if saved.is_file() else {}
            merged = {**search, "policies": {**previous.get("policies", {}), **search["policies"]}}
            if merged != previous:  # a rerun rewrites nothing
                save_json(saved, merged)
        comp.save()
    for (spec, seed), decision in decisions.items():
        if decision == "reuse":
            console.print(f"[green]{plain(spec)} (seed {seed}): finished run found in "
                          f"{plain(out / workers.run_dir(Policy.parse(spec), seed))}, reused[/green]")
    if reused := len(known.done) - sum(d == "reuse" for d in decisions.values()):
        console.print(f"[green]{reused} search trial(s) already scored at their rung: reused[/green]")
    code = launcher.start(comp, slots, session, console)
    with claims.locked(home):
        state = workers.scan(comp, session)
        wrote = write_outputs(comp, state, session, console)
    return exit_status(code, state, wrote, console)


def share_devices(cfg: CompareConfig) -> tuple[str, list[devices.Slot]]:
    """The runs' device, checked as a run would check it (mixed precision), and each worker's share of it."""
    cpu = cfg.cpu or not torch.cuda.is_available()
    capability = None if cpu else device_capability()
    resolve_mixed_precision(cfg.mixed_precision, os.environ, None, capability, Path(accelerate_default_config_file))
    gpus = [] if cpu else devices.visible_gpus(torch.cuda.device_count())
    return ("cpu" if cpu else "cuda"), devices.share(cfg.workers, cfg.processes_per_run, cfg.threads_per_run, gpus,
                                                     devices.cores())


def session_id() -> str:
    """This compare's session: the runs that fail in it are not retried in it. An array's tasks (and their
    requeues) share one; any other compare starts a new one, which retries them."""
    if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm-array-{array}"
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"


def records(comp: workers.Comparison, state: workers.Scan, session: str) -> list[dict]:
    """One record per final run (policy, seed), in --policies order then --seeds order, with how it ended."""
    lines = workers.history(comp.out)
    last = {line["run"]: line for line in lines}
    trained_now = {line["run"] for line in lines if line["session"] == session and line["exit_code"] == 0}
    found = []
    for policy in comp.policies:
        for seed in comp.seeds:
            record = {"policy": policy.spec, "seed": seed, "run_dir": workers.run_dir(policy, seed),
                      "status": "not run", "error": None, "worker": None, "host": None}
            unit = state.finals.get((policy.spec, seed))
            ran = last.get(unit.id) if unit else None
            if ran is not None:
                record.update(worker=ran["worker"], host=ran["host"])
            if policy.spec in state.blocked:
                why = state.blocked[policy.spec]
                record.update(status="failed" if "failed" in why else "skipped", error=why)
            elif unit is None:
                record["error"] = "its learning-rate search has not finished"
            elif unit.id in state.done:
                record["status"] = "trained" if unit.id in trained_now else "reused"
            elif unit.id in state.failed:
                record.update(status="failed", error=state.failed[unit.id]["error"])
            elif ran is not None and ran["exit_code"] in workers.STOPPED:
                record.update(status="interrupted", error="stopped by " + (
                    "Ctrl-C" if ran["exit_code"] == exit_codes.INTERRUPTED else "a stop request")
                    + "; checkpoint saved")
            found.append(record)
    return found


def write_outputs(comp: workers.Comparison, state: workers.Scan, session: str, console: Console) -> bool:
    """report.md/.json/.png (and search.json/.png) from the runs' files; False while the search is unfinished."""
    out, search_record = comp.out, None
    if comp.search is not None:
        walks = [state.walks[p.spec] for p in comp.policies]
        if not all(w.done or w.policy.spec in state.blocked for w in walks):
            console.print("[yellow]the learning-rate search has not finished: no report yet; rerun the same command "
                          "to go on[/yellow]")
            return False
        failed = {spec: why for spec, why in state.blocked.items() if "failed" in why}
        search_record = lr_search.search_record(walks, comp.search, comp.study, comp.device, comp.processes_per_run,
                                                failed)
        save_json(out / "search.json", search_record)
    ordered = records(comp, state, session)
    specs = [p.spec for p in comp.policies]
    baseline = BASELINE if BASELINE in specs else specs[0]
    hardware = summary.describe_hardware(comp.device, comp.processes_per_run)
    data = {**summary.collect(out, ordered, comp.base.to_dict(), hardware, baseline, comp.seeds),
            "search": search_record}
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
        console.print(f"[bold red]{len(failed)} of {len(ordered)} runs failed: {plain(', '.join(failed))}[/bold red] "
                      "(see report.md)")
    return True


def exit_status(code: int, state: workers.Scan, wrote: bool, console: Console) -> int:
    if code in workers.STOPPED:
        return code  # checkpointed; the rest waits for a rerun (a requeue under SLURM)
    if not state.complete or not wrote:
        console.print(f"[bold red]{len(state.ready)} run(s) are still to do and no worker is left[/bold red] "
                      "(see the messages above); rerunning the same command resumes them")
        return exit_codes.SOME_RUNS_FAILED
    return exit_codes.SOME_RUNS_FAILED if state.failed or any("failed" in w for w in state.blocked.values()) \
        else exit_codes.OK


def _last_session(out: Path) -> str:
    lines = workers.history(out)
    return lines[-1]["session"] if lines else ""


def show_status(out: Path) -> int:
    comp = workers.Comparison.load(out)
    state = workers.scan(comp, _last_session(out))
    console = Console(highlight=False)
    for line in launcher.summary(comp, state):
        console.print(plain(line))
    return exit_codes.OK


def report_only(out: Path) -> int:
    comp = workers.Comparison.load(out)
    console = Console(stderr=True, highlight=False)
    with claims.locked(workers.folder(out)):
        state = workers.scan(comp, _last_session(out))
        if state.running:
            console.print(f"[yellow]{len(state.running)} run(s) still running: the report shows them as not run"
                          "[/yellow]")
        wrote = write_outputs(comp, state, _last_session(out), console)
    return exit_codes.OK if wrote else exit_codes.SOME_RUNS_FAILED
