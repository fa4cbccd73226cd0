"""Every exit status a command returns, and what it means: the one place they are defined.

A batch script reads them to decide what to do next: 75 is the only status worth a requeue.
Under `accelerate launch` the launcher reports any worker failure as 1; the worker's own status
is in its failure summary.
"""

OK = 0
SOME_RUNS_FAILED = 1  # compare: at least one (policy, seed) run failed; the others finished (see report.md)
BAD_INPUT = 2  # ToolkitError: found before training (or a tracker that cannot start); nothing written
DIVERGED = 3  # non-finite loss or eval, or fp16 skipping on and on: not 0 (no result), not 75 (it would diverge again)
SAVE_FAILED = 4  # a checkpoint could not be written (disk full, read-only, something in the way)
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C: the step finished and a checkpoint was saved
PREEMPTED = 75  # EX_TEMPFAIL, "try again later": a stop request was honoured and a checkpoint saved; requeue

MEANINGS = {
    OK: "finished",
    SOME_RUNS_FAILED: "compare: some runs failed (see the report)",
    BAD_INPUT: "bad input, before training; nothing written",
    DIVERGED: "training diverged (non-finite loss or eval)",
    SAVE_FAILED: "a checkpoint could not be written",
    PREEMPTED: "preempted: checkpointed, requeue to continue",
    INTERRUPTED: "interrupted by Ctrl-C: checkpointed, --resume-from auto continues",
}
