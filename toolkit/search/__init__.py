"""The learning-rate search behind `compare --lr-search`: each policy at its own tuned rate.

grids.py    which rates each policy tries, and why those
halving.py  successive halving as pure functions of the rung scores: which arms go on, which rate wins
study.py    the Optuna study (journal file) that records every arm, its rung scores and whether it was pruned

Which trials are due, rung by rung, is decided by the command-level module toolkit/lr_search.py, and
toolkit/workers.py trains them (each in a process of its own). This subpackage imports core and policy
only, and nothing here trains: it may be imported by the commands and by report, never by the layers below
it.
"""
