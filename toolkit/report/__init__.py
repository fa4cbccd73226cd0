"""The comparison report: statistics over the runs' files, report.md / report.json, report.png.

`stats` computes the numbers (mean, std, t interval, paired differences, degenerate runs) from the
run folders, `markdown` writes report.md and report.json, `chart` draws report.png; markdown and
chart never import each other. May import core only; only the compare command imports it.
"""
