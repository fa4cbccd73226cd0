"""Train several freeze policies with the same settings and write a comparison report.

    python launch/compare.py --task imdb-subset --policies none,last2,head --output-dir runs/compare
    accelerate launch launch/compare.py --policies none,last2,head --mixed-precision fp16

Every training option passes through to each run (train.py --help lists them). OUTPUT_DIR gets
one run folder per policy plus report.md, report.png and report.json; running the command again
with the same --output-dir reuses the finished runs and trains only the missing ones.
Exit status: 0 all policies finished, 1 some failed (see the report), 2 bad input, 75 preempted.
"""

from toolkit.cli import launch
from toolkit.compare import CompareConfig, main

if __name__ == "__main__":
    launch(main, CompareConfig, __doc__)
