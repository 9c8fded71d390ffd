"""Writes ``docs/quickstart.ipynb``: the quickstart notebook executed, with its outputs.

The notebook in ``notebooks/`` is committed without outputs; the documentation shows this
executed copy (the docs build executes nothing). ``docs/generate.py`` refuses a copy whose cells
differ from the notebook's, so after editing the notebook run::

    python docs/execute_notebook.py

The install cell (tag ``skip-in-tests``) is not run: the environment has the package.
"""

import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
EXECUTED = ROOT / "docs" / "quickstart.ipynb"
SKIP_TAG = "skip-in-tests"


def main() -> None:
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  run = nbformat.from_dict(notebook)
  run.cells = [cell for cell in run.cells if SKIP_TAG not in cell.metadata.get("tags", [])]
  NotebookClient(
    run, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
  ).execute()
  executed = iter(run.cells)
  for cell in notebook.cells:
    if SKIP_TAG not in cell.metadata.get("tags", []):
      done = next(executed)
      if cell.cell_type == "code":
        cell.outputs, cell.execution_count = done.outputs, done.execution_count
  nbformat.write(notebook, EXECUTED)
  print(f"wrote {EXECUTED}")


if __name__ == "__main__":
  main()
