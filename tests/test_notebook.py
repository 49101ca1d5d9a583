"""experiments/colab_quickstart.ipynb runs top to bottom in a fresh Jupyter kernel."""
import os
import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  # The kernel is a fresh process: one CPU device (faster than the tests' eight), the repo on
  # its path, and the notebook's outputs (rollout.mp4) in a temporary directory.
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  notebook = nbformat.read(ROOT / "experiments" / "colab_quickstart.ipynb", as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert (tmp_path / "rollout.mp4").stat().st_size > 0
  printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "(9, 32, 32, 3) uint8" in printed and "(9, 48, 48, 3)" in printed
