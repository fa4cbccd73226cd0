"""report.json (for scripts) and report.md (for people) from summary.collect()'s numbers."""

from __future__ import annotations

from pathlib import Path

from ..core.config import save_json
from .stats import pct


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _mean_std(s: dict, spec: str) -> str:
    if s["mean"] is None:
        return "—"
    return f"{s['mean']:{spec}} ± {s['std']:{spec}}" if s["std"] is not None else f"{s['mean']:{spec}}"


def _ci(s: dict, spec: str) -> str:
    return f"[{s['ci95'][0]:{spec}}, {s['ci95'][1]:{spec}}]" if s["ci95"] else "—"


def _range(s: dict, spec: str, suffix: str = "") -> str:
    if s["mean"] is None:
        return "—"
    if s["n"] == 1:
        return f"{s['mean']:{spec}}{suffix}"
    return f"{s['mean']:{spec}}{suffix} ({s['min']:{spec}}–{s['max']:{spec}})"


def _bytes(n) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _seed_cell(ref: dict | None) -> str:
    if not ref:
        return "—"
    f1 = f"F1 ≈ {ref['f1']:.2f}" if ref.get("approximate") else f"F1 {ref['f1']:.3f}"
    return f"{ref['train_time_s']} s · {f1}" if ref.get("train_time_s") else f1


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _seeds(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def _verdict(p: dict, baseline: str) -> str | None:
    vs = p["vs_baseline"]
    if vs is None or p["policy"] == baseline:
        return None
    change, speed = vs["f1_change"], vs["speedup"]
    text = f"- `{p['policy']}` vs `{baseline}`: ΔF1 {change['mean']:+.4f}"
    if change["ci95"]:
        lo, hi = change["ci95"]
        text += f", 95 % CI [{lo:+.4f}, {hi:+.4f}] over {change['n']} paired seeds: "
        text += ("**inside the noise** (the interval includes 0: these seeds cannot tell the two apart)"
                 if vs["inside_noise"] else f"**{'lower' if hi < 0 else 'higher'} F1 beyond the noise** "
                                            "(the interval excludes 0)")
    else:
        text += " on one seed: no interval, so it may be seed noise"
    if speed["mean"] is not None:
        text += (f"; {speed['mean']:.2f}× as fast" +
                 (f" ({speed['min']:.2f}–{speed['max']:.2f}× per seed)" if speed["n"] > 1 else ""))
    if vs["pairs_with_degenerate"]:
        text += f"; {vs['pairs_with_degenerate']} of the {change['n']} seed pairs contain a degenerate run"
    return text + "."


def markdown(report: dict) -> str:
    s, baseline, seeds = report["settings"], report["baseline"], report["seeds"]
    many = len(seeds) > 1
    searched = report.get("search") is not None
    lr_text = ("lr per policy, chosen on the validation split (see *Learning-rate search* below)" if searched
               else f"lr {s['lr']}")
    valid_text = f"{s['validation_examples']} validation / " if s.get("validation_examples") else ""
    lines = [f"# Freeze-policy comparison: {report['task']}", "",
             (f"Model `{report['model']}` · hardware: {report['hardware']} · mixed precision {s['mixed_precision']} · "
              f"{s['train_examples']} train / {valid_text}{s['eval_examples']} eval examples (data seed "
              f"{s['data_seed']}, the same rows for every run) · max length {s['max_length']} · {s['epochs']} epoch(s) "
              f"· {lr_text} · batch "
              f"size {s['batch_size']} · training seed{'s' if many else ''} {_seeds(seeds)} (head init, dropout, batch "
              "order)"),
             ""]
    if not many:
        lines += ["**One seed only: no standard deviation or confidence interval.** A difference between policies "
                  "may be seed noise (BERT fine-tuning varies by several F1 points between seeds); pass "
                  "`--seeds 42,43,44` or `--repeats 3` to measure it.", ""]
    if report["mixed_world_sizes"]:
        lines += [f"**The runs used different numbers of processes ({', '.join(map(str, report['world_sizes']))})**: "
                  "their speeds and batches are not like for like.", ""]
    vs = f"vs `{baseline}`" if baseline else "vs baseline"
    head = ["policy", "runs", *(["lr"] if searched else []), "F1 mean ± std",
            "F1 95 % CI", "accuracy mean ± std", "train time (min–max)",
            "train samples/s", "trainable params", "peak memory", "optimizer state", f"ΔF1 {vs} (paired)",
            "ΔF1 95 % CI", f"speed-up {vs} (min–max)", "degenerate"]
    reference = report["seed_reference_label"]
    head += [reference] if reference else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for p in report["policies"]:
        runs = f"{p['n']}/{len(p['seeds'])}" + (f" ({len(p['failed'])} failed)" if p["failed"] else "")
        trainable = "—" if p["trainable_params"] is None else f"{p['trainable_params']:,} ({pct(p['trainable_pct'])})"
        cmp = p["vs_baseline"] if p["policy"] != baseline else None
        degenerate = "—" if not p["n"] else f"{p['degenerate']}" + (
            f" (seed {_seeds(p['degenerate_seeds'])}; F1 without: {_mean_std(p['f1_without_degenerate'], '.4f')})"
            if p["degenerate"] else "")
        speed = "—" if cmp is None else _range(cmp["speedup"], ".2f", "×")
        cells = [f"`{p['policy']}`", runs, *([_fmt(p["lr"], "g")] if searched else []), _mean_std(p["f1"], ".4f"),
                 _ci(p["f1"], ".4f"),
                 _mean_std(p["accuracy"], ".4f"), _range(p["train_runtime_s"], ".1f", " s"),
                 _mean_std(p["train_samples_per_s"], ".1f"), trainable, _bytes(p["peak_memory_bytes"]),
                 _bytes(p["optimizer_state_bytes"]),
                 "—" if cmp is None else f"{cmp['f1_change']['mean']:+.4f}",
                 "—" if cmp is None else _ci(cmp["f1_change"], "+.4f"),
                 speed, degenerate]
        cells += [_seed_cell(p["seed_reference"])] if reference else []
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    verdicts = [v for p in report["policies"] if baseline and (v := _verdict(p, baseline))]
    if verdicts:
        lines += ["", *verdicts]
    degenerate = [p for p in report["policies"] if p["degenerate"]]
    for p in degenerate:
        lines.append(f"- `{p['policy']}`: {p['degenerate']} of {p['n']} runs **degenerate** (one class predicted for "
                     f"every eval example; seed {_seeds(p['degenerate_seeds'])}): F1 mean "
                     f"{_fmt(p['f1']['mean'], '.4f')} with them, {_fmt(p['f1_without_degenerate']['mean'], '.4f')} "
                     f"without ({p['f1_without_degenerate']['n']} "
                     f"run{'s' if p['f1_without_degenerate']['n'] != 1 else ''}).")
    lines += ["", ("Statistics over the training seeds: std is the sample standard deviation (n − 1); the 95 % CI of a "
                   "mean is mean ± t·std/√n with Student's t at n − 1 degrees of freedom (none for one seed). "
                   f"ΔF1 is paired: per seed, F1 of the policy − F1 of `{baseline or 'the baseline'}` on that same "
                   "seed, then the mean and t interval of those differences; speed-up is per seed, train time of the "
                   "baseline / train time of the policy. Train time counts training steps only (evaluation and "
                   "checkpointing excluded). A degenerate run predicts one class for every eval example "
                   "(read from its predictions.csv); it stays in the means, and its count and the F1 without it are "
                   "given beside them."),
              ("Peak memory: " + (", ".join(report["memory_kinds"]) or "not recorded") +
               ", the largest over the run's processes and seeds, counted from the start of each run; optimizer "
               "state: bytes of the optimizer's state tensors (AdamW moments) on one process. Every run is a "
               "process of its own, so its peak is its own, not what earlier runs left behind.")]
    if reference:
        lines.append("The last column quotes the figures the seed experiments published (bert-base-cased on one T4 "
                     "GPU, the full preset subset) for reference; they were not measured here.")
    lines += ["", "## Every run", "",
              "| policy | seed | status | F1 | accuracy | eval loss | train time | train samples/s | eval samples/s | "
              "predicted classes | peak memory | processes |", "|---|---:|---|" + "---:|" * 9]
    for r in report["runs"]:
        status = r["status"] if not r["error"] else f"{r['status']}: {r['error']}"
        status += " (degenerate)" if r["degenerate"] else ""
        classes = "—" if r["predicted_classes"] is None else ", ".join(map(str, r["predicted_classes"]))
        cells = [f"`{r['policy']}`", str(r["seed"]), status, _fmt(r["f1"], ".4f"), _fmt(r["accuracy"], ".4f"),
                 _fmt(r["eval_loss"], ".4f"), _fmt(r["train_runtime_s"], ".1f", " s"),
                 _fmt(r["train_samples_per_s"], ".1f"), _fmt(r["eval_samples_per_s"], ".1f"), classes,
                 _bytes(r["peak_memory_bytes"]), _fmt(r["world_size"], "d")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if searched:
        from .search import search_markdown

        lines += ["", search_markdown(report["search"])]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    save_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
