"""Tokenize once, train warm: build the datasets cache that launch/train.py with the same options reuses.

    python launch/prepare_data.py --model bert-base-cased --task amazon --data-dir DATA --max-length 128 \
        --cache-dir /shared/hf-cache
    accelerate launch launch/train.py --model bert-base-cased --task amazon --data-dir DATA --max-length 128 \
        --cache-dir /shared/hf-cache ...

Needs only the model's tokenizer and config (no weights) and no GPU.
"""

from toolkit.cli import launch
from toolkit.core.config import PrepareConfig

if __name__ == "__main__":
    launch("toolkit.prepare", PrepareConfig, __doc__)
