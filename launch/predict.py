"""Classify texts with a trained model (label and probability per text).

    python launch/predict.py --model runs/x --input reviews.txt --output predictions.csv
    python launch/predict.py --model runs/x/model --input reviews.csv --text-column review
    echo "a wonderful film" | python launch/predict.py --model runs/x
"""

from toolkit.cli import launch
from toolkit.predict import PredictConfig, main

if __name__ == "__main__":
    launch(main, PredictConfig, __doc__)
