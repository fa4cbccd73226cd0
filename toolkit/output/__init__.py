"""What a run shows and writes beside its results: the console, library logs, trackers, curves.

`console` (RunLog: rich tables and the progress bar on rank 0, metrics.jsonl), `library_logs`
(quiet datasets / transformers / DeepSpeed output unless --verbose), `trackers` (--report-to:
TensorBoard, W&B, MLflow, trackio through Accelerate), `curves` (curves.png and the plot command),
`run_dir` (the run folder every rank agrees on, predictions.csv). May import core only; the
commands and the engine, data and back-end layers import it.
"""
