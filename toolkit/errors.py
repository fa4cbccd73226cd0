"""One exception type for every user-facing problem.

Launch scripts catch it, print the message (problem + fix) and exit with status 2,
before any training starts and before anything is written that could look like a
valid checkpoint.
"""


class ToolkitError(Exception):
    """A problem the user can fix: `problem` says what is wrong, `fix` what to do."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  fix: {fix}" if fix else problem)
