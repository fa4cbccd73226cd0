"""Score a saved model on a task's eval set (any number of processes).

    python launch/evaluate.py --model runs/x/model --task imdb-subset --data-dir ../shared/data
"""

from toolkit.cli import launch
from toolkit.config import EvalConfig
from toolkit.evaluate import main

if __name__ == "__main__":
    launch(main, EvalConfig, __doc__)
