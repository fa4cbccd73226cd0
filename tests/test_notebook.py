"""The Colab notebook runs top to bottom in a real Jupyter kernel, with its settings pointed at
the tiny CPU configuration through the environment variables it reads."""

from __future__ import annotations

import pytest
from conftest import ROOT, read_json

NOTEBOOK = ROOT / "notebooks" / "colab_quickstart.ipynb"


def test_notebook_runs_headless_and_shows_the_report(tmp_path, minilm, data_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    out = tmp_path / "compare"
    for name, value in {
        "TOOLKIT_SKIP_INSTALL": "1", "TOOLKIT_ROOT": str(ROOT), "TOOLKIT_MODEL": minilm, "TOOLKIT_PRECISION": "no",
        "TOOLKIT_OUTPUT_DIR": str(out),
        "TOOLKIT_EXTRA_ARGS": f"--data-dir {data_dir} --train-samples 48 --eval-samples 24 --max-length 48 "
                              "--batch-size 16 --lr 3e-4 --log-every 100 --cpu",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }.items():
        monkeypatch.setenv(name, value)  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell's output, on any error

    report = {r["policy"]: r for r in read_json(out / "report.json")["runs"]}
    # the notebook's own last2 run was reused by the comparison, the other two were trained
    assert [report[p]["status"] for p in ("none", "last2", "head")] == ["trained", "reused", "trained"]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    shown = [o for o in outputs if o.output_type == "display_data"]
    assert any("image/png" in o.data for o in shown), "the chart is shown inline"
    table = next(o.data["text/markdown"] for o in shown if "text/markdown" in o.data)
    assert "| `last2` | 42 | reused |" in table and "seed write-up" in table
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert printed.count('"label": ') == 2  # predict labelled both example reviews
