"""Fine-tune a BERT-class classifier.

    accelerate launch launch/train.py --freeze last2
    python launch/train.py --task imdb --freeze none --epochs 2
"""

from toolkit.cli import launch
from toolkit.core.config import TrainConfig

if __name__ == "__main__":
    launch("toolkit.train", TrainConfig, __doc__)
