"""A local `evaluate` metric for the tests: F1, accuracy and Matthews correlation in plain numpy.

It is written without scikit-learn so the test compares two independent computations (this one,
loaded through evaluate.load from a path, offline, and the toolkit's scikit-learn default set).
"""

import datasets
import evaluate
import numpy as np


class NumpyBinary(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="binary F1 (positive class 1), accuracy and Matthews correlation, in numpy",
            citation="",
            inputs_description="predictions and references: integer class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary"):
        p, r = np.asarray(predictions), np.asarray(references)
        tp = float(np.sum((p == 1) & (r == 1)))
        tn = float(np.sum((p == 0) & (r == 0)))
        fp = float(np.sum((p == 1) & (r == 0)))
        fn = float(np.sum((p == 0) & (r == 1)))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = (tp * tn - fp * fn) / denom if denom else 0.0
        return {"np_f1": f1, "np_accuracy": (tp + tn) / len(p), "np_matthews": float(mcc)}
