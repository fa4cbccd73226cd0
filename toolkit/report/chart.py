"""report.png: F1 against train time per policy (means, spread, Pareto front) beside bars of each."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters, in CI or in a launcher's child process
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from .stats import pct

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
           "#64b5cd"]


def _model_name(model: str) -> str:
    path = Path(model)
    # a package's model folder is often just "model": its parent names it
    return path.parent.name if path.name == "model" and path.parent.name else path.name or model


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (less time, more F1), fastest first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _errors(values: list[tuple[float, float, float]]) -> list[list[float]]:
    """(mean, low, high) -> matplotlib's [[below], [above]] error lengths."""
    return [[m - lo for m, lo, _ in values], [hi - m for m, _, hi in values]]


def _f1_interval(p: dict) -> tuple[float, float]:
    # a t interval of few seeds can pass 0 or 1 (e.g. with a degenerate run); F1 cannot
    lo, hi = p["f1"]["ci95"] or (p["f1"]["mean"],) * 2
    return max(lo, 0.0), min(hi, 1.0)


def figure(report: dict) -> Figure:
    done = [p for p in report["policies"] if p["n"]]
    colors = {p["policy"]: PALETTE[i % len(PALETTE)] for i, p in enumerate(report["policies"])}
    seeds = report["seeds"]
    fig = plt.figure(figsize=(14, 4.2 + 0.35 * max(len(report["policies"]), 3)))
    grid = fig.add_gridspec(1, 3, width_ratios=(2.2, 1, 1), wspace=0.08)
    ax = fig.add_subplot(grid[0])
    ax_time, ax_f1 = fig.add_subplot(grid[1]), fig.add_subplot(grid[2])

    # F1 (mean, 95 % CI) against train time (mean, min-max over seeds)
    f1 = [(p["f1"]["mean"], *_f1_interval(p)) for p in done]
    time = [(p["train_runtime_s"]["mean"], p["train_runtime_s"]["min"], p["train_runtime_s"]["max"]) for p in done]
    xs, ys = [t[0] for t in time], [f[0] for f in f1]
    front = pareto_front(list(zip(xs, ys)))
    if len(front) > 1:
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="#999999", lw=1.2, zorder=1,
                label="Pareto front (no policy is both faster and better)")
    for i, p in enumerate(done):
        ax.errorbar(xs[i], ys[i], xerr=[[xs[i] - time[i][1]], [time[i][2] - xs[i]]],
                    yerr=[[ys[i] - f1[i][1]], [f1[i][2] - ys[i]]], fmt="none", ecolor=colors[p["policy"]],
                    elinewidth=1.5, capsize=4, alpha=0.8, zorder=2)
    ax.scatter(xs, ys, s=[90 if i in front else 55 for i in range(len(done))], c=[colors[p["policy"]] for p in done],
               edgecolors="black", linewidths=[1.4 if i in front else 0.4 for i in range(len(done))], zorder=3)
    # neighbours along the time axis get their labels on alternate sides, so 8 policies stay legible
    for rank, i in enumerate(sorted(range(len(done)), key=lambda j: xs[j])):
        p = done[i]
        label = p["policy"] + (f" ({p['degenerate']} degenerate)" if p["degenerate"] else "")
        ax.annotate(label, (xs[i], ys[i]), xytext=(7, 8 if rank % 2 == 0 else -15), textcoords="offset points",
                    fontsize=9, fontweight="bold" if i in front else "normal", color="#222222", zorder=4)
    ax.set_xlabel("train time (s), mean; bars: min–max over seeds")
    ax.set_ylabel("F1 on the eval set, mean; bars: 95 % CI (within 0–1)" if len(seeds) > 1 else "F1 on the eval set")
    ax.set_title("F1 against train time: up and left is better", loc="left", fontsize=11)
    if xs:
        span = (max(t[2] for t in time) - min(t[1] for t in time)) or max(xs) or 1
        ax.set_xlim(max(0, min(t[1] for t in time) - 0.15 * span), max(t[2] for t in time) + 0.3 * span)
        lo, hi = min(f[1] for f in f1), max(f[2] for f in f1)
        pad = max(0.05, 0.15 * (hi - lo))
        ax.set_ylim(max(0, lo - pad), min(1.05, hi + pad))
    if len(front) > 1:
        ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.grid(alpha=0.3)

    # the bars: one per policy, first policy on top as in the table
    policies = report["policies"]
    pos = list(range(len(policies)))[::-1]
    bar_colors = [colors[p["policy"]] for p in policies]
    t_mean = [p["train_runtime_s"]["mean"] or 0 for p in policies]
    t_err = _errors([(m, p["train_runtime_s"]["min"] or m, p["train_runtime_s"]["max"] or m)
                     for m, p in zip(t_mean, policies)])
    ax_time.barh(pos, t_mean, xerr=t_err, color=bar_colors, capsize=3, error_kw={"elinewidth": 1})
    ax_time.set_title("train time (s), min–max", loc="left", fontsize=11)
    top = max([p["train_runtime_s"]["max"] or 0 for p in policies] or [1]) or 1
    ax_time.set_xlim(0, top * 1.5)
    f_mean = [p["f1"]["mean"] or 0 for p in policies]
    f_err = _errors([(m, *_f1_interval(p)) if p["n"] else (m, m, m) for m, p in zip(f_mean, policies)])
    ax_f1.barh(pos, f_mean, xerr=f_err, color=bar_colors, capsize=3, error_kw={"elinewidth": 1})
    ax_f1.set_title("F1, 95 % CI" if len(seeds) > 1 else "F1 (one seed)", loc="left", fontsize=11)
    ax_f1.set_xlim(0, 1.45)
    ax_f1.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    for y, p in zip(pos, policies):
        if not p["n"]:
            for axis in (ax_time, ax_f1):
                axis.text(0.02 * axis.get_xlim()[1], y, "FAILED (see report.md)", va="center", color="#c44e52",
                          fontweight="bold", fontsize=9)
            continue
        vs = p["vs_baseline"] if p["policy"] != report["baseline"] else None
        speed = f" ({vs['speedup']['mean']:.1f}×)" if vs and vs["speedup"]["mean"] else ""
        ax_time.text((p["train_runtime_s"]["max"] or 0) + top * 0.03, y, f"{p['train_runtime_s']['mean']:.0f} s{speed}",
                     va="center", fontsize=9)
        change = f" ({vs['f1_change']['mean']:+.3f})" if vs else ""
        ax_f1.text(_f1_interval(p)[1] + 0.02, y, f"{p['f1']['mean']:.3f}{change}", va="center", fontsize=9)
    labels = [f"{p['policy']}\n{pct(p['trainable_pct'])} trained" if p["trainable_pct"] is not None else p["policy"]
              for p in policies]
    ax_time.set_yticks(pos, labels, fontsize=9)
    ax_f1.set_yticks(pos, [""] * len(pos))
    ax_f1.tick_params(left=False)
    for axis in (ax, ax_time, ax_f1):
        axis.spines[["top", "right"]].set_visible(False)

    s = report["settings"]
    fig.suptitle(f"Freeze policies on {report['task']}: {_model_name(report['model'])}, {report['hardware']}",
                 x=0.01, ha="left", fontsize=12, fontweight="bold")
    seeds_text = (f"{len(seeds)} training seeds ({', '.join(map(str, seeds))})" if len(seeds) > 1
                  else f"one seed ({seeds[0]}): no spread measured")
    fig.text(0.01, 0.01, f"{seeds_text}; {s['train_examples']} train / {s['eval_examples']} eval examples, max length "
             f"{s['max_length']}, {s['epochs']} epoch(s), lr {s['lr']}, mixed precision {s['mixed_precision']}; "
             "train time excludes evaluation", fontsize=8, color="#555555")
    fig.subplots_adjust(left=0.05, right=0.99, top=0.88, bottom=0.16)
    return fig


def write_chart(report: dict, path: Path) -> None:
    fig = figure(report)
    fig.savefig(path, dpi=110)
    plt.close(fig)
