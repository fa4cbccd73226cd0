"""Delays that tests inject through the environment, read here and nowhere else.

Some behaviour is only visible when one thing outlasts another: rank 0's data phase outlasting
the main group's timeout, or a signal landing while an epoch is still running. A test that relies
on real work being slow enough passes or fails with the machine's speed; these delays make the
premise hold by construction on any CPU. Unset (the default) they cost nothing.
"""

from __future__ import annotations

import os
import sys
import time

DATA_PHASE_DELAY_ENV = "TOOLKIT_TEST_DATA_PHASE_DELAY_S"  # rank 0 holds the data phase this long
STEP_DELAY_ENV = "TOOLKIT_TEST_STEP_DELAY_S"  # every optimizer step takes at least this much longer


def seconds(env_name: str) -> float:
    return float(os.environ.get(env_name) or 0)


def hold(env_name: str, what: str) -> None:
    """Sleep for the variable's seconds, saying so on stderr, so a test can see its premise was met."""
    if (delay_s := seconds(env_name)) > 0:
        print(f"{what} held {delay_s:g} s longer ({env_name})", file=sys.stderr, flush=True)
        time.sleep(delay_s)
