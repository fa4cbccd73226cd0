"""report.png: train time and F1 per policy, side by side, readable at a glance."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters, in CI or in a launcher's child process
import matplotlib.pyplot as plt

from .report import pct

COLORS = {"none": "#4c72b0", "head": "#55a868"}
LAST_COLOR = "#dd8452"


def _model_name(model: str) -> str:
    path = Path(model)
    # a package's model folder is often just "model": its parent names it
    return path.parent.name if path.name == "model" and path.parent.name else path.name or model


def write_chart(report: dict, path: Path) -> None:
    runs = report["runs"]
    names = [r["policy"] for r in runs]
    ys = list(range(len(runs)))[::-1]  # first policy on top, as in the table
    colors = [COLORS.get(n, LAST_COLOR) for n in names]
    fig, (ax_time, ax_f1) = plt.subplots(1, 2, figsize=(11, 1.6 + 0.75 * len(runs)), sharey=True)

    times = [r["train_runtime_s"] or 0 for r in runs]
    ax_time.barh(ys, times, color=colors)
    ax_time.set_title("train time (s), lower is better", loc="left", fontsize=11)
    top = max(times) or 1
    ax_time.set_xlim(0, top * 1.45)
    f1s = [r["f1"] or 0 for r in runs]
    ax_f1.barh(ys, f1s, color=colors)
    ax_f1.set_title("F1 on the eval set, higher is better", loc="left", fontsize=11)
    ax_f1.set_xlim(0, 1.18)

    for y, r in zip(ys, runs):
        if r["f1"] is None:
            for ax, x in ((ax_time, top * 0.02), (ax_f1, 0.02)):
                ax.text(x, y, f"{r['status'].upper()} (see report.md)", va="center", color="#c44e52", fontweight="bold")
            continue
        speed = f"  ({r['speedup_vs_none']:.1f}x faster)" if r["speedup_vs_none"] and r["policy"] != "none" else ""
        ax_time.text(r["train_runtime_s"] + top * 0.02, y, f"{r['train_runtime_s']:.1f} s{speed}", va="center")
        change = f"  ({r['f1_change_vs_none']:+.3f})" if r["f1_change_vs_none"] is not None and r["policy"] != "none" else ""
        ax_f1.text(r["f1"] + 0.01, y, f"{r['f1']:.3f}{change}", va="center")

    labels = [f"{r['policy']}\n{pct(r['trainable_pct'])} trained" if r["trainable_pct"] is not None else r["policy"]
              for r in runs]
    ax_time.set_yticks(ys, labels)
    for ax in (ax_time, ax_f1):
        ax.spines[["top", "right"]].set_visible(False)
    s = report["settings"]
    fig.suptitle(f"Freeze policies on {report['task']}: {_model_name(report['model'])}, {report['hardware']}",
                 x=0.01, ha="left", fontsize=12, fontweight="bold")
    fig.text(0.01, 0.01, f"{s['train_examples']} train / {s['eval_examples']} eval examples, max length "
             f"{s['max_length']}, {s['epochs']} epoch(s), mixed precision {s['mixed_precision']}; "
             "train time excludes evaluation", fontsize=8, color="#555555")
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
