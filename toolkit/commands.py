"""The installed commands ([project.scripts] in pyproject.toml) and `python -m toolkit COMMAND`.

    bert-ft-train ...        = python -m toolkit train ...    = python launch/train.py ...
    accelerate launch -m toolkit train --freeze last2        (any launcher config, any number of processes)

`accelerate launch` needs a script path or `-m module`; `-m toolkit train` works from any folder
once the package is installed (the console scripts are Python files too:
`accelerate launch "$(which bert-ft-train)" ...` works as well).
"""

from __future__ import annotations

import sys

from .cli import launch, report_error
from .core import exit_codes


def train() -> None:
    """Fine-tune a BERT-class classifier (bert-ft-train --help lists every option)."""
    from .core.config import TrainConfig

    launch("toolkit.train", TrainConfig, "Fine-tune a BERT-class classifier (bert-ft-train, python -m toolkit train).")


def evaluate() -> None:
    from .core.config import EvalConfig

    launch("toolkit.evaluate", EvalConfig,
           "Score a trained model on an eval set (bert-ft-evaluate, python -m toolkit evaluate).")


def predict() -> None:
    from .core.config import PredictConfig

    launch("toolkit.predict", PredictConfig,
           "Classify texts with a trained model (bert-ft-predict, python -m toolkit predict).")


def compare() -> None:
    from .core.config import CompareConfig

    launch("toolkit.compare", CompareConfig,
           "Train several freeze policies and write a comparison report (bert-ft-compare, python -m toolkit compare).")


def bundle() -> None:
    from .bundle import BundleConfig

    launch("toolkit.bundle", BundleConfig,
           "Write a folder a node without network trains from: wheels, tokenizer, data, run.sh "
           "(bert-ft-bundle, python -m toolkit bundle).")


def plot(argv: list[str] | None = None) -> None:
    from .core.errors import ToolkitError
    from .output.curves import main

    try:
        code = main(argv)
    except ToolkitError as err:
        report_error(err.problem, err.fix)
        code = exit_codes.BAD_INPUT
    sys.exit(code)


COMMANDS = {"train": train, "evaluate": evaluate, "predict": predict, "compare": compare, "plot": plot,
            "bundle": bundle}


def dispatch() -> None:
    """python -m toolkit COMMAND [OPTIONS]"""
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m toolkit {{{','.join(COMMANDS)}}} [options]   (COMMAND --help for its options)",
              file=sys.stderr)
        sys.exit(exit_codes.OK if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else exit_codes.BAD_INPUT)
    command = sys.argv.pop(1)
    sys.argv[0] = f"toolkit {command}"
    COMMANDS[command]()
