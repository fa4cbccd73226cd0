"""A comparison's runs and the worker that runs them: claim the next run that may start, run it in a fresh
process, record how it ended, repeat until nothing is left.

compare.py plans a comparison into OUTPUT_DIR/workers/comparison.json and starts the workers
(`python -m toolkit.workers work OUTPUT_DIR ...`, through launcher.py); each SLURM array task is such a
compare. The queue is never stored: scan() reads it from the run folders, under the lock of
fanout/claims.py, so every worker on every node sees the same one, and a worker that dies loses nothing
but its claim (the next worker resumes its run from the last checkpoint).

A run (Unit) is one of:
  trial  an arm of the learning-rate search (policy, lr, seed) trained up to a rung; lr_search.walk() says
         which are due. Folder: OUTPUT_DIR/search/<policy>/lr-<lr>/seed-<seed>/
  run    a final run (policy, seed) at the policy's rate (the chosen one with --lr-search), scored on the
         test split. Folder: OUTPUT_DIR/<policy>/seed-<seed>/

Each run is its own process, forked from the worker (which has imported the toolkit and trained nothing, so
the run's peak memory is its own and a crash takes only it down), or, with several processes per run,
started by `accelerate launch`. OUTPUT_DIR/workers/ holds comparison.json, the lock, the claims, one log
per run, failed/<run>.json for the runs that failed in this session, and history.jsonl: one line per run
started (worker, host, threads, GPUs, exit status).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import lr_search
from .cli import finish, report_error, show_native_crashes
from .core import exit_codes
from .core.config import DataConfig, TrainConfig, check_ranges, save_json
from .core.errors import RunFailed, ToolkitError
from .engine.checkpoint import list_checkpoints
from .fanout import claims
from .output.console import PROGRESS_FILE_ENV
from .policy.policy import Policy
from .report.stats import describe_hardware
from .search import study as studies
from .train import main as train_main

POLL_S = 2.0  # a worker with nothing to start looks again after this long
STOPPED = (exit_codes.PREEMPTED, exit_codes.INTERRUPTED)


@dataclass(frozen=True)
class Unit:
    kind: str  # "trial" or "run"
    policy: Policy
    seed: int
    lr: float
    step: int | None = None  # a trial: the rung it trains to

    @property
    def id(self) -> str:
        if self.kind == "trial":
            return f"trial.{self.policy.slug}.lr-{self.lr:g}.seed-{self.seed}.step-{self.step}"
        return f"run.{self.policy.slug}.seed-{self.seed}"

    def describe(self) -> str:
        if self.kind == "trial":
            return f"search {self.policy.spec} lr {self.lr:g} seed {self.seed} to step {self.step}"
        return f"{self.policy.spec} (seed {self.seed})"

    def folder(self, out: Path) -> Path:
        if self.kind == "trial":
            return lr_search.Arm(self.policy, self.lr, self.seed).folder(out)
        return out / run_dir(self.policy, self.seed)


def run_dir(policy: Policy, seed: int) -> str:
    return f"{policy.slug}/seed-{seed}"


def run_config(base: TrainConfig, policy: Policy, seed: int, out: Path, lr: float | None = None) -> TrainConfig:
    # deep copy: train.main may fill in fields, and no run may see another's changes
    return dataclasses.replace(copy.deepcopy(base), **policy.config_fields(), seed=seed, lr=lr or base.lr,
                               output_dir=str(out / run_dir(policy, seed)))


@dataclass
class Comparison:
    """What compare planned: the runs' common settings, the policies, the seeds and the search plan."""

    out: Path
    base: TrainConfig
    policies: list[Policy]
    seeds: list[int]
    search: dict | None  # compare.search_plan(); None without --lr-search
    study: Path | None
    processes_per_run: int
    device: str  # "cuda" or "cpu"

    def save(self) -> None:
        record = {"base": self.base.to_dict(), "policies": [p.spec for p in self.policies], "seeds": self.seeds,
                  "search": self.search, "study": str(self.study) if self.study else None,
                  "processes_per_run": self.processes_per_run, "device": self.device}
        path = folder(self.out) / "comparison.json"
        if not path.is_file() or json.loads(path.read_text()) != json.loads(json.dumps(record)):
            save_json(path, record)  # a rerun rewrites nothing

    @classmethod
    def load(cls, out: Path) -> "Comparison":
        path = folder(out) / "comparison.json"
        if not path.is_file():
            raise ToolkitError(f"{out} holds no comparison (no workers/comparison.json)",
                               "pass the --output-dir of a compare that has started")
        saved = json.loads(path.read_text())
        return cls(out, config_from_dict(saved["base"]), [Policy.parse(p) for p in saved["policies"]],
                   saved["seeds"], saved["search"], Path(saved["study"]) if saved["study"] else None,
                   saved["processes_per_run"], saved["device"])

    def config(self, unit: Unit) -> TrainConfig:
        if unit.kind == "trial":
            return lr_search.trial_config(self.base, lr_search.Arm(unit.policy, unit.lr, unit.seed), self.out,
                                          unit.step, self.search["budget_steps"])
        # resume_from auto: a run its worker left (killed, preempted) goes on from its last checkpoint
        return dataclasses.replace(run_config(self.base, unit.policy, unit.seed, self.out, unit.lr),
                                   resume_from="auto")


def config_from_dict(saved: dict) -> TrainConfig:
    """A TrainConfig from its to_dict() (config.json's keys that are not options, e.g. "resolved", dropped)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in saved.items() if k in names}, "data": DataConfig(**saved["data"])})


def folder(out: Path) -> Path:
    return out / "workers"


@dataclass
class Scan:
    """The queue as the files have it now."""

    ready: list[Unit]  # may start now, claimed by no live worker
    running: dict[str, claims.Claim]  # run id -> its live claim
    walks: dict[str, lr_search.Walk]  # the search's state per policy (with --lr-search)
    finals: dict[tuple[str, int], Unit]  # (policy, seed) -> final run, for the policies whose rate is known
    blocked: dict[str, str]  # policy -> why it has no final runs (its search failed, or every rate diverged)
    failed: dict[str, dict]  # run id -> failed/<run>.json, this session's
    done: set[str]  # run ids finished (metrics.json, or a trial's score at its rung)

    @property
    def complete(self) -> bool:
        """Nothing can start and nothing is running: every run is done or failed."""
        return not self.ready and not self.running


def scan(comp: Comparison, session: str) -> Scan:
    home = folder(comp.out)
    live = {run: claim for run, claim in claims.read_claims(home).items() if claim.alive()}
    failed = {}
    for path in (home / "failed").glob("*.json"):
        record = json.loads(path.read_text())
        if record.get("session") == session:  # a new compare (or array job) tries the others again
            failed[record["run"]] = record
    state = Scan([], live, {}, {}, {}, failed, set())
    trials, finals = [], []
    for policy in comp.policies:
        lr = comp.base.lr
        if comp.search is not None:
            walk = state.walks[policy.spec] = lr_search.walk(policy, comp.search, comp.out)
            due = [Unit("trial", policy, arm.seed, arm.lr, step) for arm, step in walk.missing]
            for step, found in zip(walk.rungs, walk.found):
                state.done |= {Unit("trial", policy, s, r, step).id for (r, s), res in found.items() if res}
            if broken := [failed[u.id]["error"] for u in due if u.id in failed]:
                state.blocked[policy.spec] = f"its learning-rate search failed: {broken[0]}"
                continue
            if not walk.done:
                trials += due
                continue
            if walk.chosen is None:
                state.blocked[policy.spec] = "every learning rate of its search diverged"
                continue
            lr = walk.chosen
        for seed in comp.seeds:
            unit = state.finals[policy.spec, seed] = Unit("run", policy, seed, lr)
            if (unit.folder(comp.out) / "metrics.json").is_file():
                state.done.add(unit.id)
            elif unit.id not in failed:
                finals.append(unit)
    # seed by seed: after the first seed the table already compares every policy, should the rest be cut short
    order = {seed: i for i, seed in enumerate(comp.seeds)}
    finals.sort(key=lambda u: order[u.seed])
    state.ready = [u for u in trials + finals if u.id not in live]
    return state


def sync_study(comp: Comparison, state: Scan) -> None:
    """The study gets what the files say (idempotent, under the lock)."""
    if comp.search is None:
        return
    study = studies.open_study(comp.study)
    for spec, walk in state.walks.items():
        grid = comp.search["policies"][spec]["grid"]
        lr_search.sync_study(study, walk, grid, comp.search["budget_steps"], comp.out)


# ---------------------------------------------------------------- one run, in its own process

def run_one(cfg: TrainConfig, result_path: Path) -> int:
    """train.main in this process, its exit status and error written to result_path (rank 0)."""
    error = None
    try:
        code = train_main(cfg)
    except (ToolkitError, RunFailed) as err:
        report_error(err.problem, err.fix)
        code = err.exit_code if isinstance(err, RunFailed) else exit_codes.BAD_INPUT
        error = f"{err.problem} (fix: {err.fix})" if err.fix else err.problem
    except KeyboardInterrupt:
        code, error = exit_codes.INTERRUPTED, "interrupted (Ctrl-C) before training began"
    except Exception as exc:  # the worker records it and goes on with the next run
        traceback.print_exc()
        code, error = 1, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    if os.environ.get("RANK", "0") == "0":
        if code == exit_codes.OK and cfg.score_test:  # the report names the hardware of every final run
            import torch

            device = "cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu"
            save_json(Path(cfg.output_dir) / "hardware.json",
                      {"hardware": describe_hardware(device, int(os.environ.get("WORLD_SIZE", "1")))})
        save_json(result_path, {"exit_code": code, "error": error})
    return code


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its worker dies (kill -9), so no orphan trains on in a folder the
    next worker resumes."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _fork(cfg: TrainConfig, log: Path, result: Path, threads: int, progress: Path) -> int:
    """The run in a child forked from this worker; returns its pid."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(fd)
        return pid
    code = 1
    try:
        die_with_parent()
        os.setsid()  # the terminal's Ctrl-C reaches the worker, which passes it on once
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_DFL)
        os.environ[PROGRESS_FILE_ENV] = str(progress)
        import torch

        torch.set_num_threads(threads)
        code = run_one(cfg, result)
    except BaseException:  # noqa: BLE001 - a forked child must never return into the worker's loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _launch(cfg: TrainConfig, log: Path, result: Path, processes: int, cpu: bool, progress: Path):
    """The run under `accelerate launch` with `processes` processes (the worker's GPUs, or gloo on CPU)."""
    spec = result.with_suffix(".config.json")
    save_json(spec, cfg.to_dict())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "toolkit.workers", "run-config", str(spec), str(result)]
    env = {**os.environ, PROGRESS_FILE_ENV: str(progress), **({"ACCELERATE_USE_CPU": "true"} if cpu else {})}
    with open(log, "a") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=die_with_parent)


class Worker:
    """One worker: the loop, the run in progress, and the signals it passes on to that run."""

    def __init__(self, comp: Comparison, name: str, session: str, threads: int, gpus: str | None):
        self.comp, self.name, self.session, self.threads, self.gpus = comp, name, session, threads, gpus
        self.home = folder(comp.out)
        self.host = socket.gethostname()
        self.child = None  # pid (forked) or Popen (launched)
        self.stop_signal = None

    def on_signal(self, signum, frame) -> None:
        """SIGTERM / SIGUSR1 (preemption) and Ctrl-C: passed on once to the run, which checkpoints and stops;
        then this worker starts nothing more."""
        first = self.stop_signal is None
        self.stop_signal = self.stop_signal or signum
        if self.child is not None and (first or signum == signal.SIGINT):  # a second Ctrl-C: stop at once
            with contextlib.suppress(ProcessLookupError):
                if isinstance(self.child, int):
                    os.kill(self.child, signum)
                else:
                    os.killpg(self.child.pid, signum)

    def loop(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self.on_signal)
        while self.stop_signal is None:
            with claims.locked(self.home):
                state = scan(self.comp, self.session)
                sync_study(self.comp, state)
                if state.complete:
                    return exit_codes.OK
                unit = state.ready[0] if state.ready else None
                if unit is not None:
                    claim = claims.write_claim(self.home, claims.Claim(unit.id, self.name, self.host, os.getpid(),
                                                                       time.time()))
                    if unit.kind == "trial":  # the study's trial for this arm is RUNNING from now on
                        studies.arm_trial(studies.open_study(self.comp.study), unit.policy.spec, unit.lr, unit.seed,
                                          tuple(self.comp.search["policies"][unit.policy.spec]["grid"]))
            if unit is None:
                time.sleep(POLL_S)  # the runs that decide what comes next are running on other workers
                continue
            try:
                code = self.execute(unit, claim)
            finally:
                claims.release(claim)
            if code in STOPPED:
                return code
        return exit_codes.INTERRUPTED if self.stop_signal == signal.SIGINT else exit_codes.PREEMPTED

    def execute(self, unit: Unit, claim: claims.Claim) -> int:
        """Run `unit` in its own process and record how it ended; returns its exit status."""
        comp, run_folder = self.comp, unit.folder(self.comp.out)
        for sub in ("logs", "results", "progress", "failed"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        log, result = self.home / "logs" / f"{unit.id}.log", self.home / "results" / f"{unit.id}.json"
        progress = self.home / "progress" / f"{self.name}.json"
        with contextlib.suppress(FileNotFoundError):
            result.unlink()
        line = {"run": unit.id, "run_dir": str(run_folder.relative_to(comp.out)), "worker": self.name,
                "host": self.host, "session": self.session, "threads": self.threads, "gpus": self.gpus,
                "resumed_from_step": latest_checkpoint_step(run_folder), "started": time.time()}
        cfg = comp.config(unit)
        if comp.processes_per_run == 1:
            self.child = _fork(cfg, log, result, self.threads, progress)
        else:
            self.child = _launch(cfg, log, result, comp.processes_per_run, comp.device == "cpu", progress)
        claim.child_pid = self.child if isinstance(self.child, int) else self.child.pid
        line.update(pid=claim.child_pid, worker_pid=os.getpid())
        claims.write_claim(self.home, claim)
        with claims.Heartbeat(claim):
            if isinstance(self.child, int):
                code = os.waitstatus_to_exitcode(os.waitpid(self.child, 0)[1])
            else:
                code = self.child.wait()
        self.child = None
        ended = json.loads(result.read_text()) if result.is_file() else {
            "exit_code": code, "error": f"its process ended with status {code} (see {log})"}
        error = ended["error"]
        if unit.kind == "trial" and code == exit_codes.DIVERGED:
            # a rate that diverges is a result of the search, not a failure: it ranks last
            save_json(run_folder / "diverged.json", {"rung": unit.step, "error": error})
            code, error = exit_codes.OK, None
        if code == exit_codes.OK and not self.finished(unit):
            code, error = 1, f"it ended with status 0 and no result in {run_folder}"
        if code not in STOPPED and self.stop_signal is not None and code != exit_codes.OK:
            code = exit_codes.INTERRUPTED if self.stop_signal == signal.SIGINT else exit_codes.PREEMPTED
            error = f"stopped by signal {self.stop_signal} before its first checkpoint"
        with claims.locked(self.home):
            with (self.home / "history.jsonl").open("a") as fh:
                fh.write(json.dumps({**line, "ended": time.time(), "exit_code": code, "error": error}) + "\n")
            if code not in STOPPED and code != exit_codes.OK:
                save_json(self.home / "failed" / f"{unit.id}.json",
                          {"run": unit.id, "session": self.session, "error": error, "exit_code": code,
                           "worker": self.name, "host": self.host, "log": str(log)})
        print(f"[{self.name}] {unit.describe()}: "
              + ("done" if code == exit_codes.OK else f"stopped ({code})" if code in STOPPED else f"failed: {error}"),
              file=sys.stderr, flush=True)
        return code

    def finished(self, unit: Unit) -> bool:
        run_folder = unit.folder(self.comp.out)
        if unit.kind == "run":
            return (run_folder / "metrics.json").is_file()
        return lr_search.trial_result(run_folder, unit.step, self.comp.search["budget_steps"]) is not None


def latest_checkpoint_step(run_folder: Path) -> int | None:
    """The step of the checkpoint a run started now resumes from (None: it starts from the beginning)."""
    found = list_checkpoints(run_folder)
    return int(found[-1].name.removeprefix("step-")) if found else None


def history(out: Path) -> list[dict]:
    path = folder(out) / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.workers",
                                     description="A comparison's worker (started by compare; see docs/experiments.md)")
    sub = parser.add_subparsers(dest="command", required=True)
    work = sub.add_parser("work", help="claim and run the comparison's runs until none is left")
    work.add_argument("output_dir", type=Path)
    work.add_argument("--name", required=True)
    work.add_argument("--session", required=True)
    work.add_argument("--threads", type=int, required=True)
    work.add_argument("--gpus", default=None)
    one = sub.add_parser("run-config", help="one run from a config file (under accelerate launch)")
    one.add_argument("config", type=Path)
    one.add_argument("result", type=Path)
    args = parser.parse_args(argv)
    show_native_crashes()
    if args.command == "run-config":
        cfg = config_from_dict(json.loads(args.config.read_text()))
        check_ranges(cfg)
        finish(run_one(cfg, args.result))
    try:
        comp = Comparison.load(args.output_dir)
    except ToolkitError as err:
        report_error(err.problem, err.fix)
        return exit_codes.BAD_INPUT
    return Worker(comp, args.name, args.session, args.threads, args.gpus).loop()


if __name__ == "__main__":
    sys.exit(main())
