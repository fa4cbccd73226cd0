"""launch/train.py with a Ctrl-C pressed during optimizer step STEP of this process (rank 0):

    python tests/sigint_driver.py STEP [train options]      (also under accelerate launch)

A real SIGINT to the process group a terminal would signal: this process's own, or under torchrun
the launcher's (the agent passes it on to the workers). Rank 0 then waits until its own handler has
seen the SIGINT before the step's reduction runs, so the stop lands at step STEP + 1 (or STEP, if another
rank saw it first) whatever the speed of the machine and of the launcher: mid-training, always.
"""

import os
import signal
import sys
import time

from toolkit.backends import preemption
from toolkit.cli import launch
from toolkit.core.config import TrainConfig
from toolkit.engine import loop

if __name__ == "__main__":
    press_at = int(sys.argv.pop(1))
    received = []
    handle, reduce = preemption.StopRequest._handle, loop._step_totals
    steps = 0

    def noting(self, signum, frame):
        received.append(signum)
        return handle(self, signum, frame)

    def pressing(*args, **kwargs):
        global steps
        steps += 1
        if steps == press_at and os.environ.get("RANK", "0") == "0":
            terminal_group = os.getpgid(os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else 0)
            os.killpg(terminal_group, signal.SIGINT)
            deadline = time.monotonic() + 300
            while signal.SIGINT not in received and time.monotonic() < deadline:
                time.sleep(0.01)
        return reduce(*args, **kwargs)

    preemption.StopRequest._handle = noting
    loop._step_totals = pressing
    launch("toolkit.train", TrainConfig, "train, pressing Ctrl-C during one step")
