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


def test_the_readme_names_every_config_variant():
  readme = (ROOT / "README.md").read_text()
  listed = re.search(r"Variants \(.*?\): (.*?)\. ", readme, re.S)
  assert listed, "the README's variant list is gone"
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
