"""Train several freeze policies over one or more training seeds with the same settings; write a comparison report.

    python launch/compare.py --task imdb-subset --policies none,last2,head --seeds 42,43,44 --output-dir runs/compare
    accelerate launch launch/compare.py --policies none,last2,head --repeats 3 --mixed-precision fp16

Every training option passes through to each run (train.py --help lists them). OUTPUT_DIR gets one
run folder per policy and seed (OUTPUT_DIR/<policy>/seed-<s>/) plus report.md, report.png and
report.json: per policy mean, std, 95 % t interval, paired F1 change and speed-up against 'none',
degenerate runs. Running the command again with the same --output-dir reuses the finished runs and
trains only the missing ones (a policy or a seed added).
Exit status: 0 all policies finished, 1 some failed (see the report), 2 bad input, 75 preempted.
"""

from toolkit.cli import launch
from toolkit.core.config import CompareConfig

if __name__ == "__main__":
    launch("toolkit.compare", CompareConfig, __doc__)
