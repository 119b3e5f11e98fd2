"""The notebooks in notebooks/ run from top to bottom (so they cannot rot) and are kept in git
without outputs."""

import glob
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]


def test_the_four_notebooks_are_there():
    assert NAMES == ["01_forward_sanity.ipynb", "02_train_and_sample.ipynb", "03_seq2seq_quickstart.ipynb",
                     "04_kernels.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_is_stored_without_outputs(path):
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path}: cell {i} has outputs"
        assert set(cell.get("metadata", {})) == set(), f"{path}: cell {i} carries metadata"
    assert set(nb["metadata"]) <= {"kernelspec", "language_info"}, f"{path}: notebook metadata {nb['metadata']}"
    assert set(nb["metadata"].get("language_info", {})) <= {"name"}, f"{path}: language_info names versions"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_runs(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(path, as_version=4)
    env = {"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel is a child process: it imports this checkout's fastformer
    try:
        client.execute()  # raises CellExecutionError, naming the cell, when one fails (its asserts included)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any(c.outputs for c in nb.cells if c.cell_type == "code")
