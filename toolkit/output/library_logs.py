"""What the libraries print: quiet by default, everything with --verbose, nothing but errors on rank != 0.

The toolkit's own output goes through RunLog (main process only). The libraries' output is set
here, once the process knows its rank:
  * datasets: progress bars off ("Flattening the indices", "drop empty", one per split and rank);
    only tokenization shows one, on the main process, for a split big enough to take a while
    (`tokenize_progress`).
  * transformers: no "Loading weights" / "Writing model shards" bars and no load report; the
    toolkit prints one line naming the newly initialised head weights instead (model.load_model).
  * DeepSpeed: accelerate's `unwrap_model` (accelerate/utils/other.py, extract_model_from_parallel)
    imports deepspeed whenever it is installed, just for an isinstance check, and deepspeed's import
    logs "Setting accelerator to CPU" on a machine without a GPU. When DeepSpeed is not in use we
    name that device ourselves (DS_ACCELERATOR=cpu, what it would pick), so the import is silent.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Iterator

# Splits smaller than this tokenize in about a second: no bar for them.
TOKENIZE_BAR_MIN_ROWS = 5000

_main = True
_verbosity = 1


def configure(verbosity: int, is_main: bool, deepspeed_in_use: bool) -> None:
    """verbosity: 0 --quiet, 1 default, 2 --verbose."""
    global _main, _verbosity
    _main, _verbosity = is_main, verbosity
    import datasets
    import transformers

    if not deepspeed_in_use and not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if verbosity >= 2 and is_main:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
        transformers.utils.logging.set_verbosity_warning()
        return
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if not is_main:
        # The same code runs on every rank, so rank 0 already shows any warning; the others keep errors only.
        datasets.utils.logging.set_verbosity_error()
        warnings.simplefilter("ignore")
        for name in ("accelerate", "deepspeed", "torch", "DeepSpeed"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@contextmanager
def tokenize_progress(rows: int) -> Iterator[None]:
    """A progress bar for tokenizing `rows` rows: main process, big splits (or --verbose) only."""
    import datasets
    from datasets.utils.tqdm import are_progress_bars_disabled

    show = _main and (_verbosity >= 2 or (_verbosity >= 1 and rows >= TOKENIZE_BAR_MIN_ROWS))
    was_enabled = not are_progress_bars_disabled()
    if show:
        datasets.enable_progress_bars()
    try:
        yield
    finally:
        if show and not was_enabled:
            datasets.disable_progress_bars()
