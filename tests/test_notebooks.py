"""Run every tutorial notebook in notebooks/ top to bottom; any cell error fails the test.

The notebooks check their own claims with asserts (the chunked scan equals the loop, sampling
logits equal the teacher-forced pass, ...), so executing them is the test. They are committed
with their outputs, so the figures show on the repository page; regenerate those with
`jupyter nbconvert --to notebook --execute --inplace notebooks/*.ipynb` after a change.
Needs nbformat, nbclient and ipykernel (all come with `jupyter`); skipped without them.
"""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


pytestmark = pytest.mark.notebooks   # 2:22 in all: `pytest -m notebooks` (pytest.ini)


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {ROOT / 'notebooks'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_without_errors(path, monkeypatch):
    # The kernel is a child process and inherits this environment: one thread keeps the run
    # short and steady on a shared 2-core machine (the notebooks also call set_num_threads(1)).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()   # raises CellExecutionError (with the cell and traceback) on any error
