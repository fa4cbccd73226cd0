"""The learning-rate search's report: expected-best curves, its report.md section and search.png (no training)."""

from __future__ import annotations

import copy
import itertools
import statistics

import pytest

from toolkit.report.search import (
    expected_max,
    expected_max_curve,
    policy_curves,
    search_figure,
    search_markdown,
    write_search_chart,
)

SCORES = [0.5, 0.7, 0.7, 0.9]


def _rung(f1: float, degenerate: bool = False) -> dict:
    return {"validation_f1": f1, "by_seed": {"42": f1}, "degenerate": degenerate}


def _arm(lr: float, rungs: dict, reached: int | None, score: float | None, pruned: bool = False,
         diverged: bool = False, degenerate: bool = False, train_s: float = 10.0) -> dict:
    return {"lr": lr, "rungs": rungs, "reached_step": reached, "pruned": pruned, "diverged": diverged,
            "degenerate": degenerate, "score": score, "train_s": train_s}


def make_search() -> dict:
    """Two policies: `none` (one pruned arm, one pruned one-class arm, the chosen arm, one that diverged after
    the first rung) and `lora`, whose arms all diverged before the first rung."""
    none = {"policy": "none", "grid": [1e-5, 3e-5, 1e-4, 3e-4],
            "grid_reason": "full fine-tuning and lastN: 1e-5..3e-4",
            "chosen_lr": 1e-4, "chosen_step": 45, "chosen_validation_f1": 0.81, "status": "ok",
            "cost_s": 120.5, "full_grid_cost_s": 210.0,
            # listed out of lr order on purpose: tables and lines sort by lr
            "arms": [_arm(1e-4, {"15": _rung(0.7), "45": _rung(0.81)}, 45, 0.81, train_s=60.0),
                     _arm(1e-5, {"15": _rung(0.53)}, 15, 0.53, pruned=True),
                     _arm(3e-5, {"15": _rung(0.333, degenerate=True)}, 15, 0.333, pruned=True, degenerate=True),
                     _arm(3e-4, {"15": _rung(0.6)}, 15, None, diverged=True, train_s=40.5)]}
    lora = {"policy": "lora", "grid": [1e-4, 1e-3], "grid_reason": "LoRA adapters: 1e-4..1e-3",
            "chosen_lr": None, "chosen_step": None, "chosen_validation_f1": None, "status": "all arms diverged",
            "cost_s": 30.0, "full_grid_cost_s": 60.0,
            "arms": [_arm(1e-4, {}, None, None, diverged=True, train_s=15.0),
                     _arm(1e-3, {}, None, None, diverged=True, train_s=15.0)]}
    return {"eta": 3, "budget_steps": 45, "rungs": [15, 45], "search_seeds": [42], "device": "cpu", "world_size": 1,
            "policies": [none, lora], "cost_s": 150.5, "full_grid_cost_s": 270.0, "saved_s": 119.5,
            "gpu_hours": None}


def _brute_force(scores: list[float], n: int) -> float:
    """Mean of the best score over every one of the N^n equally likely ordered draws."""
    return statistics.fmean(max(draw) for draw in itertools.product(scores, repeat=n))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_expected_max_matches_enumerating_every_draw(n):
    assert expected_max(SCORES, n) == pytest.approx(_brute_force(SCORES, n), abs=1e-12)


def test_expected_max_by_hand():
    # n = 2: P(max = v_i) = (2i - 1) / 16 -> (0.5 + 3·0.7 + 5·0.7 + 7·0.9) / 16
    assert expected_max(SCORES, 2) == pytest.approx(12.4 / 16)
    assert expected_max([0.4], 5) == pytest.approx(0.4)


def test_expected_max_curve_starts_at_the_mean_and_rises_to_the_max():
    curve = expected_max_curve(SCORES)
    assert len(curve) == 4
    assert curve[0] == pytest.approx(statistics.fmean(SCORES))
    assert all(b >= a for a, b in zip(curve, curve[1:]))
    assert curve[-1] < 0.9
    assert expected_max(SCORES, 200) == pytest.approx(0.9, abs=1e-12)


@pytest.mark.parametrize("scores, n", [([], 1), ([0.5], 0), ([0.5, 0.6], -1)])
def test_expected_max_refuses_nothing_to_draw(scores, n):
    with pytest.raises(ValueError):
        expected_max(scores, n)


def test_policy_curves_count_diverged_arms_as_zero_and_skip_policies_without_arms():
    search = make_search()
    search["policies"].append({**copy.deepcopy(search["policies"][1]), "policy": "head", "arms": []})
    curves = policy_curves(search)
    assert list(curves) == ["none", "lora"]
    assert curves["none"] == pytest.approx([_brute_force([0.81, 0.53, 0.333, 0.0], n) for n in (1, 2, 3, 4)])
    assert curves["none"] == pytest.approx([0.41825, 9.319 / 16, 42.371 / 64, 181.195 / 256])
    assert curves["lora"] == [0.0, 0.0]


def _row(md: str, policy: str, lr: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| `{policy}` | {lr} |"))


def test_search_markdown_cells():
    md = search_markdown(make_search())
    assert md.startswith("## Learning-rate search\n")
    assert "never the test split" in md and "eta 3" in md and "steps 15, 45" in md and "search seed 42" in md
    assert "| policy | lr | F1 @ step 15 | F1 @ step 45 | reached step | note |" in md
    assert _row(md, "none", "0.0001") == "| `none` | 0.0001 | 0.700 | 0.810 | 45 | chosen |"
    assert _row(md, "none", "1e-05") == "| `none` | 1e-05 | 0.530 |  | 15 | pruned at step 15 |"
    assert _row(md, "none", "3e-05") == ("| `none` | 3e-05 | 0.333 (one class) |  | 15 | "
                                         "pruned at step 15; one class predicted |")
    assert _row(md, "none", "0.0003") == "| `none` | 0.0003 | 0.600 |  | 15 | diverged |"
    assert _row(md, "lora", "0.001") == "| `lora` | 0.001 |  |  | — | diverged |"
    # the arm table lists arms by lr within each policy
    arm_rows = [line.split(" | ")[1] for line in md.splitlines() if line.startswith("| `none` | ") and "@" not in line]
    assert arm_rows[:4] == ["1e-05", "3e-05", "0.0001", "0.0003"]
    assert sum("chosen" in line for line in md.splitlines() if line.startswith("| `")) == 1

    # cost: 1 - 120.5 / 210 = 42.6 %; 1 - 30 / 60 = 50.0 %; total 119.5 / 270 = 44.3 %
    assert ("| `none` | 0.0001 | 4 | 120.5 | 210.0 | 42.6 % | 0.418 / 0.582 / 0.662 / 0.708 |") in md
    assert "| `lora` | — | 2 | 30.0 | 60.0 | 50.0 % | 0.000 / 0.000 |" in md
    assert "Search total: 150.5 s of training, against an estimated 270.0 s" in md
    assert "halving saved 119.5 s (44.3 %)" in md
    assert "GPU-hours" not in md

    # the failed policy is said out loud, and stays in the tables
    assert "**lora**: all arms diverged — no learning rate chosen." in md
    assert "**none**:" not in md
    assert "- `lora`: grid 0.0001, 0.001 (LoRA adapters: 1e-4..1e-3); no rate chosen." in md
    assert "- `none`: grid 1e-05, 3e-05, 0.0001, 0.0003 (full fine-tuning and lastN: 1e-5..3e-4); chosen 0.0001 " \
           "(validation F1 0.810 at step 45)." in md


def test_search_markdown_gpu_hours_and_escaped_cells():
    search = make_search()
    search.update(device="cuda", world_size=2, gpu_hours=150.5 * 2 / 3600)
    search["policies"][0]["policy"] = "a|b"
    md = search_markdown(search)
    assert " 0.084 GPU-hours (2 GPUs × 150.5 s)." in md
    assert "cuda, 2 processes" in md
    assert "| `a\\|b` | 0.0001 | 0.700 | 0.810 | 45 | chosen |" in md


def test_search_markdown_without_halving():
    search = make_search()
    search.update(eta=1, rungs=[45])
    md = search_markdown(search)
    assert "no halving (eta 1): every arm trained for the full 45 steps" in md
    assert "| policy | lr | F1 @ step 45 | reached step | note |" in md


def _by_gid(ax, gid: str):
    found = [line for line in ax.lines if line.get_gid() == gid]
    assert len(found) == 1, gid
    return found[0]


def test_search_figure_left_panel():
    search = make_search()
    fig = search_figure(search)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_title(loc="left") == "validation F1 by learning rate"
    assert ax.get_xlabel() and ax.get_ylabel()
    policy_lines = {line.get_label(): line for line in ax.lines if line.get_gid() is None}
    assert list(policy_lines) == ["none", "lora (all arms diverged)"]
    none = policy_lines["none"]
    # in lr order; the diverged arm has no score, so the line skips it
    assert list(none.get_xdata()) == pytest.approx([1e-5, 3e-5, 1e-4])
    assert list(none.get_ydata()) == pytest.approx([0.53, 0.333, 0.81])
    assert len(policy_lines["lora (all arms diverged)"].get_xdata()) == 0

    pruned = _by_gid(ax, "arm:none:1e-05")
    assert pruned.get_marker() == "o" and pruned.get_markerfacecolor() == "none"
    assert list(pruned.get_ydata()) == pytest.approx([0.53])
    one_class = _by_gid(ax, "arm:none:3e-05")
    assert one_class.get_marker() == "X" and one_class.get_markerfacecolor() == "none"  # pruned as well
    kept = _by_gid(ax, "arm:none:0.0001")
    assert kept.get_marker() == "o" and kept.get_markerfacecolor() != "none"
    for gid, lr in [("arm:none:0.0003", 3e-4), ("arm:lora:0.0001", 1e-4), ("arm:lora:0.001", 1e-3)]:
        diverged = _by_gid(ax, gid)
        assert diverged.get_marker() == "v", gid
        assert list(diverged.get_xdata()) == pytest.approx([lr]) and list(diverged.get_ydata()) == [0.0]
    star = _by_gid(ax, "chosen:none")
    assert star.get_marker() == "*"
    assert list(star.get_xdata()) == pytest.approx([1e-4]) and list(star.get_ydata()) == pytest.approx([0.81])
    assert not [line for line in ax.lines if line.get_gid() == "chosen:lora"]
    assert sum(line.get_marker() == "v" for line in ax.lines) == 3

    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["none", "lora (all arms diverged)", "chosen lr", "pruned by halving", "one class predicted",
                      "diverged"]


def test_search_figure_legend_names_only_the_markers_drawn():
    search = make_search()
    del search["policies"][1]
    search["policies"][0]["arms"] = [a for a in search["policies"][0]["arms"] if not a["diverged"]]
    legend = [t.get_text() for t in search_figure(search).axes[0].get_legend().get_texts()]
    assert "diverged" not in legend and "pruned by halving" in legend


def test_search_figure_right_panel():
    search = make_search()
    ax = search_figure(search).axes[1]
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines) == ["none", "lora"]
    assert list(lines["none"].get_xdata()) == [1, 2, 3, 4]
    assert list(lines["none"].get_ydata()) == pytest.approx(policy_curves(search)["none"])
    assert list(lines["lora"].get_ydata()) == [0.0, 0.0]


def test_write_search_chart_writes_a_png(tmp_path):
    path = tmp_path / "search.png"
    write_search_chart(make_search(), path)
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 0
