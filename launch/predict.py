"""Classify texts with a trained model (label and probability per text).

    python launch/predict.py --model runs/x --input reviews.txt --output predictions.csv
    python launch/predict.py --model runs/x/model --input reviews.csv --text-column review
    echo "a wonderful film" | python launch/predict.py --model runs/x
"""

from toolkit.cli import launch
from toolkit.core.config import PredictConfig

if __name__ == "__main__":
    launch("toolkit.predict", PredictConfig, __doc__)
