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
  for path in (ROOT / "benchmarks").rglob("*.py"):
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks"):
        if node.module in ("benchmarks", "benchmarks.investigations"):
          imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        else:
          imported.add(node.module)
    graph[name] = imported
  assert "benchmarks.investigations.profile_cpu" in graph
  assert "benchmarks.throughput" in graph["benchmarks.investigations.profile_cpu"]

  def visit(module, path):
    for child in graph.get(module, ()):
      assert child not in path, f"import circle: {' -> '.join([*path, child])}"
      visit(child, [*path, child])

  for module in graph:
    visit(module, [module])


def _cited_text():
  paths = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "benchmarks" / "README.md"]
  paths += sorted((ROOT / "docs").glob("*.md"))
  return "\n".join(path.read_text() for path in paths)


def test_every_results_file_is_named_by_a_text_and_no_retired_one_remains():
  """Each file in benchmarks/results is named in README, BENCHMARKS.md, the map or the docs
  (a `name*.json` pattern counts); a run moved into the history is gone from the folder and
  names the file that replaced it."""
  from benchmarks import history

  text = _cited_text()
  globs = re.findall(r"[\w.-]+\*[\w.]*", text)
  patterns = [p.replace(".", r"\.").replace("*", r"[\w.-]*") for p in globs]
  names = sorted(p.name for p in history.RESULTS.iterdir() if p.name != history.HISTORY.name)
  for name in names:
    stem = name.partition(".")[0]
    cited = (
      name in text
      or f"{stem}.{{" in text
      or any(re.fullmatch(pattern, name) for pattern in patterns if pattern)
    )
    assert cited, f"benchmarks/results/{name} is named by no text"
  lines = history.read()
  assert lines, "the history is empty"
  for line in lines:
    assert line["file"] not in names, f"{line['file']} is in the history and still in results/"
    assert line["superseded_by"] in names, line
    assert line["record"] and line["reason"], line


def test_retiring_a_run_keeps_its_record_and_refuses_bad_names(tmp_path):
  import json

  from benchmarks import history

  old = {"meta": {"date": "2026-01-01 10:00 UTC", "command": "python -m benchmarks.memory"}, "x": 1}
  (tmp_path / "memory_old.json").write_text(json.dumps(old))
  (tmp_path / "memory.json").write_text("{}")
  with pytest.raises(ValueError, match="names no file"):
    history.retire("memory_old.json", "memory_new.json", "newer", results=tmp_path)
  line = history.retire("memory_old.json", "memory.json", "newer run", results=tmp_path)
  assert not (tmp_path / "memory_old.json").exists()
  assert line["benchmark"] == "memory" and line["date"].startswith("2026-01-01")
  assert history.read(tmp_path / "history.jsonl") == [line]
  assert line["record"] == old
  with pytest.raises(ValueError, match="not a JSON file"):
    history.retire("memory_old.json", "memory.json", "again", results=tmp_path)
