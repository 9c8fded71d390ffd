"""Pages of the documentation written from the code at build time (``make docs``).

* ``_generated/config.md``: every config key with its default and meaning, from
  :data:`experiments.configs.common.TRAINING_KEYS`, the fields and docstring of
  :class:`empf_jax.models.NetOptions` (``config.model``) and :data:`variants.VARIANTS`.
* ``_generated/api/<module>.md``: one API page per module of the ``empf_jax`` package, found by
  walking the package, so a new module gets its page without an edit here.
* ``_generated/quickstart.ipynb``: ``docs/quickstart.ipynb``, the notebook of ``notebooks/``
  executed with its outputs (``docs/execute_notebook.py``), after checking that its cells are the
  notebook's (Sphinx reads only files below ``docs/``; the build executes nothing).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pathlib
import pkgutil
import re


def _attributes(doc: str) -> dict[str, str]:
  """The ``Attributes:`` section of a Google-style docstring (``inspect.getdoc``: entries
  indented two spaces, their continuations four) as {name: text}."""
  section = doc.split("Attributes:", 1)[1]
  out: dict[str, str] = {}
  name = None
  for line in section.splitlines()[1:]:
    match = re.match(r"^  (\w+): (.*)$", line)
    if match:
      name = match.group(1)
      out[name] = match.group(2).strip()
    elif name and line.startswith("    "):
      out[name] += " " + line.strip()
    elif line.strip():
      break
  return out


def _cell(value: object) -> str:
  """Docstring text as a Markdown table cell (Sphinx roles kept as code spans)."""
  text = re.sub(r":(?:data|class|func|mod|meth|attr):`~?([^`]+)`", r"`\1`", str(value))
  return text.replace("|", "\\|").replace("\n", " ")


def config_page() -> str:
  """The config reference in MyST Markdown."""
  from empf_jax import models
  from experiments.configs import common, variants

  rows = ["| key | default | meaning |", "|---|---|---|"]
  for key, (default, meaning) in common.TRAINING_KEYS.items():
    rows.append(f"| `{key}` | `{default!r}` | {_cell(meaning)} |")
  model_rows = ["| key | default | meaning |", "|---|---|---|"]
  described = _attributes(inspect.getdoc(models.NetOptions) or "")
  defaults = common.model_config()
  for field in dataclasses.fields(models.NetOptions):
    if field.name in models.SET_FROM_DATA:
      continue
    meaning = described.get(field.name, "")
    model_rows.append(f"| `model.{field.name}` | `{defaults[field.name]!r}` | {_cell(meaning)} |")
  variant_rows = ["| variant | what it is | keys it sets |", "|---|---|---|"]
  for name, (meaning, changes) in variants.VARIANTS.items():
    keys = ", ".join(f"`{k}={v!r}`" for k, v in changes.items()) or "none"
    variant_rows.append(f"| `{name}` | {_cell(meaning)} | {keys} |")
  return "\n".join(
    [
      "# Config reference",
      "",
      "Every key of a training config, with the default of "
      "`experiments/configs/common.py` (each dataset config changes some of them). Override any "
      "key with `--config.KEY=VALUE`; a key that does not exist is an error that names the "
      "closest one. This page is written from the code when the documentation is built "
      "(`docs/generate.py`).",
      "",
      "## Training keys",
      "",
      *rows,
      "",
      "## Model keys (`config.model`)",
      "",
      "The options of `empf_jax.models.NetOptions`, which also checks them; `num_classes`, "
      "`in_channels` and `in_features` come from the data and `time_steps` from "
      "`config.time_steps`.",
      "",
      *model_rows,
      "",
      "## Variants",
      "",
      "`--config=experiments/configs/<dataset>.py:VARIANT` applies one of these to the "
      "dataset's config.",
      "",
      *variant_rows,
      "",
    ]
  )


def api_modules() -> list[str]:
  """Every module of the ``empf_jax`` package, in name order."""
  import empf_jax

  names = ["empf_jax"]
  for info in pkgutil.walk_packages(empf_jax.__path__, "empf_jax."):
    names.append(info.name)
  return sorted(names)


def module_summary(module: str) -> str:
  """The first paragraph of a module's docstring, on one line, roles turned into code spans."""
  doc = (importlib.import_module(module).__doc__ or "").strip().split("\n\n")[0]
  return re.sub(r":\w+:`~?([^`]+)`", r"`\1`", " ".join(doc.split())).replace("|", "\\|")


def api_page(module: str) -> str:
  importlib.import_module(module)
  return "\n".join([f"# `{module}`", "", "```{eval-rst}", f".. automodule:: {module}", "```", ""])


def executed_notebook(source: pathlib.Path) -> str:
  """The executed copy of the quickstart notebook; raises if its cells are not the notebook's."""
  import json

  def cells(path: pathlib.Path) -> list[tuple[str, str]]:
    notebook = json.loads(path.read_text())
    return [(c["cell_type"], "".join(c["source"])) for c in notebook["cells"]]

  notebook, executed = source.parent / "notebooks" / "quickstart.ipynb", source / "quickstart.ipynb"
  if cells(notebook) != cells(executed):
    raise RuntimeError(
      f"{executed} is not the executed {notebook}: run python docs/execute_notebook.py"
    )
  return executed.read_text()


def scaling_tables(root: pathlib.Path) -> str:
  """The scaling page's tables: the records of ``benchmarks/results/communication.json`` and the
  step times :mod:`benchmarks.communication`'s model predicts from them."""
  import json

  from benchmarks import communication

  result = json.loads((root / "benchmarks" / "results" / "communication.json").read_text())
  return communication.predictions(result)


def write_pages(source: pathlib.Path) -> None:
  """Writes the generated pages under ``source/_generated`` (only files whose text changed)."""
  out = source / "_generated"
  pages = {
    out / "config.md": config_page(),
    out / "quickstart.ipynb": executed_notebook(source),
    out / "scaling_tables.md": scaling_tables(source.parent),
  }
  modules = api_modules()
  for module in modules:
    pages[out / "api" / f"{module}.md"] = api_page(module)
  toctree = ["```{toctree}", ":maxdepth: 1", "", *[f"{m}" for m in modules], "```"]
  pages[out / "api" / "index.md"] = "\n".join(
    [
      "# API reference",
      "",
      "Every module of the `empf_jax` package with the docstrings of its public functions and "
      "classes (Google style, rendered by napoleon). What each holds, from the first paragraph of "
      "its docstring:",
      "",
      "| module | what it holds |",
      "|---|---|",
      *[f"| [`{m}`]({m}.md) | {module_summary(m)} |" for m in modules],
      "",
      *toctree,
      "",
    ]
  )
  for path, text in pages.items():
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
      path.write_text(text)
