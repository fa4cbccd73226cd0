"""The launcher's side of a comparison: start its workers, pass them the stop signals, follow them.

compare.py calls start() once its plan is written; each worker is `python -m toolkit.workers work ...`
(workers.py) in a session of its own, with its share of the devices (fanout/devices.py) in its environment
and its output in OUTPUT_DIR/workers/logs/<worker>.log. While they run, follow() shows one line per worker
(its run, step and time left, from the claims and the runs' progress files) and a total; summary() is also
what `compare --status` prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

from .core import exit_codes
from .fanout import claims
from .fanout.devices import Slot
from .search import study as studies
from .workers import STOPPED, Comparison, Scan, die_with_parent, folder, history, scan


def start(comp: Comparison, slots: list[Slot], session: str, console) -> int:
    """Start one worker process per slot, pass them the stop signals, follow them until the last has ended;
    returns 75 / 130 when they were stopped, else 0."""
    home = folder(comp.out)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    prefix = f"{socket.gethostname()}-" + (f"task{task}" if task is not None else str(os.getpid()))
    procs = {}
    for slot in slots:
        name = f"{prefix}-w{slot.index}"
        cmd = [sys.executable, "-m", "toolkit.workers", "work", str(comp.out), "--name", name, "--session", session,
               "--threads", str(slot.threads), *(["--gpus", ",".join(slot.gpus)] if slot.gpus else [])]
        with open(home / "logs" / f"{name}.log", "a") as fh:
            # a session of its own: a Ctrl-C in the terminal reaches the workers once, through this process
            # and it dies with this process (kill -9 included): no worker goes on training unwatched
            procs[name] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                           env={**os.environ, **slot.env()}, preexec_fn=die_with_parent)
    console.print(f"{len(procs)} worker(s): " + ", ".join(
        f"{name} ({'GPUs ' + ','.join(s.gpus) if s.gpus else f'{s.threads} thread(s)'})"
        for name, s in zip(procs, slots)) + f"; their logs in {home / 'logs'}")

    def forward(signum, frame):
        for proc in procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        follow(comp, procs, session, console)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    codes = [proc.returncode for proc in procs.values()]
    return next((c for c in codes if c in STOPPED), exit_codes.OK)


def follow(comp: Comparison, procs: dict, session: str, console) -> None:
    """One live line per worker (its run, step, time left) and a total, until every worker has ended; on a
    terminal a rich Live display, in a log one line per change."""
    from rich.live import Live
    from rich.table import Table

    seen, ended, shown, rates = len(history(comp.out)), set(), {}, {}
    totals = summary(comp, scan(comp, session))[0]
    live = Live(console=console, transient=True, refresh_per_second=2) if console.is_terminal else None
    with live or contextlib.nullcontext():
        while True:
            lines = history(comp.out)
            for line in lines[seen:]:
                console.print(_event(line))
            if len(lines) > seen:
                totals = summary(comp, scan(comp, session))[0]
            seen = len(lines)
            for name, proc in procs.items():
                if proc.poll() is not None and name not in ended:
                    ended.add(name)
                    if proc.returncode not in (exit_codes.OK, *STOPPED):
                        console.print(f"[bold red]worker {name} ended with "
                                      + (f"signal {-proc.returncode}" if proc.returncode < 0
                                         else f"status {proc.returncode}")
                                      + f"[/bold red]: its run is resumed by the next worker to claim it (log: "
                                      f"{folder(comp.out) / 'logs' / (name + '.log')})")
            rows = {name: _doing(comp, name, rates) if proc.poll() is None else "ended"
                    for name, proc in procs.items()}
            if live is not None:
                table = Table.grid(padding=(0, 2))
                for name, text in rows.items():
                    table.add_row(name, text)
                table.add_row("total", totals)
                live.update(table)
            else:
                for name, text in rows.items():
                    what = text.split(": step")[0]
                    if shown.get(name) != what:
                        console.print(f"{name}: {what}")
                        shown[name] = what
            if len(ended) == len(procs):
                break
            time.sleep(1.0)
    console.print(summary(comp, scan(comp, session))[0])


def _event(line: dict) -> str:
    took = f"{line['ended'] - line['started']:.0f} s"
    if line["exit_code"] == exit_codes.OK:
        return f"{line['worker']}: {line['run']} done ({took})"
    if line["exit_code"] in STOPPED:
        return f"[yellow]{line['worker']}: {line['run']} stopped ({line['exit_code']}), checkpoint kept[/yellow]"
    return f"[bold red]{line['worker']}: {line['run']} failed[/bold red]: {line['error']}"


def _doing(comp: Comparison, name: str, rates: dict) -> str:
    """What worker `name` is running: its claim, and its run's step from the progress file."""
    claim = next((c for c in claims.read_claims(folder(comp.out)).values() if c.worker == name), None)
    if claim is None:
        return "idle"
    path = folder(comp.out) / "progress" / f"{name}.json"
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"{claim.run}: starting"
    if progress["time"] < claim.started:
        return f"{claim.run}: starting"
    step, total, now = progress["step"], progress["total"], progress["time"]
    first = rates.setdefault(claim.run, (step, now))
    left = ""
    if step > first[0] and now > first[1]:
        left = f", {(total - step) * (now - first[1]) / (step - first[0]):.0f} s left"
    return f"{claim.run}: step {step}/{total}{left}"


def summary(comp: Comparison, state: Scan) -> list[str]:
    """The state of a comparison in a few lines (the launcher's total line first; compare --status prints all)."""
    undecided = [w.policy.spec for w in state.walks.values() if not w.done and w.policy.spec not in state.blocked]
    lines = [f"runs: {len(state.done)} done, {len(state.running)} running, {len(state.ready)} waiting, "
             f"{len(state.failed)} failed" + (f"; search still deciding {', '.join(undecided)}" if undecided else "")]
    for run, claim in state.running.items():
        lines.append(f"running: {run} on {claim.worker} ({claim.host}), for {time.time() - claim.started:.0f} s")
    for run, record in state.failed.items():
        lines.append(f"failed: {run} on {record['worker']}: {record['error']}")
    for spec, why in state.blocked.items():
        lines.append(f"{spec}: no final runs, {why}")
    if comp.search is not None and comp.study is not None and comp.study.is_file():
        counts: dict[str, int] = {}
        for trial in studies.open_study(comp.study).get_trials(deepcopy=False):
            counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
        lines.append(f"study {comp.study}: {len(comp.search['policies'])} policies, "
                     + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + " trials")
    return lines
