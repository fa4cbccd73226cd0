"""One exception type for every user-facing problem, and one for a run that cannot give a result.

Launch scripts catch ToolkitError, print the message (problem + fix) and exit with status 2
(exit_codes.BAD_INPUT), before any training starts and before anything is written that could
look like a valid checkpoint.
"""

from . import exit_codes


class ToolkitError(Exception):
    """A problem the user can fix: `problem` says what is wrong, `fix` what to do."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  fix: {fix}" if fix else problem)


class RunFailed(Exception):
    """A run that started but cannot give a valid result (diverged, checkpoint not writable).

    Raised on every rank at once (the ranks agree first), so no rank is left waiting in a
    collective. The launch scripts print `problem` and `fix` and exit with `exit_code`:
    never 0 (nothing valid was produced) and never 75 (a requeue would fail the same way).
    """

    def __init__(self, problem: str, fix: str | None = None, exit_code: int = exit_codes.DIVERGED):
        self.problem = problem
        self.fix = fix
        self.exit_code = exit_code
        super().__init__(f"{problem}\n  fix: {fix}" if fix else problem)
