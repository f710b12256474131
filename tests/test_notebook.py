"""notebooks/quickstart.ipynb runs from top to bottom (nbclient + ipykernel) and is committed clean."""

import json
import re
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # a kernelspec for this very interpreter, found first: the notebook must not run in another Python
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cosmic_fx tests", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one intra-op thread, as in the rest of the suite (conftest)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell, on any error

    def text(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    code = [c for c in nb.cells if c.cell_type == "code"]
    everything = "\n".join(text(c) for c in code)
    assert "+    cosmic_qci_conv1 = self.cosmic_qci.conv1(conv1)" in everything  # the diff
    losses = [float(v) for v in re.findall(r"epoch \d+: mean loss ([\d.]+)", everything)]
    assert len(losses) >= 3 and losses[-1] < 0.5 * losses[0]  # it learns
    assert "cosmic backend: " in everything and "parameter(s) hooked" in everything
    assert "adapter: identical outputs: True" in everything
    pt2 = float(re.search(r"pt2: max \|difference\| ([\d.e-]+)", everything).group(1))
    assert pt2 <= 1e-5
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the graph diagram and the loss curve
    html = [o for c in code for o in c.outputs if "text/html" in o.get("data", {})]
    assert html and "cosmic_qci" in html[0]["data"]["text/html"]  # the report's table
