"""What the documents say about the code agrees with the code: one source for each fact."""

import pathlib
import re
import tomllib

import pytest

from experiments.configs import common, variants

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_states_the_python_version_pyproject_requires():
  required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
  stated = re.search(r"Python >= (\d+\.\d+)", (ROOT / "README.md").read_text())
  assert stated and f">={stated.group(1)}" == required


def test_the_training_page_names_every_config_variant():
  page = (ROOT / "docs" / "training.md").read_text()
  listed = re.search(r"Variants \(.*?\): (.*?)\. ", page, re.S)
  assert listed, "the variant list of docs/training.md is gone"
  assert re.findall(r"`(\w+)`", listed.group(1)) == list(variants.VARIANTS)


@pytest.mark.parametrize("name", list(variants.VARIANTS))
def test_a_variant_sets_the_keys_it_describes(name):
  meaning, changes = variants.VARIANTS[name]
  config = variants.apply(common.base_config(), name)
  base = common.base_config()
  changed = {
    f"{section}.{key}" if section else key
    for section, node in (("", config), ("model", config.model))
    for key in node
    if not hasattr(node[key], "keys")
    and node[key] != (base[key] if not section else base[section][key])
  }
  assert changed == set(changes)
  assert f"{name}: {meaning}" in variants.describe()


def test_an_unknown_variant_names_the_allowed_ones():
  with pytest.raises(ValueError, match="'ternary'.*default, ternary_parallel_4bit"):
    variants.apply(common.base_config(), "ternary")


def _docs_generator():
  import importlib.util

  spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_config_page_describes_every_key():
  """docs/generate.py writes the page from the code; every key needs a meaning there."""
  page = _docs_generator().config_page()
  rows = {
    line.split("|")[1].strip(" `"): line.split("|")[3].strip()
    for line in page.splitlines()
    if line.startswith("| `")
  }
  flat = [f"model.{k}" for k in common.base_config().model] + [
    k for k in common.base_config() if k != "model"
  ]
  for key in flat:
    assert key in rows, f"config.{key} is missing from the config page"
    assert rows[key], f"config.{key} has no meaning: describe it (TRAINING_KEYS or NetOptions)"


def test_every_public_object_of_the_library_has_a_docstring():
  import importlib
  import inspect

  missing = []
  for name in _docs_generator().api_modules():
    module = importlib.import_module(name)
    assert module.__doc__, f"module {name} has no docstring"
    for attr, value in vars(module).items():
      if attr.startswith("_") or getattr(value, "__module__", None) != name:
        continue
      if (inspect.isfunction(value) or inspect.isclass(value)) and not inspect.getdoc(value):
        missing.append(f"{name}.{attr}")
  assert not missing, missing


def test_the_documentation_shows_the_notebook_as_committed():
  """docs/quickstart.ipynb is the notebook executed; the docs build refuses a stale copy."""
  _docs_generator().executed_notebook(ROOT / "docs")


def test_the_benchmark_modules_import_each_other_without_a_circle():
  import ast

  graph = {}
  for path in (ROOT / "benchmarks").glob("*.py"):
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
        imported |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
        imported.add(node.module.split(".")[1])
    graph[path.stem] = imported

  def visit(module, path):
    for child in graph.get(module, ()):
      assert child not in path, f"import circle: {' -> '.join([*path, child])}"
      visit(child, [*path, child])

  for module in graph:
    visit(module, [module])
