"""Training curves from metrics.jsonl: `curves.png` in every run folder, and several runs overlaid.

Panels: training loss (raw, and smoothed) and learning rate against the optimizer step, training
samples/s; eval F1, eval loss and eval accuracy per epoch. A resumed run logs again the steps
after its last checkpoint: for each step the last line wins.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on compute nodes
import matplotlib.pyplot as plt  # noqa: E402

FILE = "curves.png"


def read_log(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, eval lines) of a run's metrics.jsonl, by step, last line per step."""
    train, evals = {}, {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        if not line.strip():
            continue
        entry = json.loads(line)
        if "loss" in entry:
            train[entry["step"]] = entry
        elif "eval_loss" in entry or "eval_f1" in entry:
            evals[entry["step"]] = entry
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """TensorBoard-style debiased exponential moving average; the weight follows the number of points."""
    if weight is None:
        weight = min(0.9, max(0.0, 1 - 4 / max(len(values), 1)))
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight else v)
    return out


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders: each path that holds a metrics.jsonl, or every such folder below it."""
    runs = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").exists():
            runs.append(p)
        else:
            runs.extend(sorted(f.parent for f in p.rglob("metrics.jsonl") if "checkpoints" not in f.parts))
    return list(dict.fromkeys(runs))


def _labels(runs: list[Path]) -> list[str]:
    """Short names: the part of each path below the runs' common folder (e.g. last2/seed-0)."""
    if len(runs) == 1:
        return [runs[0].resolve().name]
    parts = [r.resolve().parts for r in runs]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return ["/".join(p[common:]) for p in parts]


def plot(runs: list[Path], target: Path, title: str | None = None) -> Path:
    """Draw the runs' curves into `target` (PNG); one colour per run."""
    fig = plt.figure(figsize=(15, 8), layout="constrained")
    grid = fig.add_gridspec(2, 6)
    ax_loss, ax_lr, ax_speed = (fig.add_subplot(grid[0, 2 * i:2 * i + 2]) for i in range(3))
    ax_f1, ax_eloss = fig.add_subplot(grid[1, :3]), fig.add_subplot(grid[1, 3:])
    single = len(runs) == 1
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    max_step, max_epoch = 1, 1
    for i, (run, label) in enumerate(zip(runs, _labels(runs))):
        colour = colours[i % len(colours)]
        train, evals = read_log(run)
        steps = [e["step"] for e in train]
        if train:
            loss = [e["loss"] for e in train]
            ax_loss.plot(steps, loss, color=colour, alpha=0.3 if len(train) > 1 else 1, lw=1,
                         marker="o" if len(train) < 3 else None, label="raw" if single else None)
            if len(train) > 2:
                ax_loss.plot(steps, smooth(loss), color=colour, lw=2, label="smoothed" if single else label)
            elif not single:
                ax_loss.plot([], [], color=colour, lw=2, label=label)
            ax_lr.plot(steps, [e["lr"] for e in train], color=colour, lw=2, label=label,
                       marker="o" if len(train) < 3 else None)
            if any("samples_per_s" in e for e in train):
                ax_speed.plot(steps, [e.get("samples_per_s", float("nan")) for e in train], color=colour, lw=1.5,
                              marker="." if len(train) < 30 else None, label=label)
        epochs = [e["epoch"] for e in evals]
        max_step = max([max_step, *steps])
        max_epoch = max([max_epoch, *[int(x) for x in epochs]])
        for ax, key, style in ((ax_f1, "eval_f1", "-"), (ax_f1, "eval_accuracy", "--"), (ax_eloss, "eval_loss", "-")):
            values = [e.get(key, float("nan")) for e in evals]
            if values:
                name = {"eval_f1": "F1", "eval_accuracy": "accuracy"}.get(key, label)
                ax.plot(epochs, values, color=colour, marker="o" if style == "-" else "s", ls=style, lw=2,
                        label=name if single else (label if key != "eval_accuracy" else None))
                if single:
                    for x, y in zip(epochs, values):
                        ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center",
                                    fontsize=9)
    for ax, name, xlabel in ((ax_loss, "training loss", "optimizer step"), (ax_lr, "learning rate", "optimizer step"),
                             (ax_speed, "training samples/s", "optimizer step"),
                             (ax_f1, "eval F1 (solid) and accuracy (dashed)", "epoch"),
                             (ax_eloss, "eval loss", "epoch")):
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if xlabel == "epoch":  # whole epochs only, with room for the value labels
            ax.set_xticks(range(1, max_epoch + 1)) if max_epoch <= 12 else None
            ax.set_xlim(0.5, max_epoch + 0.5)
            ax.margins(y=0.25)
        else:
            ax.set_xlim(0, max_step * 1.03 + 1)
        if ax.get_legend_handles_labels()[0] and (single and ax in (ax_loss, ax_f1) or not single and ax is ax_lr):
            ax.legend(fontsize=9)
    ax_f1.set_ylim(-0.02, 1.08)  # scores on their whole scale: a flat 0.5 is chance, not a trend
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_speed.set_ylim(bottom=0)
    fig.suptitle(title or ("training curves: " + ", ".join(_labels(runs)) if single else f"{len(runs)} runs"),
                 fontsize=13)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def plot_run(run_dir: Path) -> Path:
    """curves.png of one run folder."""
    return plot([Path(run_dir)], Path(run_dir) / FILE, title=f"{Path(run_dir).name}")


def main(argv: list[str] | None = None) -> int:
    """`bert-ft-plot RUN_DIR...`: one run's curves, or several runs overlaid (a comparison's policies)."""
    import argparse
    import os

    from ..core.errors import ToolkitError

    parser = argparse.ArgumentParser(
        prog="bert-ft-plot",
        description="Draw training curves from run folders' metrics.jsonl (several runs: overlaid).")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run folders, or folders searched for them (e.g. a comparison's OUTPUT_DIR)")
    parser.add_argument("--output", "-o", default=None,
                        help="PNG to write (default: RUN_DIR/curves.png for one run, else curves.png in the runs' "
                             "common folder)")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    runs = find_runs(args.runs)
    if not runs:
        raise ToolkitError(f"no metrics.jsonl in or below {', '.join(args.runs)}",
                           "pass run folders written by train (or a folder that holds them)")
    if args.output:
        target = Path(args.output)
    elif len(runs) == 1:
        target = runs[0] / FILE
    else:
        target = Path(os.path.commonpath([str(r.resolve()) for r in runs])) / FILE
    plot(runs, target, title=args.title or (runs[0].name if len(runs) == 1 else None))
    print(f"{len(runs)} run(s) drawn in {target}")
    return 0
