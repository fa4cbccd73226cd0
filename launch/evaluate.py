"""Score a trained model on an eval set (any number of processes).

    python launch/evaluate.py --model runs/x --same-data                  # a run, on its own eval set
    python launch/evaluate.py --model runs/x/checkpoints/step-00000500 --same-data
    python launch/evaluate.py --model runs/x/model --task imdb-subset --data-dir ../shared/data
    python launch/evaluate.py --model runs/x --eval-file reviews.csv --text-column review

--max-length and --eval-batch-size default to what the run used.
"""

from toolkit.cli import launch
from toolkit.core.config import EvalConfig

if __name__ == "__main__":
    launch("toolkit.evaluate", EvalConfig, __doc__)
