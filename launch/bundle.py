"""Bundle what a node without network needs to train: wheels, tokenizer, data rows, scripts and run.sh.

    python launch/bundle.py --output-dir gpu-bundle --model PATH --data-dir ../shared/data \
        --task imdb-subset --train-samples 8000 --eval-samples 2000 \
        --python-version 3.12 --skip-installed node-freeze.txt
    # on the node (node-freeze.txt from `python3 -m pip list --format=freeze` there):
    bash gpu-bundle/run.sh python3 benchmarks/gpu_check.py

Run it where pip reaches a package index, from the venv whose versions you tested (see docs/slurm.md).
"""

from toolkit.bundle import BundleConfig
from toolkit.cli import launch

if __name__ == "__main__":
    launch("toolkit.bundle", BundleConfig, __doc__)
