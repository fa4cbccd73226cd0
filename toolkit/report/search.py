"""The learning-rate search's report: its section of report.md and search.png, from the search's plain dict.

The search (successive halving over a per-policy grid, scored on the validation split) hands over a
JSON-serialisable dict; nothing here trains or reads run folders, so the report shows exactly what the
search recorded. The expected-best curves follow Dodge et al. (EMNLP 2019, "Show Your Work"): how good
a result a reader should expect from a search that tries only n of the grid's learning rates.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def expected_max(scores: list[float], n: int) -> float:
    """Expected best of n scores drawn i.i.d. with replacement from the observed ones (Dodge et al., 2019).

    With v_1 <= ... <= v_N sorted, P(max of n draws <= v_i) = (i/N)^n, so
    E[max_n] = sum_i v_i * ((i/N)^n - ((i-1)/N)^n); tied scores just share their probability mass.
    """
    if not scores:
        raise ValueError("expected_max needs at least one score")
    if n < 1:
        raise ValueError(f"expected_max needs n >= 1 draws, got {n}")
    values, size = sorted(scores), len(scores)
    return sum(v * ((i / size) ** n - ((i - 1) / size) ** n) for i, v in enumerate(values, start=1))


def expected_max_curve(scores: list[float]) -> list[float]:
    """Expected best score with 1, 2, ..., N arms: how much each further learning rate tried is worth."""
    return [expected_max(scores, n) for n in range(1, len(scores) + 1)]


def _score(arm: dict) -> float:
    # a diverged arm found nothing: it counts as 0 rather than vanishing, which would flatter a fragile grid
    return 0.0 if arm["diverged"] or arm["score"] is None else arm["score"]


def policy_curves(search: dict) -> dict[str, list[float]]:
    """Per policy, the expected best validation F1 with 1..N arms over its arms' scores (diverged arms count 0).

    Each arm's score is taken at the rung it reached, so a pruned arm enters with its early-rung F1: the
    curve describes the search as it ran, not a grid trained to the full budget. A policy without arms is
    left out (there is nothing to draw from).
    """
    return {p["policy"]: expected_max_curve([_score(a) for a in p["arms"]]) for p in search["policies"] if p["arms"]}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _lr(lr: float | None) -> str:
    return "—" if lr is None else f"{lr:g}"


def _rung(arm: dict, step: int) -> dict | None:
    # json.dump turns the int step keys into strings; a dict handed over before that still has ints
    rungs = arm["rungs"]
    return rungs.get(str(step), rungs.get(step))


def _saved_pct(cost: float | None, full: float | None) -> str:
    if cost is None or not full:
        return "—"
    return f"{100 * (full - cost) / full:.1f} %"


def _is_chosen(policy: dict, arm: dict) -> bool:
    return policy["chosen_lr"] is not None and arm["lr"] == policy["chosen_lr"]


def _note(policy: dict, arm: dict) -> str:
    notes = ["chosen"] if _is_chosen(policy, arm) else []
    notes += [f"pruned at step {arm['reached_step']}"] if arm["pruned"] else []
    notes += ["diverged"] if arm["diverged"] else []
    notes += ["one class predicted"] if arm["degenerate"] else []
    return "; ".join(notes)


def _status_line(policy: dict) -> str:
    outcome = ("no learning rate chosen" if policy["chosen_lr"] is None
               else f"lr {_lr(policy['chosen_lr'])} kept as the best of them, read its F1 with care")
    return f"**{policy['policy']}**: {policy['status']} — {outcome}."


def _seeds(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def search_markdown(search: dict) -> str:
    """The '## Learning-rate search' section: how the rates were chosen, every arm, and what the search cost."""
    rungs, seeds, eta = search["rungs"], search["search_seeds"], search["eta"]
    steps = ", ".join(str(s) for s in rungs)
    device = search["device"] + (f", {search['world_size']} processes" if search["world_size"] > 1 else "")
    halving = (f"no halving (eta 1): every arm trained for the full {search['budget_steps']} steps" if eta == 1 else
               f"successive halving with eta {eta}: every arm was scored at steps {steps}, and after each rung only "
               f"about the best 1/{eta} of the arms still running trained on; the others were pruned there")
    f1_of = "the median over the search seeds" if len(seeds) > 1 else "from one search seed"
    lines = ["## Learning-rate search", "",
             (f"Each policy's learning rate was chosen on the **validation split only, never the test split**: one "
              f"arm per learning rate of the policy's grid, search seed{'s' if len(seeds) > 1 else ''} "
              f"{_seeds(seeds)}, on {device}; {halving}. A full run is {search['budget_steps']} optimizer steps. "
              f"Validation F1 is {f1_of}."), ""]
    for p in search["policies"]:
        grid = ", ".join(_lr(lr) for lr in p["grid"])
        chosen = ("no rate chosen" if p["chosen_lr"] is None else
                  f"chosen {_lr(p['chosen_lr'])} (validation F1 {_fmt(p['chosen_validation_f1'], '.3f')} at step "
                  f"{_fmt(p['chosen_step'], 'd')})")
        lines.append(f"- `{p['policy']}`: grid {grid} ({p['grid_reason']}); {chosen}.")
    # a failed policy stays in every table; this line makes sure nobody reads past it
    failed = [_status_line(p) for p in search["policies"] if p["status"] != "ok"]
    lines += ["", *failed] if failed else []

    head = ["policy", "lr", *(f"F1 @ step {s}" for s in rungs), "reached step", "note"]
    lines += ["", "### Every arm", "", "| " + " | ".join(head) + " |",
              "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    for p in search["policies"]:
        for arm in sorted(p["arms"], key=lambda a: a["lr"]):
            scores = []
            for step in rungs:
                rung = _rung(arm, step)
                # an empty cell: the arm never got there (pruned or diverged before it)
                scores.append("" if rung is None else _fmt(rung["validation_f1"], ".3f") +
                              (" (one class)" if rung.get("degenerate") else ""))
            cells = [f"`{p['policy']}`", _lr(arm["lr"]), *scores, _fmt(arm["reached_step"], "d"), _note(p, arm)]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")

    curves = policy_curves(search)
    lines += ["", "### Cost of the search", "",
              "| policy | chosen lr | arms | train s | full grid s (est.) | saved by halving | "
              "expected best validation F1 with 1 / 2 / … arms |", "|---|---:|---:|---:|---:|---:|---|"]
    for p in search["policies"]:
        curve = " / ".join(f"{v:.3f}" for v in curves.get(p["policy"], [])) or "—"
        cells = [f"`{p['policy']}`", _lr(p["chosen_lr"]), str(len(p["arms"])), _fmt(p["cost_s"], ".1f"),
                 _fmt(p["full_grid_cost_s"], ".1f"), _saved_pct(p["cost_s"], p["full_grid_cost_s"]), curve]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")

    cost, full = search["cost_s"], search["full_grid_cost_s"]
    saved = search["saved_s"] if search["saved_s"] is not None else (full - cost if full is not None else None)
    total = (f"Search total: {_fmt(cost, '.1f', ' s')} of training, against an estimated {_fmt(full, '.1f', ' s')} "
             f"for training every arm to {search['budget_steps']} steps: halving saved {_fmt(saved, '.1f', ' s')} "
             f"({_saved_pct(cost, full)}).")
    if search["gpu_hours"] is not None:
        gpus = search["world_size"]
        total += f" {search['gpu_hours']:.3f} GPU-hours ({gpus} GPU{'s' if gpus > 1 else ''} × {cost:.1f} s)."
    lines += ["", total, "",
              ("Expected best validation F1 with n arms (Dodge et al., EMNLP 2019): the expected maximum over n "
               "learning rates drawn at random, with replacement, from the policy's arms, each scored at the rung "
               "it reached (a pruned arm with its early F1); a diverged arm counts as 0, it found nothing. A curve "
               "still rising at the last arm says a wider grid may pay; a flat one says the grid was wide enough.")]
    return "\n".join(lines) + "\n"


def _marker(arm: dict) -> tuple[str, bool]:
    """(marker, filled) of an arm on the left panel."""
    if arm["diverged"]:
        return "v", True
    return ("X" if arm["degenerate"] else "o"), not arm["pruned"]


def search_figure(search: dict) -> Figure:
    """Left: validation F1 by learning rate per policy; right: expected best F1 by arms tried."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters, in CI or in a launcher's child process
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from .chart import PALETTE

    fig, (ax, ax_curve) = plt.subplots(1, 2, figsize=(13, 5))
    handles, kinds = [], set()
    for i, p in enumerate(search["policies"]):
        color = PALETTE[i % len(PALETTE)]
        arms = sorted(p["arms"], key=lambda a: a["lr"])
        # the line joins the arms that have a score; a diverged arm has none, so it is only a marker at 0
        scored = [a for a in arms if not a["diverged"] and a["score"] is not None]
        label = p["policy"] if p["status"] == "ok" else f"{p['policy']} ({p['status']})"
        (line,) = ax.plot([a["lr"] for a in scored], [a["score"] for a in scored], "-", color=color, lw=1.5,
                          label=label, zorder=2)
        handles.append(line)
        for arm in arms:
            marker, filled = _marker(arm)
            # the legend names the marker kinds actually drawn: "v" hides whatever else a diverged arm was
            kinds.update(["diverged"] if arm["diverged"] else [k for k in ("degenerate", "pruned") if arm[k]])
            ax.plot([arm["lr"]], [_score(arm)], linestyle="none", marker=marker, markersize=8 if marker == "o" else 9,
                    color=color, markerfacecolor=color if filled else "none", markeredgecolor=color,
                    markeredgewidth=1.5, gid=f"arm:{p['policy']}:{_lr(arm['lr'])}", zorder=3)
        chosen = next((a for a in arms if _is_chosen(p, a)), None)
        if chosen is not None:
            f1 = p["chosen_validation_f1"] if p["chosen_validation_f1"] is not None else _score(chosen)
            ax.plot([chosen["lr"]], [f1], linestyle="none", marker="*", markersize=18, color=color,
                    markeredgecolor="black", markeredgewidth=0.8, gid=f"chosen:{p['policy']}", zorder=4)
            kinds.add("chosen")
    # one grey legend entry per kind of marker, not one per policy and kind
    proxy = {"color": "#555555", "linestyle": "none"}
    legend_of = {"chosen": Line2D([], [], marker="*", markersize=12, label="chosen lr", **proxy),
                 "pruned": Line2D([], [], marker="o", markerfacecolor="none", label="pruned by halving", **proxy),
                 "degenerate": Line2D([], [], marker="X", label="one class predicted", **proxy),
                 "diverged": Line2D([], [], marker="v", label="diverged", **proxy)}
    handles += [h for kind, h in legend_of.items() if kind in kinds]
    ax.set_xscale("log")
    ax.set_ylim(-0.06, 1.05)  # room for the diverged markers at 0
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("validation F1 at the rung the arm reached")
    ax.set_title("validation F1 by learning rate", loc="left", fontsize=11)
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.8)
    ax.grid(alpha=0.3)

    colors = {p["policy"]: PALETTE[i % len(PALETTE)] for i, p in enumerate(search["policies"])}
    for policy, curve in policy_curves(search).items():
        ax_curve.plot(range(1, len(curve) + 1), curve, "-o", color=colors[policy], markersize=5, label=policy)
    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.set_ylim(-0.06, 1.05)
    ax_curve.set_xlabel("arms tried (learning rates drawn at random from the grid)")
    ax_curve.set_ylabel("expected best validation F1")
    ax_curve.set_title("expected best validation F1 by arms tried (Dodge et al., 2019)", loc="left", fontsize=11)
    if ax_curve.lines:
        ax_curve.legend(loc="lower right", fontsize=8, frameon=False)
    ax_curve.grid(alpha=0.3)
    for axis in (ax, ax_curve):
        axis.spines[["top", "right"]].set_visible(False)

    seeds = search["search_seeds"]
    halving = "no halving" if search["eta"] == 1 else f"successive halving, eta {search['eta']}"
    rungs = ", ".join(str(s) for s in search["rungs"])
    fig.suptitle(f"Learning-rate search on the validation split: {halving}, rungs at steps {rungs}, search "
                 f"seed{'s' if len(seeds) > 1 else ''} {_seeds(seeds)}", x=0.01, ha="left", fontsize=12,
                 fontweight="bold")
    fig.subplots_adjust(left=0.06, right=0.99, top=0.86, bottom=0.12, wspace=0.22)
    return fig


def write_search_chart(search: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = search_figure(search)
    fig.savefig(path, dpi=110)
    plt.close(fig)
